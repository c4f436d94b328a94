"""Guest RAM backings: anonymous 4 KiB, THP, a shared 4 KiB memfd, and hugetlbfs
(2 MiB / 1 GiB) memfds.

Theory of operation
-------------------
Guest RAM is a :class:`Mapping`: a Python :class:`mmap.mmap` object plus the facts the rest
of livemig needs (host address, length, host page size, backing kind).  Using the
``mmap`` object (rather than a raw ``mmap(2)`` through ctypes) ties the memory's lifetime to
a refcounted Python object: while any memoryview of guest RAM exists, ``close()`` fails
instead of unmapping memory someone still reads.

* ``4K``  - private anonymous memory.
* ``THP`` - private anonymous memory with ``MADV_HUGEPAGE``.  Linux aligns anonymous
  mappings whose length is a multiple of 2 MiB on a 2 MiB boundary, which THP needs.
* ``4K-memfd`` - a plain (shmem) ``memfd_create`` file mapped shared, 4 KiB pages (QEMU's
  ``memory-backend-memfd,share=on``).  Another process can map the same memory
  (postcopy's helper processes do: the source's urgent helper sends guest RAM from its
  own mapping of it, with no copy).
* ``2M`` / ``1G`` - a ``memfd_create(MFD_HUGETLB | MFD_HUGE_*)`` file mapped shared: the
  same memory is handed to helper processes the same way.

Every memfd backing has :attr:`Mapping.fd` >= 0 (the file another process maps);
anonymous memory has -1.

What sharing costs: a read of a page never written allocates it in a memfd (anonymous
memory maps the shared zero page instead), so the first precopy round, which looks at
every page, leaves the source's memfd fully allocated, as QEMU's memory-backend-memfd
does.  That, and QEMU's own default, is why private ``4K`` stays the default and
``4K-memfd`` is chosen (``--object memory-backend-memfd``).

Discarding pages (:meth:`Mapping.discard`: postcopy's "drop what the source will send
again") must free them *in the file* for a memfd: ``MADV_DONTNEED`` on a shared mapping
only unmaps the page from this process, the file keeps its contents, and the next touch
(even under userfaultfd, which traps only pages missing from the file) reads the old
bytes again.  So a memfd's pages are dropped with ``fallocate(PUNCH_HOLE)``, anonymous
memory's with ``MADV_DONTNEED``.

Any backing may be *preallocated* (``map_guest_ram(prealloc=True)``, ``livemig run
--mem-prealloc``, QEMU's ``-mem-prealloc``): ``MADV_POPULATE_WRITE`` faults every page in
before the VM starts, so that an incoming migration does not pay the kernel's
allocation and zeroing of each page as it arrives.  Postcopy needs no empty RAM for
that: the source discards every page it has not sent at the switchover, and a discarded
page faults again.

Huge pages must be reserved in ``/proc/sys/vm/nr_hugepages`` (or the per-size sysfs knob)
before they can be used.  :class:`HugepageReservation` raises the pool by what is needed
when running as root and gives it back on release.

Reserving is atomic across processes
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
The pool is machine-wide, and a free huge page belongs to whoever maps it first: if
process A raises the pool and process B, starting at the same moment, sees A's new pages
as free, B maps them and A's own ``mmap`` fails.  So every step that reads or changes the
pool holds an exclusive ``flock`` on a lock file per page size,
``/run/lock/livemig-hugepages-<size>kB.lock`` (``/tmp`` where ``/run/lock`` is missing):

* :meth:`HugepageReservation.acquire` takes the lock, raises the pool and keeps the lock;
* the memfd is mapped (``mmap`` of a shared hugetlb file reserves its pages in the
  kernel's ``resv_hugepages``: from then on nobody else can take them, even before a page
  is touched) and :meth:`HugepageReservation.mapped` drops the lock;
* :meth:`HugepageReservation.release` gives pages back under the lock, after the mapping
  is gone.

Pages are interchangeable: a process that starts while another's pages are unmapped but
not yet given back uses those and raises nothing.  So what is given back is not "what I
added" but a ledger kept in the lock file: the number of pages livemig processes added
and have not given back.  A release gives back the pages that are idle (free and not
reserved by any mapping), at most the ledger; pages someone still maps are given back by
whoever releases after them.  The pool is therefore back at its starting size once the
last livemig process has released (or died: a killed process's pages become idle and the
next release gives them back), and it is never shrunk below what is in use.

:func:`map_guest_ram` with ``reserve=True`` does all of this itself: the returned
:class:`Mapping` owns the reservation and gives the pages back when it is closed.  The
lock file is left in place (so the lock's identity never changes while others wait on
it), mode 0644 and owned by root once root has used it: anyone may take the lock, only
root writes the ledger.
An ``flock`` dies with its holder, so a killed process never leaves the pool locked.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

from livemig.errors import ConfigError, MemoryMapError

# Explicit re-exports: callers may take the units from here or from livemig.units.
from livemig.units import GIB, KIB, MIB, PAGE_SIZE

MADV_HUGEPAGE: Final = 14
MADV_NOHUGEPAGE: Final = 15
MADV_DONTNEED: Final = 4
MADV_POPULATE_WRITE: Final = 23  # Linux 5.14
FALLOC_FL_KEEP_SIZE: Final = 0x01
FALLOC_FL_PUNCH_HOLE: Final = 0x02


class Backing(Enum):
    """How guest RAM is backed, and so what its host page size is."""

    ANON_4K = "4K"
    THP = "THP"
    MEMFD_4K = "4K-memfd"
    HUGETLB_2M = "2M"
    HUGETLB_1G = "1G"

    @property
    def host_page_size(self) -> int:
        """The unit in which the kernel maps (and userfaultfd must place) this memory."""
        return {Backing.HUGETLB_2M: 2 * MIB, Backing.HUGETLB_1G: GIB}.get(self, PAGE_SIZE)

    @property
    def is_hugetlb(self) -> bool:
        return self in (Backing.HUGETLB_2M, Backing.HUGETLB_1G)

    @property
    def is_memfd(self) -> bool:
        """A memfd mapped shared: another process can map the same memory."""
        return self is Backing.MEMFD_4K or self.is_hugetlb

    @classmethod
    def parse(cls, text: str) -> Backing:
        for b in cls:
            if b.value.lower() == text.strip().lower():
                return b
        valid = ", ".join(b.value for b in cls)
        raise ConfigError(f"unknown page size {text!r}; choose one of {valid}")


@dataclass(frozen=True)
class Mapping:
    """A mapped region of guest RAM; keep it alive as long as KVM or uffd may use it."""

    mm: mmap.mmap
    size: int
    backing: Backing
    fd: int  # the memfd (4K-memfd, hugetlb), -1 for anonymous memory
    # The huge pages this mapping raised the pool by, given back on close (None: the
    # caller reserved them, or none were needed).
    reservation: HugepageReservation | None = None

    @property
    def host_addr(self) -> int:
        # A temporary ctypes export gives the address; dropping it at once keeps the
        # mmap closable.  The address stays valid while self.mm is open.
        return ctypes.addressof(ctypes.c_char.from_buffer(self.mm))

    def view(self) -> memoryview:
        return memoryview(self.mm)

    def discard(self, offset: int, length: int) -> None:
        """Drop the pages in [offset, offset+length) (see :meth:`discard_ranges`)."""
        self.discard_ranges(np.array([[offset, length]], dtype=np.uint64))

    def discard_ranges(self, ranges: npt.NDArray[np.uint64]) -> None:
        """Drop the pages of every (offset, length) row of ``ranges``: later reads see
        zeroes, or fault under userfaultfd (how postcopy discards stale pages on the
        destination, often tens of thousands of scattered ranges at a switchover).

        Anonymous memory: ``process_madvise(MADV_DONTNEED)`` on this process, IOV_MAX
        ranges a call (Linux 6.13 allows any advice on oneself), ``madvise`` a range
        on older kernels.

        Huge pages stay reserved for the range.  Punching a hole in a hugetlbfs file
        also drops its pages' reservation: the freed pages go back to the machine's
        pool, where any process may take them, and the page placed there later
        (``UFFDIO_COPY``) then finds none -- which Linux reports as EEXIST, "already
        there", for a page that is not: the page would be lost.  Mapping the range
        again reserves it again (a shared hugetlbfs mapping reserves each page of its
        range that has no reservation); that mapping is not needed and goes at once.
        Both steps hold the pool lock, so no livemig process takes the pages between
        them.  A 4 KiB memfd's pages are punched out of the file (see the module
        docstring); anonymous memory's are dropped with ``MADV_DONTNEED``.
        """
        if not len(ranges):
            return
        if self.fd < 0:
            # The iovecs point into self.mm, which this call keeps open.
            iov = ranges.astype(np.uint64, copy=True)
            iov[:, 0] += np.uint64(self.host_addr)
            ranges = ranges[_advise_self(iov, MADV_DONTNEED):]  # the rest one by one
        if not self.backing.is_hugetlb:
            for offset, length in ranges.tolist():
                self._drop(offset, length)
            return
        with HugepagePoolLock(self.backing.host_page_size):
            for offset, length in ranges.tolist():
                self._drop(offset, length)
                self._reserve_again(offset, length)

    def _reserve_again(self, offset: int, length: int) -> None:
        try:
            mmap.mmap(self.fd, length, mmap.MAP_SHARED, mmap.PROT_READ,
                      offset=offset).close()
        except OSError as e:
            raise MemoryMapError("discard: reserve the huge pages again",
                                 e.errno or errno.EIO,
                                 "no free huge page is left for the discarded range"
                                 ) from None

    def _drop(self, offset: int, length: int) -> None:
        """Free the pages: out of the memfd (a hole), or out of anonymous memory."""
        try:
            if self.fd >= 0:
                # MADV_DONTNEED would keep a memfd's pages (and their old bytes).
                _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset,
                           length)
            else:
                self.mm.madvise(MADV_DONTNEED, offset, length)
        except OSError as e:
            raise MemoryMapError("discard", e.errno or errno.EIO) from None

    def populate(self) -> None:
        """Fault every page in for writing now (QEMU's ``prealloc=on``): the kernel
        allocates and zeroes the whole mapping here, so a migration that writes it later
        does not pay that first touch (which under nested virtualisation also makes the
        outer hypervisor back memory it reclaimed)."""
        try:
            self.mm.madvise(MADV_POPULATE_WRITE)
        except OSError as e:
            err = e.errno or errno.EIO
            raise MemoryMapError("madvise(MADV_POPULATE_WRITE)", err,
                                 "preallocating guest RAM needs Linux 5.14"
                                 if err == errno.EINVAL else "") from None

    def placed_host_pages(self) -> npt.NDArray[np.bool_]:
        """One bool per host page: mapped in this process now (``mincore``).  A huge
        page, once placed, stays mapped (hugetlb memory is never swapped or reclaimed);
        a 4 KiB page may have been swapped out since."""
        vec = np.zeros(self.size // PAGE_SIZE, dtype=np.uint8)
        # self.mm keeps the memory mapped, and vec (on this frame) lives, until it returns.
        if _LIBC.mincore(ctypes.c_void_p(self.host_addr), ctypes.c_size_t(self.size),
                         vec.ctypes.data_as(ctypes.c_void_p)):
            raise MemoryMapError("mincore", ctypes.get_errno())
        per_host_page = vec.reshape(-1, self.backing.host_page_size // PAGE_SIZE) & 1
        return np.asarray(per_host_page.all(axis=1), dtype=np.bool_)

    def close(self) -> None:
        self.mm.close()
        if self.fd >= 0:
            os.close(self.fd)
        if self.reservation is not None:
            self.reservation.release()


_LIBC: Final = ctypes.CDLL(None, use_errno=True)


NR_PROCESS_MADVISE: Final = 440  # x86-64
IOV_MAX: Final = 1024
_process_madvise: Final = ctypes.CFUNCTYPE(
    ctypes.c_long, ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t,
    ctypes.c_int, ctypes.c_uint, use_errno=True)(("syscall", _LIBC))


def _advise_self(iov: npt.NDArray[np.uint64], advice: int) -> int:
    """``process_madvise`` of this process over the (address, length) rows of ``iov``,
    IOV_MAX rows a call; returns how many rows were advised: all, or the rows before
    the first that failed on a kernel that refuses this advice here (the caller
    advises the rest one by one, which reports a real error)."""
    pidfd = os.pidfd_open(os.getpid())
    try:
        done = 0
        ends = np.cumsum(iov[:, 1], dtype=np.uint64)
        while done < len(iov):
            batch = iov[done : done + IOV_MAX]  # rows of (void *, size_t): struct iovec
            # `batch` is referenced until the call returns, keeping the iovecs alive.
            n = _process_madvise(NR_PROCESS_MADVISE, pidfd, batch.ctypes.data, len(batch),
                                 advice, 0)
            if n <= 0:
                return done
            base = int(ends[done - 1]) if done else 0
            done = int(np.searchsorted(ends, np.uint64(base + n), side="right"))
        return done
    finally:
        os.close(pidfd)


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    rc = _LIBC.fallocate(fd, mode, ctypes.c_long(offset), ctypes.c_long(length))
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def map_guest_ram(size: int, backing: Backing, name: str = "pc.ram", *,
                  reserve: bool = False, prealloc: bool = False) -> Mapping:
    """Map ``size`` bytes of zeroed guest RAM with the given backing.

    With ``reserve`` (hugetlb only) the huge pages are reserved and mapped atomically
    with respect to other processes, and given back when the mapping is closed.  With
    ``prealloc`` every page is faulted in before this returns (:meth:`Mapping.populate`).
    """
    mapping = _map_guest_ram(size, backing, name, reserve)
    if prealloc:
        try:
            mapping.populate()
        except BaseException:
            mapping.close()
            raise
    return mapping


def _map_guest_ram(size: int, backing: Backing, name: str, reserve: bool) -> Mapping:
    page = backing.host_page_size
    if size <= 0 or size % page:
        raise ConfigError(
            f"memory size {size} is not a positive multiple of the {backing.value} page size")
    if backing.is_hugetlb and reserve:
        reservation = HugepageReservation(page, size // page).acquire()
        try:
            mapping = _map_memfd(size, backing, name)
        except BaseException:
            reservation.release()
            raise
        reservation.mapped()
        return Mapping(mapping.mm, size, backing, mapping.fd, reservation)
    if backing.is_memfd:
        return _map_memfd(size, backing, name)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
    mm = mmap.mmap(-1, size, flags, mmap.PROT_READ | mmap.PROT_WRITE)
    if backing is Backing.THP:
        mm.madvise(MADV_HUGEPAGE)
    return Mapping(mm, size, backing, -1)


_MEMFD_FLAGS: Final = {Backing.MEMFD_4K: 0,
                       Backing.HUGETLB_2M: os.MFD_HUGETLB | os.MFD_HUGE_2MB,
                       Backing.HUGETLB_1G: os.MFD_HUGETLB | os.MFD_HUGE_1GB}


def _map_memfd(size: int, backing: Backing, name: str) -> Mapping:
    try:
        fd = os.memfd_create(name, os.MFD_CLOEXEC | _MEMFD_FLAGS[backing])
    except OSError as e:
        raise MemoryMapError(f"memfd_create ({backing.value})", e.errno or errno.EIO) from None
    try:
        os.ftruncate(fd, size)
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as e:
        os.close(fd)
        raise MemoryMapError(f"mmap memfd {backing.value}", e.errno or errno.EIO,
                             "are enough huge pages reserved?" if backing.is_hugetlb
                             else "") from None
    if backing is Backing.MEMFD_4K:
        # 4 KiB pages even where the host's shmem_enabled would hand out huge ones.
        mm.madvise(MADV_NOHUGEPAGE)
    return Mapping(mm, size, backing, fd)


M_TRIM_THRESHOLD: Final = -1
M_MMAP_THRESHOLD: Final = -3


def keep_freed_buffers() -> None:
    """Let glibc reuse freed multi-megabyte buffers instead of unmapping them.

    The destination receives the stream in 4 MiB chunks; by default each chunk is a
    fresh mmap (and tens of thousands of page faults per GiB, expensive under nested
    virtualisation).  Raising the mmap and trim thresholds keeps such buffers in the
    heap for reuse.  Process-wide, so only the ``livemig run`` entry point calls it.
    """
    libc = ctypes.CDLL(None)
    libc.mallopt(M_MMAP_THRESHOLD, 64 * MIB)
    libc.mallopt(M_TRIM_THRESHOLD, 256 * MIB)


def _pool_dir(page_size: int) -> Path:
    return Path(f"/sys/kernel/mm/hugepages/hugepages-{page_size // KIB}kB")


def free_hugepages(page_size: int) -> int:
    """Huge pages nobody has yet: free ones minus those promised to existing mappings.

    The two counters are separate files: a page fault elsewhere between the two reads
    takes one page from both, and would make a single pair of reads count one page too
    many.  So free is read again after resv, until it has not changed.
    """
    pool = _pool_dir(page_size)
    try:
        free = int((pool / "free_hugepages").read_text())
        while True:
            resv = int((pool / "resv_hugepages").read_text())
            again = int((pool / "free_hugepages").read_text())
            if again == free:
                return free - resv
            free = again
    except OSError:
        return 0


def persistent_hugepages(page_size: int) -> int:
    """The pool size proper: ``nr_hugepages`` without surplus pages (what a write to
    ``nr_hugepages`` sets)."""
    pool = _pool_dir(page_size)
    return int((pool / "nr_hugepages").read_text()) - int(
        (pool / "surplus_hugepages").read_text())


LOCK_FILE_MODE: Final = 0o644  # flock needs only read access, so anyone may take it


def hugepage_lock_path(page_size: int) -> Path:
    """The lock file that serialises changes to the pool of ``page_size`` pages."""
    base = Path("/run/lock")
    if not base.is_dir():
        base = Path("/tmp")
    return base / f"livemig-hugepages-{page_size // KIB}kB.lock"


class HugepagePoolLock:
    """An exclusive ``flock`` on :func:`hugepage_lock_path`; take/drop are idempotent.

    While it is held, :meth:`added` / :meth:`set_added` read and write the ledger kept in
    the file: how many pages livemig processes added to the pool and have not given
    back.  Only root writes it (only root can change the pool).
    """

    def __init__(self, page_size: int) -> None:
        self.path = hugepage_lock_path(page_size)
        self._fd = -1

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def take(self) -> None:
        if self.held:
            return
        root = os.geteuid() == 0
        # O_NOFOLLOW: the directory may be world-writable; never follow a planted link.
        flags = (os.O_RDWR if root else os.O_RDONLY) | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            fd = os.open(self.path, flags, LOCK_FILE_MODE)
        except OSError as e:
            raise MemoryMapError(f"open {self.path}", e.errno or errno.EIO) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            owner = os.fstat(fd).st_uid
            if root and owner != 0:
                # Made by an unprivileged process: nobody else may have written a ledger.
                os.fchown(fd, 0, 0)
                os.ftruncate(fd, 0)
            if owner == os.geteuid() or root:
                os.fchmod(fd, LOCK_FILE_MODE)  # whatever the umask: others may lock it too
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def drop(self) -> None:
        if self.held:
            fd, self._fd = self._fd, -1
            os.close(fd)  # closing the only descriptor releases the flock

    def added(self) -> int:
        """Pages livemig added to the pool and has not given back (the ledger)."""
        text = os.pread(self._fd, 32, 0).decode(errors="replace").strip()
        return int(text) if text.isdigit() else 0

    def set_added(self, pages: int) -> None:
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{max(0, pages)}\n".encode(), 0)

    def __enter__(self) -> HugepagePoolLock:
        self.take()
        return self

    def __exit__(self, *exc: object) -> None:
        self.drop()


class HugepageReservation:
    """Make sure ``count`` free huge pages of ``page_size`` exist; give pages back on release.

    :meth:`acquire` returns holding the pool lock (see the module docstring): call
    :meth:`mapped` once the memory that uses the pages is mapped, :meth:`release` after
    it is unmapped.  Raises :class:`ConfigError` with instructions when the pages are
    missing and we may not (or cannot) reserve them.
    """

    def __init__(self, page_size: int, count: int) -> None:
        self.page_size = page_size
        self.count = count
        self._pool = _pool_dir(page_size)
        self._knob = self._pool / "nr_hugepages"
        self._lock = HugepagePoolLock(page_size)

    def acquire(self) -> HugepageReservation:
        self._lock.take()
        try:
            self._reserve()
        except BaseException:
            self._lock.drop()
            raise
        return self

    def _reserve(self) -> None:
        missing = self.count - free_hugepages(self.page_size)
        if missing <= 0:
            return
        how = (f"echo {missing} more > {self._knob} "
               f"(e.g. echo $(( $(cat {self._knob}) + {missing} )) > {self._knob})")
        if os.geteuid() != 0:
            raise ConfigError(f"{self.count} huge pages of {self.page_size // KIB} KiB needed, "
                              f"{missing} missing; reserve them as root: {how}")
        old = persistent_hugepages(self.page_size)
        self._knob.write_text(str(old + missing))
        added = persistent_hugepages(self.page_size) - old
        self._lock.set_added(self._lock.added() + added)
        if free_hugepages(self.page_size) < self.count:
            self._give_back_idle()
            raise ConfigError(f"could not reserve {missing} huge pages of "
                              f"{self.page_size // KIB} KiB (memory too fragmented?)")

    def mapped(self) -> None:
        """The pages are mapped (so reserved by the kernel for us): let others reserve."""
        self._lock.drop()

    def release(self) -> None:
        """Give back the idle pages livemig added; call it once the pages are unmapped."""
        with self._lock:
            if os.geteuid() == 0:
                self._give_back_idle()

    def _give_back_idle(self) -> None:
        # Only pages nobody has (free and unreserved) and at most what livemig added:
        # pages another process maps stay, and whoever releases last gives them back.
        # Shrinking below what is in use would not free anything now, but turn pages
        # into "surplus" that the next raise of the pool would silently keep.
        ledger = self._lock.added()
        give = min(ledger, free_hugepages(self.page_size))
        if give <= 0:
            return
        surplus = self._pool / "surplus_hugepages"
        before, surplus_before = persistent_hugepages(self.page_size), int(surplus.read_text())
        self._knob.write_text(str(before - give))
        extra = int(surplus.read_text()) - surplus_before
        if extra > 0:  # a page was taken meanwhile after all: keep it in the pool
            self._knob.write_text(str(before - give + extra))
        self._lock.set_added(ledger - (before - persistent_hugepages(self.page_size)))

    def __enter__(self) -> HugepageReservation:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
