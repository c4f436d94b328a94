"""Helper processes: the urgent side of postcopy runs in a process of its own.

Theory of operation
-------------------
A CPython thread that a fault wakes must take the GIL from whichever thread is busy
streaming background pages, and on a 2-CPU host every hop of a page request (fault
thread, return path, urgent sender, postcopy channel receiver) paid that price.  With
``x-postcopy-urgent-sender=process`` each side hands the postcopy channel to a helper
process with one thread and nothing else to do (as Firecracker hands its userfaultfd to
an external page-fault handler): the destination's helper owns the userfaultfd and the
postcopy channel, the source's helper owns its end of that channel.

Helpers are forked from a :class:`HelperServer`: a process of the VMM's that has
imported the helpers' modules once (Python, NumPy and livemig cost a fifth of a
CPU-second here) and forks one helper per request in a few milliseconds.  ``livemig
run`` starts it with the VMM, so neither side of a migration pays that import while
precopy runs or, with postcopy from the start, before its switchover; an
:class:`~livemig.instance.Instance` without one starts it at its first helper.

:class:`HelperProcess` (parent side) holds one end of a ``SOCK_SEQPACKET`` control
socket, the server hands the other to the forked helper; messages are JSON objects, and
file descriptors (a userfaultfd, a socket, a memfd) ride along with ``SCM_RIGHTS``.
:func:`run_helper` (child side) runs a helper's ``serve`` function and reports an
exception as ``{"error": ..., "type": ...}``, which the parent raises again as the same
livemig error class.  The server leaves when the VMM closes its socket or dies; a
helper dies with the server (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, Final, Protocol

from livemig import errors
from livemig.errors import ChannelClosedError, LivemigError, MigrationError
from livemig.kernel.mman import Mapping
from livemig.kernel.shared import die_with_parent
from livemig.runtime import NamedThread, name_os_thread

log = logging.getLogger("livemig.helper")

MAX_MESSAGE = 1 << 20
MAX_FDS = 16


class HelperBlock(Protocol):
    """What a helper needs of a RAM block (a vmm RamBlock; a plain mapping in tests)."""

    @property
    def size(self) -> int: ...
    @property
    def host_page_size(self) -> int: ...
    @property
    def mapping(self) -> Mapping: ...


def _send(sock: socket.socket, msg: dict[str, Any], fds: Sequence[int]) -> None:
    socket.send_fds(sock, [json.dumps(msg).encode()], list(fds))


def _recv(sock: socket.socket) -> tuple[dict[str, Any], list[int]]:
    data, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS)
    if not data:
        for fd in fds:
            os.close(fd)
        raise ChannelClosedError("the helper process closed its control socket")
    try:
        return decode_message(data), fds
    except MigrationError:
        for fd in fds:
            os.close(fd)
        raise


def decode_message(data: bytes) -> dict[str, Any]:
    """One control message: a JSON object, or MigrationError."""
    try:
        msg = json.loads(data)
    except (ValueError, RecursionError):
        msg = None
    if not isinstance(msg, dict):
        raise MigrationError(f"bad helper message {data[:80]!r}")
    return msg


def error_from(msg: dict[str, Any]) -> LivemigError:
    """The livemig error a helper reported (its class when it is one of ours)."""
    cls = getattr(errors, str(msg.get("type")), None)
    text = str(msg.get("error"))
    if isinstance(cls, type) and issubclass(cls, LivemigError):
        try:
            return cls(text)
        except TypeError:  # a KernelError needs (op, errno)
            pass
    return MigrationError(f"helper process failed: {msg.get('type')}: {text}")


HELPER_MODULES: Final = ("livemig.migration.urgent", "livemig.migration.faultserver")
SERVER_MODULE: Final = "livemig.migration.helperserver"
SERVER_TIMEOUT: Final = 30.0  # for the server's imports, on a loaded host


def helper_environment() -> dict[str, str]:
    """The VMM's environment, with NumPy's BLAS held to one thread: helpers do no
    linear algebra, and OpenBLAS would otherwise start a thread per CPU while the
    server imports, a third of the CPU its start costs."""
    return {**os.environ, "OPENBLAS_NUM_THREADS": "1"}


def _end(pidfd: int, timeout: float) -> None:
    """Until the process of ``pidfd`` has exited: ``timeout`` seconds, then SIGKILL."""
    if not select.select([pidfd], [], [], timeout)[0]:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        select.select([pidfd], [], [])


class HelperServer:
    """VMM side of the process that forks the helpers (see the module docstring).

    One per VMM process, like :class:`~livemig.runtime.SwitchInterval`.  It comes to
    exist one of two ways, chosen once: a fork of a VMM that has one thread and has
    imported the helpers (``livemig run`` before it starts the VM, through
    :meth:`started_early`: nothing to import), or a fresh ``python -m
    livemig.migration.helperserver`` that imports them (:meth:`start`: an instance in a
    process of other threads, such as a test; also at the first :meth:`launch` when
    nobody started it).  :meth:`close` ends it and the helpers still running."""

    def __init__(self, preload: Sequence[str] = HELPER_MODULES) -> None:
        self._preload = tuple(preload)
        self._lock = threading.Lock()  # one fork request at a time
        self._pid: int | None = None
        self._reap: Callable[[], object] = lambda: None  # waits for the exited server
        self._ctl: socket.socket | None = None
        self._ready = False  # the server said it has imported the helpers

    @property
    def pid(self) -> int | None:
        return self._pid

    @classmethod
    def started_early(cls, preload: Sequence[str] = HELPER_MODULES) -> HelperServer:
        """The server of a VMM that starts: a fork of the calling process if it has one
        thread (a fork keeps only the calling thread: a lock another held would stay
        held), with ``preload`` imported already; a fresh process otherwise."""
        if len(os.listdir("/proc/self/task")) == 1:
            return cls._forked(preload)
        server = cls(preload)
        server.start()
        return server

    @classmethod
    def _forked(cls, preload: Sequence[str]) -> HelperServer:
        server = cls(preload)
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:  # the server
            parent.close()
            try:
                serve_forks(child, preload)
            finally:
                os._exit(0)
        child.close()
        server._pid, server._ctl = pid, parent
        server._reap = lambda: os.waitpid(pid, 0)
        return server

    def start(self) -> None:
        """Start the server as a fresh process (it imports on its own while the caller
        goes on); nothing if it runs."""
        with self._lock:
            self._start()

    def _start(self) -> None:
        if self._pid is not None:
            return
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc = subprocess.Popen(
                # -P: the VMM's own livemig (its path), not one in the working directory.
                [sys.executable, "-P", "-m", SERVER_MODULE, str(child.fileno()),
                 *self._preload],
                pass_fds=[child.fileno()], stdin=subprocess.DEVNULL, env=helper_environment())
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        self._pid, self._ctl, self._reap = proc.pid, parent, proc.wait

    def wait_ready(self) -> None:
        """Until the server has imported the helpers (started if it was not)."""
        with self._lock:
            self._wait_ready()

    def _wait_ready(self) -> None:
        self._start()
        if not self._ready:
            msg, fds = self._answer("import the helpers")
            for fd in fds:
                os.close(fd)
            if msg.get("msg") != "ready":
                raise MigrationError(f"bad answer from the helper server: {msg}")
            self._ready = True

    def _answer(self, what: str) -> tuple[dict[str, Any], list[int]]:
        assert self._ctl is not None
        if not select.select([self._ctl], [], [], SERVER_TIMEOUT)[0]:
            raise MigrationError(f"the helper server did not {what} in "
                                 f"{SERVER_TIMEOUT:.0f} s")
        try:
            return _recv(self._ctl)
        except OSError as e:
            raise ChannelClosedError(f"the helper server is gone: {e}") from None

    def launch(self, module: str, ctl: socket.socket) -> tuple[int, int]:
        """Fork a helper that runs ``module``'s ``serve`` over ``ctl`` (the child's end
        of its control socket): its pid and a pidfd of it."""
        with self._lock:
            self._wait_ready()
            assert self._ctl is not None
            try:
                _send(self._ctl, {"msg": "fork", "module": module}, [ctl.fileno()])
            except OSError as e:
                raise ChannelClosedError(f"the helper server is gone: {e}") from None
            msg, fds = self._answer(f"fork {module}")
        if "error" in msg:
            for fd in fds:
                os.close(fd)
            raise error_from(msg)
        if len(fds) != 1 or not isinstance(msg.get("pid"), int):
            for fd in fds:
                os.close(fd)
            raise MigrationError(f"bad answer from the helper server: {msg}")
        return msg["pid"], fds[0]

    def close(self, timeout: float = 5.0) -> None:
        """The server leaves when its socket closes; its helpers die with it."""
        with self._lock:
            if self._pid is None or self._ctl is None:
                return
            pidfd = os.pidfd_open(self._pid)
            self._ctl.close()
            try:
                _end(pidfd, timeout)
            finally:
                os.close(pidfd)
            self._reap()
            self._pid, self._ctl, self._ready = None, None, False


class HelperProcess:
    """Parent side: one helper process, forked by ``server``, and its control socket."""

    def __init__(self, module: str, server: HelperServer) -> None:
        self.module = module
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.pid, self._pidfd = server.launch(module, child)
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        self.ctl = parent

    def send(self, msg: dict[str, Any], fds: Sequence[int] = ()) -> None:
        try:
            _send(self.ctl, msg, fds)
        except OSError as e:
            raise ChannelClosedError(f"helper {self.module} is gone: {e}") from None

    def recv(self, timeout: float | None = None) -> dict[str, Any]:
        """The next message; a reported error is raised as such."""
        if timeout is not None and not select.select([self.ctl], [], [], timeout)[0]:
            raise MigrationError(f"helper {self.module} did not answer in {timeout:.0f} s")
        msg, fds = _recv(self.ctl)
        for fd in fds:
            os.close(fd)
        if "error" in msg:
            raise error_from(msg)
        return msg

    def expect(self, kind: str, timeout: float | None = None) -> dict[str, Any]:
        msg = self.recv(timeout)
        if msg.get("msg") != kind:
            raise MigrationError(f"helper {self.module} sent {msg.get('msg')!r}, "
                                 f"expected {kind!r}")
        return msg

    def close(self, timeout: float = 5.0) -> None:
        """Ask the helper to stop, then make sure it has (again: nothing)."""
        if self.ctl.fileno() < 0:
            return
        with contextlib.suppress(OSError):
            _send(self.ctl, {"msg": "stop"}, ())
        _end(self._pidfd, timeout)
        os.close(self._pidfd)
        self.ctl.close()


class HelperWatch:
    """Reads a started helper's control socket on a thread of its own: first, with
    ``ready``, the message of that kind (the helper took its start message; what waits
    for it goes on then, see :meth:`when_ready`), then until the one message of
    ``final`` kind comes (kept in :attr:`message`) or the helper fails (its report, or
    its death).  A failure goes to ``on_error`` at once, unless the helper was stopped
    on purpose (:meth:`close`)."""

    def __init__(self, helper: HelperProcess, final: str, name: str,
                 on_error: Callable[[Exception], None], *, ready: str | None = None) -> None:
        self.helper = helper
        self.final = final
        self.message: dict[str, Any] = {}
        self.error: LivemigError | None = None
        self._ready_kind = ready
        self._ready = threading.Event()
        self._then: list[Callable[[], None]] = []  # run once ready, in order
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._stopping = False
        self._on_error = on_error
        self._thread = NamedThread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _expect(self, kind: str) -> dict[str, Any]:
        msg = self.helper.recv()
        if msg.get("msg") != kind:
            raise MigrationError(f"helper {self.helper.module} sent {msg.get('msg')!r}, "
                                 f"expected {kind!r}")
        return msg

    def _run(self) -> None:
        try:
            if self._ready_kind is not None:
                self._expect(self._ready_kind)
            for then in self._set_ready():
                then()
            self.message = self._expect(self.final)
        except LivemigError as e:
            self.error = e
        except OSError as e:
            self.error = ChannelClosedError(f"helper {self.helper.module}: {e}")
        finally:
            self._set_ready()  # a failed helper: waiters wake up to its error
            self._done.set()
        if self.error is not None and not self._stopping:
            self._on_error(self.error)

    def _set_ready(self) -> list[Callable[[], None]]:
        """Mark the helper ready; returns what waited for it (to run, unless failed)."""
        with self._lock:
            self._ready.set()
            then, self._then = self._then, []
        return then

    def when_ready(self, then: Callable[[], None]) -> None:
        """Run ``then`` once the helper is ready: now, or on the watching thread (in
        the order asked); never if it failed first."""
        with self._lock:
            if not self._ready.is_set():
                self._then.append(then)
                return
        if self.error is None:
            then()

    def wait_ready(self, timeout: float) -> None:
        """Until the helper is ready; its failure is raised."""
        if not self._ready.wait(timeout):
            raise MigrationError(f"helper {self.helper.module} did not answer in "
                                 f"{timeout:.0f} s")
        if self.error is not None:
            raise self.error

    def wait(self, timeout: float, what: str) -> dict[str, Any]:
        """The final message; the helper's failure is raised."""
        if not self._done.wait(timeout):
            raise MigrationError(f"helper {self.helper.module}: {what} within "
                                 f"{timeout:.0f} s")
        if self.error is not None:
            raise self.error
        return self.message

    def close(self) -> None:
        """Stop the helper (its end is then no failure) and the watching thread."""
        self._stopping = True
        self.helper.close()
        self._thread.join(5)


