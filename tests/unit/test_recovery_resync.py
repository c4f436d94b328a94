"""Postcopy recovery on the source: after RECV_BITMAP, every host page the destination
lacks is sent again whole (bitmap.MigrationBitmap.resync), for 4 KiB, 2 MiB and 1 GiB
host pages.  The block is a lazily mapped buffer, so the 1 GiB case needs no huge page
(the machine that runs the real-KVM tests cannot give two 1 GiB pages at run time)."""

from __future__ import annotations

import mmap

import numpy as np
import pytest

from livemig.migration.bitmap import MigrationBitmap
from livemig.units import GIB, MIB, PAGE_SIZE
from livemig.vmm.memory import Bitmap


class LazyBlock:
    """``host_pages`` host pages of ``host_page_size``, anonymous memory never touched."""

    def __init__(self, host_page_size: int, host_pages: int) -> None:
        self.name, self.host_page_size = "pc.ram", host_page_size
        self.size = host_page_size * host_pages
        self.pages = self.size // PAGE_SIZE
        self._ram = mmap.mmap(-1, self.size)

    def view(self) -> memoryview:
        return memoryview(self._ram)

    def sync_dirty(self, into: Bitmap) -> int:
        return 0  # the guest runs on the destination: nothing is dirtied here


@pytest.mark.parametrize("host_page_size", [PAGE_SIZE, 2 * MIB, GIB],
                         ids=["4K", "2M", "1G"])
def test_a_host_page_the_destination_lacks_one_piece_of_is_sent_again_whole(
        host_page_size: int) -> None:
    block = LazyBlock(host_page_size, 4)
    per = host_page_size // PAGE_SIZE
    bm = MigrationBitmap(block)  # all dirty: resync replaces what it held
    received = np.ones(block.pages, dtype=np.bool_)
    received[per + per // 2] = False  # lost in flight, in the middle of host page 1
    received[3 * per] = False  # the first piece of host page 3
    assert bm.resync(received) == 2 * per
    dirty = np.flatnonzero(bm.bits)
    assert dirty.tolist() == [*range(per, 2 * per), *range(3 * per, 4 * per)]


def test_a_destination_that_holds_everything_leaves_nothing_to_send() -> None:
    block = LazyBlock(2 * MIB, 2)
    bm = MigrationBitmap(block)
    assert bm.resync(np.ones(block.pages, dtype=np.bool_)) == 0
    assert not bm.bits.any()


def test_a_bitmap_of_another_size_is_refused() -> None:
    bm = MigrationBitmap(LazyBlock(PAGE_SIZE, 8))
    with pytest.raises(ValueError, match="7 pages for a block of 8"):
        bm.resync(np.ones(7, dtype=np.bool_))
