"""The source's urgent server: a helper process that owns the source end of the
postcopy channel (``x-postcopy-urgent-sender=process``).

Theory of operation
-------------------
The destination's fault server sends page requests on the postcopy channel itself;
this helper reads them there and answers on the same socket: take the requested host
page's dirty bits (shared with the migration thread, under a
:class:`~livemig.kernel.shared.ProcessLock`, so a page is sent by one of the two only),
read the page, send it.  Nothing else runs in this process, so no thread streaming
background pages holds a GIL that a request would wait for.

A requested 4 KiB page is answered even if the migration thread has taken it already
(it may still be on its way in a background piece; the destination ignores a second
copy); a huge page only if none of its pieces were taken (a huge page is never split
between the two channels).

Guest RAM is read from the VMM's memfd when there is one (``4K-memfd`` or hugetlb:
mapped here, sent without a copy) and otherwise through ``/proc/PID/mem`` into a
buffer of one host page (private anonymous RAM cannot be mapped by another process).

The VMM keeps the precopy channel and the migration thread as they are; it sends the
postcopy channel's preamble before handing the socket over, and at the end asks this
helper to end the channel (:meth:`UrgentServer.finish`), after its last urgent page.
Counters live in the shared memory so ``query-migrate`` sees them while postcopy runs.
"""

from __future__ import annotations

import os
import select
import socket
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from livemig.errors import (
    ChannelClosedError,
    MigrationError,
    RemoteProtocolError,
)
from livemig.kernel.shared import (
    Counters,
    Field,
    ProcessLock,
    ProcessMemory,
    SharedLayout,
    SharedMemory,
    SharedViews,
    counters_field,
    grouped,
)
from livemig.migration.bitmap import split_zero_pages, take_bits
from livemig.migration.channel import Channel, ChannelWriter
from livemig.migration.helper import (
    HelperBlock,
    HelperConn,
    HelperProcess,
    HelperServer,
    HelperWatch,
)
from livemig.migration.sender import write_window
from livemig.migration.trace import Tracer
from livemig.runtime import UrgentPriority
from livemig.units import PAGE_SIZE
from livemig.wire.blocks import BlockInfo
from livemig.wire.channel import ChannelKind
from livemig.wire.encoder import Encoder
from livemig.wire.events import NEED_DATA
from livemig.wire.returnpath import ReqPages, ReturnPathDecoder

MODULE = "livemig.migration.urgent"
START_TIMEOUT = 30.0
# Shared counters, in front of the bits.
COUNTERS = ("requests", "urgent_bytes", "host_pages")
_ZERO_PAGE = bytes(PAGE_SIZE)


def bits_layout(pages: Mapping[str, int]) -> SharedLayout:
    """The counters, then one byte per 4 KiB page of each block (its dirty bit)."""
    return SharedLayout([counters_field("counters", COUNTERS),
                         *(f for name, n in pages.items()
                           for f in grouped(name, [Field.of("bits", np.bool_, n)]))])


def _bits_and_counters(views: SharedViews, names: Iterable[str]
                       ) -> tuple[dict[str, npt.NDArray[np.bool_]], Counters]:
    return {n: views[f"{n}/bits"] for n in names}, views.counters("counters")


class SharedBits:
    """The migration bitmaps' bits and the urgent counters, in memory both processes
    map, with the lock that makes taking pages exclusive."""

    def __init__(self, pages: Mapping[str, int]) -> None:
        self.memory, views = bits_layout(pages).create("livemig-bits")
        self.lock = ProcessLock(self.memory.fd)
        self.bits, self.counters = _bits_and_counters(views, pages)
        views.release()

    def counter(self, name: str) -> int:
        return self.counters[name]

    def close(self) -> None:
        self.bits.clear()
        del self.counters
        self.lock.close()
        self.memory.close()


