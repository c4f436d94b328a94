"""Tests for livemig.kernel.uffd against the real kernel (no KVM needed).

Faulting accesses are made by helper threads through ``ctypes.memmove``, a CFUNCTYPE
call that drops the GIL, so the test thread can read the fault and resolve it.  Every
wait is bounded by TIMEOUT; teardown closes the userfaultfd first (which wakes any
thread still blocked on a fault) and only unmaps memory once every thread is done.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import select
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from livemig.errors import ConfigError, UffdError
from livemig.kernel import uffd as U
from livemig.kernel.mman import Backing, HugepageReservation, map_guest_ram
from livemig.kernel.uffd import PageFault, Userfaultfd

PAGE = mmap.PAGESIZE
HUGE = 2 << 20
TIMEOUT = 10.0
HUGE_SYSFS = Path("/sys/kernel/mm/hugepages/hugepages-2048kB")


def pattern(length: int, seed: int = 7) -> bytes:
    return ((np.arange(length, dtype=np.uint64) * seed + 3) % 251).astype(np.uint8).tobytes()


def peek(addr: int, length: int) -> bytes:
    """Read memory that is known to be present (memmove: never holds the GIL)."""
    buf = ctypes.create_string_buffer(length)
    ctypes.memmove(buf, addr, length)
    return buf.raw


class Toucher:
    """A thread that reads (or writes) ``length`` bytes at ``addr`` and may block
    in a userfault until the test thread places the page."""

    def __init__(self, addr: int, length: int, write: bytes | None = None) -> None:
        self.addr, self.length = addr, length
        self.buf = ctypes.create_string_buffer(write or b"", length)
        self.write = write is not None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        if self.write:
            ctypes.memmove(self.addr, self.buf, self.length)
        else:
            ctypes.memmove(self.buf, self.addr, self.length)

    @property
    def tid(self) -> int | None:
        return self.thread.native_id

    def result(self) -> bytes:
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive(), "faulting thread was never woken"
        return self.buf.raw


class Guest:
    """A registered memory region, its userfaultfd and the threads touching it."""

    def __init__(self, uffd: Userfaultfd, addr: int, size: int) -> None:
        self.uffd, self.addr, self.size = uffd, addr, size
        self.touchers: list[Toucher] = []

    def page(self, index: int, page_size: int = PAGE) -> int:
        return self.addr + index * page_size

    def touch(self, addr: int, length: int, write: bytes | None = None) -> Toucher:
        toucher = Toucher(addr, length, write)
        self.touchers.append(toucher)
        return toucher

    def shutdown(self) -> bool:
        """Close the uffd (waking blocked threads) and join them; True if all ended."""
        self.uffd.close()
        for toucher in self.touchers:
            toucher.thread.join(TIMEOUT)
        return not any(t.thread.is_alive() for t in self.touchers)


def close_guest(guest: Guest, views: list[ctypes.Array[ctypes.c_char]],
                mm: mmap.mmap) -> None:
    """Close the guest, drop ``views`` (the only references to them) and unmap it; fail
    if a thread touching it did not end (the mapping is then left alone, not unmapped
    under the thread)."""
    ended = guest.shutdown()
    if ended:
        views.clear()
        mm.close()
    assert ended, "a thread touching the guest memory did not end"


def wait_for_faults(uffd: Userfaultfd, count: int, max_events: int = 64) -> list[PageFault]:
    faults: list[PageFault] = []
    deadline = time.monotonic() + TIMEOUT
    while len(faults) < count:
        remaining = deadline - time.monotonic()
        ready, _, _ = select.select([uffd], [], [], max(remaining, 0.0))
        if not ready:
            pytest.fail(f"only {len(faults)} of {count} faults reported within {TIMEOUT}s")
        faults += uffd.read_events(max_events)
    return faults


def open_guest(addr: int, size: int, features: int) -> Guest:
    uffd = Userfaultfd.open()
    try:
        uffd.api(features)
        uffd.register(addr, size)
    except BaseException:
        uffd.close()
        raise
    return Guest(uffd, addr, size)


@pytest.fixture
def anon() -> Iterator[Guest]:
    """4 private anonymous 4 KiB pages registered in MISSING mode."""
    size = 4 * PAGE
    mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    views = [(ctypes.c_char * size).from_buffer(mm)]
    guest = open_guest(ctypes.addressof(views[0]), size, U.FEATURE_THREAD_ID)
    yield guest
    close_guest(guest, views, mm)


@pytest.fixture
def shmem() -> Iterator[tuple[Guest, Callable[[int], None]]]:
    """4 pages of 4K-memfd guest RAM (shmem, mapped shared) registered in MISSING mode,
    with their old contents written before registration, and the mapping's discard."""
    size = 4 * PAGE
    mapping = map_guest_ram(size, Backing.MEMFD_4K, "livemig-uffd-shmem")
    mapping.mm[:] = b"\xaa" * size  # stale bytes a discard must drop
    views = [(ctypes.c_char * size).from_buffer(mapping.mm)]
    guest = open_guest(ctypes.addressof(views[0]), size,
                       U.FEATURE_MISSING_SHMEM | U.FEATURE_THREAD_ID)
    yield guest, lambda page: mapping.discard(page * PAGE, PAGE)
    close_guest(guest, views, mapping.mm)
    mapping.close()


