"""Guest memory: named RAM blocks, their KVM slots, and dirty tracking.

Theory of operation
-------------------
A :class:`RamBlock` is one contiguous range of guest-physical memory (QEMU's
``RAMBlock``): a name (``pc.ram``), a length, a host page size and a host mapping
(:mod:`livemig.kernel.mman`).  Each block is one KVM memory slot.

Address types are kept apart on purpose: a *guest-physical address* (what the guest
uses), a *block offset* (what the migration stream carries) and a *page index*
(``offset // 4096``, what bitmaps are indexed by).  Only this module converts between
them (:meth:`RamBlock.offset_of`).

Dirty tracking is KVM's dirty log (``KVM_MEM_LOG_DIRTY_PAGES``) in manual-protect mode:
``KVM_GET_DIRTY_LOG`` reads the bits without re-arming write protection, and
``KVM_CLEAR_DIRTY_LOG`` re-arms it for exactly the pages we took, in chunks.  Writes
the VMM itself makes to guest RAM are invisible to KVM, so the block also has a VMM-side
bitmap (Firecracker's design); :meth:`RamBlock.sync_dirty` ORs both into the caller's
bitmap.  Bitmaps are NumPy ``uint64`` words in KVM's layout (bit ``i`` = page ``i``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import NewType

import numpy as np
import numpy.typing as npt

from livemig.errors import ConfigError
from livemig.kernel.kvm import KVM_MEM_LOG_DIRTY_PAGES, VmFd
from livemig.kernel.mman import Backing, Mapping, map_guest_ram
from livemig.units import PAGE_SIZE

GuestPhysAddr = NewType("GuestPhysAddr", int)
BlockOffset = NewType("BlockOffset", int)

# KVM_CLEAR_DIRTY_LOG works on ranges that are multiples of 64 pages; clearing 1 GiB at
# a time keeps each call short while making few calls.
CLEAR_CHUNK_PAGES = 1 << 18

Bitmap = npt.NDArray[np.uint64]


def bitmap_words(pages: int) -> int:
    return (pages + 63) // 64


def new_bitmap(pages: int) -> Bitmap:
    return np.zeros(bitmap_words(pages), dtype=np.uint64)


def bitmap_to_bools(words: Bitmap, pages: int) -> npt.NDArray[np.bool_]:
    """One bool per page, from KVM's little-endian bit order."""
    bits = np.unpackbits(words.view(np.uint8), bitorder="little")[:pages]
    return bits.astype(np.bool_)


def bools_to_bitmap(bools: npt.NDArray[np.bool_]) -> Bitmap:
    nbytes = bitmap_words(len(bools)) * 8
    packed = np.packbits(bools.astype(np.uint8), bitorder="little")
    out = np.zeros(nbytes, dtype=np.uint8)
    out[: len(packed)] = packed
    return out.view(np.uint64)


def host_page_view(bools: npt.NDArray[np.bool_], host_page_size: int) -> npt.NDArray[np.bool_]:
    """Per-host-page dirtiness: a huge page is dirty if any 4 KiB page in it is."""
    per = host_page_size // PAGE_SIZE
    if per == 1:
        return bools
    return np.asarray(bools.reshape(-1, per).any(axis=1), dtype=np.bool_)


@dataclass
class RamBlock:
    """One named block of guest RAM, mapped into the guest through one KVM slot."""

    name: str
    gpa: GuestPhysAddr
    mapping: Mapping
    slot: int
    vm_fd: VmFd

    def __post_init__(self) -> None:
        self._vmm_dirty = new_bitmap(self.pages)
        self._vmm_dirty_lock = threading.Lock()
        self._log_bitmap = new_bitmap(self.pages)
        self.logging = False

    @property
    def size(self) -> int:
        return self.mapping.size

    @property
    def pages(self) -> int:
        return self.size // PAGE_SIZE

    @property
    def host_page_size(self) -> int:
        return self.mapping.backing.host_page_size

    @property
    def backing(self) -> Backing:
        return self.mapping.backing

    @property
    def host_addr(self) -> int:
        return self.mapping.host_addr

    def view(self) -> memoryview:
        """A writable view of the whole block; keeps the mapping open while it lives."""
        return self.mapping.view()

    def array(self) -> npt.NDArray[np.uint8]:
        return np.frombuffer(self.mapping.mm, dtype=np.uint8)

    def contains(self, gpa: int, length: int = 1) -> bool:
        return self.gpa <= gpa and gpa + length <= self.gpa + self.size

    def offset_of(self, gpa: int) -> BlockOffset:
        if not self.contains(gpa):
            raise ConfigError(f"guest address {gpa:#x} is outside block {self.name}")
        return BlockOffset(gpa - self.gpa)

    # --- dirty tracking --------------------------------------------------------------
    def _register(self, flags: int) -> None:
        # The mapping is owned by this block and outlives the slot (see Vm.close()).
        self.vm_fd.set_user_memory_region(self.slot, self.gpa, self.size, self.host_addr, flags)

    def register(self) -> None:
        self._register(0)

    def set_dirty_logging(self, on: bool) -> None:
        self._register(KVM_MEM_LOG_DIRTY_PAGES if on else 0)
        self.logging = on

    def mark_dirty(self, offset: int, length: int) -> None:
        """Record a write the VMM made to guest RAM (KVM does not see those)."""
        first, last = offset // PAGE_SIZE, (offset + length - 1) // PAGE_SIZE
        bools = np.zeros(self.pages, dtype=np.bool_)
        bools[first : last + 1] = True
        with self._vmm_dirty_lock:
            self._vmm_dirty |= bools_to_bitmap(bools)

    def sync_dirty(self, into: Bitmap) -> int:
        """OR the pages dirtied since the last sync into ``into`` and re-arm tracking.

        Returns the number of newly dirty pages seen by this sync.
        """
        log = self._log_bitmap
        if self.logging:
            # log is owned by self and alive during both calls.
            self.vm_fd.get_dirty_log(self.slot, log.ctypes.data)
            self._clear_in_chunks(log)
        else:
            log[:] = 0
        with self._vmm_dirty_lock:
            log |= self._vmm_dirty
            self._vmm_dirty[:] = 0
        into |= log
        return int(np.unpackbits(log.view(np.uint8)).sum())

    def _clear_in_chunks(self, log: Bitmap) -> None:
        for first in range(0, self.pages, CLEAR_CHUNK_PAGES):
            num = min(CLEAR_CHUNK_PAGES, self.pages - first)
            words = log[first // 64 : (first + num + 63) // 64]
            if words.any():
                # KVM reads the bits to clear from this slice of log (alive here).
                self.vm_fd.clear_dirty_log(self.slot, first, num, words.ctypes.data)


def make_block(vm_fd: VmFd, name: str, gpa: int, size: int, backing: Backing,
               slot: int, *, reserve: bool = False, prealloc: bool = False) -> RamBlock:
    mapping = map_guest_ram(size, backing, name, reserve=reserve, prealloc=prealloc)
    block = RamBlock(name, GuestPhysAddr(gpa), mapping, slot, vm_fd)
    block.register()
    return block
