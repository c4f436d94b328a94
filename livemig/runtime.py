"""The interpreter's GIL switch interval, lowered while a postcopy needs it; the CPU
priority of a thread that streams background pages while helper processes answer
page requests, and of the threads and processes that answer them.

Theory of operation
-------------------
CPython hands the GIL from a running thread to a waiting one only every *switch
interval* (5 ms by default).  During postcopy that interval is latency: a fault or a
page request wakes a thread (the destination's fault thread, the source's return-path
thread) which then waits up to one interval for the thread streaming background
pages to let go of the GIL.  So while postcopy runs the interval is lowered to
:data:`POSTCOPY_SWITCH_INTERVAL`, and put back when it ends.

The interval is state of the whole process, and one process may run several
migrations at a time (a source and a destination in one test process, say).  Saving
and restoring around each one is then wrong as soon as they do not end in the
reverse order they started: the first to finish would put back 5 ms under the other,
or the last would leave the process at 50 µs for good.  One owner,
:class:`SwitchInterval`, therefore keeps every request in force: each user takes a
:class:`SwitchIntervalLease`; while any lease is held the interval is the smallest
one asked for, and the value found before the first lease is put back when the last
lease is released, in whatever order the leases end.

The owner is an object, not module state: there must be exactly one per process
(the interpreter is one), so the program's entry point creates it and hands the same
one to every migration it runs -- each ``Instance`` receives it rather than making
its own.  Two owners in one process would undo each other's lowering; an owner that
finds the interval changed behind its back logs a warning, so that mistake shows.

Background threads and helper processes
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
With the helper-process design (``x-postcopy-urgent-sender=process``) a page request
never needs this process's GIL, but it needs a CPU: the helpers (and, on the
destination, the vCPU that faulted) are woken by one packet and run for microseconds,
while the migration thread (source) and the load thread (destination) stream
background pages for as long as the postcopy lasts -- with TLS, encrypting and
decrypting every byte.  When the CPUs are busy, a woken helper waits for the
scheduler behind them.

Nice values weigh threads against each other only inside one scheduling group, and
each VMM is a group of its own (an autogroup per session, a cgroup per VM under
libvirt or systemd): a helper woken while other VMMs' threads hold every CPU still
waits for one, 0.2 ms on average and up to 6 ms on this project's 2-CPU machine
(``perf sched latency``).  So the threads and helper processes that answer page
requests -- the destination's fault thread or fault server and postcopy receiver, the
source's return-path thread or urgent helper -- enter the real-time class
(``SCHED_FIFO``) at :class:`UrgentPriority`'s priority (``x-postcopy-urgent-priority``,
default 1), which preempts every time-sharing thread the moment it wakes.  Their work
per wake-up is one request's (microseconds), they block in ``poll`` between requests,
and the kernel's real-time throttling (``kernel.sched_rt_runtime_us``) keeps a share
of every second for everyone else.  Only threads and processes that end with their
migration enter it, and what they start (a thread for a recovery, a process) does not
inherit it (``SCHED_RESET_ON_FORK``).  Without the privilege (``CAP_SYS_NICE`` or an
``RLIMIT_RTPRIO`` at least the priority) they stay time-sharing, and a warning says so.

The threads that stream background pages keep their priority when the urgent ones are
real-time: they lose the CPU to them anyway, and anything nicer loses it to the
guest's vCPUs too (nice 0), which on the destination run all through postcopy -- the
load thread then starts late after each wake-up, and the link idles between its
writes (a 1 Gbit/s link carried 107 MB/s instead of 116 so).  Only when the urgent
threads are time-sharing (priority 0) does :meth:`UrgentPriority.background_thread`
raise the background thread's nice value by :data:`BACKGROUND_NICE` (on Linux nice is
per thread, and raising it needs no privilege), so that the scheduler lets the short
urgent work run first; it cannot be undone without privilege, so only threads that
end with their migration call it.

"""

from __future__ import annotations

import logging
import os
import sys
import threading
from dataclasses import dataclass
from typing import Final

log = logging.getLogger("livemig.runtime")

# A woken thread waits for the GIL at most this long: 100x shorter than CPython's
# default, small next to a page request's network round trip, large enough that the
# streaming thread still runs in long stretches (switching costs a few microseconds).
POSTCOPY_SWITCH_INTERVAL: Final = 50e-6
# How much nicer a background-streaming thread becomes while helpers answer requests:
# CFS then weighs it about 3x lighter than a nice-0 helper (1024 against 335).
BACKGROUND_NICE: Final = 5
MAX_NICE: Final = 19
# The SCHED_FIFO priority of the threads that answer page requests (1: the lowest
# real-time priority, above every time-sharing thread).
DEFAULT_URGENT_PRIORITY: Final = 1
MAX_URGENT_PRIORITY: Final = 99