class UrgentServer:
    """VMM side of the source's urgent helper."""

    def __init__(self, helpers: HelperServer) -> None:
        self.helper = HelperProcess(MODULE, helpers)
        self._watch: HelperWatch | None = None

    def start(self, blocks: Mapping[str, HelperBlock], shared: SharedBits, channel: Channel,
              trace_patterns: tuple[str, ...], priority: UrgentPriority,
              on_error: Callable[[Exception], None] = lambda _e: None) -> None:
        """Hand the helper the postcopy channel (it serves at ``priority``); ``on_error``
        hears of its failure (or death) at once, from the thread that watches its
        control socket."""
        if channel.sock is None:
            raise MigrationError("the postcopy channel must be a socket")
        fds = [channel.sock.fileno(), shared.memory.fd]
        table = []
        for name, b in blocks.items():
            if b.mapping.fd >= 0:
                table.append([name, b.size, b.host_page_size, "memfd", len(fds)])
                fds.append(b.mapping.fd)
            else:
                table.append([name, b.size, b.host_page_size, "pid", b.mapping.host_addr])
        self.helper.send({"msg": "start", "blocks": table, "pid": os.getpid(),
                          "shared_size": shared.memory.size, "trace": list(trace_patterns),
                          "priority": priority.priority,
                          "channel": channel.handover()},
                         fds)
        self.helper.expect("ready", START_TIMEOUT)
        self._watch = HelperWatch(self.helper, "finished", "urgent/watch", on_error)

    def finish(self, timeout: float = 60.0) -> dict[str, int]:
        """End the postcopy channel after the last urgent page; the helper's trace
        counters come back."""
        assert self._watch is not None, "start() first"
        self.helper.send({"msg": "finish"})
        msg = self._watch.wait(timeout, "the postcopy channel did not end")
        return {str(k): int(v) for k, v in dict(msg.get("trace", {})).items()}

    def close(self) -> None:
        if self._watch is not None:
            self._watch.close()
        else:
            self.helper.close()


# --- the helper process ---------------------------------------------------------------


