"""The source's page sender: dirty pages of guest RAM -> encoded records -> channels.

Theory of operation
-------------------
The sender owns one :class:`~livemig.migration.bitmap.MigrationBitmap` per block and
one :class:`OutChannel` per connection: the *precopy channel* (the main connection) and,
with postcopy preemption, the *postcopy channel*.  Each channel has its own encoder, so
the "last block sent" that the CONTINUE flag relies on is naturally per channel.

Precopy
    A round walks every dirty page once, inside ``ram`` PART sections of bounded size,
    in pieces of up to 2 MiB of pages (or one host page's worth): the next dirty pages
    from where the last piece ended, however scattered (:meth:`MigrationBitmap.take_next`
    within PIECE_SPAN pieces' worth of the bitmap), so that a late round or the
    stop-and-copy, whose dirty pages are few and spread over all of RAM, pays the
    per-piece work (about 0.1 ms of Python) per 2 MiB sent, not per 2 MiB of RAM.  A
    piece's dirty bits are cleared *before* its pages are read, so a write after the
    read is caught by the next dirty-log sync.  Zero pages become ZERO records; the
    rest are PAGE records whose payloads are memoryviews of guest RAM (no copies).

Postcopy (:meth:`PageSender.postcopy_loop`)
    Requested pages first, background pages otherwise (continuing after the last
    requested page: a faulting guest touches neighbours next).  Without preemption
    everything goes on the precopy channel.  With preemption a requested host page is
    sent whole on the postcopy channel and flushed at once.
    A background piece of 4 KiB pages is the next dirty pages from the cursor, however
    scattered (:meth:`MigrationBitmap.take_next`), so that late in a migration, when
    the pages left are sparse, a piece still carries as many pages as it may and the
    per-piece work (about 80 us of Python) is not paid for a few pages.  How many: a
    whole kernel queue of the main channel (:meth:`PageSender.widen_background`; 1 MiB
    on loopback), at least POSTCOPY_CHUNK_PAGES; over TLS TLS_POSTCOPY_CHUNK_PAGES.
    Where requests are answered in this process, a piece goes BACKGROUND_STEP_PAGES
    (128 KiB) per system call, and when a request is waiting for this thread after a
    step the rest of the piece is dirty again (:meth:`MigrationBitmap.give_back`): a
    request waits for one step in hand, not for the piece (and, without preemption,
    behind what is in the kernel's queue); the return-path thread that answers them
    itself (``preempt-rp``) gets the CPU back between two steps.  Where the helper
    process answers them, a piece goes in one system call.  A huge
    page goes whole without preemption, in 32-page steps of one encoding when the
    migration thread may break it for a request, and in background pieces otherwise
    (:meth:`PageSender._huge_piece`).

Huge-page preemption (migration-thread mode, QEMU 7.1)
    A huge page goes on the precopy channel encoded once and sent 32 pages per system
    call; the sender checks for pending requests between two; if there is one it
    stops, remembers where
    (:class:`Preempted`: block, host page, the pieces not yet sent), serves the requests
    on the postcopy channel, then resumes the interrupted huge page on the precopy
    channel.  A request that falls *inside* the interrupted huge page is never sent on
    the postcopy channel (a huge page must not be split across channels): the
    interrupted page is resumed at once instead, so that request cannot starve.

Urgent pages from the return-path thread (QEMU 8.0)
    With ``x-postcopy-urgent-sender=return-path`` the return-path thread sends requested
    pages itself (:meth:`PageSender.send_urgent`) while the migration thread keeps
    streaming background pages; the two share the bitmaps under their lock, so a page
    taken by one is never sent by the other, and the migration thread never has to
    break a huge page.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from livemig.migration.bitmap import (
    BitmapLock,
    IndexArray,
    MigrationBitmap,
    SourceBlock,
    Window,
)
from livemig.migration.channel import ChannelWriter
from livemig.migration.ratelimit import RateLimiter
from livemig.migration.returnpath import PageRequest, RequestQueue
from livemig.migration.state import RamStats
from livemig.migration.trace import Tracer
from livemig.units import MIB, PAGE_SIZE
from livemig.wire.encoder import Encoder

# A PART section ends after this much data or time, like QEMU's 50 ms iterations.
PART_BYTES = 64 * MIB
PART_SECONDS = 0.05
PRECOPY_PIECE_BYTES = 2 * MIB
# In postcopy, background work is cut into pieces at least this large (huge pages into
# chunks this large between request checks).
POSTCOPY_CHUNK_PAGES = 32
# A background piece of 4 KiB pages goes this many pages per system call, with a look
# at the request queue between two: a request waits for at most one step in hand.
BACKGROUND_STEP_PAGES = 32
# A piece takes the next dirty pages within this many pieces' worth of the bitmap: one
# NumPy scan of a few KiB of bools, however scattered the pages left are.
PIECE_SPAN = 64
# Over TLS a piece also costs its copy and encryption (about 1 ms per MiB of CPU, more
# on a busy machine) before a request that arrives meanwhile can be served: smaller
# pieces keep that wait near the plain one.
TLS_POSTCOPY_CHUNK_PAGES = 8
# Background pages wait while the postcopy channel has more than this unacknowledged
# (an urgent page on its way), for at most URGENT_HOLD_MAX_S at a time.
URGENT_QUEUED_BYTES = 16 * 1024
URGENT_HOLD_MAX_S = 0.05
URGENT_POLL_S = 0.0002


class Written(NamedTuple):
    nbytes: int  # encoded: the ZERO records and the PAGE records sent
    pages: int  # PAGE records sent: the first ``pages`` of the window's pages


def write_window(enc: Encoder, writer: ChannelWriter, block: str, w: Window, ram: memoryview,
                 block_size: int, base: int = 0, stop: Callable[[], bool] | None = None,
                 step: int = 0) -> Written:
    """Encode a window: ZERO records for its zero pages, then PAGE records whose payloads
    go straight from ``ram`` (guest RAM, or a copy of it whose first byte is block
    offset ``base``).  Pages are sent now, zero records alone are queued.  With
    ``stop``, the pages go ``step`` at a time and the rest stay unsent once ``stop()``
    is true between two steps."""
    zero_records = enc.zero_pages(block, w.zeros * PAGE_SIZE) if len(w.zeros) else b""
    lead = [zero_records] if zero_records else []
    if not len(w.pages):
        writer.write(lead)
        return Written(len(zero_records), 0)
    rec = enc.page_records(block, w.pages * PAGE_SIZE, block_size)
    if base:
        rec = dataclasses.replace(rec, offsets=rec.offsets - np.uint64(base))
    sent = writer.write_pages(rec, ram, lead, stop, step)  # after the ZERO records
    return Written(len(zero_records) + rec.bytes_of(sent), sent)


@dataclass
class OutChannel:
    """One outgoing connection with its own encoder (and so its own last block)."""

    name: str  # "precopy" or "postcopy"
    encoder: Encoder
    writer: ChannelWriter


@dataclass
class Preempted:
    """Where the precopy channel stopped inside a huge page (one fact per field)."""

    block: str
    host_page: int  # index of the huge page's first 4 KiB page
    pages: IndexArray  # pieces not yet sent (non-zero)
    zeros: IndexArray  # pieces not yet sent (zero)


class PageSender:
    """Sends dirty pages of every block (see the module docstring)."""

    def __init__(self, blocks: Mapping[str, SourceBlock], main: OutChannel, section_id: int,
                 stats: RamStats, limiter: RateLimiter, tracer: Tracer | None = None, *,
                 bits: Mapping[str, npt.NDArray[np.bool_]] | None = None,
                 lock: BitmapLock | None = None) -> None:
        """``bits``/``lock``: the bitmaps' bits in memory shared with the urgent helper
        process, and the lock that also excludes it."""
        self.blocks = dict(blocks)
        self.bitmaps = {name: MigrationBitmap(b, bits[name] if bits else None, lock)
                        for name, b in self.blocks.items()}
        self.main = main
        self.post: OutChannel | None = None
        self.section_id = section_id
        self.stats = stats
        self.limiter = limiter
        self.trace = tracer or Tracer()
        self.break_huge = True
        self.locality = True
        self.yield_to_urgent = True  # see _yield_to_urgent
        # Background pieces go out in steps, with a look at the request queue between
        # two (_send_background): unless requests are answered in another process.
        self.background_steps = True
        # Background pieces in postcopy (pages), chosen once from the main channel.
        self.postcopy_chunk = (TLS_POSTCOPY_CHUNK_PAGES if main.writer.channel.secured
                               else POSTCOPY_CHUNK_PAGES)
        # Background pieces (see widen_background and _huge_piece).
        self.background_piece = self.postcopy_chunk
        self.current = main.name  # the channel in use, for switch/reset traces
        self.preempted: Preempted | None = None
        self._views = {name: b.view() for name, b in self.blocks.items()}
        self._stats_lock = threading.Lock()
        self._post_lock = threading.Lock()  # the postcopy channel may have two writers
        self._hint: tuple[str, int] | None = None  # locality hint from the last request

    # compatibility accessors used by the source state machine
    @property
    def encoder(self) -> Encoder:
        return self.main.encoder

    @property
    def writer(self) -> ChannelWriter:
        return self.main.writer

    def release(self) -> None:
        """Drop every view of guest RAM so the VM can unmap it."""
        self.bitmaps.clear()
        for v in self._views.values():
            v.release()
        self._views.clear()

    # --- dirty tracking -----------------------------------------------------------------
    def sync(self) -> int:
        """Sync every block's dirty log into its bitmap; returns dirty pages in total."""
        self.stats.dirty_sync_count += 1
        return sum(bm.sync() for bm in self.bitmaps.values())

    def dirty_pages(self) -> int:
        return sum(bm.dirty_count() for bm in list(self.bitmaps.values()))

    def _precopy_piece(self, block: SourceBlock) -> int:
        """Pages per precopy piece: 2 MiB of them, or one host page's worth."""
        return max(PRECOPY_PIECE_BYTES, block.host_page_size) // PAGE_SIZE

    # --- encoding -------------------------------------------------------------------------
    def _emit(self, ch: OutChannel, name: str, pages: IndexArray, zeros: IndexArray, *,
              urgent: bool, stop: Callable[[], bool] | None = None,
              step: int = BACKGROUND_STEP_PAGES) -> Written:
        """Encode pages of one block on ``ch``; urgent data is flushed at once.  With
        ``stop``, the pages go ``step`` at a time and those left once ``stop()`` is true
        are not sent: ``Written.pages`` says how many went, and the caller decides
        what the rest become."""
        with self._stats_lock:
            self.stats.normal += len(pages)
            self.stats.duplicate += len(zeros)
        view = self._views[name]
        out = write_window(ch.encoder, ch.writer, name, Window(pages, zeros), view, len(view),
                           stop=stop, step=step)
        if out.pages < len(pages):
            with self._stats_lock:
                self.stats.normal -= len(pages) - out.pages
        if urgent:
            ch.writer.flush()
        else:
            self.limiter.account(out.nbytes)
        return out

    def widen_background(self, piece_bytes: int) -> None:
        """Cut background pieces of ``piece_bytes`` (at least the default): the
        per-piece work in Python (bitmap scan and take, zero test, records, iovec) cost
        about 80 us, which 32-page pieces paid every 128 KiB.  Not over TLS, where a
        piece's copy and encryption compete for a CPU with the requests."""
        # A request arriving meanwhile still waits for one BACKGROUND_STEP_PAGES step
        # only: _emit stops the piece there and gives the rest back to the bitmap.
        if not self.main.writer.channel.secured:
            self.background_piece = max(self.postcopy_chunk, piece_bytes // PAGE_SIZE)

    def send_piece(self, name: str, first: int, most: int) -> tuple[int, int]:
        """Send the next ``most`` dirty pages from ``first`` on the precopy channel;
        returns the bytes sent and the page to go on from."""
        w, after = self.bitmaps[name].take_next(first, most, most * PIECE_SPAN)
        sent = self._emit(self.main, name, w.pages, w.zeros, urgent=False).nbytes if len(w) else 0
        return sent, after

    # --- precopy --------------------------------------------------------------------------
    def send_round(self, interrupted: Callable[[], bool]) -> int:
        """Send every page that is dirty now, in PART sections; returns bytes sent."""
        total = 0
        for name, block in self.blocks.items():
            piece = self._precopy_piece(block)
            page = self.bitmaps[name].next_dirty(0)
            while page >= 0 and not interrupted():
                total += self._send_part(name, page, piece)
                page = self.bitmaps[name].next_dirty(0)
        return total

    def _send_part(self, name: str, first: int, piece: int) -> int:
        """One PART section: pieces from ``first`` on, until the size/time budget."""
        self.main.writer.write([self.main.encoder.ram_part(self.section_id)])
        deadline = time.monotonic() + PART_SECONDS
        sent = 0
        bm = self.bitmaps[name]
        while first < bm.pages and sent < PART_BYTES and time.monotonic() < deadline:
            n, first = self.send_piece(name, first, piece)
            sent += n
        self._close_part()
        return sent

    def _close_part(self) -> None:
        self.main.writer.write([self.main.encoder.close_ram_section()])
        self.main.writer.flush()

    def send_all_remaining(self) -> int:
        """Stop-and-copy: every dirty page, inside the already open END section."""
        total = 0
        for name, block in self.blocks.items():
            piece = self._precopy_piece(block)
            first = 0
            while first < block.pages:
                n, first = self.send_piece(name, first, piece)
                total += n
        return total

    # --- postcopy: switchover -------------------------------------------------------------
    def postcopy_discards(self) -> list[tuple[str, npt.NDArray[np.uint64]]]:
        """At switchover: whole host pages dirty, and per block the ranges the
        destination must drop that no earlier call returned (see bitmap.py)."""
        return [(name, bm.discard_ranges()) for name, bm in self.bitmaps.items()]

    # --- postcopy: urgent pages -----------------------------------------------------------
    def _switch(self, channel: str) -> None:
        if self.current != channel:
            self.trace("postcopy_preempt_switch_channel", channel=channel)
            self.current = channel

    def reconnect(self, main: OutChannel, post: OutChannel | None) -> None:
        """Postcopy recovery: go on over new connections.  Nothing sent on the old ones
        is assumed to have arrived (the bitmaps are resynchronised from the
        destination's), so an interrupted huge page is forgotten, not resumed."""
        with self._post_lock:
            self.main, self.post = main, post
            self.preempted = None
            self._hint = None
            self.current = main.name

    def reset_channel(self) -> None:
        """End of a round or completion: back to the precopy channel."""
        if self.post is not None:
            self.trace("postcopy_preempt_reset_channel")
        self.current = self.main.name

    def _hits_preempted(self, req: PageRequest) -> bool:
        p = self.preempted
        if p is None or p.block != req.block:
            return False
        per = self.blocks[req.block].host_page_size // PAGE_SIZE
        first = req.start // PAGE_SIZE
        return p.host_page <= first < p.host_page + per

    def serve_request(self, req: PageRequest) -> None:
        """Migration-thread mode: send one requested host page, or resume the
        interrupted huge page if the request lies inside it."""
        with self._stats_lock:
            self.stats.postcopy_requests += 1
        self._hint = (req.block, (req.start + req.length) // PAGE_SIZE)
        if self._hits_preempted(req):
            self.trace("postcopy_preempt_hit", block=req.block, offset=req.start)
            self._resume_preempted(interruptible=False)
            self.main.writer.flush()  # the faulting vCPU waits for exactly this
            return
        self._send_requested(req)

    def send_urgent(self, req: PageRequest) -> None:
        """Return-path-thread mode: send a requested host page on the postcopy channel."""
        with self._stats_lock:
            self.stats.postcopy_requests += 1
        self._hint = (req.block, (req.start + req.length) // PAGE_SIZE)
        self._send_requested(req)

    def _send_requested(self, req: PageRequest) -> None:
        ch = self.post or self.main
        # Take the pages and write them under one lock, so the postcopy channel cannot
        # be ended (finish_postcopy_channel) between the two.
        with self._post_lock:
            w = self.bitmaps[req.block].take_window(req.start // PAGE_SIZE,
                                                    req.length // PAGE_SIZE)
            if not len(w):
                return  # already sent (or on its way on the precopy channel)
            self._switch(ch.name)
            self.trace("postcopy_preempt_send_host_page", channel=ch.name, block=req.block,
                       offset=req.start)
            nbytes = self._emit(ch, req.block, w.pages, w.zeros, urgent=True).nbytes
        with self._stats_lock:
            self.stats.x_postcopy_urgent_bytes += nbytes

    def finish_postcopy_channel(self) -> None:
        """All pages are sent: end the postcopy channel (after any urgent send)."""
        if self.post is not None:
            with self._post_lock:
                self.post.writer.write_now([self.post.encoder.eof()])

    # --- postcopy: the migration thread ---------------------------------------------------
    def postcopy_loop(self, queue: RequestQueue, failed: Callable[[], bool]) -> None:
        """Requests first (unless the return-path thread serves them), background
        pages otherwise, in PART sections on the precopy channel."""
        cursor = {name: 0 for name in self.blocks}
        while not failed():
            self.main.writer.write([self.main.encoder.ram_part(self.section_id)])
            deadline = time.monotonic() + PART_SECONDS
            done = False
            while time.monotonic() < deadline and not failed():
                if self._serve_queue(queue):
                    continue
                if not self.limiter.settle():
                    # A request ended the limit's pause: it is served, and no background
                    # page goes before the rest is paid (else a guest that keeps
                    # faulting would lift max-postcopy-bandwidth altogether).
                    continue
                if self.preempted is not None:
                    self.trace("postcopy_preempt_restored", block=self.preempted.block,
                               page=self.preempted.host_page)
                    self._resume_preempted(interruptible=True, queue=queue)
                    continue
                if not self._send_background(cursor, queue):
                    done = True
                    break
            self._close_part()
            self.reset_channel()
            if done:
                return

    def _serve_queue(self, queue: RequestQueue) -> bool:
        served = False
        while (req := queue.pop()) is not None:
            self.serve_request(req)
            served = True
        return served

    def _yield_to_urgent(self) -> None:
        """Hold background pages while requested pages are still on their way: on a
        slow link both channels share one queue (the qdisc), and an urgent huge page
        would otherwise get only part of the link.  Bounded, so the background stream
        cannot starve; a faulting vCPU has at most one request in flight anyway."""
        if self.post is None or not self.yield_to_urgent:
            return
        deadline = time.monotonic() + URGENT_HOLD_MAX_S
        while (self.post.writer.channel.queued() > URGENT_QUEUED_BYTES
               and time.monotonic() < deadline):
            time.sleep(URGENT_POLL_S)

    def _send_background(self, cursor: dict[str, int], queue: RequestQueue) -> bool:
        """One background piece on the first block with dirty pages; False when none."""
        self._yield_to_urgent()
        hint, self._hint = self._hint, None
        if hint is not None and self.locality:
            cursor[hint[0]] = hint[1]
        for name, block in self.blocks.items():
            bm = self.bitmaps[name]
            page = bm.next_dirty(cursor[name] % bm.pages)
            if page < 0:
                continue
            self._switch(self.main.name)
            per = block.host_page_size // PAGE_SIZE
            if per > 1:
                self._send_huge(name, page - page % per, queue)
                cursor[name] = page - page % per + per
            else:
                # The next background_piece dirty pages, however scattered; a request
                # for this thread waits for the step in hand, not the piece (_emit).
                chunk = self.background_piece
                w, cursor[name] = bm.take_next(page, chunk, chunk * PIECE_SPAN)
                if len(w):
                    # A step is one system call: 32-page steps cost the loop a quarter
                    # of its CPU per GB, paid only where requests are answered here.
                    stop = (lambda: len(queue) > 0) if self.background_steps else None
                    out = self._emit(self.main, name, w.pages, w.zeros, urgent=False,
                                     stop=stop)
                    if out.pages < len(w.pages):  # cut short: dirty again, go on there
                        bm.give_back(w.pages[out.pages:])
                        cursor[name] = int(w.pages[out.pages])
            return True
        return False

    def _send_huge(self, name: str, first: int, queue: RequestQueue) -> None:
        per = self.blocks[name].host_page_size // PAGE_SIZE
        w = self.bitmaps[name].take_window(first, per)
        self.preempted = Preempted(name, first, w.pages, w.zeros)
        self._resume_preempted(interruptible=True, queue=queue)

    def _resume_preempted(self, *, interruptible: bool,
                          queue: RequestQueue | None = None) -> None:
        """Send the rest of the interrupted huge page on the precopy channel; stop again
        (keeping the position) if a request is pending and this thread may break a huge
        page for one.

        Where it may, the rest is encoded once and goes postcopy_chunk pages per system
        call with a look at the queue between two: a request waits for one step in
        hand, and the per-piece work (records, iovec: about 80 us) is paid once per huge
        page, not per step.  Otherwise it goes in pieces (:meth:`_huge_piece`)."""
        p = self.preempted
        assert p is not None
        self._switch(self.main.name)
        may_break = interruptible and self.break_huge and self.post is not None
        breaker = queue if may_break else None

        def requested() -> bool:
            return breaker is not None and len(breaker) > 0

        while len(p.pages) or len(p.zeros):
            if requested():
                # Pieces are sent in order, zero pages first: report the next piece.
                nxt = int(p.zeros[0] if len(p.zeros) else p.pages[0])
                self.trace("postcopy_preempt_triggered", block=p.block, page=nxt)
                return
            if len(p.zeros):
                self._emit(self.main, p.block, p.zeros[:0], p.zeros, urgent=False)
                p.zeros = p.zeros[:0]
                continue
            if interruptible:
                self._yield_to_urgent()
            if breaker is not None:
                out = self._emit(self.main, p.block, p.pages, p.pages[:0], urgent=False,
                                 stop=requested, step=self.postcopy_chunk)
                p.pages = p.pages[out.pages:]
                continue
            n = self._huge_piece(len(p.pages))
            chunk, p.pages = p.pages[:n], p.pages[n:]
            self._emit(self.main, p.block, chunk, chunk[:0], urgent=False)
        self.preempted = None

    def _huge_piece(self, left: int) -> int:
        """Pages of a huge page per piece where no request may break in: as many as the
        per-piece work (records, iovec, a system call) is worth: the whole rest without
        an urgent channel, a background piece (one kernel queue of the main channel, see
        widen_background) when urgent pages share the link and must not wait behind
        more than that."""
        return left if self.post is None else self.background_piece