class ParentGone(ChannelClosedError):
    """The VMM closed the control socket: nobody is left to report to."""


class HelperConn:
    """Child side of the control socket."""

    def __init__(self, fd: int) -> None:
        self.sock = socket.socket(fileno=fd)

    def send(self, msg: dict[str, Any], fds: Sequence[int] = ()) -> None:
        try:
            _send(self.sock, msg, fds)
        except OSError as e:
            raise ParentGone(str(e)) from None

    def recv(self) -> tuple[dict[str, Any], list[int]]:
        try:
            return _recv(self.sock)
        except ChannelClosedError as e:
            raise ParentGone(str(e)) from None

    def fileno(self) -> int:
        return self.sock.fileno()


def run_helper(serve: Callable[[HelperConn, dict[str, Any], list[int]], None], fd: int,
               name: str) -> None:
    """A forked helper's life (livemig.migration.helperserver): waits on control socket
    ``fd`` for the VMM's first message (its "start", with the fds) and runs ``serve``;
    a "stop" before that just ends the helper.  Never returns."""
    die_with_parent()
    name_os_thread(name)
    conn = HelperConn(fd)
    try:
        msg, fds = conn.recv()
        if msg.get("msg") != "stop":
            serve(conn, msg, fds)
    except ParentGone:
        os._exit(0)
    except Exception as e:
        with contextlib.suppress(OSError):
            _send(conn.sock, {"error": str(e), "type": type(e).__name__}, ())
        # Stay until the VMM has read the report and says stop (or goes): a helper that
        # exits with a message of the VMM's unread makes the VMM's next read fail with
        # ECONNRESET instead of returning the report.
        _linger(conn)
        os._exit(1)
    os._exit(0)


