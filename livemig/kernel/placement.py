"""Atomic page placement into userfaultfd-registered guest RAM, from Python buffers.

Theory of operation
-------------------
Postcopy places each host page whole with ``UFFDIO_COPY`` (or ``UFFDIO_ZEROPAGE``),
which also wakes every vCPU blocked on it.  The migration code works with buffers
(NumPy rows of a received batch, a temporary huge page) and block offsets; this class
is where those become raw addresses, so that no code outside ``kernel/`` handles one.

Lifetimes: ``mapping`` is guest RAM owned by the VM's block and outlives this object
(the destination closes the placer before the VM); the source buffer of each call is
held by the caller for the duration of the (synchronous) ioctl.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from livemig.errors import UffdError
from livemig.kernel.mman import Mapping
from livemig.kernel.uffd import Userfaultfd


def buffer_address(buf: npt.NDArray[np.uint8] | mmap.mmap | bytearray) -> int:
    """The address of a buffer's first byte (the caller keeps ``buf`` alive)."""
    if isinstance(buf, np.ndarray):
        return int(buf.ctypes.data)
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


@dataclass(frozen=True)
class RemoteRange:
    """Guest RAM of another process, known only by its address there: a helper that
    was handed the VM's userfaultfd places pages into it (UFFDIO_COPY writes into the
    address space the userfaultfd belongs to, from a buffer of the caller's)."""

    host_addr: int
    size: int

    def discard_ranges(self, ranges: npt.NDArray[np.uint64]) -> None:
        raise UffdError("discard in another process's RAM", errno.EPERM,
                        "only the VMM itself discards pages")


class PagePlacer:
    """Places host pages of one RAM block through one userfaultfd."""

    def __init__(self, uffd: Userfaultfd, mapping: Mapping | RemoteRange) -> None:
        self.uffd = uffd
        self.mapping = mapping
        self._base = mapping.host_addr

    def register(self) -> None:
        self.uffd.register(self._base, self.mapping.size)

    def unregister(self) -> None:
        self.uffd.unregister(self._base, self.mapping.size)

    def offset_of(self, address: int) -> int:
        """Block offset of a faulting host address (-1 if outside this block)."""
        off = address - self._base
        return off if 0 <= off < self.mapping.size else -1

    def copy(self, offset: int, src: npt.NDArray[np.uint8] | mmap.mmap | bytearray,
             length: int) -> bool:
        """UFFDIO_COPY ``length`` bytes of ``src`` to ``offset``; False if already there."""
        return self.uffd.copy(self._base + offset, buffer_address(src), length) == length

    def discard(self, ranges: npt.NDArray[np.uint64]) -> None:
        """Drop the (offset, length) rows' pages so that they fault again (postcopy
        discard of stale pages)."""
        self.mapping.discard_ranges(ranges)

    def copy_prefix(self, offset: int, src: npt.NDArray[np.uint8], length: int) -> int:
        """UFFDIO_COPY a run of pages; returns how many bytes were placed before the
        first page that was already there (the kernel stops at it)."""
        return self.uffd.copy(self._base + offset, buffer_address(src), length)

    def zero(self, offset: int, length: int) -> bool:
        """UFFDIO_ZEROPAGE (4 KiB pages only); False if the page was already there."""
        return self.uffd.zeropage(self._base + offset, length) == length
