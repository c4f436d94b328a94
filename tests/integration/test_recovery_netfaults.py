"""Postcopy recovery under real network faults: two ``livemig run`` processes in two
network namespaces, a postcopy over TCP between them, and the kernel breaking it.

Each case starts a postcopy (``livemig.recoverylab``: the random guest, 64 MiB,
``x-dead-link-timeout`` 1500 ms on both sides, a slow postcopy), breaks it at a chosen
moment - the veth link down, every packet dropped by nftables, the TCP connections
destroyed with ``ss -K`` - and recovers it on a new port.  Every case ends with both
sides completed, the guest's check of every page on the destination at 0 bad pages, and
nothing left behind: the namespaces, both VMM processes and their helpers, and the huge
pages they reserved.

The cases marked ``slow`` (deselect with ``-m 'not slow'``) repeat what the others show
with another fault or page size; the link-down and ``ss -K`` cases always run.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import needs_kvm, needs_netlab, needs_nft

from livemig.errors import MigrationError, QmpError
from livemig.netlab import Shaping
from livemig.recoverylab import (
    DESIGNS,
    DROP_ALL,
    KILL_CONNECTIONS,
    LINK_DOWN,
    Cut,
    Fault,
    NetnsLink,
    RecoveryConfig,
    RecoveryRun,
    hugepages_2m,
    netns_link,
    status,
)
from livemig.wire.channel import ChannelKind
from livemig.wire.encoder import Encoder
from livemig.wire.returnpath import ReturnPathEncoder

pytestmark = [needs_netlab, needs_kvm, pytest.mark.kvm]

DEAD_LINK_MS = RecoveryConfig(DESIGNS["vanilla"]).dead_link_ms


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


@pytest.fixture
def link() -> Iterator[NetnsLink]:
    """A namespace pair; afterwards its namespaces and the huge pages are gone."""
    pool = hugepages_2m()
    with netns_link() as lab:
        yield lab
    assert not {e.ns for e in lab.pair.ends} & namespaces()
    assert hugepages_2m() == pool, "huge pages were not given back"


def migration(link: NetnsLink, tmp_path: Path, design: str, page_size: str) -> RecoveryRun:
    return RecoveryRun(link, tmp_path, RecoveryConfig(DESIGNS[design], page_size))


def finish(run: RecoveryRun) -> None:
    outcome = run.finish()
    assert outcome.completed, (outcome, run.src.log_text(), run.dst.log_text())
    assert (outcome.bad_pages, outcome.pages > 0) == (0, True), outcome
    assert outcome.latency_ns, "no page request was measured"


def descendants(pid: int) -> set[int]:
    """Every live descendant of ``pid`` (its helpers, and theirs)."""
    found: set[int] = set()
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return found  # gone meanwhile
    for tid in tasks:
        try:
            children = Path(f"/proc/{pid}/task/{tid}/children").read_text().split()
        except FileNotFoundError:
            continue
        for child in map(int, children):
            found |= {child} | descendants(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def assert_stopped(run: RecoveryRun, helpers: set[int]) -> None:
    """Both VMMs have exited, and with them every helper they had started."""
    assert not any(vmm.running() for vmm in (run.src, run.dst))
    assert not [pid for pid in helpers if alive(pid)], "helper processes left behind"


def processes(run: RecoveryRun) -> set[int]:
    return descendants(run.src.pid) | descendants(run.dst.pid)


def cut(run: RecoveryRun, fault: Fault) -> Cut:
    got = run.cut(fault)
    assert got is not None, "the migration completed before the fault took"
    return got


def test_a_link_down_until_both_sides_time_out_recovers_on_a_new_port(
        link: NetnsLink, tmp_path: Path) -> None:
    """(a) The veth link goes down during postcopy and stays down: each side notices
    the silent peer after its dead-link timeout and pauses; the link comes back, and a
    recovery on a new port completes the migration."""
    with migration(link, tmp_path, "vanilla", "4K") as run:
        run.start_postcopy()
        first_port = run.port
        time.sleep(0.1)  # both sides are in postcopy: cut before the few pages left are sent
        got = cut(run, LINK_DOWN)
        assert run.port != first_port
        # Nothing closed a socket: only the timeout can have noticed the cut link.
        assert DEAD_LINK_MS / 2000 <= got.to_paused <= 6 * DEAD_LINK_MS / 1000, got
        assert all(got.errors), got
        helpers = processes(run)
        finish(run)
    assert_stopped(run, helpers)


@needs_nft
@pytest.mark.slow
def test_dropping_every_packet_mid_huge_page_recovers(tmp_path: Path) -> None:
    """(b) nftables drops every packet while the migration thread streams 2 MiB pages
    (a huge page is then most likely half sent); both sides pause, the huge page is sent
    again after the recovery, whole.  The link is 100 Mbit/s: the guest's 32 huge pages
    are all requested at once, and on a faster link postcopy is over in 0.1 s."""
    with netns_link(Shaping(rate="100mbit")) as slow, \
            migration(slow, tmp_path, "vanilla", "2M") as run:
        run.start_postcopy()
        time.sleep(0.3)
        cut(run, DROP_ALL)
        helpers = processes(run)
        finish(run)
    assert_stopped(run, helpers)


def postcopy_requests(run: RecoveryRun) -> int:
    return int(run.src.qmp.execute("query-migrate")["ram"]["postcopy-requests"])


def kill_with_requests_in_flight(run: RecoveryRun) -> None:
    """ss -K just after the source received a new page request."""
    before = postcopy_requests(run)
    deadline = time.monotonic() + 30
    while postcopy_requests(run) == before:
        assert time.monotonic() < deadline, "the guest asked for no page"
        time.sleep(0.005)
    assert run.link.kill_connections(run.port) >= 1


KILL_IN_FLIGHT = Fault("ss-kill-in-flight", kill_with_requests_in_flight)


def test_killed_connections_with_requests_in_flight_recover_with_new_helpers(
        link: NetnsLink, tmp_path: Path) -> None:
    """(c) Preemption, urgent pages sent by a helper process: ``ss -K`` destroys every
    connection (main, postcopy channel, return path) just after the source received a
    page request, so requests are in flight on the postcopy channel; both sides pause,
    pending requests are served again after the recovery."""
    with migration(link, tmp_path, "preempt-process", "4K") as run:
        run.start_postcopy()
        old_helpers = processes(run)
        cut(run, KILL_IN_FLIGHT)
        assert processes(run) - old_helpers, "no new helper after the recovery"
        helpers = processes(run)
        finish(run)
    assert_stopped(run, helpers)


@pytest.mark.slow
def test_a_second_cut_during_the_resumed_postcopy_recovers_again(
        link: NetnsLink, tmp_path: Path) -> None:
    """(d) The link goes down, the migration recovers, and the resumed postcopy is cut
    again (its connections destroyed); a second recovery completes it."""
    with migration(link, tmp_path, "preempt-rp", "4K") as run:
        run.start_postcopy()
        time.sleep(0.3)
        cut(run, LINK_DOWN)
        time.sleep(0.3)
        cut(run, KILL_CONNECTIONS)
        assert run.recoveries == 2
        helpers = processes(run)
        finish(run)
    assert_stopped(run, helpers)


def wait_for(run: RecoveryRun, want: tuple[str, str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while (got := run.statuses()) != want:
        if time.monotonic() > deadline:
            raise MigrationError(f"not {want} after {timeout} s: {got}")
        time.sleep(0.02)


@needs_nft
@pytest.mark.parametrize("design", ["vanilla", "preempt-process"])
def test_a_cut_that_loses_only_the_final_shut_completes_the_source_on_recovery(
        link: NetnsLink, tmp_path: Path, design: str) -> None:
    """(e) The cut comes as the migration ends: the destination has every page,
    completes and sends SHUT, and the SHUT never arrives (nftables drops it at the
    source's end, every retransmission too).  The source, which cannot tell whether
    everything arrived, pauses; the destination stays completed.  The ordinary
    recovery completes the source too: the destination answers the resume with SHUT
    (with preemption, the resumed postcopy channel is closed unused), and the guest's
    memory on the destination is whole."""
    with migration(link, tmp_path, design, "4K") as run:
        shut = bytes(ReturnPathEncoder().shut(0))
        link.pair.drop_segments(link.pair.source, shut, sport=run.port)
        run.start_postcopy()
        wait_for(run, ("postcopy-paused", "completed"), timeout=90)
        link.pair.stop_dropping_segments(link.pair.source)
        assert "SHUT" in run.src.qmp.execute("query-migrate")["error-desc"]
        run.recover()
        assert run.statuses() == ("completed", "completed")
        helpers = processes(run)
        finish(run)
        # A second resume of a completed migration is refused by the source.
        with pytest.raises(QmpError, match="paused"):
            run.src.qmp.execute("migrate", uri=run.uri, resume=True)
        assert status(run.dst) == "completed"
    assert_stopped(run, helpers)


@needs_nft
@pytest.mark.parametrize("design", ["preempt-rp", "preempt-process"])
def test_a_cut_that_loses_the_postcopy_channels_end_pauses_and_recovers(
        link: NetnsLink, tmp_path: Path, design: str) -> None:
    """(f) Preemption: the source ends the postcopy channel (EOS), then the main
    channel (EOF); the cut loses only the postcopy channel's end (nftables drops the
    segment that holds the EOS alone, every retransmission too).  The destination has
    the main channel's EOF but waits for that end: the wait fails, which pauses both
    sides (it must not fail the migration: the guest runs there), and a recovery
    brings the end again on a new postcopy channel."""
    with migration(link, tmp_path, design, "4K") as run:
        enc = Encoder(channel=ChannelKind.POSTCOPY, postcopy=True)
        enc.preamble()
        eos = enc.eof()
        link.pair.drop_segments(link.pair.dest, eos, dport=run.port, alone=True)
        run.start_postcopy()
        got = run.wait("postcopy-paused", timeout=90)
        link.pair.stop_dropping_segments(link.pair.dest)
        assert got == ("postcopy-paused", "postcopy-paused"), got
        run.recover()
        helpers = processes(run)
        finish(run)
    assert_stopped(run, helpers)
