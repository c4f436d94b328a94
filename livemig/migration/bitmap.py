"""The source's migration bitmap: which pages of a block still have to be sent.

Theory of operation
-------------------
One bool per 4 KiB page (NumPy), owned by one migration.  It starts all set (every page
must be sent once); each round ORs in what the dirty log reports
(:meth:`MigrationBitmap.sync`).  The sender takes pages in *windows* (2 MiB of the block
by default, one host page for huge pages): :meth:`take_window` clears and returns the
dirty page indexes of a window in one NumPy step and splits them into zero and non-zero
pages by looking at guest RAM as 64-bit words (no copy of page data).

At the postcopy switchover the destination must drop every page it holds that is
dirty here (POSTCOPY_RAM_DISCARD).  :meth:`MigrationBitmap.discard_ranges` returns the
dirty pages it has not returned before, so the switchover can discard most of them
while the guest still runs and only the pages dirtied since once it is paused.  A page
sent after its discard and dirtied again must be discarded again: a sync forgets the
discards of pages that are no longer dirty (they were sent) before it ORs in the log.

A lock guards the bitmap because in postcopy two senders (the migration thread and
the return-path thread, or the urgent helper process, serving requests) may take pages
concurrently; a page taken by one is never sent by the other.  For the helper process
the bits live in shared memory and the lock is a ProcessLock.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from livemig.units import PAGE_SIZE
from livemig.vmm.memory import Bitmap, bitmap_to_bools, new_bitmap

IndexArray = npt.NDArray[np.int64]
SCAN_SLICE = 1 << 14  # pages (64 MiB of guest RAM) per step of next_dirty


class SourceBlock(Protocol):
    """What the source needs of a RAM block (a vmm RamBlock, or a plain buffer in tests)."""

    @property
    def name(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def pages(self) -> int: ...
    @property
    def host_page_size(self) -> int: ...
    def view(self) -> memoryview: ...
    def sync_dirty(self, into: Bitmap) -> int: ...


class BitmapLock(Protocol):
    def __enter__(self) -> object: ...
    def __exit__(self, *exc: Any) -> Any: ...


def take_bits(bits: npt.NDArray[np.bool_], first: int, count: int,
              lock: BitmapLock, most: int | None = None) -> IndexArray:
    """Clear the set bits in [first, first+count) and return their indexes: under
    ``lock``, so two senders never take the same page.  With ``most``, only the first
    ``most`` of them.

    The indexes come from one copy of the bits.  The urgent helper process clears the
    bit of a 4 KiB page without the lock (urgent.py), and ``np.flatnonzero`` reads its
    input twice (count, then fill): a bit cleared between the two reads left an
    uninitialised index in the result (an IndexError naming a garbage index, or a wrong
    page taken).  With the copy, a bit the helper clears meanwhile is taken too: that
    4 KiB page goes on both channels, which the destination tolerates.

    With ``most`` the range is read in growing slices (``most`` bits, then four times
    as many, ...) until ``most`` are found: a dense bitmap costs one slice of ``most``
    bits, not the whole range (64 times the piece for precopy and postcopy pieces:
    reading it all cost a dense 1 GiB round 10.7 ms of bitmap work, the slices 2.5)."""
    end = min(first + count, len(bits))  # a range may run past the bitmap's end
    taken: list[IndexArray] = []
    need = width = count if most is None else most
    with lock:
        lo = first
        while lo < end and need > 0:
            sl = bits[lo : min(end, lo + width)]
            idx = np.flatnonzero(sl.copy())[:need]
            if len(idx):
                sl[idx] = False
                taken.append(idx + lo)
                need -= len(idx)
            lo += len(sl)
            width *= 4
    if len(taken) == 1:
        return taken[0]
    return np.concatenate(taken) if taken else np.zeros(0, dtype=np.int64)


def split_zero_pages(words: npt.NDArray[np.uint64], rows: IndexArray,
                     idx: IndexArray) -> Window:
    """Split pages ``idx`` (at ``rows`` of ``words``, one row of 64-bit words per page)
    into non-zero and zero pages.  Most pages that hold data have a non-zero first word:
    decide those from one word each, and read whole pages only for the rest (QEMU's
    buffer_is_zero also bails out at the first non-zero byte)."""
    nonzero = words[rows, 0] != 0
    maybe_zero = rows[~nonzero]
    if len(maybe_zero):
        nonzero[~nonzero] = _any_word_set(words, maybe_zero)
    return Window(idx[nonzero], idx[~nonzero])


def _any_word_set(words: npt.NDArray[np.uint64], rows: IndexArray) -> npt.NDArray[np.bool_]:
    """Has page ``rows[i]`` any non-zero word?  Read in place: when the rows are dense
    (the usual window of zero pages), OR-reduce the span they cover, a view of guest
    RAM; only scattered rows are gathered, which copies them.  (Gathering every row
    cost about 0.18 CPU s per GiB of zero pages, the OR over the span 0.02.)"""
    lo, hi = int(rows.min()), int(rows.max()) + 1
    if hi - lo <= 2 * len(rows):
        span = np.bitwise_or.reduce(words[lo:hi], axis=1)
        return np.asarray(span[rows - lo] != 0, dtype=np.bool_)
    return np.asarray(np.bitwise_or.reduce(words[rows], axis=1) != 0, dtype=np.bool_)


@dataclass(frozen=True)
class Window:
    """Pages taken from one window: indexes of non-zero and of all-zero pages."""

    pages: IndexArray
    zeros: IndexArray

    def __len__(self) -> int:
        return len(self.pages) + len(self.zeros)


class MigrationBitmap:
    """Dirty pages still to send for one RAM block."""

    def __init__(self, block: SourceBlock, bits: npt.NDArray[np.bool_] | None = None,
                 lock: BitmapLock | None = None) -> None:
        """``bits``/``lock``: shared with the urgent helper process (see urgent.py)."""
        self.block = block
        self.pages = block.pages
        if bits is None:
            bits = np.ones(self.pages, dtype=np.bool_)
        else:
            bits[:] = True
        self.bits = bits
        self.lock: BitmapLock = lock or threading.Lock()
        self._log = new_bitmap(self.pages)
        # Dirty pages the destination was told to drop and that have not been sent since
        # (None until the first discard_ranges).
        self._discarded: npt.NDArray[np.bool_] | None = None
        # Guest RAM as one row of 64-bit words per page: zero checks read RAM in place.
        # This view pins the mapping: drop the bitmap when the migration ends.
        self._words = np.frombuffer(block.view(), dtype=np.uint64).reshape(
            self.pages, PAGE_SIZE // 8)

    def sync(self) -> int:
        """OR in the pages dirtied since the last sync; returns how many are now dirty."""
        self._log[:] = 0
        self.block.sync_dirty(self._log)
        with self.lock:
            if self._discarded is not None:
                self._discarded &= self.bits  # a page sent since its discard is back
            self.bits |= bitmap_to_bools(self._log, self.pages)
            return int(np.count_nonzero(self.bits))

    def dirty_count(self) -> int:
        return int(np.count_nonzero(self.bits))

    def next_dirty(self, start: int) -> int:
        """First dirty page at or after ``start`` (wrapping), or -1 if none.

        Scans in bounded slices: postcopy asks this for every small chunk, and a scan of
        the whole rest of a 1 GiB bitmap each time cost a fifth of the sending thread.
        """
        for lo, hi in ((start, self.pages), (0, start)):
            for a in range(lo, hi, SCAN_SLICE):
                sl = self.bits[a : min(a + SCAN_SLICE, hi)]
                # Another sender may clear the bit argmax found before we look at it:
                # then look again, or the rest of this slice would be skipped.
                while sl.any():
                    hit = int(np.argmax(sl))
                    if sl[hit]:
                        return a + hit
        return -1

    def take_window(self, first: int, count: int) -> Window:
        """Clear and return the dirty pages in [first, first+count)."""
        idx = take_bits(self.bits, first, count, self.lock)
        if not len(idx):
            return Window(idx, idx)
        return split_zero_pages(self._words, idx, idx)

    def take_next(self, first: int, most: int, span: int) -> tuple[Window, int]:
        """Clear and return the first ``most`` dirty pages in [first, first+span), and
        the page to look from next.  Postcopy's background pieces: late in a migration
        the dirty pages left are scattered, and a piece cut as an aligned window of
        ``most`` pages would carry only the few of them it covers, each piece paying
        the same fixed work (bitmap, records, a system call) for a few pages."""
        idx = take_bits(self.bits, first, span, self.lock, most)
        if not len(idx):
            return Window(idx, idx), first + span
        after = int(idx[-1]) + 1 if len(idx) == most else first + span
        return split_zero_pages(self._words, idx, idx), after

    def give_back(self, pages: IndexArray) -> None:
        """Pages taken and then not sent (a background piece cut short for a request):
        dirty again, so a later piece or a request sends them."""
        with self.lock:
            self.bits[pages] = True

    def expand_to_host_pages(self) -> None:
        """Postcopy: a host page with any dirty piece must be re-sent whole (and is
        discarded whole on the destination), so mark all of its pieces dirty."""
        per = self.block.host_page_size // PAGE_SIZE
        if per > 1:
            with self.lock:
                hp = self.bits.reshape(-1, per).any(axis=1)
                self.bits[:] = np.repeat(hp, per)

    def resync(self, received: npt.NDArray[np.bool_]) -> int:
        """Postcopy recovery: every page the destination has not got is dirty again
        (whole host pages); returns how many are.  ``received``: one bool per page."""
        if len(received) != self.pages:
            raise ValueError(f"a bitmap of {len(received)} pages for a block of {self.pages}")
        with self.lock:
            self.bits[:] = ~received
        self.expand_to_host_pages()
        return self.dirty_count()

    def discard_ranges(self) -> npt.NDArray[np.uint64]:
        """Postcopy: mark whole host pages dirty, and return the dirty pages not returned
        by an earlier call (and not sent since) as (start byte, length) runs, one row
        each, for POSTCOPY_RAM_DISCARD."""
        self.expand_to_host_pages()
        with self.lock:
            new = self.bits.copy() if self._discarded is None else self.bits & ~self._discarded
            self._discarded = self.bits.copy()
        return runs(new)


def runs(bools: npt.NDArray[np.bool_]) -> npt.NDArray[np.uint64]:
    """Runs of set pages as (start byte, length) rows."""
    edges = np.diff(np.concatenate(([0], bools.view(np.int8), [0])))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)
    return (np.stack([starts, ends - starts], axis=1) * PAGE_SIZE).astype(np.uint64)
