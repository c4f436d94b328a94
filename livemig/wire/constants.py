"""Numbers of the migration stream, as QEMU 7.2 defines them, plus livemig's own.

Theory of operation: this module is the single place where wire constants live,
so the encoder, the decoder, the return path and docs/STREAM.md can never drift
apart.  Values marked "QEMU" are copied by meaning from QEMU 7.2
(migration/savevm.c, migration/ram.c, migration/migration.c); values marked
"livemig" are our own extensions, each explained in docs/STREAM.md.  The one
exception is ``PAGE_SIZE``: the stream's page is also the kernel's, so it is defined
once in :mod:`livemig.units` (which both layers may import) and re-exported here.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Final

from livemig.units import PAGE_SIZE  # the stream's TARGET_PAGE_SIZE

# --- file header (QEMU: QEMU_VM_FILE_MAGIC / QEMU_VM_FILE_VERSION) -------------
QEVM_MAGIC: Final = 0x5145564D  # b"QEVM"
QEVM_MAGIC_BYTES: Final = b"QEVM"
QEVM_VERSION: Final = 3
QEVM_VERSION_COMPAT: Final = 2  # QEMU's obsolete v2; named only to reject it clearly
MACHINE_NAME: Final = "livemig"  # what we send in the CONFIGURATION section

# --- postcopy-preempt channel preamble (livemig) --------------------------------
POSTCOPY_MAGIC: Final = b"LMPC"
POSTCOPY_VERSION: Final = 1
POSTCOPY_PREAMBLE_SIZE: Final = len(POSTCOPY_MAGIC) + 4  # magic, be32 version

# --- multifd channels (QEMU: migration/multifd.h; the formats are in wire/multifd.py)
MULTIFD_MAGIC: Final = 0x11223344
MULTIFD_MAGIC_BYTES: Final = b"\x11\x22\x33\x44"  # be32, how a multifd channel starts
MULTIFD_VERSION: Final = 1
MULTIFD_FLAG_SYNC: Final = 0x1
MULTIFD_MAX_CHANNELS: Final = 255  # QEMU: multifd-channels is 1..255

# --- pages (QEMU: TARGET_PAGE_SIZE on x86) --------------------------------------
# PAGE_SIZE (imported above) is defined in livemig.units, shared with kernel/.
FLAG_MASK: Final = PAGE_SIZE - 1  # the low 12 bits of a RAM record word hold flags
OFFSET_MASK: Final = 0xFFFF_FFFF_FFFF_FFFF ^ FLAG_MASK
PAGE_RECORD_SIZE: Final = 8 + PAGE_SIZE  # CONTINUE|PAGE record: be64 word + page
ZERO_RECORD_SIZE: Final = 8 + 1  # CONTINUE|ZERO record: be64 word + fill byte


class SectionType(IntEnum):
    """First byte of every top-level record of the main channel (QEMU_VM_*)."""

    EOF = 0x00
    START = 0x01
    PART = 0x02
    END = 0x03
    FULL = 0x04
    SUBSECTION = 0x05  # QEMU uses it inside vmstate only; never valid at top level
    VMDESCRIPTION = 0x06  # QEMU's JSON description of the devices, after EOF
    CONFIGURATION = 0x07
    COMMAND = 0x08
    FOOTER = 0x7E


class RamFlag(IntEnum):
    """QEMU's RAM_SAVE_FLAG_* bits, carried in the low bits of a be64 word."""

    ZERO = 0x02
    MEM_SIZE = 0x04
    PAGE = 0x08
    EOS = 0x10
    CONTINUE = 0x20
    MULTIFD_FLUSH = 0x200  # QEMU 8.0: every multifd channel is synced up to here


# ZERO|MEM_SIZE|PAGE|EOS|CONTINUE|MULTIFD_FLUSH; anything else is refused
KNOWN_RAM_FLAGS: Final = 0x23E
PAGE_CONT: Final = RamFlag.PAGE | RamFlag.CONTINUE
ZERO_CONT: Final = RamFlag.ZERO | RamFlag.CONTINUE


class Command(IntEnum):
    """QEMU's MIG_CMD_* values that livemig speaks (others are refused)."""

    OPEN_RETURN_PATH = 1
    PING = 2
    POSTCOPY_ADVISE = 3
    POSTCOPY_LISTEN = 4
    POSTCOPY_RUN = 5
    POSTCOPY_RAM_DISCARD = 6
    POSTCOPY_RESUME = 7  # postcopy recovery: the source is ready to go on
    PACKAGED = 8
    RECV_BITMAP = 10  # postcopy recovery: send me the bitmap of this block's pages


# Payload length of each fixed-size command; None = variable (QEMU's mig_cmd_args).
COMMAND_LENGTHS: Final[dict[Command, int | None]] = {
    Command.OPEN_RETURN_PATH: 0,
    Command.PING: 4,
    Command.POSTCOPY_ADVISE: 16,
    Command.POSTCOPY_LISTEN: 0,
    Command.POSTCOPY_RUN: 0,
    Command.POSTCOPY_RAM_DISCARD: None,
    Command.POSTCOPY_RESUME: 0,
    Command.PACKAGED: 4,
    Command.RECV_BITMAP: None,  # u8 length + block name
}
DISCARD_VERSION: Final = 0  # QEMU: postcopy_ram_discard_version
MAX_COMMAND_PAYLOAD: Final = 0xFFFF  # be16 length field

# --- sections -------------------------------------------------------------------
RAM_IDSTR: Final = "ram"
RAM_INSTANCE_ID: Final = 0
RAM_VERSION_ID: Final = 4
DEVICE_PREFIX: Final = "livemig/"  # FULL sections we accept by default
MAX_IDSTR: Final = 255  # u8-counted string
MAX_MACHINE_NAME: Final = 256  # QEMU machine type names are short

# --- resource limits (livemig) ----------------------------------------------------
MAX_RECORD: Final = 64 * 1024 * 1024  # bytes one record (or PACKAGED blob) may need
MAX_DEVICE_STATE: Final = 16 * 1024 * 1024  # payload of one FULL device section
MAX_VMDESC: Final = 16 * 1024 * 1024  # JSON of the VM description after EOF
