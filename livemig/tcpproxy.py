"""A forwarding TCP proxy for tests and seed recording (not used by migrations).

Theory of operation
-------------------
:class:`TcpProxy` listens on a free loopback port; every connection it accepts is
forwarded to ``127.0.0.1:target`` by two pump threads, one per direction, and each
direction's bytes are recorded in :attr:`TcpProxy.flows` (``fuzz/record_seeds.py``
takes its seeds from there).  :meth:`TcpProxy.go_silent` turns it into the peer a dead
link or a hung program looks like: from then on it reads nothing and forwards nothing,
yet keeps every connection open, so only a timeout can notice.  Its sockets' receive
buffers are fixed (:data:`BUFFER`), as a hung program's are bounded: with the kernel's
autotuning (up to ``tcp_rmem``'s maximum, 32 MiB on some hosts) a silent proxy could
swallow a whole small guest's remaining pages before the sender ever sees a full
window.  A direction that ends
(EOF) is half-closed on the other side, as the peer would see it.
"""

from __future__ import annotations

import contextlib
import socket
import threading

from livemig.runtime import NamedThread

POLL_S = 0.05  # how often a pump checks whether it should go silent
BUFFER = 256 << 10  # SO_RCVBUF of every proxy socket (set before connect/accept)


class TcpProxy:
    """Forwards TCP connections to ``127.0.0.1:target`` and records both directions."""

    def __init__(self, target: int) -> None:
        self.server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER)  # accepted inherit
        self.server.bind(("127.0.0.1", 0))
        self.server.listen()
        self.port: int = self.server.getsockname()[1]
        self.uri = f"tcp:127.0.0.1:{self.port}"
        self.target = target
        self.flows: list[tuple[bytearray, bytearray]] = []  # (to target, from target)
        self._silent = threading.Event()
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        self._threads = [NamedThread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while True:
            try:
                a, _ = self.server.accept()
            except OSError:
                return
            b = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER)
            b.connect(("127.0.0.1", self.target))
            self._sockets += [a, b]
            up, down = bytearray(), bytearray()
            self.flows.append((up, down))
            for src, dst, log in ((a, b, up), (b, a, down)):
                t = NamedThread(target=self._pump, args=(src, dst, log), daemon=True)
                t.start()
                self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, log: bytearray) -> None:
        src.settimeout(POLL_S)
        with contextlib.suppress(OSError):
            while not self._silent.is_set():
                try:
                    data = src.recv(1 << 16)
                except TimeoutError:
                    continue
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                log += data
                dst.sendall(data)
        self._closed.wait()

    def go_silent(self) -> None:
        """Stop reading and forwarding; keep every connection open."""
        self._silent.set()

    def close(self) -> None:
        """Stop listening, end the pumps, close every connection."""
        self._closed.set()
        self.server.close()
        for t in self._threads:
            t.join(10)
        for s in self._sockets:
            s.close()
