"""Postcopy preemption end to end on real KVM: requested pages travel on their own
postcopy channel while background pages stream on the precopy channel.

Every combination that changes the code path is migrated: guests that touch pages in
order (ab) or at random, 4 KiB / THP / 2 MiB hugetlbfs pages (huge pages are the ones
that may be interrupted and resumed), both senders of urgent pages (the migration
thread, QEMU 7.1; the return-path thread, QEMU 8.0), and both orders in which the two
connections can reach the destination.  Each must complete with the guest intact.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from pc_helpers import (
    FINISHED,
    GUEST_PAGES,
    NO_CONVERGENCE,
    PairConfig,
    caps_of,
    ends_migration,
    events,
    guest_check,
    hugepages_checked,
    migration_pair,
    migration_statuses,
    run_postcopy,
    runs_on,
    start_postcopy_after_first_round,
    wait_migration,
    wait_until,
)

import livemig.instance
from livemig.kernel.mman import Backing
from livemig.migration import destination
from livemig.migration.channel import Channel
from livemig.migration.source import SourceMigration
from livemig.migration.tls import TlsEndpoint
from livemig.wire.channel import ChannelKind

pytestmark = pytest.mark.kvm

BACKINGS = [pytest.param(Backing.ANON_4K, id="4K"), pytest.param(Backing.THP, id="THP"),
            pytest.param(Backing.HUGETLB_2M, id="2M")]
SENDERS = ["migration", "return-path", "process"]
ORDERS = [pytest.param(False, id="main-first"), pytest.param(True, id="postcopy-first")]


def preempt_config(guest: str, backing: Backing, sender: str) -> PairConfig:
    return PairConfig(guest, backing, src_caps=caps_of(postcopy=True, preempt=True),
                      params={**NO_CONVERGENCE, "x-postcopy-urgent-sender": sender})


def postcopy_channel_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every migration started over QMP use the source's channel-order hook."""
    monkeypatch.setattr(livemig.instance, "SourceMigration",
                        functools.partial(SourceMigration, postcopy_channel_first=True))


def trace_counters(info: dict[str, Any]) -> dict[str, int]:
    prefix = "x-trace-postcopy-preempt-"
    return {k.removeprefix(prefix): v for k, v in info.items() if k.startswith(prefix)}


@pytest.mark.parametrize("channel_first", ORDERS)
@pytest.mark.parametrize("sender", SENDERS)
@pytest.mark.parametrize("backing", BACKINGS)
@pytest.mark.parametrize("guest", ["ab", "random"])
def test_preempt_moves_a_running_guest(
        tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch,
        guest: str, backing: Backing, sender: str, channel_first: bool) -> None:
    hugepages_checked(request, backing)
    if channel_first:
        postcopy_channel_first(monkeypatch)
    with migration_pair(tmp_path, preempt_config(guest, backing, sender)) as p:
        src_info, dst_info = run_postcopy(p)
        assert src_info["status"] == "completed", src_info
        assert dst_info["status"] == "completed", dst_info
        assert migration_statuses(events(p.dq, ends_migration)) == [
            "setup", "active", "postcopy-active", "completed"]
        assert runs_on(p.dst.vm), p.dst.vm.serial.output[-80:]
        check = guest_check(p.dq, guest)
        assert (check["bad_pages"], check["pages"]) == (0, GUEST_PAGES), check
        assert dst_info["x-postcopy-latency-percentiles"]["count"] > 0
        assert src_info["ram"]["postcopy-requests"] > 0
        assert_preempt_traced(src_info, guest, sender)


@pytest.mark.parametrize("sender", SENDERS)
def test_preempt_moves_a_running_guest_in_memfd_ram(
        tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch,
        sender: str) -> None:
    """Shared 4 KiB guest RAM (the urgent helper maps it): random touches, so requested
    pages travel on the postcopy channel."""
    test_preempt_moves_a_running_guest(tmp_path, request, monkeypatch, "random",
                                       Backing.MEMFD_4K, sender, False)


