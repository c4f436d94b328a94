"""PagePlacer's runs against the real kernel: scattered 4 KiB pages placed with one
UFFDIO_COPY (or UFFDIO_ZEROPAGE) per run of consecutive pages, from rows that lie
apart as the payloads in a receive buffer do, stopping a run at a page that is
already there."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from livemig.kernel.mman import Backing, Mapping, map_guest_ram
from livemig.kernel.placement import PagePlacer
from livemig.kernel.uffd import Userfaultfd
from livemig.units import PAGE_SIZE
from livemig.wire.ram import PAGE_RECORD_SIZE, page_view

PAGES = 32


@pytest.fixture
def ram() -> Iterator[tuple[PagePlacer, Mapping]]:
    mapping = map_guest_ram(PAGES * PAGE_SIZE, Backing.ANON_4K)
    uffd = Userfaultfd.open()
    uffd.api(0)
    placer = PagePlacer(uffd, mapping)
    placer.register()
    yield placer, mapping
    placer.unregister()
    uffd.close()
    mapping.close()


def received(pages: list[int]) -> tuple[bytes, np.ndarray]:
    """A receive buffer of one page record per page (an 8-byte header, then the page,
    whose bytes name it) and the (N, 4096) view of its payloads, 4104 bytes apart."""
    buf = bytearray(len(pages) * PAGE_RECORD_SIZE)
    for i, p in enumerate(pages):
        at = i * PAGE_RECORD_SIZE + 8
        buf[at : at + PAGE_SIZE] = bytes([p + 1]) * PAGE_SIZE
    data = bytes(buf)
    return data, page_view(data, 8, len(pages))


def runs(*spans: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(first page, pages) pairs as the placer's offsets and lengths."""
    return (np.array([a * PAGE_SIZE for a, _n in spans], dtype=np.uint64),
            np.array([n for _a, n in spans], dtype=np.int64))


def page_byte(mapping: Mapping, page: int) -> set[int]:
    """The distinct byte values of a page that is known to be there."""
    return set(mapping.view()[page * PAGE_SIZE : (page + 1) * PAGE_SIZE].tobytes())


def test_scattered_runs_land_at_their_offsets_with_their_rows(
        ram: tuple[PagePlacer, Mapping]) -> None:
    placer, mapping = ram
    pages = [1, 5, 6, 7, 12, 20, 21]
    _buf, rows = received(pages)
    offsets, lengths = runs((1, 1), (5, 3), (12, 1), (20, 2))
    placed = placer.copy_runs(offsets, lengths, rows)
    assert placed.tolist() == [1, 3, 1, 2]
    for p in pages:
        assert page_byte(mapping, p) == {p + 1}


def test_a_run_stops_at_a_page_already_there_and_reports_the_pages_before_it(
        ram: tuple[PagePlacer, Mapping]) -> None:
    placer, mapping = ram
    assert placer.zero_runs(*runs((3, 1), (9, 1), (14, 1))).tolist() == [1, 1, 1]
    _buf, rows = received([0, 1, 2, 3, 4, 8, 9, 14, 15])
    placed = placer.copy_runs(*runs((0, 5), (8, 2), (14, 2)), rows)
    assert placed.tolist() == [3, 1, 0]  # stopped at page 3, at page 9, at page 14
    assert [page_byte(mapping, p) for p in (0, 1, 2, 3, 8, 9, 14)] == [
        {1}, {2}, {3}, {0}, {9}, {0}, {0}]
    # Pages 4 and 15 were not tried: they are still missing and can be placed now.
    assert placer.copy_runs(*runs((4, 1), (15, 1)), rows[[4, 8]]).tolist() == [1, 1]
    assert (page_byte(mapping, 4), page_byte(mapping, 15)) == ({5}, {16})


def test_zero_runs_place_zero_pages_and_stop_at_a_page_already_there(
        ram: tuple[PagePlacer, Mapping]) -> None:
    placer, mapping = ram
    _buf, rows = received([2])
    placer.copy_runs(*runs((2, 1)), rows)
    assert placer.zero_runs(*runs((0, 4), (10, 3), (2, 2))).tolist() == [2, 3, 0]
    assert [page_byte(mapping, p) for p in (0, 1, 2, 10, 11, 12)] == [{0}, {0}, {3}, {0}, {0}, {0}]
