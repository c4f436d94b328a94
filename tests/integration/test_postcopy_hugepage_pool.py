"""Postcopy with 2 MiB pages while other processes take every idle huge page.

The destination discards the huge pages the source re-sends (a hole punched in its
hugetlbfs file).  Linux drops a punched page's reservation with it: the freed page goes
back to the machine's pool, where anyone may take it, and placing the page later
(``UFFDIO_COPY``) then finds no huge page -- which Linux 6.x reports as EEXIST, the
answer for "already there".  The page was then lost: the migration completed, and the
first touch after userfaultfd was gone either got a zero page or, with the pool empty,
killed the VMM with SIGBUS.  A discard must keep the range's pages reserved, and the
destination checks with the kernel that every page it placed is there.

Here a test process "hogs" every idle huge page of the machine right after the
discard, as other VMMs on a busy host do.  (Another process may add idle pages to the
pool meanwhile; then a missing reservation would go unnoticed, never the other way.)
"""

from __future__ import annotations

import contextlib
import mmap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pc_helpers import (
    GUEST_PAGES,
    NO_CONVERGENCE,
    PairConfig,
    caps_of,
    guest_check,
    migration_pair,
    runs_on,
    start_postcopy_after_first_round,
    wait_migration,
)

from livemig.kernel.mman import Backing, Mapping, free_hugepages, map_guest_ram
from livemig.kernel.placement import PagePlacer
from livemig.kernel.uffd import FEATURE_MISSING_HUGETLBFS, Userfaultfd
from livemig.units import MIB

pytestmark = pytest.mark.kvm

HUGE = 2 * MIB


@contextlib.contextmanager
def idle_huge_pages_taken() -> Iterator[int]:
    """Reserve every 2 MiB page nobody has (a hugetlbfs mapping of that many), until
    exit: what another VMM starting on the host does.  Yields how many it took."""
    idle = free_hugepages(HUGE)
    hog: Mapping | None = map_guest_ram(idle * HUGE, Backing.HUGETLB_2M) if idle else None
    try:
        yield idle
    finally:
        if hog is not None:
            hog.close()


def test_a_discarded_huge_page_is_placed_though_the_pool_has_no_idle_page(
        hugepages_restored: None) -> None:
    ram = map_guest_ram(4 * HUGE, Backing.HUGETLB_2M, reserve=True)
    try:
        ram.mm[:] = b"\x11" * ram.size  # precopy: every page arrived
        ram.discard(HUGE, 2 * HUGE)  # pages 1 and 2 are stale: the source re-sends them
        page = mmap.mmap(-1, HUGE)
        page[:] = b"\x22" * HUGE
        with Userfaultfd.open() as uffd:
            uffd.api(FEATURE_MISSING_HUGETLBFS)
            placer = PagePlacer(uffd, ram)
            placer.register()
            with idle_huge_pages_taken():
                # `page` and guest RAM stay mapped for the calls (closed below).
                placed = [placer.copy(HUGE * i, page, HUGE) for i in (1, 2)]
            placer.unregister()
        assert placed == [True, True], "a discarded page found no huge page to be placed in"
        assert ram.placed_host_pages().tolist() == [True] * 4
        quarters = np.frombuffer(ram.mm, dtype=np.uint8)[::HUGE // 4].tolist()
        assert quarters == [0x11] * 4 + [0x22] * 8 + [0x11] * 4
        page.close()
    finally:
        ram.close()


def test_a_postcopy_completes_whole_while_every_idle_huge_page_is_taken(
        tmp_path: Path, hugepages_restored: None) -> None:
    """The random guest dirties every page, so the switchover discards nearly all of
    the destination's RAM; the pool's idle pages are then taken for the whole postcopy.
    The migration still completes, and every page is the guest's."""
    cfg = PairConfig("random", Backing.HUGETLB_2M, src_caps=caps_of(postcopy=True),
                     params={**NO_CONVERGENCE, "max-postcopy-bandwidth": 8_000_000})
    with migration_pair(tmp_path, cfg) as p:
        p.listen()
        p.migrate()
        start_postcopy_after_first_round(p.sq)
        assert wait_migration(p.dq, until=("postcopy-active", "completed", "failed"))[
            "status"] == "postcopy-active"
        with idle_huge_pages_taken():
            src, dst = wait_migration(p.sq, 120), wait_migration(p.dq, 120)
        assert (src["status"], dst["status"]) == ("completed", "completed"), (src, dst)
        assert runs_on(p.dst.vm), p.dst.vm.serial.output[-80:]
        check = guest_check(p.dq, "random")
        assert (check["bad_pages"], check["pages"]) == (0, GUEST_PAGES), check