def assert_preempt_traced(src_info: dict[str, Any], guest: str, sender: str) -> None:
    """The source traced the preempt path it took (counters in query-migrate)."""
    counters = trace_counters(src_info)
    assert counters.get("enabled") == 1, counters
    assert counters.get("reset-channel", 0) >= 1, counters
    if guest == "random":
        # Random touches fault on pages the background scan has not reached: some
        # must have gone on the postcopy channel.  (The ab guest faults right behind
        # the scan, so its requests may all be for pages already on their way.)
        assert counters.get("send-host-page", 0) >= 1, counters
        assert src_info["ram"]["x-postcopy-urgent-bytes"] > 0
    if sender in ("return-path", "process"):
        # The return-path thread sends whole host pages itself: the migration thread
        # never has to interrupt a huge page.
        assert not {"triggered", "hit", "restored"} & set(counters), counters


KNOBS = [
    pytest.param({"x-postcopy-preempt-break-huge": False}, id="no-break-huge"),
    pytest.param({"x-postcopy-locality": False}, id="no-locality"),
]


@pytest.mark.parametrize("knob", KNOBS)
def test_preempt_knobs_keep_the_guest_intact(
        tmp_path: Path, request: pytest.FixtureRequest, knob: dict[str, bool]) -> None:
    """The migration thread sends urgent pages (the mode where both knobs matter) of a
    random guest on 2 MiB pages."""
    hugepages_checked(request, Backing.HUGETLB_2M)
    cfg = preempt_config("random", Backing.HUGETLB_2M, "migration")
    cfg = PairConfig(cfg.guest, cfg.backing, src_caps=cfg.src_caps,
                     params={**cfg.params, **knob})
    with migration_pair(tmp_path, cfg) as p:
        src_info, dst_info = run_postcopy(p)
        assert (src_info["status"], dst_info["status"]) == ("completed", "completed")
        assert runs_on(p.dst.vm)
        assert guest_check(p.dq, "random")["bad_pages"] == 0
        counters = trace_counters(src_info)
        if knob.get("x-postcopy-preempt-break-huge") is False:
            assert "triggered" not in counters, counters  # no huge page was interrupted


