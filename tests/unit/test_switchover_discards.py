"""The postcopy switchover's discards: most of them while the guest still runs, then
only what it dirtied since (bitmap.MigrationBitmap.discard_ranges)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from livemig.migration.bitmap import MigrationBitmap
from livemig.units import PAGE_SIZE
from livemig.vmm.memory import Bitmap, bools_to_bitmap

HUGE = 2 << 20


class GuestBlock:
    """A block whose guest writes pages between syncs (``write``), as a dirty log does."""

    def __init__(self, pages: int, host_page_size: int = PAGE_SIZE) -> None:
        self.name = "pc.ram"
        self.pages = pages
        self.size = pages * PAGE_SIZE
        self.host_page_size = host_page_size
        self._ram = bytearray(self.size)
        self._written = np.zeros(pages, dtype=np.bool_)

    def write(self, *pages: int) -> None:
        self._written[list(pages)] = True

    def view(self) -> memoryview:
        return memoryview(self._ram)

    def sync_dirty(self, into: Bitmap) -> int:
        into |= bools_to_bitmap(self._written)
        n = int(self._written.sum())
        self._written[:] = False
        return n


def pages_of(ranges: npt.NDArray[np.uint64]) -> list[int]:
    return [p for start, length in ranges.tolist()
            for p in range(start // PAGE_SIZE, (start + length) // PAGE_SIZE)]


def sent_everything(bm: MigrationBitmap) -> None:
    bm.take_window(0, bm.pages)


def test_a_second_discard_names_only_the_pages_dirtied_since_the_first() -> None:
    block = GuestBlock(64)
    bm = MigrationBitmap(block)
    sent_everything(bm)
    block.write(3, 4, 10)
    bm.sync()
    assert pages_of(bm.discard_ranges()) == [3, 4, 10]
    block.write(4, 20)  # 4 again: the destination dropped it already
    bm.sync()
    assert pages_of(bm.discard_ranges()) == [20]
    assert pages_of(bm.discard_ranges()) == []
    assert sorted(np.flatnonzero(bm.bits).tolist()) == [3, 4, 10, 20]  # still to send


def test_the_first_discard_names_every_page_never_sent() -> None:
    block = GuestBlock(16)
    bm = MigrationBitmap(block)
    bm.take_window(0, 8)
    assert bm.discard_ranges().tolist() == [[8 * PAGE_SIZE, 8 * PAGE_SIZE]]


def test_a_page_sent_after_its_discard_and_dirtied_again_is_discarded_again() -> None:
    block = GuestBlock(64)
    bm = MigrationBitmap(block)
    sent_everything(bm)
    block.write(7)
    bm.sync()
    assert pages_of(bm.discard_ranges()) == [7]
    bm.take_window(7, 1)  # the page goes out again: the destination holds it now
    block.write(7)
    bm.sync()
    assert pages_of(bm.discard_ranges()) == [7]


def test_discards_cover_whole_huge_pages_and_a_huge_page_only_once() -> None:
    per = HUGE // PAGE_SIZE
    block = GuestBlock(4 * per, HUGE)
    bm = MigrationBitmap(block)
    sent_everything(bm)
    block.write(per + 3)
    bm.sync()
    assert bm.discard_ranges().tolist() == [[HUGE, HUGE]]
    block.write(per + 100, 2 * per)  # the first huge page again, and a new one
    bm.sync()
    assert bm.discard_ranges().tolist() == [[2 * HUGE, HUGE]]
    assert int(bm.bits.sum()) == 2 * per  # both whole huge pages are still to send
