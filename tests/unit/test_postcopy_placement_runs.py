"""Postcopy placement in runs: 4 KiB zero pages with one UFFDIO_ZEROPAGE per run of
consecutive pages (as for page data), page by page only past a page that is already
there; a batch over several huge pages assembled and placed one huge page at a time."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from preempt_harness import BufferPlacer

from livemig.migration.postcopy import BlockState, ChannelPlacer, PostcopyState
from livemig.units import PAGE_SIZE
from livemig.wire import events as ev

BLK = "pc.ram"
PAGES = 64


class PartlyPlaced(BufferPlacer):
    """A placer where some pages are already there: a zero-fill stops at the first of
    them and reports the bytes placed before it, as UFFDIO_ZEROPAGE does (EEXIST)."""

    def __init__(self, size: int, present: set[int]) -> None:
        super().__init__(size)
        self.present = present

    def zero(self, offset: int, length: int) -> int:
        self.placements.append((offset, length))
        first = offset // PAGE_SIZE
        for p in range(first, first + length // PAGE_SIZE):
            if p in self.present:
                return (p - first) * PAGE_SIZE
            self.present.add(p)
        return length


def offsets(*pages: int) -> np.ndarray:
    return np.array(pages, dtype=np.uint64) * PAGE_SIZE


@pytest.fixture
def zero_pages() -> Iterator[tuple[BufferPlacer, ChannelPlacer, PostcopyState]]:
    placer = BufferPlacer(PAGES * PAGE_SIZE)
    state = PostcopyState({BLK: BlockState(BLK, PAGES * PAGE_SIZE, PAGE_SIZE, placer)},
                          None, {})
    ch = ChannelPlacer(state, "main")
    yield placer, ch, state
    ch.close()
    state.close()
    placer.close()


def test_each_run_of_zero_pages_is_one_placement(
        zero_pages: tuple[BufferPlacer, ChannelPlacer, PostcopyState]) -> None:
    placer, ch, state = zero_pages
    placer.mem[:] = 0xAB
    ch.zeros(ev.ZeroPages(BLK, offsets(0, 1, 2, 3, 10, 11, 40)))
    assert placer.placements == [(0, 4 * PAGE_SIZE), (10 * PAGE_SIZE, 2 * PAGE_SIZE),
                                 (40 * PAGE_SIZE, PAGE_SIZE)]
    got = state.received_pages(BLK)
    assert np.flatnonzero(got).tolist() == [0, 1, 2, 3, 10, 11, 40]
    assert not placer.mem[: 4 * PAGE_SIZE].any()
    assert placer.mem[4 * PAGE_SIZE] == 0xAB  # between the runs: untouched


def test_a_run_goes_on_page_by_page_past_a_page_already_there() -> None:
    """The kernel stops a run at a page someone else placed: the pages after it are
    placed one by one, the ones before it not again."""
    placer = PartlyPlaced(PAGES * PAGE_SIZE, present={2, 4})
    state = PostcopyState({BLK: BlockState(BLK, PAGES * PAGE_SIZE, PAGE_SIZE, placer)},
                          None, {})
    ch = ChannelPlacer(state, "main")
    try:
        ch.zeros(ev.ZeroPages(BLK, offsets(0, 1, 2, 3, 4, 5, 9)))
        assert placer.placements == [(0, 6 * PAGE_SIZE), (9 * PAGE_SIZE, PAGE_SIZE),
                                     (3 * PAGE_SIZE, PAGE_SIZE), (4 * PAGE_SIZE, PAGE_SIZE),
                                     (5 * PAGE_SIZE, PAGE_SIZE)]
        assert placer.present == {0, 1, 2, 3, 4, 5, 9}
        assert np.flatnonzero(state.received_pages(BLK)).tolist() == [0, 1, 2, 3, 4, 5, 9]
    finally:
        ch.close()
        state.close()
        placer.close()


def test_a_batch_over_several_huge_pages_places_each_whole_with_its_pieces() -> None:
    """Background pieces of consecutive 2 MiB pages arrive in one batch: each huge page
    is assembled from its own pieces and placed once, as it completes; the last one
    waits for its zero pieces, which come in a batch of their own."""
    huge = 2 << 20
    per_huge = huge // PAGE_SIZE
    placer = BufferPlacer(3 * huge)
    state = PostcopyState({BLK: BlockState(BLK, 3 * huge, huge, placer)}, None, {})
    ch = ChannelPlacer(state, "main")
    try:
        pages = np.arange(0, 2 * per_huge + per_huge // 2, dtype=np.uint64)
        data = np.zeros((len(pages), PAGE_SIZE), dtype=np.uint8)
        data[:, 0] = (pages % 251 + 1).astype(np.uint8)
        ch.batch(ev.PageBatch(BLK, pages * PAGE_SIZE, data))
        assert placer.placements == [(0, huge), (huge, huge)]  # the third lacks half
        ch.zeros(ev.ZeroPages(BLK, offsets(*range(2 * per_huge + per_huge // 2,
                                                  3 * per_huge))))
        assert placer.placements[-1] == (2 * huge, huge)
        got = placer.mem.reshape(-1, PAGE_SIZE)[:, 0].copy()
        assert np.array_equal(got[: len(pages)], data[:, 0])
        assert not got[len(pages) :].any()
        assert state.received_pages(BLK).all()
    finally:
        ch.close()
        state.close()
        placer.close()
