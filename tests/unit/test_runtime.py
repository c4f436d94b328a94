"""SwitchInterval: the GIL switch interval stays low while any migration needs it."""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from livemig.migration.channel import Channel
from livemig.migration.fault_handler import ThreadFaultHandler
from livemig.runtime import (
    BACKGROUND_NICE,
    MAX_NICE,
    POSTCOPY_SWITCH_INTERVAL,
    NamedThread,
    SwitchInterval,
    lower_thread_priority,
)

BASELINE = 0.005


def interval_is(seconds: float) -> bool:
    # The interpreter keeps whole microseconds, truncating (1e-4 s reads back as 99 µs).
    return abs(sys.getswitchinterval() - seconds) < 2e-6


@pytest.fixture(autouse=True)
def baseline() -> Iterator[None]:
    before = sys.getswitchinterval()
    sys.setswitchinterval(BASELINE)
    yield
    left = sys.getswitchinterval()
    sys.setswitchinterval(before)
    assert abs(left - BASELINE) < 1e-6, "a test left the switch interval changed"


def test_interval_is_low_inside_and_restored_after() -> None:
    with SwitchInterval().switch_interval(POSTCOPY_SWITCH_INTERVAL):
        assert interval_is(POSTCOPY_SWITCH_INTERVAL)
    assert interval_is(BASELINE)


def test_interval_is_restored_when_the_block_raises() -> None:
    owner = SwitchInterval()
    with pytest.raises(RuntimeError), owner.switch_interval(1e-4):
        raise RuntimeError("postcopy failed")
    assert interval_is(BASELINE) and owner.held == 0


def test_interval_stays_low_until_the_last_of_two_overlapping_migrations_leaves() -> None:
    owner = SwitchInterval()
    first = owner.switch_interval(POSTCOPY_SWITCH_INTERVAL)
    second = owner.switch_interval(POSTCOPY_SWITCH_INTERVAL)
    first.release()  # not in reverse order of taking
    assert interval_is(POSTCOPY_SWITCH_INTERVAL)
    second.release()
    assert interval_is(BASELINE)


def test_the_smallest_interval_asked_for_is_in_force() -> None:
    owner = SwitchInterval()
    coarse = owner.switch_interval(1e-3)
    fine = owner.switch_interval(1e-4)
    assert interval_is(1e-4)
    fine.release()
    assert interval_is(1e-3)
    coarse.release()
    assert interval_is(BASELINE)


def test_releasing_twice_does_not_end_another_lease() -> None:
    owner = SwitchInterval()
    lease = owner.switch_interval(1e-4)
    other = owner.switch_interval(1e-4)
    lease.release()
    lease.release()
    assert owner.held == 1 and interval_is(1e-4)
    other.release()
    assert owner.held == 0


def test_leases_taken_and_released_on_many_threads_restore_the_baseline() -> None:
    owner = SwitchInterval()
    go = threading.Barrier(8)

    def migrate() -> None:
        go.wait()
        for _ in range(200):
            with owner.switch_interval(POSTCOPY_SWITCH_INTERVAL):
                assert interval_is(POSTCOPY_SWITCH_INTERVAL)

    threads = [threading.Thread(target=migrate) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert owner.held == 0 and interval_is(BASELINE)


def test_nonpositive_interval_is_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        SwitchInterval().switch_interval(0)


def test_a_second_owner_changing_the_interval_is_reported(
        caplog: pytest.LogCaptureFixture) -> None:
    mine, stray = SwitchInterval(), SwitchInterval()
    with caplog.at_level(logging.WARNING, logger="livemig.runtime"):
        lease = mine.switch_interval(1e-4)
        stray_lease = stray.switch_interval(1e-3)  # raises it under our lease
        lease.release()
        stray_lease.release()
    assert any("second SwitchInterval" in r.getMessage() for r in caplog.records)
    # Two owners leave the interval wrong (the stray one put back 1e-4): the reason
    # a process has one owner.
    assert interval_is(1e-4)
    sys.setswitchinterval(BASELINE)


def test_one_owner_warns_about_nothing(caplog: pytest.LogCaptureFixture) -> None:
    owner = SwitchInterval()
    with (caplog.at_level(logging.WARNING, logger="livemig.runtime"),
          owner.switch_interval(1e-3 / 3), owner.switch_interval(1e-4 / 7)):
        pass
    assert not caplog.records


def test_lower_thread_priority_makes_only_the_calling_thread_nicer() -> None:
    def nice_of(tid: int) -> int:
        return os.getpriority(os.PRIO_PROCESS, tid)

    main_tid = threading.get_native_id()
    before = nice_of(main_tid)
    seen: dict[str, int] = {}

    def background() -> None:
        tid = threading.get_native_id()
        seen["before"] = nice_of(tid)
        lower_thread_priority()
        seen["after"] = nice_of(tid)

    t = threading.Thread(target=background)
    t.start()
    t.join(10)
    assert seen["after"] == min(MAX_NICE, seen["before"] + BACKGROUND_NICE)
    assert seen["after"] > seen["before"] or seen["before"] == MAX_NICE
    assert nice_of(main_tid) == before  # the process and its other threads keep theirs


@pytest.mark.parametrize("with_postcopy_channel", [True, False])
def test_the_load_thread_yields_the_cpu_only_when_requested_pages_come_elsewhere(
        with_postcopy_channel: bool) -> None:
    """Thread fault handling: with a postcopy channel the load thread places only
    background pages once postcopy listens, and becomes nicer; without one it places
    requested pages too, and keeps its priority."""
    a, b = socket.socketpair()
    post = Channel(sock=a, name="postcopy") if with_postcopy_channel else None
    handler = ThreadFaultHandler(post, SwitchInterval())
    seen: dict[str, int] = {}

    def load() -> None:
        tid = threading.get_native_id()
        seen["before"] = os.getpriority(os.PRIO_PROCESS, tid)
        handler.listen()
        seen["after"] = os.getpriority(os.PRIO_PROCESS, tid)

    t = threading.Thread(target=load)
    t.start()
    t.join(10)
    handler.stop()
    a.close()
    b.close()
    expected = min(MAX_NICE, seen["before"] + BACKGROUND_NICE) if with_postcopy_channel \
        else seen["before"]
    assert seen["after"] == expected


@pytest.mark.parametrize(("name", "kernel"), [("postcopy/fault", "postcopy/fault"),
                                               ("qmp-accept:/tmp/x.qmp", "qmp-accept:/tmp")])
def test_a_named_thread_carries_its_name_in_the_kernel(name: str, kernel: str) -> None:
    """``ps -L``/``top -H``/``perf`` see the Python name, cut to the kernel's 15 bytes."""
    seen: list[str] = []

    def look() -> None:
        seen.append(Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text()
                    .strip())

    t = NamedThread(target=look, name=name)
    t.start()
    t.join()
    assert seen == [kernel]
