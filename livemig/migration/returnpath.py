"""The return path: destination -> source messages on the main connection.

Theory of operation
-------------------
A TCP or unix socket is full duplex, so, as in QEMU, the return path reuses the main
channel in the other direction.  On the destination several threads speak on it (the
fault thread asks for pages, the load thread answers PINGs and sends SHUT), so
:class:`ReturnPathWriter` serialises them with a lock.  On the source one thread,
:class:`ReturnPathReader`, owns the receiving direction: it decodes messages with the
sans-IO :class:`~livemig.wire.returnpath.ReturnPathDecoder` (which validates block names
and ranges) and hands page requests to the sender's urgent queue.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from livemig.errors import ChannelClosedError, MigrationError
from livemig.migration.channel import Channel
from livemig.migration.state import detached
from livemig.runtime import NamedThread
from livemig.wire import events as ev
from livemig.wire.blocks import BlockInfo
from livemig.wire.returnpath import (
    Pong,
    RecvBitmap,
    ReqPages,
    ResumeAck,
    ReturnPathDecoder,
    ReturnPathEncoder,
    Shut,
)

log = logging.getLogger("livemig.returnpath")


class ReturnPathWriter:
    """Destination side: thread-safe sending of return-path messages."""

    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        self._enc = ReturnPathEncoder()
        self._lock = threading.Lock()

    def request(self, block: str, start: int, length: int) -> None:
        with self._lock:
            self._channel.send([self._enc.req_pages(block, start, length)])

    def pong(self, value: int) -> None:
        with self._lock:
            self._channel.send([self._enc.pong(value)])

    def shut(self, status: int = 0) -> None:
        with self._lock:
            self._channel.send([self._enc.shut(status)])

    def recv_bitmap(self, block: str, received: npt.NDArray[np.bool_]) -> None:
        """Postcopy recovery: which 4 KiB pages of ``block`` are here."""
        with self._lock:
            self._channel.send([self._enc.recv_bitmap(block, received)])

    def resume_ack(self) -> None:
        with self._lock:
            self._channel.send([self._enc.resume_ack()])


@dataclass(frozen=True)
class PageRequest:
    """A page request queued on the source, with the time it arrived."""

    block: str
    start: int
    length: int
    received_ns: int


class RequestQueue:
    """The source's urgent queue: requests from the return path, served first."""

    def __init__(self) -> None:
        self._q: deque[PageRequest] = deque()
        self._cond = threading.Condition()
        self.total = 0

    def put(self, req: PageRequest) -> None:
        with self._cond:
            self._q.append(req)
            self.total += 1
            self._cond.notify_all()

    def pop(self) -> PageRequest | None:
        with self._cond:
            return self._q.popleft() if self._q else None

    def __len__(self) -> int:
        return len(self._q)

    def wait(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: bool(self._q), timeout)

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()


class ReturnPathReader:
    """Source side: the return-path thread."""

    def __init__(self, channel: Channel, blocks: Mapping[str, BlockInfo],
                 on_request: Callable[[PageRequest], None]) -> None:
        self._channel = channel
        self._dec = ReturnPathDecoder(blocks)
        self._on_request = on_request
        self._cond = threading.Condition()
        self._pongs: set[int] = set()
        self._bitmaps: dict[str, npt.NDArray[np.bool_]] = {}
        self._resume_acked = False
        self.shut_status: int | None = None
        self.error: Exception | None = None
        self.finished = False
        self._thread = NamedThread(target=self._run, name="return-path", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def thread_id(self) -> int:
        """The reading thread's kernel id (once started): it answers page requests in
        the thread designs (livemig.runtime.UrgentPriority)."""
        tid = self._thread.native_id
        assert tid is not None, "start() first"
        return tid

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _wait(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: done() or self.finished, timeout):
                raise MigrationError(f"the destination did not send {what} within "
                                     f"{timeout:.0f} s")
            if not done():
                raise MigrationError(f"the destination closed the return path before "
                                     f"{what}: {self.error}")

    def wait_pong(self, value: int, timeout: float) -> None:
        self._wait(lambda: value in self._pongs, timeout, f"PONG {value}")

    def wait_bitmaps(self, blocks: Collection[str], timeout: float
                     ) -> dict[str, npt.NDArray[np.bool_]] | None:
        """Postcopy recovery: the received-pages bitmap of each of ``blocks``; None if
        the destination answered SHUT 0 instead: it had completed, and its first SHUT
        was lost with the old connection (docs/STREAM.md)."""
        self._wait(lambda: self.shut_status == 0 or all(b in self._bitmaps for b in blocks),
                   timeout, "the received bitmaps")
        if self.shut_status == 0:
            return None
        return {b: self._bitmaps[b] for b in blocks}

    def wait_resume_ack(self, timeout: float) -> None:
        self._wait(lambda: self._resume_acked, timeout, "RESUME_ACK")

    def wait_shut(self, timeout: float) -> None:
        """The destination's SHUT, which must report success (QEMU: a non-zero status
        marks the return path bad and fails the migration)."""
        with self._cond:
            self._cond.wait_for(lambda: self.finished, timeout)
            if self.shut_status is None:
                raise MigrationError(f"no SHUT from the destination: {self.error}")
            if self.shut_status != 0:
                raise MigrationError("the destination failed to load the stream (SHUT "
                                     f"status {self.shut_status})")

    def _run(self) -> None:
        try:
            while True:
                e = self._dec.next_event()
                if e is ev.NEED_DATA:
                    self._dec.receive_data(self._channel.recv(65536))
                    continue
                if isinstance(e, ReqPages):
                    self._on_request(PageRequest(e.block, e.start, e.length,
                                                 time.monotonic_ns()))
                elif isinstance(e, Pong):
                    with self._cond:
                        self._pongs.add(e.value)
                        self._cond.notify_all()
                elif isinstance(e, RecvBitmap):
                    with self._cond:
                        self._bitmaps[e.block] = e.received
                        self._cond.notify_all()
                elif isinstance(e, ResumeAck):
                    with self._cond:
                        self._resume_acked = True
                        self._cond.notify_all()
                elif isinstance(e, Shut):
                    with self._cond:
                        self.shut_status = e.status
                    return
                else:  # Closed: a clean end without SHUT
                    raise ChannelClosedError("return path closed without SHUT")
        except Exception as e:
            log.info("return path ended: %s", str(e))
            self.error = detached(e)  # keep no frames alive
        finally:
            with self._cond:
                self.finished = True
                self._cond.notify_all()
