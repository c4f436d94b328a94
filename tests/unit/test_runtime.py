"""SwitchInterval: the GIL switch interval stays low while any migration needs it."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from livemig.migration.channel import Channel
from livemig.migration.fault_handler import ThreadFaultHandler
from livemig.runtime import (
    BACKGROUND_NICE,
    MAX_NICE,
    POSTCOPY_SWITCH_INTERVAL,
    NamedThread,
    SwitchInterval,
    UrgentPriority,
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


@pytest.mark.parametrize(("with_postcopy_channel", "urgent_priority", "nicer"),
                         [(True, 0, True), (True, 1, False), (False, 0, False)])
def test_the_load_thread_yields_the_cpu_only_to_time_sharing_urgent_threads(
        with_postcopy_channel: bool, urgent_priority: int, nicer: bool) -> None:
    """Thread fault handling: with a postcopy channel the load thread places only
    background pages once postcopy listens; it becomes nicer when the threads that
    answer requests are time-sharing, and keeps its priority when they are real-time
    (they preempt it anyway; nicer, it would lose the CPU to the guest's vCPUs too).
    Without a postcopy channel it places requested pages too, and keeps its priority."""
    a, b = socket.socketpair()
    post = Channel(sock=a, name="postcopy") if with_postcopy_channel else None
    handler = ThreadFaultHandler(post, SwitchInterval(), UrgentPriority(urgent_priority))
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
    expected = min(MAX_NICE, seen["before"] + BACKGROUND_NICE) if nicer else seen["before"]
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


def _policy_in_thread(act: Callable[[int], bool], by_tid: bool = False) -> dict[str, Any]:
    """Run ``act`` in a fresh thread (its argument: the thread's kernel id, or 0 for
    "the calling thread"); what it returned and the thread's policy and priority after."""
    seen: dict[str, Any] = {}

    def body() -> None:
        tid = threading.get_native_id()
        seen["applied"] = act(tid if by_tid else 0)
        seen["policy"] = os.sched_getscheduler(tid)
        seen["priority"] = os.sched_getparam(tid).sched_priority

    t = threading.Thread(target=body)
    t.start()
    t.join(10)
    return seen


@pytest.mark.skipif(os.geteuid() != 0, reason="SCHED_FIFO needs CAP_SYS_NICE")
@pytest.mark.parametrize("by_tid", [False, True], ids=["calling-thread", "by-kernel-id"])
def test_urgent_priority_puts_only_its_thread_in_the_real_time_class(by_tid: bool) -> None:
    main_policy = os.sched_getscheduler(0)
    seen = _policy_in_thread(UrgentPriority(3).apply, by_tid)
    assert seen == {"applied": True, "policy": os.SCHED_FIFO | os.SCHED_RESET_ON_FORK,
                    "priority": 3}
    assert os.sched_getscheduler(0) == main_policy  # the other threads keep theirs


@pytest.mark.skipif(os.geteuid() != 0, reason="SCHED_FIFO needs CAP_SYS_NICE")
def test_what_a_real_time_thread_starts_runs_time_sharing() -> None:
    """A thread that answers page requests may start another (a recovery's): that one
    must not inherit the real-time class, or its long work would starve the host."""
    def start_one(_tid: int) -> bool:
        UrgentPriority(1).apply()
        inner = _policy_in_thread(lambda _t: True)
        return bool(inner["policy"] == os.SCHED_OTHER and inner["priority"] == 0)

    assert _policy_in_thread(start_one)["applied"] is True


def test_urgent_priority_0_leaves_the_thread_time_sharing() -> None:
    seen = _policy_in_thread(UrgentPriority(0).apply)
    assert seen == {"applied": False, "policy": os.SCHED_OTHER, "priority": 0}


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become an unprivileged user")
def test_without_the_privilege_urgent_priority_warns_and_the_thread_stays_time_sharing(
        ) -> None:
    """A VMM run by an unprivileged user: the request still succeeds at normal priority,
    and the log says why page requests may wait for busy CPUs."""
    code = ("import logging, os, sys\n"
            "logging.basicConfig(stream=sys.stdout, format='%(levelname)s %(message)s')\n"
            "from livemig.runtime import UrgentPriority\n"
            "os.setgid(65534); os.setuid(65534)\n"
            "print(UrgentPriority(1).apply(), os.sched_getscheduler(0) == os.SCHED_OTHER)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.splitlines()[-1] == "False True"
    assert "WARNING page requests are answered at normal priority" in out
