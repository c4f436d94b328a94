"""The interactive serial console: stdio or a unix socket, as QEMU's ``-serial``.

Theory of operation
-------------------
A console is two directions of one byte stream.  Guest output reaches it because the
console *is* the UART's sink (``write``/``flush``); user input goes to
:meth:`Serial.feed`, which queues it in the UART's receive FIFO and raises IRQ 4.  The
FIFO is bounded, so a reader thread that got more than fits waits and offers the rest
again (the guest drains the FIFO from its interrupt handler).

``stdio`` reads standard input and writes standard output.  ``unix:PATH`` listens on a
unix socket and serves one client at a time (a new client replaces the old one, as with
QEMU's ``server=on``); with no client, output is dropped.  Either way the console stays
attached across a migration: the destination's console starts where the guest is.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
from typing import BinaryIO, Protocol

from livemig.errors import ConfigError
from livemig.runtime import NamedThread

FEED_RETRY_S = 0.005


class Feed(Protocol):
    def feed(self, data: bytes) -> int: ...


class Console:
    """Base: the thread that moves input into the UART."""

    def __init__(self) -> None:
        self._uart: Feed | None = None
        self._closed = threading.Event()

    def attach(self, uart: Feed) -> None:
        """Start delivering input to ``uart``."""
        self._uart = uart
        NamedThread(target=self._input_loop, name="console-input", daemon=True).start()

    def _input_loop(self) -> None:
        raise NotImplementedError

    def _deliver(self, data: bytes) -> None:
        while data and not self._closed.is_set() and self._uart is not None:
            n = self._uart.feed(data)
            data = data[n:]
            if data:
                time.sleep(FEED_RETRY_S)

    def write(self, data: bytes) -> int:
        raise NotImplementedError

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self._closed.set()


class StdioConsole(Console):
    def __init__(self, stdin: BinaryIO | None = None, stdout: BinaryIO | None = None) -> None:
        super().__init__()
        self._in = stdin if stdin is not None else sys.stdin.buffer
        self._out = stdout if stdout is not None else sys.stdout.buffer

    def _input_loop(self) -> None:
        fd = self._in.fileno()
        while not self._closed.is_set():
            data = os.read(fd, 4096)
            if not data:
                return
            self._deliver(data)

    def write(self, data: bytes) -> int:
        n = self._out.write(data)
        self._out.flush()
        return n


class SocketConsole(Console):
    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            self._server.bind(path)
            self._server.listen(1)
        except OSError as e:
            self._server.close()
            raise ConfigError(f"cannot listen for the console on {path}: {e.strerror}") \
                from None
        self._client: socket.socket | None = None
        self._lock = threading.Lock()

    def _input_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._server.accept()
            except OSError:
                return  # closed
            with self._lock:
                if self._client is not None:
                    self._client.close()
                self._client = conn
            self._serve(conn)

    def _serve(self, conn: socket.socket) -> None:
        while True:
            try:
                data = conn.recv(4096)
            except OSError:
                return
            if not data:
                return
            self._deliver(data)

    def write(self, data: bytes) -> int:
        with self._lock:
            if self._client is not None:
                try:
                    self._client.sendall(data)
                except OSError:
                    self._client.close()
                    self._client = None
        return len(data)

    def close(self) -> None:
        super().close()
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None
        self._server.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def open_console(spec: str) -> Console:
    """``stdio`` or ``unix:PATH``."""
    if spec == "stdio":
        return StdioConsole()
    if spec.startswith("unix:") and len(spec) > 5:
        return SocketConsole(spec[5:])
    raise ConfigError(f"unknown console {spec!r}; use stdio or unix:PATH")
