"""Reserving and mapping huge pages is atomic across processes (the pool lock).

Several processes reserve, map and touch 2 MiB pages at the same moment, again and again:
without the lock one process sees the pages another has just added as free, maps them,
and the other's ``mmap`` fails.  Every attempt must succeed, and the pool must end at
the size it started with.  Pages are given back through the ledger in the lock file, so
even the pages of a process killed while mapping them return to the pool.
"""

from __future__ import annotations

import fcntl
import multiprocessing as mp
import os
import stat
import time
from collections.abc import Callable
from multiprocessing.synchronize import Barrier

import pytest
from conftest import needs_root

from livemig.errors import LivemigError
from livemig.kernel.mman import (
    LOCK_FILE_MODE,
    MIB,
    Backing,
    HugepagePoolLock,
    HugepageReservation,
    Mapping,
    free_hugepages,
    hugepage_lock_path,
    map_guest_ram,
    persistent_hugepages,
)

PROCESSES = 4
ROUNDS = 10
HUGE = 2 * MIB
SETUP_S = 0.01  # between reserving and mapping, as when a child process maps later
MAX_FREE_POOL = 256  # pages; a larger idle pool would make each round map too much


def _map_reserving(pages: int) -> Mapping:
    """What the VMM does: one call reserves and maps; close gives the pages back."""
    return map_guest_ram(pages * HUGE, Backing.HUGETLB_2M, "pool-test", reserve=True)


def _reserve_then_map(pages: int) -> Mapping:
    """What a harness does for a QEMU child: reserve, let the child start (here: a
    pause), and it maps the pages later."""
    reservation = HugepageReservation(HUGE, pages).acquire()
    try:
        time.sleep(SETUP_S)
        mapping = map_guest_ram(pages * HUGE, Backing.HUGETLB_2M, "pool-test")
    except BaseException:
        reservation.release()
        raise
    reservation.mapped()
    return Mapping(mapping.mm, mapping.size, mapping.backing, mapping.fd, reservation)


def _reserve_map_touch(how: Callable[[int], Mapping], pages: int, barrier: Barrier,
                       results: mp.Queue[str]) -> None:
    failures = []
    for _ in range(ROUNDS):
        barrier.wait()
        try:
            mapping = how(pages)
        except LivemigError as e:
            failures.append(str(e))
            continue
        mapping.mm[0] = 1  # the first and the last page really are ours
        mapping.mm[pages * HUGE - 1] = 1
        mapping.close()
    results.put("\n".join(failures))


@needs_root
@pytest.mark.usefixtures("hugepages_restored")
@pytest.mark.parametrize("how", [_map_reserving, _reserve_then_map],
                         ids=["map-reserving", "reserve-then-map"])
def test_concurrent_processes_all_reserve_and_map_their_huge_pages(
        how: Callable[[int], Mapping]) -> None:
    if not os.path.isdir("/sys/kernel/mm/hugepages/hugepages-2048kB"):
        pytest.skip("kernel has no 2 MiB huge pages")
    idle = free_hugepages(HUGE)
    if idle > MAX_FREE_POOL:
        pytest.skip(f"{idle} idle 2 MiB pages already reserved by someone else")
    # More than the idle pool, so every process must raise the pool for itself: the
    # moment another could take the pages it just added.
    pages = idle + 2
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(PROCESSES)
    results: mp.Queue[str] = ctx.Queue()
    procs = [ctx.Process(target=_reserve_map_touch, args=(how, pages, barrier, results))
             for _ in range(PROCESSES)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert [o for o in outcomes if o] == []


@needs_root
def test_pool_lock_excludes_other_processes_until_dropped() -> None:
    def try_lock() -> int:
        pid = os.fork()
        if pid == 0:
            fd = os.open(hugepage_lock_path(HUGE), os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os._exit(1)
            os._exit(0)
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    with HugepagePoolLock(HUGE):
        info = os.stat(hugepage_lock_path(HUGE))
        assert stat.S_ISREG(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == LOCK_FILE_MODE == 0o644
        assert try_lock() == 1  # held: another process cannot take it
    assert try_lock() == 0


def _map_and_wait(pages: int, ready: mp.Queue[str]) -> None:
    mapping = map_guest_ram(pages * HUGE, Backing.HUGETLB_2M, "pool-test", reserve=True)
    mapping.mm[0] = 1
    ready.put("mapped")
    time.sleep(60)  # killed long before


@needs_root
@pytest.mark.usefixtures("hugepages_restored")
def test_pages_of_a_killed_process_are_given_back_by_the_next_release() -> None:
    if not os.path.isdir("/sys/kernel/mm/hugepages/hugepages-2048kB"):
        pytest.skip("kernel has no 2 MiB huge pages")
    start = persistent_hugepages(HUGE)
    ctx = mp.get_context("fork")
    ready: mp.Queue[str] = ctx.Queue()
    victim = ctx.Process(target=_map_and_wait, args=(free_hugepages(HUGE) + 2, ready))
    victim.start()
    assert ready.get(timeout=60) == "mapped"
    victim.kill()
    victim.join(30)
    assert persistent_hugepages(HUGE) > start  # it died without giving its pages back
    map_guest_ram(HUGE, Backing.HUGETLB_2M, "pool-test", reserve=True).close()
    assert persistent_hugepages(HUGE) == start