# --- ABI -------------------------------------------------------------------------

STRUCT_LAYOUTS = [
    (U.UffdioApi, 24, {"api": 0, "features": 8, "ioctls": 16}),
    (U.UffdioRange, 16, {"start": 0, "len": 8}),
    (U.UffdioRegister, 32, {"range": 0, "mode": 16, "ioctls": 24}),
    (U.UffdioCopy, 40, {"dst": 0, "src": 8, "len": 16, "mode": 24, "copy": 32}),
    (U.UffdioZeropage, 32, {"range": 0, "mode": 16, "zeropage": 24}),
    (U.UffdMsg, 32, {"event": 0, "reserved1": 1, "reserved2": 2, "reserved3": 4, "arg": 8}),
    (U.UffdMsgArg, 24, {"pagefault": 0, "fork": 0, "remap": 0, "remove": 0, "reserved": 0}),
    (U.UffdPagefault, 24, {"flags": 0, "address": 8, "feat": 16}),
    (U.UffdPagefaultFeat, 4, {"ptid": 0}),
]


@pytest.mark.parametrize(("struct", "size", "offsets"), STRUCT_LAYOUTS,
                         ids=[s.__name__ for s, _, _ in STRUCT_LAYOUTS])
def test_struct_layout_matches_uapi_header(
    struct: type[ctypes.Structure], size: int, offsets: dict[str, int]
) -> None:
    assert ctypes.sizeof(struct) == size
    assert {f[0]: getattr(struct, f[0]).offset for f in struct._fields_} == offsets


def test_pagefault_fields_sit_at_their_uffd_msg_offsets() -> None:
    msg = U.UffdMsg(event=U.EVENT_PAGEFAULT)
    msg.arg.pagefault.flags = 0x1111
    msg.arg.pagefault.address = 0x2222
    msg.arg.pagefault.feat.ptid = 0x3333
    raw = bytes(msg)
    assert raw[0] == 0x12
    assert int.from_bytes(raw[8:16], "little") == 0x1111
    assert int.from_bytes(raw[16:24], "little") == 0x2222
    assert int.from_bytes(raw[24:28], "little") == 0x3333


def test_ioctl_numbers_match_uapi_header() -> None:
    assert U.UFFDIO_API == 0xC018AA3F
    assert U.UFFDIO_REGISTER == 0xC020AA00
    assert U.UFFDIO_UNREGISTER == 0x8010AA01
    assert U.UFFDIO_WAKE == 0x8010AA02
    assert U.UFFDIO_COPY == 0xC028AA03
    assert U.UFFDIO_ZEROPAGE == 0xC020AA04
    assert U.USERFAULTFD_IOC_NEW == 0xAA00
    assert U.UFFDIO_ZEROPAGE == 0xC020AA04
    assert U.USERFAULTFD_IOC_NEW == 0xAA00


def test_ioctls_are_called_without_holding_the_gil() -> None:
    # A PYFUNCTYPE/PyDLL prototype would keep the GIL across a blocking UFFDIO_COPY.
    assert U.IOCTL._flags_ & ctypes._FUNCFLAG_PYTHONAPI == 0  # type: ignore[attr-defined]


# --- parsing -------------------------------------------------------------------

def make_messages(*events: tuple[int, int, int, int]) -> bytes:
    msgs = (U.UffdMsg * len(events))()
    for msg, (event, flags, address, ptid) in zip(msgs, events, strict=True):
        msg.event = event
        msg.arg.pagefault.flags = flags
        msg.arg.pagefault.address = address
        msg.arg.pagefault.feat.ptid = ptid
    return bytes(msgs)


