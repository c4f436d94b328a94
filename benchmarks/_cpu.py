"""CPU accounting: what a VMM process and the whole machine used during a migration.

Theory of operation
-------------------
:meth:`CpuTime.of` reads a process with psutil: its own user and system time, plus
that of its children that have exited and were waited for (``children_user``,
``children_system``), plus that of its descendants still running (each with its own
reaped children).  livemig's urgent helper processes (children of its helper server, a
child of the VMM) are part of the VMM's cost, and a helper that exits between two
readings moves its time from the live figure to its parent's reaped one, so the sum
stays whole.  Minor page faults come from the same
places; psutil does not report them, so they are read from ``/proc/PID/stat``
(``minflt`` + ``cminflt``).

:func:`machine_busy_seconds` is the CPU time every CPU of the machine has spent busy
since boot; what the machine used beyond the two VMMs during a migration is the noise
of other work on a shared box (:class:`Usage`).

:class:`PhaseMark` is :class:`Usage` plus the CPU time of the destination's vCPU
threads (their thread ids from ``query-cpus-fast``, which QEMU and livemig both
answer); two marks give a :class:`PhaseCpu`: what each VMM spent on one phase of a
migration (postcopy), with the guest's own running on the destination apart from the
work of migrating.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class CpuTime:
    """CPU seconds (user, system) and minor page faults of a process, all its threads."""

    user: float = 0.0
    system: float = 0.0
    minor_faults: int = 0

    @property
    def total(self) -> float:
        return self.user + self.system

    def __add__(self, other: CpuTime) -> CpuTime:
        return CpuTime(self.user + other.user, self.system + other.system,
                       self.minor_faults + other.minor_faults)

    def __sub__(self, other: CpuTime) -> CpuTime:
        return CpuTime(self.user - other.user, self.system - other.system,
                       self.minor_faults - other.minor_faults)

    @classmethod
    def of(cls, pid: int) -> CpuTime:
        """The process, its children that have exited (and were waited for), and its
        descendants still running: livemig's helpers are part of the VMM's cost."""
        proc = psutil.Process(pid)
        total = cls._with_reaped(proc)
        for child in proc.children(recursive=True):
            # A child that exits meanwhile: its time is in the parent's reaped figures.
            with contextlib.suppress(psutil.NoSuchProcess, FileNotFoundError,
                                     ProcessLookupError):
                total = total + cls._with_reaped(child)
        return total

    @classmethod
    def _with_reaped(cls, proc: psutil.Process) -> CpuTime:
        # Process totals, not threads: the migration threads have exited by the time the
        # migration is over, and only the process totals keep their time.
        t = proc.cpu_times()
        return cls(t.user + t.children_user, t.system + t.children_system,
                   _minor_faults(proc.pid))


def _minor_faults(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # the name may hold spaces
    return int(fields[7]) + int(fields[8])  # minflt + cminflt


def thread_seconds(pid: int, tid: int) -> float:
    """CPU seconds (user + system) thread ``tid`` of process ``pid`` has used."""
    stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs of this machine have spent busy since boot."""
    t = psutil.cpu_times()  # user already holds guest time, nice holds guest_nice
    return float(t.user + t.nice + t.system + t.irq + t.softirq + t.steal)


@dataclass(frozen=True)
class Usage:
    """What two processes (source, destination) and the whole machine had used at one
    instant."""

    at: float
    src: CpuTime
    dst: CpuTime
    busy: float

    @classmethod
    def take(cls, src_pid: int, dst_pid: int) -> Usage:
        return cls(time.monotonic(), CpuTime.of(src_pid), CpuTime.of(dst_pid),
                   machine_busy_seconds())

    def other_since(self, before: Usage) -> float:
        """CPU seconds the rest of the machine used between ``before`` and this."""
        used = (self.src - before.src).total + (self.dst - before.dst).total
        return max(self.busy - before.busy - used, 0.0)


@dataclass(frozen=True)
class PhaseCpu:
    """CPU seconds the two VMMs used in one phase of a migration: each process whole,
    and the destination's vCPU threads (the guest running) on their own."""

    src: float
    dst: float
    dst_vcpus: float

    @property
    def dst_migration(self) -> float:
        """The destination's CPU apart from running the guest: receiving, placing,
        faults."""
        return self.dst - self.dst_vcpus


@dataclass(frozen=True)
class PhaseMark:
    """What the two VMMs had used at one instant (the start or end of a phase)."""

    usage: Usage
    dst_vcpus: float

    @classmethod
    def take(cls, src_pid: int, dst_pid: int, vcpu_tids: Sequence[int]) -> PhaseMark:
        return cls(Usage.take(src_pid, dst_pid),
                   sum(thread_seconds(dst_pid, t) for t in vcpu_tids))

    def since(self, before: PhaseMark) -> PhaseCpu:
        return PhaseCpu((self.usage.src - before.usage.src).total,
                        (self.usage.dst - before.usage.dst).total,
                        self.dst_vcpus - before.dst_vcpus)