def test_postcopy_channel_first_reaches_the_destination_first(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    postcopy_channel_first(monkeypatch)
    accepted: list[ChannelKind] = []
    identify = destination.identify_incoming

    def recording(ch: Channel, tls: TlsEndpoint | None) -> ChannelKind:
        accepted.append(identify(ch, tls))
        return accepted[-1]

    monkeypatch.setattr(destination, "identify_incoming", recording)
    with migration_pair(tmp_path, preempt_config("ab", Backing.ANON_4K, "return-path")) as p:
        src_info, dst_info = run_postcopy(p)
        assert (src_info["status"], dst_info["status"]) == ("completed", "completed")
        assert accepted == [ChannelKind.POSTCOPY, ChannelKind.MAIN]


def test_destination_without_preempt_refuses_a_preempt_source(tmp_path: Path) -> None:
    cfg = PairConfig("ab", src_caps=caps_of(postcopy=True, preempt=True),
                     dst_caps=caps_of(postcopy=True, preempt=False),
                     params=NO_CONVERGENCE)
    with migration_pair(tmp_path, cfg) as p:
        p.listen()
        p.migrate()
        # Refused from the capabilities section, while the source's first precopy round
        # runs (it does not wait for the answer to ADVISE before sending pages): the
        # destination loads no page and the source never stops its guest.
        dst_info = wait_migration(p.dq, 60)
        assert dst_info["status"] == "failed", dst_info
        assert "preempt" in dst_info["error-desc"], dst_info
        src_info = wait_migration(p.sq, 60)
        assert src_info["status"] == "failed", src_info
        assert p.src.vm.running


def test_demo_cli_preempt_migrates_a_random_guest_on_huge_pages(
        tmp_path: Path, request: pytest.FixtureRequest) -> None:
    hugepages_checked(request, Backing.HUGETLB_2M)  # both VMM processes reserve them
    out = tmp_path / "demo.json"
    result = subprocess.run(
        [sys.executable, "-m", "livemig", "demo", "--mode", "preempt", "--guest", "random",
         "--mem", "64M", "--page-size", "2M", "--json", str(out)],
        capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr + result.stdout[-2000:]
    report = json.loads(out.read_text())
    assert (report["mode"], report["guest"], report["page_size"]) == ("preempt", "random", "2M")
    assert report["source"]["status"] == report["destination"]["status"] == "completed"
    assert report["check"]["bad_pages"] == 0, report["check"]
    assert report["check"]["guest_ran_on"] and not report["check"]["guest_error"]
    assert report["source"].get("x-trace-postcopy-preempt-enabled") == 1
    # Whether the guest faulted before every huge page had arrived depends on timing
    # (64 MiB is 32 huge pages); the requests themselves are checked by the matrix above.
    assert "count" in report["destination"]["x-postcopy-latency-percentiles"]


# --- one design per migration, and counters that add up ---------------------------------
def test_a_migration_keeps_the_urgent_sender_it_started_with(
        tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """migrate-set-parameters during a migration changes bandwidth, not the design: a
    migration started with the return-path sender never becomes a migration-thread one
    (which would interrupt huge pages), whatever the parameter says later."""
    hugepages_checked(request, Backing.HUGETLB_2M)
    with migration_pair(tmp_path, preempt_config("random", Backing.HUGETLB_2M,
                                                 "return-path")) as p:
        p.listen()
        p.migrate()
        wait_migration(p.sq, until=("active", *FINISHED))
        p.sq.execute("migrate-set-parameters", **{"x-postcopy-urgent-sender": "migration",
                                                  "x-postcopy-preempt-break-huge": True})
        params = p.sq.execute("query-migrate-parameters")
        assert params["x-postcopy-urgent-sender"] == "migration"  # for the next migration
        start_postcopy_after_first_round(p.sq)
        src_info = wait_migration(p.sq)
        assert wait_migration(p.dq)["status"] == "completed"
        assert src_info["status"] == "completed", src_info
        assert src_info["x-postcopy-urgent-sender"] == "return-path"
        assert not {"triggered", "hit", "restored"} & set(trace_counters(src_info))
        assert guest_check(p.dq, "random")["bad_pages"] == 0


@pytest.mark.parametrize("sender", SENDERS)
def test_transferred_never_goes_down_and_counts_every_channel(
        tmp_path: Path, sender: str) -> None:
    """query-migrate's ram.transferred, polled through postcopy, only grows; at the end
    it is precopy + downtime + postcopy bytes, the postcopy channel's included."""
    cfg = preempt_config("random", Backing.ANON_4K, sender)
    cfg = PairConfig(cfg.guest, cfg.backing, src_caps=cfg.src_caps,
                     params={**cfg.params, "max-postcopy-bandwidth": 8_000_000})
    with migration_pair(tmp_path, cfg) as p:
        p.listen()
        p.migrate()
        start_postcopy_after_first_round(p.sq)
        seen: list[int] = []
        info = p.sq.execute("query-migrate")
        while info["status"] not in FINISHED:
            if info["status"] == "postcopy-active":
                seen.append(info["ram"]["transferred"])
            time.sleep(0.01)
            info = p.sq.execute("query-migrate")
        assert info["status"] == "completed", info
        assert wait_migration(p.dq)["status"] == "completed"
        ram = info["ram"]
        assert len(seen) >= 3, "postcopy ended before it could be watched"
        series = [*seen, ram["transferred"]]
        assert all(a <= b for a, b in itertools.pairwise(series)), series
        assert ram["x-postcopy-urgent-bytes"] > 0, ram
        assert ram["transferred"] == (ram["precopy-bytes"] + ram["downtime-bytes"]
                                      + ram["postcopy-bytes"]), ram
        assert ram["postcopy-bytes"] >= ram["x-postcopy-urgent-bytes"], ram
        assert guest_check(p.dq, "random")["bad_pages"] == 0


# The policy of what answers page requests: real-time, and not inherited by what it starts.
REAL_TIME = os.SCHED_FIFO | os.SCHED_RESET_ON_FORK
# The kernel names of what answers page requests in each design (livemig.runtime).
URGENT_WORKERS = {"migration": {"return-path", "postcopy/fault", "postcopy/recv"},
                  "return-path": {"return-path", "postcopy/fault", "postcopy/recv"},
                  "process": {"urgent", "faultserver"}}


def scheduling_classes() -> dict[str, set[int]]:
    """The scheduling policies of this process's threads (both VMMs of a
    migration_pair run here) and of its helper processes, by kernel name."""
    seen: dict[str, set[int]] = {}
    me = psutil.Process()
    for t in me.threads():
        try:
            name = Path(f"/proc/self/task/{t.id}/comm").read_text().strip()
            policy = os.sched_getscheduler(t.id)
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended since the listing
        seen.setdefault(name, set()).add(policy)
    for child in me.children(recursive=True):
        try:
            seen.setdefault(child.name(), set()).add(os.sched_getscheduler(child.pid))
        except (psutil.NoSuchProcess, ProcessLookupError):
            continue
    return seen


@pytest.mark.parametrize(("sender", "priority"), [("process", 1), ("process", 0),
                                                  ("return-path", 2), ("migration", 1)])
def test_what_answers_page_requests_runs_real_time_while_postcopy_lasts(
        tmp_path: Path, sender: str, priority: int) -> None:
    """x-postcopy-urgent-priority on each side: the threads or helper processes that
    read, answer and place page requests run SCHED_FIFO at that priority while postcopy
    lasts (0: time-sharing like everything else), and none is left real-time after."""
    cfg = preempt_config("random", Backing.ANON_4K, sender)
    cfg = PairConfig(cfg.guest, cfg.backing, src_caps=cfg.src_caps,
                     params={**cfg.params, "max-postcopy-bandwidth": 2_000_000,
                             "x-postcopy-urgent-priority": priority})
    workers = URGENT_WORKERS[sender]
    with migration_pair(tmp_path, cfg) as p:
        p.dq.execute("migrate-set-parameters", **{"x-postcopy-urgent-priority": priority})
        p.listen()
        p.migrate()
        start_postcopy_after_first_round(p.sq)
        wait_migration(p.sq, until=("postcopy-active", *FINISHED))
        deadline = time.monotonic() + 10
        while True:
            classes = scheduling_classes()
            running = {n: classes[n] for n in workers if n in classes}
            if running.keys() == workers and (
                    not priority or all(c == {REAL_TIME} for c in running.values())):
                break
            assert time.monotonic() < deadline, (classes, p.sq.execute("query-migrate"))
            time.sleep(0.05)
        if priority:
            assert {n for n, c in classes.items() if c - {os.SCHED_OTHER}} == workers, classes
        else:
            assert all(c == {os.SCHED_OTHER} for c in classes.values()), classes
        assert p.sq.execute("query-migrate")["status"] == "postcopy-active"
        p.sq.execute("migrate-set-parameters", **{"max-postcopy-bandwidth": 0})
        assert wait_migration(p.sq)["status"] == "completed"
        assert wait_migration(p.dq)["status"] == "completed"
        assert guest_check(p.dq, "random")["bad_pages"] == 0
        assert wait_until(lambda: not any(
            c - {os.SCHED_OTHER} for c in scheduling_classes().values()), 10), \
            scheduling_classes()
