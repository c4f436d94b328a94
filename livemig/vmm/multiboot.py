"""A multiboot (version 1) loader for flat kernel images, as QEMU's ``-kernel`` does it.

Theory of operation
-------------------
A multiboot kernel carries a header in its first 8 KiB, 4-byte aligned: the magic
``0x1BADB002``, flags and a checksum making the three sum to zero.  livemig loads only
images whose flags have bit 16 (the "a.out kludge"): the header then also gives the
addresses to use, so no ELF parsing is needed and a flat NASM binary is a valid kernel::

    +0  magic          +12 header_addr   (where the header itself lands)
    +4  flags          +16 load_addr     (where the file byte at header_addr - ...
    +8  checksum       +20 load_end_addr   ... load_addr lands; 0 = to the end of file)
                       +24 bss_end_addr  (zeroed up to here; 0 = no bss)
                       +28 entry_addr

The loader copies the file, zeroes the bss, writes a multiboot information block
(``mem_lower``/``mem_upper`` in KiB, and the command line when there is one) at
:data:`INFO_ADDR`, and enters the kernel on the boot processor in the state the
specification fixes: 32-bit protected mode with flat 4 GiB code and data segments,
paging off, interrupts off, ``EAX = 0x2BADB002`` and ``EBX`` = the information block.
QEMU 7.2 accepts the same images with ``-kernel``, so both VMMs run the same bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from livemig.errors import ConfigError
from livemig.kernel import kvm as K

HEADER_MAGIC: Final = 0x1BADB002
BOOT_MAGIC: Final = 0x2BADB002
FLAG_AOUT_KLUDGE: Final = 1 << 16
SEARCH_LIMIT: Final = 8192
INFO_ADDR: Final = 0x6000  # the information block, below the guests' 0x8000
CMDLINE_ADDR: Final = INFO_ADDR + 0x100
CMDLINE_MAX: Final = 0xE00
INFO_MEM, INFO_CMDLINE = 1 << 0, 1 << 2
_HEADER = struct.Struct("<8I")
_INFO = struct.Struct("<4I")  # flags, mem_lower, mem_upper, boot_device
_INFO_CMD = struct.Struct("<I")  # cmdline (at offset 16)
CODE_SELECTOR, DATA_SELECTOR = 0x10, 0x18


@dataclass(frozen=True)
class MultibootImage:
    data: bytes
    header_offset: int
    header_addr: int
    load_addr: int
    load_end_addr: int
    bss_end_addr: int
    entry_addr: int

    @classmethod
    def parse(cls, data: bytes) -> MultibootImage:
        """Find and check the header; raises ConfigError for anything livemig cannot load."""
        for off in range(0, min(len(data), SEARCH_LIMIT) - _HEADER.size + 1, 4):
            magic, flags, checksum, *addrs = _HEADER.unpack_from(data, off)
            if magic != HEADER_MAGIC or (magic + flags + checksum) & 0xFFFFFFFF:
                continue
            if not flags & FLAG_AOUT_KLUDGE:
                raise ConfigError("multiboot image without load addresses (flag 16); "
                                  "livemig loads flat images only")
            image = cls(data, off, *addrs)
            image._validate()
            return image
        raise ConfigError("no multiboot header in the first 8 KiB of the image")

    def _validate(self) -> None:
        start = self.header_offset - (self.header_addr - self.load_addr)
        if self.header_addr < self.load_addr or start < 0:
            raise ConfigError("multiboot header_addr lies before the image")
        if self.load_addr < 0x100000:
            raise ConfigError("multiboot images load at 1 MiB or above")
        if not self.load_addr <= self.entry_addr < self.end_addr:
            raise ConfigError("multiboot entry point lies outside the image")

    @property
    def file_bytes(self) -> bytes:
        start = self.header_offset - (self.header_addr - self.load_addr)
        if self.load_end_addr:
            return self.data[start : start + self.load_end_addr - self.load_addr]
        return self.data[start:]

    @property
    def end_addr(self) -> int:
        return max(self.load_addr + len(self.file_bytes), self.bss_end_addr)

    def placements(self, ram_size: int, cmdline: bytes = b"") -> list[tuple[int, bytes]]:
        """``(guest address, bytes)`` to write: the image, its zeroed bss, the info block."""
        if self.end_addr > ram_size:
            raise ConfigError(f"the kernel needs {self.end_addr:#x} bytes of RAM")
        if len(cmdline) >= CMDLINE_MAX:
            raise ConfigError(f"kernel command line longer than {CMDLINE_MAX - 1} bytes")
        body = self.file_bytes
        out = [(self.load_addr, body)]
        bss_start = self.load_addr + len(body)
        if self.bss_end_addr > bss_start:
            out.append((bss_start, bytes(self.bss_end_addr - bss_start)))
        flags = INFO_MEM | (INFO_CMDLINE if cmdline else 0)
        mem_upper = (min(ram_size, 0xFFFFFFFF) - 0x100000) // 1024
        info = bytearray(0x100)
        _INFO.pack_into(info, 0, flags, 640, mem_upper, 0)
        if cmdline:
            _INFO_CMD.pack_into(info, 16, CMDLINE_ADDR)
        out.append((INFO_ADDR, bytes(info) + cmdline + b"\0"))
        return out

    @staticmethod
    def enter_protected_mode(sregs: K.KvmSregs) -> None:
        """Flat 32-bit segments, CR0.PE, paging off (the multiboot machine state)."""
        for seg, selector, seg_type in ((sregs.cs, CODE_SELECTOR, 0xB),
                                        *((s, DATA_SELECTOR, 0x3) for s in (
                                            sregs.ds, sregs.es, sregs.fs, sregs.gs,
                                            sregs.ss))):
            seg.base, seg.limit, seg.selector, seg.type = 0, 0xFFFFFFFF, selector, seg_type
            seg.present, seg.dpl, seg.db, seg.s, seg.l, seg.g = 1, 0, 1, 1, 0, 1
        sregs.cr0 = 0x11  # PE | ET: protected mode, paging and caching controls off
        sregs.cr4 = 0
        sregs.efer = 0

    def entry_regs(self) -> K.KvmRegs:
        regs = K.KvmRegs()
        regs.rip, regs.rflags = self.entry_addr, 0x2
        regs.rax, regs.rbx = BOOT_MAGIC, INFO_ADDR
        return regs


def is_multiboot(data: bytes) -> bool:
    """True if ``data`` carries a multiboot header (of any kind)."""
    return any(_HEADER.unpack_from(data, off)[0] == HEADER_MAGIC
               for off in range(0, min(len(data), SEARCH_LIMIT) - _HEADER.size + 1, 4))
