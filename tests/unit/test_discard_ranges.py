"""Postcopy discards at the switchover: thousands of scattered ranges, dropped in one
step per command on the destination (kernel.mman.Mapping.discard_ranges,
postcopy.PostcopyState.discard)."""

from __future__ import annotations

import numpy as np
import pytest
from preempt_harness import BufferPlacer

from livemig.kernel.mman import MIB, Backing, map_guest_ram
from livemig.migration.postcopy import BlockState, PostcopyState
from livemig.units import PAGE_SIZE

HUGE = 2 * MIB


def test_discarding_many_scattered_ranges_drops_exactly_those_pages() -> None:
    pages = 4096  # 16 MiB
    mapping = map_guest_ram(pages * PAGE_SIZE, Backing.ANON_4K, "discard-test")
    try:
        ram = np.frombuffer(mapping.view(), dtype=np.uint8).reshape(pages, PAGE_SIZE)
        ram[:, 0] = 1
        # 1500 ranges (more than one process_madvise call takes), some two pages long.
        starts = np.arange(0, 3000, 2, dtype=np.uint64)
        lengths = np.where(starts % 10 == 0, 2, 1).astype(np.uint64)
        rows = np.stack([starts, lengths], axis=1) * np.uint64(PAGE_SIZE)
        mapping.discard_ranges(rows)
        dropped = np.zeros(pages, dtype=np.bool_)
        for s, n in zip(starts.tolist(), lengths.tolist(), strict=True):
            dropped[s : s + n] = True
        assert (ram[:, 0] == 0).tolist() == dropped.tolist()
        del ram
    finally:
        mapping.close()


def test_discarding_nothing_is_allowed() -> None:
    mapping = map_guest_ram(MIB, Backing.ANON_4K, "discard-test")
    try:
        mapping.mm[0] = 7
        mapping.discard_ranges(np.zeros((0, 2), dtype=np.uint64))
        assert mapping.mm[0] == 7
    finally:
        mapping.close()


@pytest.mark.parametrize("host_page", [PAGE_SIZE, HUGE], ids=["4K", "2M"])
def test_a_discard_forgets_precopy_pages_only_under_its_ranges(host_page: int) -> None:
    hp = 8
    size = hp * host_page
    placer = BufferPlacer(size)
    state = PostcopyState({"pc.ram": BlockState("pc.ram", size, host_page, placer)}, None, {})
    try:
        placer.mem[:] = 1
        state.blocks["pc.ram"].precopy_present[:] = True
        # Host pages 1, 4-5 (one range over two) and 7; 4 also named twice.
        rows = np.array([[1, 1], [4, 2], [4, 1], [7, 1]], dtype=np.uint64) * np.uint64(host_page)
        state.discard("pc.ram", rows)
        assert state.blocks["pc.ram"].precopy_present.tolist() == [
            True, False, True, True, False, False, True, False]
        assert state.missing() == {"pc.ram": (4, host_page)}
        assert placer.mem[::host_page].tolist() == [1, 0, 1, 1, 0, 0, 1, 0]
    finally:
        state.close()
        placer.close()
