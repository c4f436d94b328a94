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

:class:`HelperProcess` (parent side) starts ``python -m <module> <fd>`` with one end
of a ``SOCK_SEQPACKET`` control socket; messages are JSON objects, and file
descriptors (a userfaultfd, a socket, a memfd) ride along with ``SCM_RIGHTS``.
:func:`helper_main` (child side) runs a helper's ``serve`` function and reports an
exception as ``{"error": ..., "type": ...}``, which the parent raises again as the same
livemig error class.  The child dies with its parent (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from livemig import errors
from livemig.errors import ChannelClosedError, LivemigError, MigrationError
from livemig.kernel.mman import Mapping, keep_freed_buffers
from livemig.kernel.shared import die_with_parent
from livemig.runtime import NamedThread

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


class HelperProcess:
    """Parent side: one helper process and its control socket."""

    def __init__(self, module: str) -> None:
        self.module = module
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen(
                # -P: the VMM's own livemig (its path), not one in the working directory.
                [sys.executable, "-P", "-m", module, str(child.fileno())],
                pass_fds=[child.fileno()], stdin=subprocess.DEVNULL)
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        self.ctl = parent

    @property
    def pid(self) -> int:
        return self.proc.pid

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
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
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


def helper_main(serve: Callable[[HelperConn, dict[str, Any], list[int]], None]) -> None:
    """Entry point of a helper process: ``python -m module <control fd>``.  Waits for
    the VMM's first message (its "start", with the fds) and runs ``serve``; a "stop"
    before that just ends the helper."""
    die_with_parent()
    keep_freed_buffers()  # receive buffers are reused, not mapped and faulted in anew
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    conn = HelperConn(int(sys.argv[1]))
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


def _linger(conn: HelperConn) -> None:
    with contextlib.suppress(Exception):
        while conn.recv()[0].get("msg") != "stop":
            pass