def test_parse_messages_decodes_a_batch_in_order() -> None:
    data = make_messages((0x12, 0, 0x7F0000001000, 41), (0x12, 1, 0xFFFF_FFFF_F000, 42),
                         (0x12, 0, 0x200000, 0))
    assert U.parse_messages(data) == [
        PageFault(0x7F0000001000, 0, 41),
        PageFault(0xFFFF_FFFF_F000, 1, 42),
        PageFault(0x200000, 0, 0),
    ]
    assert U.parse_messages(data)[1].is_write


def test_parse_messages_rejects_events_that_were_not_requested() -> None:
    data = make_messages((0x12, 0, 0x1000, 1), (0x13, 0, 0, 0))
    with pytest.raises(UffdError, match="FORK") as info:
        U.parse_messages(data)
    assert info.value.errno == errno.EPROTO


def test_parse_messages_rejects_a_truncated_message() -> None:
    with pytest.raises(UffdError, match="whole number"):
        U.parse_messages(make_messages((0x12, 0, 0x1000, 1))[:-4])


def test_feature_names_names_known_and_unknown_bits() -> None:
    assert U.feature_names(U.FEATURE_THREAD_ID | U.FEATURE_MISSING_HUGETLBFS | 1 << 63) == [
        "MISSING_HUGETLBFS", "THREAD_ID", "bit 63"]


# --- lifetime and handshake --------------------------------------------------------

def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_handshake_grants_a_superset_of_the_requested_features() -> None:
    wanted = U.FEATURE_THREAD_ID | U.FEATURE_MISSING_SHMEM
    with Userfaultfd.open() as uffd:
        granted = uffd.api(wanted)
        assert granted & wanted == wanted
        assert uffd.features == granted


def test_supported_features_uses_and_closes_a_throwaway_fd() -> None:
    before = open_fds()
    supported = Userfaultfd.supported_features()
    assert open_fds() == before
    assert supported & U.FEATURE_MISSING_HUGETLBFS
    with Userfaultfd.open() as uffd:
        assert uffd.api(0) == supported


def test_requesting_an_unsupported_feature_raises_naming_it() -> None:
    with Userfaultfd.open() as uffd, pytest.raises(UffdError, match="bit 63") as info:
        uffd.api(U.FEATURE_THREAD_ID | 1 << 63)
    assert info.value.errno == errno.EINVAL
    assert info.value.op == "UFFDIO_API"


def test_second_handshake_on_the_same_fd_is_refused() -> None:
    with Userfaultfd.open() as uffd:
        uffd.api(0)
        with pytest.raises(UffdError, match="once per fd"):
            uffd.api(0)


def test_open_falls_back_to_the_syscall_without_the_device() -> None:
    with Userfaultfd.open(device="/nonexistent/userfaultfd") as uffd:
        assert uffd.api(0) & U.FEATURE_MISSING_HUGETLBFS


def test_close_is_idempotent_and_later_calls_raise_ebadf() -> None:
    uffd = Userfaultfd.open()
    fd = uffd.fileno()
    with uffd:
        pass
    uffd.close()
    assert uffd.closed
    assert str(fd) not in open_fds()
    with pytest.raises(UffdError) as info:
        uffd.read_events()
    assert info.value.errno == errno.EBADF


def test_open_sets_nonblocking_and_cloexec_by_default() -> None:
    with Userfaultfd.open() as uffd:
        assert not os.get_blocking(uffd.fileno())
        assert not os.get_inheritable(uffd.fileno())


# --- 4 KiB shared memory (memfd) --------------------------------------------------

def test_discarded_shmem_page_faults_and_gets_the_placed_bytes_not_its_old_ones(
        shmem: tuple[Guest, Callable[[int], None]]) -> None:
    guest, discard = shmem
    discard(1)
    reader = guest.touch(guest.page(1), PAGE)
    [fault] = wait_for_faults(guest.uffd, 1)
    assert fault.address == guest.page(1)
    data = pattern(PAGE, seed=5)
    src = ctypes.create_string_buffer(data, PAGE)
    assert guest.uffd.copy(guest.page(1), ctypes.addressof(src), PAGE) == PAGE
    assert reader.result() == data
    assert peek(guest.page(0), PAGE) == b"\xaa" * PAGE  # a page not discarded stays


def test_discarded_shmem_page_placed_as_zero_reads_zeroes(
        shmem: tuple[Guest, Callable[[int], None]]) -> None:
    guest, discard = shmem
    discard(2)
    reader = guest.touch(guest.page(2) + 64, 64)
    [fault] = wait_for_faults(guest.uffd, 1)
    assert fault.address == guest.page(2)
    assert guest.uffd.zeropage(guest.page(2), PAGE) == PAGE
    assert reader.result() == bytes(64)


