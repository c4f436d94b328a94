"""livemig's QMP server: QEMU's monitor protocol on a unix socket, for ``qemu.qmp``.

Theory of operation
-------------------
:class:`QmpServer` owns the I/O; the protocol itself lives in
:mod:`livemig.control.protocol` (one :class:`QmpProtocol` per session) and the
commands in :mod:`livemig.control.commands`.

* **Socket.**  ``start()`` removes a stale socket file (never any other kind of
  file), then binds under umask 0177 so the socket is born mode 0600 -- it is never,
  even briefly, reachable by other users -- and listens.  ``close()`` unlinks it again,
  but only if the path still names the socket we bound.
* **Threads.**  One accept thread waits on the listening socket *and* a wake-up
  socketpair, so ``close()`` can stop it without polling.  Each client gets one
  session thread that sends the greeting, then reads, feeds the protocol and writes
  the replies; commands therefore run on that thread, one at a time per session, as
  in QEMU without out-of-band execution.  ``close()`` shuts every session socket
  down (which wakes its blocked ``recv``), then joins the threads with a bound.
* **Writes.**  Replies (session thread) and events (any thread, via ``emit``) share a
  per-session write lock, so lines never interleave.  Events go only to sessions
  past negotiation; the "events on" flag flips under that lock right after the
  ``qmp_capabilities`` reply is written, so no event can overtake that reply (which
  would break a client still negotiating).  Each session socket has a send timeout
  (SO_SNDTIMEO): a client that stops reading is dropped after ``send_timeout``
  seconds instead of blocking ``emit`` forever; a vanished client fails at once.
* **File descriptors.**  Only the session thread closes its socket, under the write
  lock (no send in flight) and a small fd lock shared with ``shutdown``, so a
  concurrent ``close()`` can never shut down a recycled descriptor.

No state is kept at module level: any number of servers can run side by side.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import stat
import struct
import threading
from types import TracebackType
from typing import Any

from livemig.control.commands import CommandTable, Handler, JsonType, Param
from livemig.control.jsonstream import DEFAULT_LIMIT
from livemig.control.protocol import QmpProtocol, Version, event_message
from livemig.errors import ConfigError, QmpError
from livemig.runtime import NamedThread

__all__ = ["CommandTable", "Handler", "JsonType", "Param", "QmpError", "QmpServer"]

_log = logging.getLogger("livemig.qmp")

_RECV_SIZE = 65536
_JOIN_TIMEOUT = 10.0


class _Session:
    """One connected client: its socket, protocol state and write lock."""

    def __init__(self, sock: socket.socket, protocol: QmpProtocol, name: str) -> None:
        self.name = name
        self._sock = sock
        self._protocol = protocol
        self._write_lock = threading.Lock()
        self._fd_lock = threading.Lock()
        self._events_on = False
        self._dead = False
        self.thread: threading.Thread | None = None

    def run(self) -> None:
        """Session thread body: greet, then answer requests until EOF or error."""
        try:
            if not self._write(self._protocol.greeting()):
                return
            while not self._dead:
                data = self._sock.recv(_RECV_SIZE)
                if not data:
                    break
                for reply in self._protocol.handle(data):
                    if not self._write(reply, events_on=self._protocol.negotiated):
                        return
        except OSError as exc:
            _log.info("QMP %s: connection error: %s", self.name, exc)
        except Exception:
            # Protocol code should never raise; if it does, lose this session, not the server.
            _log.exception("QMP %s: session failed", self.name)
        finally:
            self._close_socket()

    def send_event(self, line: bytes) -> None:
        with self._write_lock:
            if self._events_on and not self._dead:
                self._write_locked(line)

    def _write(self, line: bytes, events_on: bool = False) -> bool:
        with self._write_lock:
            ok = self._write_locked(line)
            self._events_on = events_on and ok
            return ok

    def _write_locked(self, line: bytes) -> bool:
        if self._dead:
            return False
        try:
            self._sock.sendall(line)
            return True
        except OSError as exc:
            # Timed out or peer gone; a partial line may have been sent, so the stream
            # is unusable: drop the session and wake its reader.
            _log.warning("QMP %s: dropping client, send failed: %s", self.name, exc)
            self._dead = True
            self.shutdown()
            return False

    def shutdown(self) -> None:
        """Wake the session thread (its recv returns EOF); safe from any thread."""
        with self._fd_lock, contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def _close_socket(self) -> None:
        with self._write_lock, self._fd_lock:
            self._dead = True
            self._sock.close()


class QmpServer:
    """A QMP server on unix socket ``path`` serving ``commands`` (see module doc).

    ``max_input`` bounds one request's size; ``send_timeout`` (seconds, 0 = never)
    is how long a write may stall on a client that does not read before it is dropped.
    """

    def __init__(
        self,
        path: str,
        commands: CommandTable,
        *,
        version: Version = (7, 2, 0),
        package: str = "livemig",
        max_input: int = DEFAULT_LIMIT,
        send_timeout: float = 5.0,
    ) -> None:
        self._path = path
        self._commands = commands
        self._version = version
        self._package = package
        self._max_input = max_input
        self._send_timeout = send_timeout
        self._lock = threading.Lock()
        self._sessions: set[_Session] = set()
        self._session_count = 0
        self._state = "new"  # new -> serving -> closed
        self._listener: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._inode: tuple[int, int] | None = None

    @property
    def path(self) -> str:
        return self._path

    def session_count(self) -> int:
        """Number of connected clients (negotiated or not)."""
        with self._lock:
            return len(self._sessions)

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Bind the socket (mode 0600) and start accepting clients."""
        with self._lock:
            if self._state != "new":
                raise ConfigError(f"QMP server on {self._path} was already started.")
            self._state = "serving"
        self._listener = self._bind()
        self._wake_r, self._wake_w = socket.socketpair()
        self._accept_thread = NamedThread(
            target=self._accept_loop,
            args=(self._listener, self._wake_r),
            name=f"qmp-accept:{self._path}",
            daemon=True,
        )
        self._accept_thread.start()
        _log.info("QMP server listening on %s", self._path)

    def _bind(self) -> socket.socket:
        _remove_stale_socket(self._path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # umask is process-wide; it is only ever narrowed here, for one bind().
            old_umask = os.umask(0o177)
            try:
                listener.bind(self._path)
            finally:
                os.umask(old_umask)
            info = os.lstat(self._path)
            self._inode = (info.st_dev, info.st_ino)
            listener.listen(16)
            listener.setblocking(False)
        except OSError as exc:
            listener.close()
            raise ConfigError(f"Cannot listen for QMP on {self._path}: {exc}.") from exc
        return listener

    def close(self) -> None:
        """Stop accepting, disconnect every client, join threads, unlink the socket."""
        with self._lock:
            if self._state != "serving":
                self._state = "closed"
                return
            self._state = "closed"
            sessions = list(self._sessions)
        self._stop_accepting()
        for session in sessions:
            session.shutdown()
        for session in sessions:
            if session.thread is not None:
                _join(session.thread)
        _log.info("QMP server on %s closed", self._path)

    def _stop_accepting(self) -> None:
        assert self._wake_w is not None and self._wake_r is not None
        assert self._listener is not None
        self._wake_w.send(b"x")
        if self._accept_thread is not None:
            _join(self._accept_thread)
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()
        self._unlink_own_socket()

    def _unlink_own_socket(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            info = os.lstat(self._path)
            if (info.st_dev, info.st_ino) == self._inode:
                os.unlink(self._path)

    def __enter__(self) -> QmpServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- events ----------------------------------------------------------------------

    def emit(self, event: str, data: dict[str, Any] | None = None) -> None:
        """Send event ``event`` to every negotiated client; callable from any thread."""
        line = event_message(event, data)
        with self._lock:
            sessions = list(self._sessions)
        _log.debug("QMP event %s %s to %d client(s)", event, data, len(sessions))
        for session in sessions:
            session.send_event(line)

    # -- accepting -------------------------------------------------------------------

    def _accept_loop(self, listener: socket.socket, wake: socket.socket) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(listener, selectors.EVENT_READ)
            selector.register(wake, selectors.EVENT_READ)
            while True:
                ready = {key.fileobj for key, _ in selector.select()}
                if wake in ready:
                    return
                self._accept_one(listener, wake)

    def _accept_one(self, listener: socket.socket, wake: socket.socket) -> None:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return  # the client gave up between select() and accept()
        except OSError as exc:
            # e.g. EMFILE: the listener stays readable, so pause instead of spinning.
            _log.warning("QMP accept on %s failed: %s", self._path, exc)
            _wait_readable(wake, 0.5)
            return
        self._start_session(conn)

    def _start_session(self, conn: socket.socket) -> None:
        seconds = int(self._send_timeout)
        micros = int((self._send_timeout - seconds) * 1_000_000)
        try:
            conn.setblocking(True)
            conn.setsockopt(
                socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", seconds, micros)
            )
        except OSError as exc:  # never let one bad client end the accept thread
            _log.warning("QMP client on %s rejected: %s", self._path, exc)
            conn.close()
            return
        protocol = QmpProtocol(
            self._commands, version=self._version, package=self._package, max_input=self._max_input
        )
        with self._lock:
            if self._state != "serving":
                conn.close()
                return
            self._session_count += 1
            session = _Session(conn, protocol, f"client#{self._session_count}")
            session.thread = NamedThread(
                target=self._run_session, args=(session,), name=f"qmp-{session.name}", daemon=True
            )
            self._sessions.add(session)
        session.thread.start()
        _log.info("QMP %s connected on %s", session.name, self._path)

    def _run_session(self, session: _Session) -> None:
        try:
            session.run()
        finally:
            with self._lock:
                self._sessions.discard(session)
            _log.info("QMP %s disconnected", session.name)


def _remove_stale_socket(path: str) -> None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise ConfigError(f"Cannot listen for QMP on {path}: it exists and is not a socket.")
    os.unlink(path)


def _wait_readable(sock: socket.socket, timeout: float) -> None:
    with selectors.DefaultSelector() as selector:
        selector.register(sock, selectors.EVENT_READ)
        selector.select(timeout)


def _join(thread: threading.Thread) -> None:
    # A command handler may close the server from its own session thread.
    if thread is threading.current_thread():
        return
    thread.join(_JOIN_TIMEOUT)
    if thread.is_alive():
        _log.warning("QMP thread %s did not stop within %.0f s", thread.name, _JOIN_TIMEOUT)