def helper_name(module: str) -> str:
    """The name a helper process has in the kernel (``ps``, ``top``): its module's."""
    return module.rsplit(".", 1)[-1]


def _reap_helpers(_signum: int, _frame: object) -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


def serve_forks(sock: socket.socket, preload: Sequence[str]) -> None:
    """The helper server's loop: imports ``preload`` once, then forks a helper for each
    request until the VMM closes ``sock``.  The server has this one thread, so a fork
    copies nothing another thread was in the middle of."""
    name_os_thread(helper_name(SERVER_MODULE))
    for module in preload:  # a fork then finds them imported
        importlib.import_module(module)
    # Helpers are reaped as they end, so their CPU time adds to this process's
    # (what `ps`, `time` and the benchmarks count as the VMM's).
    signal.signal(signal.SIGCHLD, _reap_helpers)
    try:
        _send(sock, {"msg": "ready"}, ())
    except OSError:
        return
    while True:
        try:
            msg, fds = _recv(sock)
        except (ChannelClosedError, MigrationError, OSError):
            return  # the VMM is gone (or spoke nonsense): so are we
        if msg.get("msg") != "fork" or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            return
        module = str(msg.get("module"))
        try:
            serve = importlib.import_module(module).serve
            pid = os.fork()
        except Exception as e:
            os.close(fds[0])
            _send(sock, {"error": f"cannot start helper {module}: {e}",
                         "type": type(e).__name__}, ())
            continue
        if pid == 0:
            sock.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            run_helper(serve, fds[0], helper_name(module))
        os.close(fds[0])
        pidfd = os.pidfd_open(pid)
        try:
            _send(sock, {"msg": "forked", "pid": pid}, [pidfd])
        finally:
            os.close(pidfd)


def _linger(conn: HelperConn) -> None:
    with contextlib.suppress(Exception):
        while conn.recv()[0].get("msg") != "stop":
            pass