# --- 4 KiB anonymous memory -----------------------------------------------------

def test_register_reports_copy_zeropage_and_wake_for_anonymous_memory() -> None:
    with mmap.mmap(-1, PAGE, flags=mmap.MAP_PRIVATE) as mm, Userfaultfd.open() as uffd:
        view = (ctypes.c_char * PAGE).from_buffer(mm)
        uffd.api(0)
        ioctls = uffd.register(ctypes.addressof(view), PAGE)
        assert ioctls & (U.IOCTL_COPY | U.IOCTL_ZEROPAGE | U.IOCTL_WAKE) == (
            U.IOCTL_COPY | U.IOCTL_ZEROPAGE | U.IOCTL_WAKE)
        uffd.unregister(ctypes.addressof(view), PAGE)
        del view


def test_read_events_returns_nothing_when_no_fault_is_pending(anon: Guest) -> None:
    assert anon.uffd.read_events() == []


def test_read_fault_is_reported_and_copy_places_exactly_those_bytes(anon: Guest) -> None:
    data = pattern(PAGE)
    src = ctypes.create_string_buffer(data, PAGE)
    reader = anon.touch(anon.page(1) + 100, 64)

    [fault] = wait_for_faults(anon.uffd, 1)
    assert fault.address == anon.page(1)  # page aligned without EXACT_ADDRESS
    assert not fault.is_write
    assert fault.thread_id == reader.tid

    assert anon.uffd.copy(anon.page(1), ctypes.addressof(src), PAGE) == PAGE
    assert reader.result() == data[100:164]


def test_write_fault_is_flagged_and_the_write_lands_on_the_placed_page(anon: Guest) -> None:
    data = pattern(PAGE)
    src = ctypes.create_string_buffer(data, PAGE)
    writer = anon.touch(anon.page(2) + 8, 4, write=b"WXYZ")

    [fault] = wait_for_faults(anon.uffd, 1)
    assert fault.address == anon.page(2) and fault.is_write

    assert anon.uffd.copy(anon.page(2), ctypes.addressof(src), PAGE) == PAGE
    writer.result()
    assert peek(anon.page(2), PAGE) == data[:8] + b"WXYZ" + data[12:]


def test_zeropage_resolves_a_fault_with_zeros(anon: Guest) -> None:
    reader = anon.touch(anon.page(3), PAGE)
    [fault] = wait_for_faults(anon.uffd, 1)
    assert fault.address == anon.page(3)
    assert anon.uffd.zeropage(anon.page(3), PAGE) == PAGE
    assert reader.result() == bytes(PAGE)


def test_copy_onto_a_present_page_reports_eexist_without_raising(anon: Guest) -> None:
    first = ctypes.create_string_buffer(pattern(PAGE, seed=3), PAGE)
    second = ctypes.create_string_buffer(pattern(PAGE, seed=5), PAGE)
    assert anon.uffd.copy(anon.page(0), ctypes.addressof(first), PAGE) == PAGE
    assert anon.uffd.copy(anon.page(0), ctypes.addressof(second), PAGE) == 0
    assert anon.uffd.zeropage(anon.page(0), PAGE) == 0
    assert peek(anon.page(0), PAGE) == first.raw[:PAGE]


def test_copy_across_a_present_page_stops_there_and_reports_bytes_placed(anon: Guest) -> None:
    src = ctypes.create_string_buffer(pattern(3 * PAGE), 3 * PAGE)
    assert anon.uffd.zeropage(anon.page(1), PAGE) == PAGE
    # Page 0 is placed (a partial copy: the kernel answers EAGAIN), page 1 is EEXIST.
    assert anon.uffd.copy(anon.page(0), ctypes.addressof(src), 3 * PAGE) == PAGE
    # Page 2 was not examined, so it is still missing and can be placed now.
    assert anon.uffd.copy(anon.page(2), ctypes.addressof(src) + 2 * PAGE, PAGE) == PAGE


def test_multi_page_copy_places_the_whole_range(anon: Guest) -> None:
    data = pattern(anon.size)
    src = ctypes.create_string_buffer(data, anon.size)
    assert anon.uffd.copy(anon.addr, ctypes.addressof(src), anon.size) == anon.size
    assert peek(anon.addr, anon.size) == data


