"""Postcopy on real KVM, driven over QMP: the guest moves to the destination after one
precopy round and runs there while its pages arrive on demand.

What is checked is what a user of QEMU relies on: both sides complete, the destination
went through postcopy-active, the guest runs on without an error and its memory is
intact; refusals (cancel in postcopy, postcopy without the capability, a destination
that cannot do postcopy) leave the source guest running; a hostile or vanished peer
makes a migration fail, never hang or send wrong memory.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from pc_helpers import (
    FINISHED,
    GUEST_PAGES,
    LATENCY_KEYS,
    MEM,
    NO_CONVERGENCE,
    SLOW_PRECOPY,
    FakeDestination,
    Pair,
    PairConfig,
    Relay,
    capabilities,
    caps_of,
    client,
    ends_migration,
    events,
    guest_check,
    guest_instance,
    hugepages_checked,
    migration_pair,
    migration_statuses,
    raw_request,
    run_postcopy,
    runs_on,
    start_postcopy_after_first_round,
    wait_migration,
    wait_until,
)

from livemig.control.client import QmpClient
from livemig.errors import QmpError
from livemig.instance import Instance
from livemig.kernel.mman import Backing
from livemig.kernel.uffd import FEATURE_THREAD_ID
from livemig.migration.channel import Listener
from livemig.migration.handshake import block_table
from livemig.vmm.vm import MAIN_BLOCK
from livemig.wire import events as ev
from livemig.wire.returnpath import ReturnPathEncoder

pytestmark = pytest.mark.kvm

BACKINGS = [pytest.param(Backing.ANON_4K, id="4K"), pytest.param(Backing.THP, id="THP"),
            pytest.param(Backing.MEMFD_4K, id="4K-memfd"),
            pytest.param(Backing.HUGETLB_2M, id="2M")]
# Keeps the postcopy phase going for a while (several seconds of background pages).
SLOW_POSTCOPY = 2_000_000


def postcopy_config(guest: str = "ab", backing: Backing = Backing.ANON_4K,
                    **params: Any) -> PairConfig:
    return PairConfig(guest, backing, src_caps=caps_of(postcopy=True),
                      params={**NO_CONVERGENCE, **params})


# --- the normal path --------------------------------------------------------------------------
@pytest.mark.parametrize("backing", BACKINGS)
@pytest.mark.parametrize("guest", ["ab", "random"])
def test_postcopy_after_one_round_moves_a_running_guest(
        tmp_path: Path, request: pytest.FixtureRequest, guest: str, backing: Backing) -> None:
    hugepages_checked(request, backing)
    with migration_pair(tmp_path, postcopy_config(guest, backing)) as p:
        src_info, dst_info = run_postcopy(p)
        assert src_info["status"] == "completed", src_info
        assert dst_info["status"] == "completed", dst_info
        assert migration_statuses(events(p.dq, ends_migration)) == [
            "setup", "active", "postcopy-active", "completed"]
        assert [e["event"] for e in events(p.sq) if e["event"] in ("STOP", "RESUME")] == ["STOP"]
        assert p.sq.execute("query-status")["status"] == "postmigrate"
        assert runs_on(p.dst.vm), p.dst.vm.serial.output[-80:]
        check = guest_check(p.dq, guest)
        assert (check["bad_pages"], check["pages"]) == (0, GUEST_PAGES), check
        assert_postcopy_statistics(src_info, dst_info)
        # The raw samples behind the percentiles (for exact CDFs in the benchmarks).
        raw = p.dq.execute("x-query-postcopy-latency-samples")
        samples, fault_at = raw["samples-ns"], raw["fault-at-ns"]
        pct = dst_info["x-postcopy-latency-percentiles"]
        assert len(samples) == len(fault_at) == pct["count"]
        # Counted from the start of postcopy, which came after the migration's start.
        assert 0 < max(fault_at) < dst_info["total-time"] * 1_000_000
        # The slowest requests by page: their latency is the slowest sample's.
        cut_us = sorted(samples)[-min(3, len(samples))] // 1000
        slow = p.dq.execute("x-query-postcopy-latency-samples", **{"slow-us": cut_us})["slow"]
        assert len(slow) == sum(1 for x in samples if x >= cut_us * 1000)
        assert max(s["placed-ns"] - s["fault-ns"] for s in slow) == max(samples)
        assert all(s["block"] == MAIN_BLOCK and s["offset"] % 4096 == 0 for s in slow)
        assert round(max(samples) / 1000, 1) == pct["max"]


@pytest.mark.parametrize("backing", [pytest.param(Backing.ANON_4K, id="4K"),
                                     pytest.param(Backing.MEMFD_4K, id="4K-memfd"),
                                     pytest.param(Backing.HUGETLB_2M, id="2M")])
def test_postcopy_into_a_preallocated_destination_moves_the_guest_intact(
        tmp_path: Path, request: pytest.FixtureRequest, backing: Backing) -> None:
    """Postcopy starts before precopy has sent a page: every preallocated page the
    destination never received must still fault and be fetched, not read as zeroes
    (the switchover's discards cover every page not sent, as QEMU's do)."""
    hugepages_checked(request, backing)
    cfg = replace(postcopy_config("ab", backing), dst_prealloc=True)
    with migration_pair(tmp_path, cfg) as p:
        assert p.dst.vm.blocks[MAIN_BLOCK].mapping.placed_host_pages().all()
        p.listen()
        p.migrate()
        p.sq.execute("migrate-start-postcopy")
        src_info = wait_migration(p.sq)
        assert src_info["status"] == "completed", src_info
        assert wait_migration(p.dq)["status"] == "completed"
        assert src_info["ram"]["postcopy-requests"] > 0, src_info["ram"]
        assert runs_on(p.dst.vm), p.dst.vm.serial.output[-80:]
        check = guest_check(p.dq, "ab")
        assert (check["bad_pages"], check["pages"]) == (0, GUEST_PAGES), check


def assert_postcopy_statistics(src_info: dict[str, Any], dst_info: dict[str, Any]) -> None:
    """Pages were requested, answered, and the destination measured how long it waited."""
    assert set(LATENCY_KEYS) <= set(dst_info), sorted(dst_info)
    assert len(dst_info["postcopy-latency-dist"]) == 24
    assert sum(dst_info["postcopy-latency-dist"]) == \
        dst_info["x-postcopy-latency-percentiles"]["count"] > 0
    assert len(dst_info["postcopy-vcpu-blocktime"]) == 1
    assert dst_info["postcopy-latency"] > 0
    assert src_info["ram"]["postcopy-requests"] > 0
    assert src_info["ram"]["postcopy-bytes"] > 0


def test_forced_postcopy_completes_a_migration_precopy_cannot_finish(tmp_path: Path) -> None:
    with migration_pair(tmp_path, postcopy_config(
            "ab", **{"max-bandwidth": 20_000_000, "downtime-limit": 300})) as p:
        p.listen()
        p.migrate()
        limit = p.sq.execute("query-migrate-parameters")["downtime-limit"]
        # Three syncs: two convergence decisions, both "too much left for the limit".
        assert wait_until(lambda: p.sq.execute("query-migrate")["ram"]["dirty-sync-count"]
                          >= 3, 60)
        info = p.sq.execute("query-migrate")
        assert info["status"] == "active", info
        assert info["expected-downtime"] > limit, info
        p.sq.execute("migrate-start-postcopy")
        assert wait_migration(p.sq)["status"] == "completed"
        assert wait_migration(p.dq)["status"] == "completed"
        assert runs_on(p.dst.vm)
        assert guest_check(p.dq, "ab")["bad_pages"] == 0


# --- refusals ---------------------------------------------------------------------------------
def test_cancel_during_postcopy_is_refused_and_the_migration_completes(tmp_path: Path) -> None:
    cfg = postcopy_config("ab", **{"max-postcopy-bandwidth": SLOW_POSTCOPY})
    with migration_pair(tmp_path, cfg) as p:
        p.listen()
        p.migrate()
        start_postcopy_after_first_round(p.sq)
        wait_migration(p.sq, until=("postcopy-active", *FINISHED))
        with pytest.raises(QmpError, match="[Pp]ostcopy is active"):
            p.sq.execute("migrate_cancel")
        assert p.sq.execute("query-migrate")["status"] in ("postcopy-active", "completed")
        assert wait_migration(p.sq)["status"] == "completed"
        assert wait_migration(p.dq)["status"] == "completed"
        assert "cancelling" not in migration_statuses(events(p.sq, ends_migration))
        assert runs_on(p.dst.vm)
        assert guest_check(p.dq, "ab")["bad_pages"] == 0


def test_start_postcopy_after_the_migration_completed_is_accepted_and_changes_nothing(
        tmp_path: Path) -> None:
    """QEMU's rule: the command races with the end of precopy, so once the migration is
    over it is not an error (a client that asks a moment too late gets no failure)."""
    cfg = PairConfig("ab", params={"x-max-iterations": 2})
    with migration_pair(tmp_path, cfg) as p:
        p.listen()
        p.migrate()
        assert wait_migration(p.sq)["status"] == "completed"
        p.sq.execute("migrate-start-postcopy")
        assert p.sq.execute("query-migrate")["status"] == "completed"
        assert wait_migration(p.dq)["status"] == "completed"
        assert "postcopy-active" not in migration_statuses(events(p.dq, ends_migration))
        assert runs_on(p.dst.vm)


def test_start_postcopy_is_refused_without_postcopy_ram_and_precopy_goes_on(
        tmp_path: Path) -> None:
    cfg = PairConfig("ab", src_caps=caps_of(postcopy=False),
                     params={"max-bandwidth": SLOW_PRECOPY, "x-max-iterations": 2})
    with migration_pair(tmp_path, cfg) as p:
        with pytest.raises(QmpError, match="started"):
            p.sq.execute("migrate-start-postcopy")  # no migration at all
        p.listen()
        p.migrate()
        wait_migration(p.sq, until=("active", *FINISHED))
        with pytest.raises(QmpError, match="postcopy"):
            p.sq.execute("migrate-start-postcopy")
        assert wait_migration(p.sq)["status"] == "completed"
        assert wait_migration(p.dq)["status"] == "completed"
        assert "postcopy-active" not in migration_statuses(events(p.dq, ends_migration))
        assert runs_on(p.dst.vm)


def assert_source_untouched(p: Pair) -> None:
    """The source failed before it stopped its guest (in setup, or in its first
    precopy round: it waits for the destination's answer to ADVISE only before the
    switch to postcopy), which still runs."""
    seen = events(p.sq, ends_migration)
    assert migration_statuses(seen) in (["setup", "failed"], ["setup", "active", "failed"])
    assert "STOP" not in [e["event"] for e in seen]
    assert p.sq.execute("query-status")["status"] == "running"
    assert runs_on(p.src.vm), p.src.vm.serial.output[-80:]


NO_USERFAULTFD = [
    pytest.param(Backing.ANON_4K, 0, "THREAD_ID", id="4K-no-thread-id"),
    pytest.param(Backing.MEMFD_4K, FEATURE_THREAD_ID, "MISSING_SHMEM",
                 id="4K-memfd-no-shmem"),
    pytest.param(Backing.HUGETLB_2M, FEATURE_THREAD_ID, "MISSING_HUGETLBFS",
                 id="2M-no-hugetlbfs"),
]


@pytest.mark.parametrize("backing,features,missing", NO_USERFAULTFD)
def test_destination_without_userfaultfd_features_refuses_before_the_source_stops(
        tmp_path: Path, request: pytest.FixtureRequest, backing: Backing, features: int,
        missing: str) -> None:
    hugepages_checked(request, backing)
    with migration_pair(tmp_path, postcopy_config("ab", backing)) as p:
        p.listen()
        assert p.dst.incoming is not None
        p.dst.incoming.uffd_features = lambda: features  # a host without them
        p.migrate()
        dst_info = wait_migration(p.dq, 60)
        assert dst_info["status"] == "failed"
        assert missing in dst_info["error-desc"], dst_info
        src_info = wait_migration(p.sq, 60)
        assert src_info["status"] == "failed", src_info
        assert src_info["error-desc"], src_info
        assert_source_untouched(p)


def test_destination_without_postcopy_ram_refuses_before_the_source_stops(
        tmp_path: Path) -> None:
    cfg = PairConfig("ab", src_caps=caps_of(postcopy=True), dst_caps=caps_of(postcopy=False),
                     params=NO_CONVERGENCE)
    with migration_pair(tmp_path, cfg) as p:
        p.listen()
        p.migrate()
        dst_info = wait_migration(p.dq, 60)
        assert dst_info["status"] == "failed"
        assert "postcopy-ram" in dst_info["error-desc"], dst_info
        assert wait_migration(p.sq, 60)["status"] == "failed"
        assert_source_untouched(p)


def test_source_vm_closes_after_its_postcopy_setup_is_refused(tmp_path: Path) -> None:
    cfg = PairConfig("ab", src_caps=caps_of(postcopy=True), dst_caps=caps_of(postcopy=False),
                     params=NO_CONVERGENCE)
    with migration_pair(tmp_path, cfg) as p:
        p.listen()
        p.migrate()
        assert wait_migration(p.sq, 60)["status"] == "failed"
        assert p.src.outgoing is not None
        p.src.outgoing.join(30)
        p.src.close()  # what `quit` does in `livemig run`


PAGE_SIZE_MISMATCH = [
    pytest.param(Backing.ANON_4K, Backing.HUGETLB_2M, id="4K-to-2M"),
    pytest.param(Backing.HUGETLB_2M, Backing.ANON_4K, id="2M-to-4K"),
]


@pytest.mark.parametrize("src_backing,dst_backing", PAGE_SIZE_MISMATCH)
def test_page_size_mismatch_is_refused_at_setup(
        tmp_path: Path, request: pytest.FixtureRequest, src_backing: Backing,
        dst_backing: Backing) -> None:
    hugepages_checked(request, src_backing, dst_backing)
    cfg = PairConfig("ab", src_backing, dst_backing, src_caps=caps_of(postcopy=True),
                     params=NO_CONVERGENCE)
    with migration_pair(tmp_path, cfg) as p:
        p.listen()
        p.migrate()
        dst_info = wait_migration(p.dq, 60)
        assert dst_info["status"] == "failed"
        assert "page size" in dst_info["error-desc"], dst_info
        src_info = wait_migration(p.sq, 60)
        assert src_info["status"] == "failed"
        assert_source_untouched(p)


# --- a hostile destination -------------------------------------------------------------------
BAD_REQUESTS = [
    pytest.param(ReturnPathEncoder().req_pages("nope", 0, 4096), "unknown RAM block",
                 id="unknown-block"),
    pytest.param(raw_request("pc.ram", MEM, 4096), "outside block", id="offset-past-the-end"),
    pytest.param(raw_request("pc.ram", MEM - 4096, 2 * 4096), "outside block",
                 id="range-past-the-end"),
    pytest.param(raw_request("pc.ram", 0x101001, 4096), "not whole", id="misaligned-start"),
    pytest.param(raw_request("pc.ram", 0x100000, 0), "not whole", id="empty-range"),
]


def on_first(kind: type | tuple[type, ...], reply: bytes) -> Callable[[object], bytes | None]:
    """An attack that answers the first event of ``kind`` with ``reply``."""
    sent = threading.Event()

    def attack(e: object) -> bytes | None:
        if isinstance(e, kind) and not sent.is_set():
            sent.set()
            return reply
        return None

    return attack


@contextlib.contextmanager
def source_to_fake(tmp_path: Path, attack: Callable[[object], bytes | None]
                   ) -> Iterator[tuple[Instance, QmpClient, FakeDestination]]:
    with guest_instance(tmp_path, "ab", "src") as src, client(src) as sq:
        sq.execute("migrate-set-capabilities", capabilities=capabilities(postcopy=True))
        sq.execute("migrate-set-parameters", **NO_CONVERGENCE)
        fake = FakeDestination(str(tmp_path / "fake.sock"), block_table(src.vm.blocks), attack)
        try:
            yield src, sq, fake
        finally:
            fake.close()


@pytest.mark.parametrize("bad,hint", BAD_REQUESTS)
def test_bad_page_request_in_precopy_fails_the_source_which_runs_on(
        tmp_path: Path, bad: bytes, hint: str) -> None:
    with source_to_fake(tmp_path, on_first((ev.PageBatch, ev.PageHeader), bad)) as (
            src, sq, fake):
        sq.execute("migrate", uri=fake.uri)
        info = wait_migration(sq, 60)
        assert info["status"] == "failed", info
        assert hint in info["error-desc"], info
        assert fake.ended.wait(30)
        assert fake.error is None, fake.error  # every page it got was a valid one
        assert "StreamEnd" not in fake.seen
        assert not [e for e in events(sq) if e["event"] == "STOP"]
        assert sq.execute("query-status")["status"] == "running"
        assert runs_on(src.vm)
        assert not src.vm.main_block.logging


def test_bad_page_request_in_postcopy_pauses_the_source_without_restarting_it(
        tmp_path: Path) -> None:
    """In postcopy the guest runs on the destination: any failure, a bad request
    included, pauses the source (postcopy-paused, recoverable) instead of failing it."""
    bad = raw_request("pc.ram", MEM, 4096)
    with source_to_fake(tmp_path, on_first(ev.PostcopyRun, bad)) as (src, sq, fake):
        sq.execute("migrate", uri=fake.uri)
        start_postcopy_after_first_round(sq)
        info = wait_migration(sq, 60, until=("postcopy-paused", *FINISHED))
        assert info["status"] == "postcopy-paused", info
        assert "outside block" in info["error-desc"], info
        assert "postcopy-active" in migration_statuses(events(sq, ends_migration))
        assert fake.ended.wait(30)
        assert fake.error is None, fake.error
        # The guest may have run on the destination: it must never run here again.
        assert not sq.execute("query-status")["running"]


# --- a peer that vanishes mid-postcopy --------------------------------------------------------
def incoming_threads() -> list[str]:
    return [t.name for t in threading.enumerate()
            if t.name in ("incoming", "postcopy/fault", "postcopy/recv")]


def assert_destination_paused(dq: QmpClient, says: str) -> None:
    """Paused within a bound (not failed: the guest lives on there), the reason in
    error-desc, still answering QMP."""
    info = wait_migration(dq, 60, until=("postcopy-paused", *FINISHED))
    assert info["status"] == "postcopy-paused", info
    assert says in info.get("error-desc", ""), info
    assert "postcopy-active" in migration_statuses(events(dq, ends_migration))
    assert dq.execute("query-status")["status"] == "running"  # faults just wait


@pytest.fixture
def source_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], QmpClient]]:
    """``livemig run --guest ab`` in a child process (so it can be killed)."""
    qmp, serial = tmp_path / "src.qmp", tmp_path / "src.serial"
    log = open(tmp_path / "src.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "livemig", "run", "--guest", "ab",
                             "--mem", "32M", "--qmp", str(qmp), "--serial", str(serial)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        assert wait_until(lambda: serial.exists() and serial.read_bytes().count(b"B") >= 2,
                          60), (tmp_path / "src.log").read_text()
        sq = QmpClient(str(qmp), timeout=30)
        try:
            yield proc, sq
        finally:
            sq.close()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        log.close()


def test_destination_pauses_when_the_source_process_is_killed_in_postcopy(
        tmp_path: Path, source_process: tuple[subprocess.Popen[bytes], QmpClient]) -> None:
    proc, sq = source_process
    with guest_instance(tmp_path, None, "dst") as dst, client(dst) as dq:
        for q in (sq, dq):
            q.execute("migrate-set-capabilities", capabilities=capabilities(postcopy=True))
        sq.execute("migrate-set-parameters", **NO_CONVERGENCE,
                   **{"max-postcopy-bandwidth": SLOW_POSTCOPY})
        uri = f"unix:{tmp_path / 'mig.sock'}"
        dq.execute("migrate-incoming", uri=uri)
        sq.execute("migrate", uri=uri)
        start_postcopy_after_first_round(sq)
        wait_migration(dq, until=("postcopy-active", *FINISHED))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        # The VM cannot be saved now (half its memory died with the source); the
        # destination says the source is gone and waits, as QEMU does.
        assert_destination_paused(dq, "lost the connection to the source")
    # Quitting the destination ends it: threads gone, nothing left behind.
    assert not incoming_threads()


@pytest.mark.parametrize("preempt", [False, True], ids=["postcopy", "preempt"])
def test_cut_connections_in_postcopy_pause_both_sides_and_a_recovery_completes(
        tmp_path: Path, preempt: bool) -> None:
    cfg = PairConfig("ab", src_caps=caps_of(postcopy=True, preempt=preempt),
                     params={**NO_CONVERGENCE, "max-postcopy-bandwidth": SLOW_POSTCOPY})
    with migration_pair(tmp_path, cfg) as p:
        p.listen()
        relay = Relay(str(tmp_path / "relay.sock"), p.uri.removeprefix("unix:"))
        p.sq.execute("migrate", uri=relay.uri)
        start_postcopy_after_first_round(p.sq)
        wait_migration(p.dq, until=("postcopy-active", *FINISHED))
        relay.cut()
        assert_destination_paused(p.dq, "lost the connection to the source")
        assert wait_migration(p.sq, 60, until=("postcopy-paused", *FINISHED))[
            "status"] == "postcopy-paused"
        assert not p.sq.execute("query-status")["running"]  # never runs here again
        uri = f"unix:{tmp_path / 'recover.sock'}"
        p.dq.execute("migrate-recover", uri=uri)
        p.sq.execute("migrate", uri=uri, resume=True)
        assert wait_migration(p.sq, 90)["status"] == "completed"
        assert wait_migration(p.dq, 90)["status"] == "completed"
        assert runs_on(p.dst.vm)
        assert guest_check(p.dq, "ab")["bad_pages"] == 0


def test_closing_a_destination_in_postcopy_waits_for_its_load_thread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The load thread's work after "failed" (stopping the guest's faults, releasing its
    # views of guest RAM, closing channels) may take a while: make its last step take
    # 0.5 s, so a close that does not wait for the thread fails whatever the scheduling.
    listener_close = Listener.close

    def slow_close_in_the_load_thread(listener: Listener) -> None:
        listener_close(listener)
        if threading.current_thread().name == "incoming":
            time.sleep(0.5)

    monkeypatch.setattr(Listener, "close", slow_close_in_the_load_thread)
    thread_errors: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda a: thread_errors.append(a.exc_value))
    cfg = postcopy_config("ab", **{"max-postcopy-bandwidth": SLOW_POSTCOPY})
    with migration_pair(tmp_path, cfg) as p:
        p.listen()
        p.migrate()
        start_postcopy_after_first_round(p.sq)
        wait_migration(p.dq, until=("postcopy-active", *FINISHED))
        closing = threading.Thread(target=p.dst.close, daemon=True)  # what `quit` does
        closing.start()
        closing.join(30)
        assert not closing.is_alive(), "Instance.close() of the destination hung"
        assert thread_errors == []
        assert not incoming_threads()


# --- quitting mid-postcopy --------------------------------------------------------------------
def test_quitting_a_source_in_postcopy_releases_its_vm(tmp_path: Path) -> None:
    cfg = postcopy_config("ab", **{"max-postcopy-bandwidth": SLOW_POSTCOPY})
    with migration_pair(tmp_path, cfg) as p:
        p.listen()
        p.migrate()
        start_postcopy_after_first_round(p.sq)
        wait_migration(p.sq, until=("postcopy-active", *FINISHED))
        p.src.close()  # what `quit` (or SIGTERM) does in `livemig run`
        assert p.src.vm.runstate.value == "shutdown"
        out = p.src.outgoing
        assert out is not None and out.wait(5)
        assert out.status.status.value == "failed"  # nothing to cancel in postcopy

