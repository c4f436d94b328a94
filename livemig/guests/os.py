"""The ``os`` guest: a small SMP long-mode kernel that checks itself (``guests/os.asm``).

Theory of operation
-------------------
Unlike the boot-sector guests, ``os`` is a multiboot kernel: livemig's loader
(``livemig.vmm.multiboot``) and QEMU's ``-kernel`` start the same bytes.  It brings up
``ncpus`` vCPUs, takes local-APIC timer interrupts on every one of them, echoes serial
input from its interrupt handler, reads kvmclock, and runs a workload that writes and
verifies pages; any failed check prints ``E`` with a reason letter (the list is in
``guests/os.asm``).

Its parameters are a block of little-endian u32 at image offset 0x20, after the
multiboot header (:class:`OsParams`; :meth:`OsParams.patch` writes them, the host check
reads them back from guest RAM where the loader put the image, at 1 MiB)::

    0x20 b"LMOS"   0x24 version (1)   0x28 ncpus          0x2c private pages per vCPU
    0x30 shared pages    0x34 pattern (0 sequential, 1 scattered, 2 hot)
    0x38 hot pages       0x3c rate (pages per tick and vCPU, 0 = no limit)
    0x40 timer hz        0x44 max clock step (ms)  0x48 tick timeout (ms)
    0x4c (read-only) guest-physical address of the per-vCPU records

Each vCPU's record (:data:`PERCPU_SIZE` bytes, vCPU ``c`` at ``records + c *
PERCPU_SIZE``) starts with its timer tick count, a u64 the interrupt handler bumps:
:func:`tick_counts` reads them from a copy of that memory (QMP ``pmemsave``, in
livemig and in QEMU), so a host can see the ticks of every vCPU keep coming.

Memory layout: vCPU ``c``'s private region is ``private`` pages at
``WORK_BASE + c * private * 4096``; the shared region follows the last private one.
"""

from __future__ import annotations

import struct
from dataclasses import astuple, dataclass
from enum import IntEnum
from importlib import resources
from typing import Final

from livemig.errors import ConfigError
from livemig.units import PAGE_SIZE

OS_GUEST: Final = "os"
LOAD_ADDRESS: Final = 0x100000
PARAMS_OFFSET: Final = 0x20
WORK_BASE: Final = 0x400000
MAX_CPUS: Final = 16
_MAGIC: Final = b"LMOS"
_VERSION: Final = 1
_PARAMS = struct.Struct("<4s10I")
PERCPUS_POINTER: Final = LOAD_ADDRESS + PARAMS_OFFSET + _PARAMS.size  # u32 at 0x4c
PERCPU_SIZE: Final = 64
_TICKS = struct.Struct("<Q")  # at offset 0 of each record


class Pattern(IntEnum):
    SEQUENTIAL = 0
    SCATTERED = 1
    HOT = 2


@dataclass(frozen=True)
class OsParams:
    ncpus: int = 1
    private_pages: int = 256
    shared_pages: int = 256
    pattern: Pattern = Pattern.SEQUENTIAL
    hot_pages: int = 16
    rate: int = 0
    hz: int = 100
    max_jump_ms: int = 5000
    tick_timeout_ms: int = 5000

    def validate(self, ram_size: int | None = None) -> None:
        """The guest checks the same and prints ``EB`` (checked here to fail early)."""
        if not 1 <= self.ncpus <= MAX_CPUS:
            raise ConfigError(f"the os guest runs 1 to {MAX_CPUS} vCPUs, not {self.ncpus}")
        if self.private_pages < 1 or self.shared_pages < 1 or self.hz < 1:
            raise ConfigError("the os guest needs private and shared pages and a timer")
        if self.pattern is Pattern.SCATTERED and not (
                _pow2(self.private_pages) and _pow2(self.shared_pages)):
            raise ConfigError("the scattered pattern needs power-of-two region sizes")
        if self.pattern is Pattern.HOT and not (
                1 <= self.hot_pages <= min(self.private_pages, self.shared_pages)):
            raise ConfigError("the hot set must be 1 page to the smaller region's size")
        if ram_size is not None and self.work_end > ram_size:
            raise ConfigError(f"the os guest's regions end at {self.work_end:#x}, "
                              f"beyond {ram_size:#x} bytes of RAM")

    @classmethod
    def for_ram(cls, ram_size: int, ncpus: int, pattern: Pattern = Pattern.SEQUENTIAL,
                **kw: int) -> OsParams:
        """Regions filling the RAM above WORK_BASE: half private (split), half shared."""
        pages = (ram_size - WORK_BASE) // PAGE_SIZE
        private = _floor_pow2(pages // 2 // ncpus)
        return cls(ncpus=ncpus, private_pages=private, shared_pages=_floor_pow2(pages // 2),
                   pattern=pattern, **kw)

    @property
    def shared_base(self) -> int:
        return WORK_BASE + self.ncpus * self.private_pages * PAGE_SIZE

    @property
    def work_end(self) -> int:
        return self.shared_base + self.shared_pages * PAGE_SIZE

    def private_base(self, cpu: int) -> int:
        return WORK_BASE + cpu * self.private_pages * PAGE_SIZE

    def patch(self, image: bytes) -> bytes:
        self.validate()
        if image[PARAMS_OFFSET : PARAMS_OFFSET + 4] != _MAGIC:
            raise ConfigError("not an os guest image (no LMOS parameter block)")
        out = bytearray(image)
        _PARAMS.pack_into(out, PARAMS_OFFSET, _MAGIC, _VERSION, *astuple(self))
        return bytes(out)

    @classmethod
    def unpack(cls, block: bytes) -> OsParams:
        """Parameters from an image, or from guest RAM at ``LOAD_ADDRESS + PARAMS_OFFSET``."""
        magic, version, ncpus, private, shared, pattern, *rest = _PARAMS.unpack_from(block)
        if magic != _MAGIC or version != _VERSION:
            raise ConfigError(f"no os guest parameters here ({magic!r} v{version})")
        return cls(ncpus, private, shared, Pattern(pattern), *rest)


PARAMS_SIZE: Final = _PARAMS.size


def tick_counts(records: bytes, ncpus: int) -> tuple[int, ...]:
    """Each vCPU's timer ticks, from ``ncpus * PERCPU_SIZE`` bytes of guest RAM read at
    the address stored at :data:`PERCPUS_POINTER`."""
    if len(records) < ncpus * PERCPU_SIZE:
        raise ConfigError(f"{len(records)} bytes hold no records for {ncpus} vCPUs")
    return tuple(_TICKS.unpack_from(records, c * PERCPU_SIZE)[0] for c in range(ncpus))


def load_os_image() -> bytes:
    return resources.files("livemig.guests").joinpath("os.bin").read_bytes()


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _floor_pow2(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)