class NamedThread(threading.Thread):
    """A thread the kernel knows by its Python name too: ``top -H``, ``ps -L``,
    ``perf`` and ``/proc/PID/task/TID/comm`` show it (its first 15 bytes), as they show
    QEMU's ``CPU 0/KVM`` or ``live_migration`` with ``-name debug-threads=on``."""

    def run(self) -> None:
        name_os_thread(self.name)
        super().run()


def name_this_thread() -> None:
    """Give the calling thread its Python name in the kernel (a pool's initializer)."""
    name_os_thread(threading.current_thread().name)


def name_os_thread(name: str) -> None:
    """Give the calling thread ``name`` (cut to the kernel's 15 bytes) in the kernel."""
    fd = os.open("/proc/thread-self/comm", os.O_WRONLY)
    try:
        os.write(fd, name.encode()[:15])
    finally:
        os.close(fd)


def lower_thread_priority(by: int = BACKGROUND_NICE) -> None:
    """Raise the calling thread's nice value by ``by`` (at most to 19): see the module
    docstring.  Only for threads that end with their migration."""
    tid = threading.get_native_id()
    now = os.getpriority(os.PRIO_PROCESS, tid)
    os.setpriority(os.PRIO_PROCESS, tid, min(MAX_NICE, now + by))


@dataclass(frozen=True)
class UrgentPriority:
    """The real-time priority of the threads and processes that answer page requests
    (``x-postcopy-urgent-priority``): ``SCHED_FIFO`` at ``priority``, 0 for none (see
    the module docstring)."""

    priority: int = DEFAULT_URGENT_PRIORITY

    def apply(self, tid: int = 0) -> bool:
        """Put thread ``tid`` (0: the calling one; a process's only thread is the
        process) in the real-time class; False if the priority is 0 or the privilege is
        missing (then with a warning: page requests wait for busy CPUs)."""
        if not self.priority:
            return False
        try:
            os.sched_setscheduler(tid, os.SCHED_FIFO | os.SCHED_RESET_ON_FORK,
                                  os.sched_param(self.priority))
        except PermissionError:
            log.warning("page requests are answered at normal priority: SCHED_FIFO %d "
                        "needs CAP_SYS_NICE or RLIMIT_RTPRIO >= %d "
                        "(x-postcopy-urgent-priority 0 silences this)",
                        self.priority, self.priority)
            return False
        return True

    def background_thread(self) -> None:
        """The calling thread streams background pages from here while others answer
        page requests: it becomes nicer only if they are time-sharing (see the module
        docstring).  Only for threads that end with their migration."""
        if not self.priority:
            lower_thread_priority()


class SwitchInterval:
    """The one owner of ``sys.setswitchinterval`` in a process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._leases: set[SwitchIntervalLease] = set()
        self._baseline = 0.0  # the interval before the first lease (valid while any)
        self._applied = 0.0  # what this owner last set (valid while any lease)

    def switch_interval(self, seconds: float) -> SwitchIntervalLease:
        """Keep the interval at most ``seconds`` until the returned lease is released.

        Takes effect at once, so the lease may outlive a ``with`` block (released by
        whoever ends the postcopy); used as a context manager it is released on exit.
        """
        if not seconds > 0:
            raise ValueError(f"switch interval {seconds!r} is not a positive number of seconds")
        lease = SwitchIntervalLease(self, seconds)
        with self._lock:
            if self._leases:
                self._check_untouched()
            else:
                self._baseline = sys.getswitchinterval()
            self._leases.add(lease)
            self._apply()
        return lease

    @property
    def held(self) -> int:
        """How many leases are in force."""
        with self._lock:
            return len(self._leases)

    def _release(self, lease: SwitchIntervalLease) -> None:
        with self._lock:
            if lease not in self._leases:
                return
            self._check_untouched()
            self._leases.remove(lease)
            self._apply()

    def _check_untouched(self) -> None:
        # While leases are held, the interval is what this owner set, unless someone
        # else (another owner) set it too.
        current = sys.getswitchinterval()
        if current != self._applied:
            log.warning("the GIL switch interval is %g s, not the %g s its owner set "
                        "(a second SwitchInterval in this process?)", current, self._applied)

    def _apply(self) -> None:
        wanted = min((x.seconds for x in self._leases), default=self._baseline)
        if wanted != sys.getswitchinterval():
            sys.setswitchinterval(wanted)
        self._applied = sys.getswitchinterval()  # as the interpreter rounded it


class SwitchIntervalLease:
    """One user's request for a short switch interval; :meth:`release` ends it (once:
    releasing again does nothing, so every cleanup path may call it)."""

    def __init__(self, owner: SwitchInterval, seconds: float) -> None:
        self._owner = owner
        self.seconds = seconds

    def release(self) -> None:
        self._owner._release(self)

    def __enter__(self) -> SwitchIntervalLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
