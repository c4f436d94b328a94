"""Guest RAM backings: anonymous 4 KiB, THP, and hugetlbfs (2 MiB / 1 GiB) memfds.

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
* ``2M`` / ``1G`` - a ``memfd_create(MFD_HUGETLB | MFD_HUGE_*)`` file mapped shared: the
  same memory could be handed to another process over a unix socket.

Huge pages must be reserved in ``/proc/sys/vm/nr_hugepages`` (or the per-size sysfs knob)
before they can be used.  :class:`HugepageReservation` raises the pool by what is needed
when running as root and gives it back on release.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Final

from livemig.errors import ConfigError, MemoryMapError

# Explicit re-exports: callers may take the units from here or from livemig.units.
from livemig.units import GIB, KIB, MIB, PAGE_SIZE

MADV_HUGEPAGE: Final = 14
MADV_DONTNEED: Final = 4
FALLOC_FL_KEEP_SIZE: Final = 0x01
FALLOC_FL_PUNCH_HOLE: Final = 0x02


class Backing(Enum):
    """How guest RAM is backed, and so what its host page size is."""

    ANON_4K = "4K"
    THP = "THP"
    HUGETLB_2M = "2M"
    HUGETLB_1G = "1G"

    @property
    def host_page_size(self) -> int:
        """The unit in which the kernel maps (and userfaultfd must place) this memory."""
        return {Backing.HUGETLB_2M: 2 * MIB, Backing.HUGETLB_1G: GIB}.get(self, PAGE_SIZE)

    @property
    def is_hugetlb(self) -> bool:
        return self in (Backing.HUGETLB_2M, Backing.HUGETLB_1G)

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
    fd: int  # the memfd for hugetlb, -1 for anonymous memory

    @property
    def host_addr(self) -> int:
        # A temporary ctypes export gives the address; dropping it at once keeps the
        # mmap closable.  The address stays valid while self.mm is open.
        return ctypes.addressof(ctypes.c_char.from_buffer(self.mm))

    def view(self) -> memoryview:
        return memoryview(self.mm)

    def discard(self, offset: int, length: int) -> None:
        """Drop the pages in [offset, offset+length): later reads see zeroes, or fault
        under userfaultfd (how postcopy discards stale pages on the destination)."""
        try:
            if self.fd >= 0:
                mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
                _fallocate(self.fd, mode, offset, length)
            else:
                self.mm.madvise(MADV_DONTNEED, offset, length)
        except OSError as e:
            raise MemoryMapError("discard", e.errno or errno.EIO) from None

    def close(self) -> None:
        self.mm.close()
        if self.fd >= 0:
            os.close(self.fd)


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    rc = libc.fallocate(fd, mode, ctypes.c_long(offset), ctypes.c_long(length))
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def map_guest_ram(size: int, backing: Backing, name: str = "pc.ram") -> Mapping:
    """Map ``size`` bytes of zeroed guest RAM with the given backing."""
    page = backing.host_page_size
    if size <= 0 or size % page:
        raise ConfigError(
            f"memory size {size} is not a positive multiple of the {backing.value} page size")
    if backing.is_hugetlb:
        return _map_hugetlb(size, backing, name)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
    mm = mmap.mmap(-1, size, flags, mmap.PROT_READ | mmap.PROT_WRITE)
    if backing is Backing.THP:
        mm.madvise(MADV_HUGEPAGE)
    return Mapping(mm, size, backing, -1)


def _map_hugetlb(size: int, backing: Backing, name: str) -> Mapping:
    huge_flag = os.MFD_HUGE_2MB if backing is Backing.HUGETLB_2M else os.MFD_HUGE_1GB
    try:
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_HUGETLB | huge_flag)
    except OSError as e:
        raise MemoryMapError("memfd_create(MFD_HUGETLB)", e.errno or errno.EIO) from None
    try:
        os.ftruncate(fd, size)
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as e:
        os.close(fd)
        raise MemoryMapError(f"mmap hugetlb {backing.value}", e.errno or errno.EIO,
                             "are enough huge pages reserved?") from None
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
    """Huge pages nobody has yet: free ones minus those promised to existing mappings."""
    try:
        pool = _pool_dir(page_size)
        free = int((pool / "free_hugepages").read_text())
        return free - int((pool / "resv_hugepages").read_text())
    except OSError:
        return 0


class HugepageReservation:
    """Make sure ``count`` free huge pages of ``page_size`` exist; give them back on release.

    Raises :class:`ConfigError` with instructions when the pages are missing and we may
    not (or cannot) reserve them.
    """

    def __init__(self, page_size: int, count: int) -> None:
        self.page_size = page_size
        self.count = count
        self._knob = _pool_dir(page_size) / "nr_hugepages"
        self._added = 0  # pages this reservation added to the pool

    def acquire(self) -> HugepageReservation:
        missing = self.count - free_hugepages(self.page_size)
        if missing <= 0:
            return self
        how = (f"echo {missing} more > {self._knob} "
               f"(e.g. echo $(( $(cat {self._knob}) + {missing} )) > {self._knob})")
        if os.geteuid() != 0:
            raise ConfigError(f"{self.count} huge pages of {self.page_size // KIB} KiB needed, "
                              f"{missing} missing; reserve them as root: {how}")
        old = int(self._knob.read_text())
        self._knob.write_text(str(old + missing))
        self._added = int(self._knob.read_text()) - old
        if free_hugepages(self.page_size) < self.count:
            self.release()
            raise ConfigError(f"could not reserve {missing} huge pages of "
                              f"{self.page_size // KIB} KiB (memory too fragmented?)")
        return self

    def release(self) -> None:
        # Give back only what we added: another reservation may still hold its share.
        if self._added:
            now = int(self._knob.read_text())
            self._knob.write_text(str(max(0, now - self._added)))
            self._added = 0

    def __enter__(self) -> HugepageReservation:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
