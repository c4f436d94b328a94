"""The destination places every page it received, and only those: a canary test.

Fresh guest RAM reads as zero, so a destination that never writes a page (a ZERO
record skipped because "the page is zero anyway", a postcopy page never placed because
the page was already populated, a page lost between rounds) goes unnoticed when the
source page is zero too.  Here the destination's RAM is filled with a canary pattern
before the incoming migration: at the end no page may still hold it, and none may be
zero where the source page is not.  Precopy compares with the (paused) source byte for
byte; postcopy runs the random guest, which checks every page of its test range itself,
and the whole of RAM is searched for the canary.  (Hostile and truncated streams against
a canary-filled destination: test_precopy_faults.py.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import (
    canary_pages,
    client,
    empty_instance,
    fill_with_canary,
    free_tcp_port,
    halt_instance,
    hugepages_given_back,
    nonzero_bytes,
    page_differences,
    qmp_path,
)
from pc_helpers import (
    GUEST_PAGES,
    MEM,
    NO_CONVERGENCE,
    PairConfig,
    caps_of,
    guest_check,
    hugepages_checked,
    migration_pair,
    start_postcopy_after_first_round,
    wait_migration,
)

from livemig.kernel.mman import Backing

pytestmark = pytest.mark.kvm

BACKINGS = [pytest.param(Backing.ANON_4K, id="4K"), pytest.param(Backing.HUGETLB_2M, id="2M")]
SLOW_FIRST_ROUND = 8_000_000  # bytes/s: a first precopy round of 32 MiB takes 4 s
SAME = {"canary": 0, "silent zero": 0, "other": 0}


@pytest.mark.parametrize("backing", BACKINGS)
def test_precopy_overwrites_every_canary_page_with_the_source_page(
        tmp_path: Path, backing: Backing) -> None:
    uri = f"tcp:127.0.0.1:{free_tcp_port()}"
    with hugepages_given_back(backing), halt_instance(tmp_path, backing=backing) as src, \
            empty_instance(tmp_path, backing=backing) as dst, \
            client(qmp_path(src)) as s, client(qmp_path(dst)) as d:
        fill_with_canary(dst.vm)
        s.execute("stop")
        d.execute("migrate-incoming", uri=uri)
        s.execute("migrate", uri=uri)
        assert (wait_migration(s)["status"], wait_migration(d)["status"]) == (
            "completed", "completed")
        assert nonzero_bytes(src.vm) > 0 and canary_pages(src.vm) == 0
        assert page_differences(src.vm, dst.vm) == SAME
        assert canary_pages(dst.vm) == 0


@pytest.mark.parametrize("switch", ["at once", "after one round"])
@pytest.mark.parametrize("backing", BACKINGS)
def test_postcopy_places_every_page_over_a_canary_filled_destination(
        tmp_path: Path, request: pytest.FixtureRequest, backing: Backing,
        switch: str) -> None:
    """Switched at once, most pages were never sent in precopy: the destination must
    not take its own (canary) pages for received ones; after one round, every page
    came once in precopy and the dirty ones again in postcopy."""
    hugepages_checked(request, backing)
    cfg = PairConfig("random", backing, src_caps=caps_of(postcopy=True),
                     params={**NO_CONVERGENCE, "max-bandwidth": SLOW_FIRST_ROUND})
    with migration_pair(tmp_path, cfg) as p:
        fill_with_canary(p.dst.vm)
        p.listen()
        p.migrate()
        if switch == "at once":
            wait_migration(p.sq, until=("active",))
            p.sq.execute("migrate-start-postcopy")
        else:
            start_postcopy_after_first_round(p.sq)
        src_info, dst_info = wait_migration(p.sq, 120), wait_migration(p.dq, 120)
        assert (src_info["status"], dst_info["status"]) == ("completed", "completed")
        postcopy_share = src_info["ram"]["postcopy-bytes"] / MEM
        assert postcopy_share > (0.5 if switch == "at once" else 0), src_info["ram"]
        assert canary_pages(p.dst.vm) == 0
        check = guest_check(p.dq, "random")
        assert (check["bad_pages"], check["pages"]) == (0, GUEST_PAGES), check