class _Ram:
    """One block's guest RAM as seen from the helper."""

    def __init__(self, size: int, host_page: int, kind: str, where: int,
                 mem: ProcessMemory, fds: list[int]) -> None:
        self.size = size
        self.host_page = host_page
        self._mem = mem
        self._addr = where
        self._shared: SharedMemory | None = None
        if kind == "memfd":
            # The VMM's own memfd, mapped here too: pages are sent without a copy.
            self._shared = SharedMemory.attach(fds[where], size)
            self._pages = self._shared.array(0, np.uint8, size).reshape(-1, PAGE_SIZE)
        else:
            self._scratch = np.empty((host_page // PAGE_SIZE, PAGE_SIZE), dtype=np.uint8)
            self._scratch_view = self._scratch.data.cast("B")

    def host_page_at(self, start: int) -> tuple[npt.NDArray[np.uint8], int]:
        """The 4 KiB rows of the host page at ``start``, and the block offset that
        row 0 of the returned buffer's memory stands for."""
        if self._shared is not None:
            return self._pages, 0
        self._mem.read_into(self._addr + start, self._scratch_view)
        return self._scratch, start

    def small_page(self, start: int) -> memoryview:
        """The 4 KiB page at ``start`` (4 KiB host pages only)."""
        if self._shared is not None:
            row: memoryview = self._pages[start // PAGE_SIZE].data
            return row
        self._mem.read_into(self._addr + start, self._scratch_view)
        return self._scratch_view


class _Server:
    def __init__(self, conn: HelperConn, msg: dict[str, Any], fds: list[int]) -> None:
        self.conn = conn
        self.channel = Channel.adopt(socket.socket(fileno=fds[0]), msg["channel"], "postcopy")
        self.writer = ChannelWriter(self.channel)
        shared = SharedMemory.attach(fds[1], int(msg["shared_size"]))
        self.lock = ProcessLock(fds[1])
        blocks = {str(b[0]): b for b in msg["blocks"]}
        layout = bits_layout({n: int(b[1]) // PAGE_SIZE for n, b in blocks.items()})
        self.bits, self.counters = _bits_and_counters(layout.views(shared), blocks)
        mem = ProcessMemory(int(msg["pid"]))
        self.ram = {n: _Ram(int(b[1]), int(b[2]), str(b[3]), int(b[4]), mem, fds)
                    for n, b in blocks.items()}
        self.requests = ReturnPathDecoder({n: BlockInfo(int(b[1]), int(b[2]))
                                           for n, b in blocks.items()})
        # The VMM already sent this channel's preamble: start past it.
        self.enc = Encoder(channel=ChannelKind.POSTCOPY, postcopy=True)
        self.enc.preamble()
        self.trace = Tracer(tuple(msg.get("trace", ())), sys.stderr)
        self.finished = False

    def serve_request(self, req: ReqPages) -> None:
        if self.ram[req.block].host_page == PAGE_SIZE:
            nbytes = self._send_small(req.block, req.start)
        else:
            nbytes = self._send_huge(req)
        self.counters.add("requests")
        if nbytes:
            self.counters.add("urgent_bytes", nbytes)
            self.counters.add("host_pages")
            # After the send: the trace line is not on the request's path.
            self.trace("postcopy_preempt_send_host_page", channel="postcopy",
                       block=req.block, offset=req.start)

    def _send_small(self, block: str, start: int) -> int:
        """One 4 KiB page, with scalar steps only (this is the latency that counts).

        Sent even when its bit is clear: the destination asks only for a page it does
        not have, and one the migration thread took may still be in a background piece
        as long as the main channel's kernel queue, on its way behind up to twice that;
        the faulting vCPU should not wait for it.  The destination places a 4 KiB page
        atomically and ignores the second copy (the source's RAM no longer changes).
        No lock, for the same reason."""
        self.bits[block][start // PAGE_SIZE] = False
        page = self.ram[block].small_page(start)
        if page.tobytes() == _ZERO_PAGE:
            record = self.enc.page_header(block, start, zero=True)
            self.channel.send([record])
            return len(record)
        header = self.enc.page_header(block, start)
        self.channel.send([header, page])
        return len(header) + PAGE_SIZE

    def _send_huge(self, req: ReqPages) -> int:
        """A huge page: its bits under the lock (it must never be split between two
        senders), zero pieces as ZERO records, the rest straight from RAM."""
        ram = self.ram[req.block]
        first = req.start // PAGE_SIZE
        idx = take_bits(self.bits[req.block], first, req.length // PAGE_SIZE, self.lock)
        if not len(idx):
            return 0  # already sent (or on its way on the precopy channel)
        rows, base = ram.host_page_at(req.start)
        w = split_zero_pages(rows.view(np.uint64), idx - base // PAGE_SIZE, idx)
        nbytes = write_window(self.enc, self.writer, req.block, w, rows.data.cast("B"),
                              ram.size, base).nbytes
        self.writer.flush()
        return nbytes

    def on_requests(self) -> bool:
        """Serve the requests received; False once the destination closed its end."""
        data = self.channel.recv(65536)
        if not data:
            if self.finished:
                return False
            raise ChannelClosedError("the destination closed the postcopy channel")
        self.requests.receive_data(data)
        while (e := self.requests.next_event()) is not NEED_DATA:
            if not isinstance(e, ReqPages):
                raise RemoteProtocolError(f"unexpected {type(e).__name__} on the "
                                          "postcopy channel's return direction")
            if not self.finished:  # after the end every page has been sent already
                self.serve_request(e)
        return True

    def serve(self) -> None:
        poll = select.poll()
        sock, ctl = self.channel.fileno(), self.conn.fileno()
        poll.register(ctl, select.POLLIN)
        self.conn.send({"msg": "ready"})
        # With TLS, this process opens the channel's session (the client speaks first).
        self.channel.secure()
        sock = self.channel.fileno()
        poll.register(sock, select.POLLIN)
        while True:
            # Records already decrypted do not make the socket readable again.
            ready = {fd for fd, _ in poll.poll(0 if self.channel.buffered() else None)}
            if self.channel.buffered():
                ready.add(sock)
            if sock in ready and not self.on_requests():
                poll.unregister(sock)
            if ctl in ready:
                msg, _ = self.conn.recv()
                if msg.get("msg") == "finish":
                    self.finished = True
                    self.writer.write_now([self.enc.eof()])
                    self.conn.send({"msg": "finished", "trace": dict(self.trace.counts)})
                elif msg.get("msg") == "stop":
                    return


def serve(conn: HelperConn, msg: dict[str, Any], fds: list[int]) -> None:
    """The helper's life (livemig.migration.helper.run_helper)."""
    UrgentPriority(int(msg["priority"])).apply()
    _Server(conn, msg, fds).serve()