def test_copy_without_wake_leaves_the_thread_blocked_until_wake(anon: Guest) -> None:
    data = pattern(PAGE)
    src = ctypes.create_string_buffer(data, PAGE)
    reader = anon.touch(anon.page(1), PAGE)
    wait_for_faults(anon.uffd, 1)

    assert anon.uffd.copy(anon.page(1), ctypes.addressof(src), PAGE, wake=False) == PAGE
    reader.thread.join(0.05)
    assert reader.thread.is_alive()
    anon.uffd.wake(anon.page(1), PAGE)
    assert reader.result() == data


def test_faults_from_several_threads_are_read_at_most_max_events_at_a_time(
    anon: Guest,
) -> None:
    readers = [anon.touch(anon.page(i), 8) for i in (0, 3)]
    faults = [wait_for_faults(anon.uffd, 1, max_events=1)[0] for _ in readers]
    assert {f.address for f in faults} == {anon.page(0), anon.page(3)}
    assert {f.thread_id for f in faults} == {r.tid for r in readers}
    for fault in faults:
        anon.uffd.zeropage(fault.address, PAGE)
    assert [r.result() for r in readers] == [bytes(8)] * 2


def test_unregistered_memory_no_longer_traps_faults(anon: Guest) -> None:
    anon.uffd.unregister(anon.addr, anon.size)
    assert anon.touch(anon.page(0), 16).result() == bytes(16)
    assert anon.uffd.read_events() == []


def test_copy_into_unregistered_or_misaligned_memory_raises(anon: Guest) -> None:
    src = ctypes.create_string_buffer(PAGE)
    with pytest.raises(UffdError) as info:
        anon.uffd.copy(anon.page(0) + 1, ctypes.addressof(src), PAGE)
    assert (info.value.op, info.value.errno) == ("UFFDIO_COPY", errno.EINVAL)
    anon.uffd.unregister(anon.addr, anon.size)
    with pytest.raises(UffdError, match="UFFDIO_COPY"):
        anon.uffd.copy(anon.page(0), ctypes.addressof(src), PAGE)


# --- 2 MiB hugetlbfs ----------------------------------------------------------------

@pytest.fixture
def huge_pages_2m() -> Iterator[HugepageReservation]:
    """One free 2 MiB huge page for the test, given back afterwards.

    Reserved as livemig reserves: under the pool lock, held until the test has mapped
    the page (``mapped()``), so a concurrent user of the pool cannot take it meanwhile.
    """
    if os.geteuid() != 0:
        pytest.skip("raising the huge page pool needs root")
    if not HUGE_SYSFS.is_dir():
        pytest.skip("kernel has no 2 MiB huge pages")
    reservation = HugepageReservation(HUGE, 1)
    try:
        reservation.acquire()
    except ConfigError:
        pytest.skip("could not reserve a 2 MiB huge page (memory fragmented?)")
    try:
        yield reservation
    finally:
        reservation.release()


@pytest.fixture
def huge(huge_pages_2m: HugepageReservation) -> Iterator[Guest]:
    """One shared 2 MiB hugetlbfs page (memfd) registered in MISSING mode."""
    fd = os.memfd_create("livemig-uffd-test",
                         os.MFD_CLOEXEC | os.MFD_HUGETLB | os.MFD_HUGE_2MB)
    try:
        os.ftruncate(fd, HUGE)
        mm = mmap.mmap(fd, HUGE, flags=mmap.MAP_SHARED)
    finally:
        os.close(fd)  # the mapping keeps the file alive
    huge_pages_2m.mapped()
    views = [(ctypes.c_char * HUGE).from_buffer(mm)]
    guest = open_guest(ctypes.addressof(views[0]), HUGE,
                       U.FEATURE_MISSING_HUGETLBFS | U.FEATURE_THREAD_ID)
    yield guest
    close_guest(guest, views, mm)


def test_huge_page_fault_reports_the_aligned_address_and_copy_places_2mib(
    huge: Guest,
) -> None:
    data = pattern(HUGE, seed=13)
    src = ctypes.create_string_buffer(data, HUGE)
    offset = (1 << 20) + PAGE + 5
    reader = huge.touch(huge.addr + offset, 64)

    [fault] = wait_for_faults(huge.uffd, 1)
    assert huge.addr % HUGE == 0
    assert fault.address == huge.addr
    assert fault.thread_id == reader.tid

    assert huge.uffd.copy(huge.addr, ctypes.addressof(src), HUGE) == HUGE
    assert reader.result() == data[offset:offset + 64]
    assert peek(huge.addr, HUGE) == data
    assert huge.uffd.copy(huge.addr, ctypes.addressof(src), HUGE) == 0
