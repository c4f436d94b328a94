"""The source's page sender: dirty windows of guest RAM -> encoded records -> channel.

Theory of operation
-------------------
The sender owns one :class:`~livemig.migration.bitmap.MigrationBitmap` per block and
the main channel's encoder and writer.  A *round* walks every dirty page once, in
windows of 2 MiB (or one host page, whichever is larger), inside ``ram`` PART
sections of bounded size, so the destination sees steady progress and cancel is
noticed quickly.  For each window the bitmap clears the dirty bits and splits the
pages into zero pages (sent as ZERO records) and the rest (PAGE records whose payloads
are memoryviews of guest RAM, sent with one ``sendmsg``).  Clearing a bit *before*
reading the page is what makes this safe while the guest runs: a write after the read
is caught by the next dirty-log sync.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from livemig.kernel.mman import MIB, PAGE_SIZE
from livemig.migration.bitmap import MigrationBitmap
from livemig.migration.channel import ChannelWriter
from livemig.migration.ratelimit import RateLimiter
from livemig.migration.returnpath import PageRequest, RequestQueue
from livemig.migration.state import RamStats
from livemig.vmm.memory import RamBlock
from livemig.wire.encoder import Encoder

# A PART section ends after this much data or time, like QEMU's 50 ms iterations.
PART_BYTES = 64 * MIB
PART_SECONDS = 0.05
WINDOW_BYTES = 2 * MIB


@dataclass
class SendCounters:
    pages: int = 0
    zeros: int = 0
    bytes: int = 0


class PageSender:
    """Sends dirty pages of every block on the main channel."""

    def __init__(self, blocks: Mapping[str, RamBlock], encoder: Encoder,
                 writer: ChannelWriter, section_id: int, stats: RamStats,
                 limiter: RateLimiter) -> None:
        self.blocks = dict(blocks)
        self.bitmaps = {name: MigrationBitmap(b) for name, b in self.blocks.items()}
        self.encoder = encoder
        self.writer = writer
        self.section_id = section_id
        self.stats = stats
        self.limiter = limiter
        self._views = {name: b.view() for name, b in self.blocks.items()}

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
        return sum(bm.dirty_count() for bm in self.bitmaps.values())

    # --- sending ------------------------------------------------------------------------
    def send_window(self, name: str, first: int, count: int, *, urgent: bool = False) -> int:
        """Send the dirty pages of one window; returns bytes queued.

        Urgent (requested) pages are flushed at once; background pages are batched and
        rate limited.
        """
        window = self.bitmaps[name].take_window(first, count)
        if not len(window):
            return 0
        enc = self.encoder
        bufs: list[bytes | memoryview] = []
        if len(window.zeros):
            bufs.append(enc.zero_pages(name, window.zeros * PAGE_SIZE))
        if len(window.pages):
            bufs += enc.pages(name, window.pages * PAGE_SIZE, self._views[name])
        nbytes = sum(len(b) for b in bufs)
        self.stats.normal += len(window.pages)
        self.stats.duplicate += len(window.zeros)
        if urgent:
            self.writer.write_now(bufs)
        else:
            self.writer.write(bufs)
            self.limiter.account(nbytes)
        return nbytes

    def send_round(self, cancelled: Callable[[], bool]) -> int:
        """Send every page that is dirty now, in PART sections; returns bytes sent."""
        total = 0
        for name, block in self.blocks.items():
            window = max(WINDOW_BYTES, block.host_page_size) // PAGE_SIZE
            page = self.bitmaps[name].next_dirty(0)
            while page >= 0 and not cancelled():
                total += self._send_part(name, page - page % window, window)
                page = self.bitmaps[name].next_dirty(0)
        return total

    def _send_part(self, name: str, first: int, window: int) -> int:
        """One PART section: windows from ``first`` on, until the size/time budget."""
        self.writer.write([self.encoder.ram_part(self.section_id)])
        deadline = time.monotonic() + PART_SECONDS
        sent = 0
        bm = self.bitmaps[name]
        while first < bm.pages and sent < PART_BYTES and time.monotonic() < deadline:
            sent += self.send_window(name, first, window)
            first += window
        self.writer.write([self.encoder.close_ram_section()])
        self.writer.flush()
        return sent

    def send_all_remaining(self) -> int:
        """Stop-and-copy: every dirty page, inside the already open END section."""
        total = 0
        for name, block in self.blocks.items():
            window = max(WINDOW_BYTES, block.host_page_size) // PAGE_SIZE
            for first in range(0, block.pages, window):
                total += self.send_window(name, first, window)
        return total

    # --- postcopy -----------------------------------------------------------------------
    def prepare_postcopy(self) -> list[tuple[str, list[tuple[int, int]]]]:
        """At switchover: whole host pages dirty, and the ranges to discard per block."""
        out = []
        for name, bm in self.bitmaps.items():
            bm.expand_to_host_pages()
            out.append((name, bm.dirty_ranges()))
        return out

    def serve_request(self, req: PageRequest) -> int:
        """Send a requested host page now, if it still has to be sent."""
        self.stats.postcopy_requests += 1
        return self.send_window(req.block, req.start // PAGE_SIZE, req.length // PAGE_SIZE,
                                urgent=True)

    def postcopy_loop(self, queue: RequestQueue, failed: Callable[[], bool]) -> None:
        """Serve requests first; otherwise send background pages, continuing after the
        last requested page (a faulting guest tends to touch its neighbours next)."""
        cursor = {name: 0 for name in self.blocks}
        while not failed():
            self.writer.write([self.encoder.ram_part(self.section_id)])
            deadline = time.monotonic() + PART_SECONDS
            done = False
            while time.monotonic() < deadline and not failed():
                req = queue.pop()
                if req is not None:
                    self.serve_request(req)
                    cursor[req.block] = (req.start + req.length) // PAGE_SIZE
                    continue
                if not self._send_background(cursor):
                    done = True
                    break
            self.writer.write([self.encoder.close_ram_section()])
            self.writer.flush()
            if done:
                return

    def _send_background(self, cursor: dict[str, int]) -> bool:
        """One background window on the first block with dirty pages; False when none."""
        for name, block in self.blocks.items():
            bm = self.bitmaps[name]
            page = bm.next_dirty(cursor[name] % bm.pages)
            if page < 0:
                continue
            window = max(WINDOW_BYTES, block.host_page_size) // PAGE_SIZE
            first = page - page % window
            self.send_window(name, first, window)
            cursor[name] = first + window
            return True
        return False
