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
from livemig.units import PAGE_SIZE


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

    def copy_runs(self, offsets: npt.NDArray[np.uint64], lengths: npt.NDArray[np.int64],
                  rows: npt.NDArray[np.uint8]) -> npt.NDArray[np.int64]:
        """UFFDIO_COPY runs of 4 KiB pages: run ``i`` is ``lengths[i]`` pages at block
        offset ``offsets[i]``, and its data the next ``lengths[i]`` rows of ``rows``
        (N, 4096; rows may lie apart, as the payloads of a receive buffer do).  One
        call per run: a page alone is copied from its row where it lies, longer runs
        from one gathered copy of their rows.  Returns the pages placed per run; fewer
        than the run's means the next page was already there (the kernel stops at
        it), and the pages after it were not tried."""
        if rows.strides[1] != 1:
            rows = np.ascontiguousarray(rows)
        first = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1], out=first[1:])
        srcs = first * rows.strides[0] + rows.ctypes.data
        gathered = None  # referenced until the calls return
        if rows.strides[0] != PAGE_SIZE and (multi := lengths > 1).any():
            gathered = np.ascontiguousarray(rows[np.repeat(multi, lengths)])
            at = np.zeros(int(multi.sum()), dtype=np.int64)
            np.cumsum(lengths[multi][:-1], out=at[1:])
            srcs[multi] = at * PAGE_SIZE + gathered.ctypes.data
        placed = self.uffd.copy_runs((offsets + np.uint64(self._base)).tolist(), srcs.tolist(),
                                     (lengths * PAGE_SIZE).tolist())
        del gathered
        return np.array(placed, dtype=np.int64) // PAGE_SIZE

    def zero_runs(self, offsets: npt.NDArray[np.uint64],
                  lengths: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """UFFDIO_ZEROPAGE runs of 4 KiB pages (4 KiB-page blocks only), one call per
        run; returns the pages placed per run, as :meth:`copy_runs` does."""
        placed = self.uffd.zeropage_runs((offsets + np.uint64(self._base)).tolist(),
                                         (lengths * PAGE_SIZE).tolist())
        return np.array(placed, dtype=np.int64) // PAGE_SIZE
