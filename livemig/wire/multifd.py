"""The multifd channels' format: QEMU's initial packet and page packets (sans-IO).

Theory of operation
-------------------
With the ``multifd`` capability, precopy pages travel on ``multifd-channels`` extra
connections.  Each starts with an *initial packet* (:class:`InitPacket`, 64 bytes:
magic 0x11223344, version 1, the migration's 16-byte UUID and the channel id), then
carries *packets*: a 320-byte header (:class:`PacketHeader`: magic, version, flags,
the page capacity of a packet, the number of normal and of zero pages, the size of the
next packet, the packet number and the RAM block's name), the pages' offsets (be64,
normal pages first, then zero pages), and the normal pages' data.  A packet whose flags
hold ``MULTIFD_FLAG_SYNC`` ends a dirty round on its channel; the main channel's
``MULTIFD_FLUSH`` record says every channel sent one.  Everything is big-endian, as in
QEMU.  docs/STREAM.md says where this follows QEMU 7.2 and where it deviates.

This module only turns values into bytes and bytes into checked values: a header that
names an unknown block, an offset outside it or not page aligned, more pages than the
packet can hold, or a wrong magic/version is a :class:`RemoteProtocolError`.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from livemig.errors import LocalProtocolError, RemoteProtocolError
from livemig.units import PAGE_SIZE
from livemig.wire.blocks import BlockInfo, local_name
from livemig.wire.constants import (
    MULTIFD_FLAG_SYNC,
    MULTIFD_MAGIC,
    MULTIFD_MAX_CHANNELS,
    MULTIFD_VERSION,
)

# QEMU's MultiFDInit_t: be32 magic, be32 version, uuid[16], u8 id, 7 + 32 bytes unused.
_INIT = struct.Struct(">II16sB39x")
INIT_SIZE = _INIT.size  # 64
# QEMU's MultiFDPacket_t (with QEMU 9.0's zero_pages in place of an unused be32): be32
# magic, version, flags, pages_alloc, normal_pages, next_packet_size; be64 packet_num;
# be32 zero_pages; 4 + 24 bytes unused; char ramblock[256].
_HEADER = struct.Struct(">IIIIIIQI28x256s")
HEADER_SIZE = _HEADER.size  # 320
KNOWN_FLAGS = MULTIFD_FLAG_SYNC
# Pages a packet may hold: one 8 MiB window of 4 KiB pages (QEMU 7.2 holds 128).  Each
# packet costs a channel's thread its Python, a wake-up and the GIL on both sides:
# 4 channels on 2 CPUs moved 1 GiB with 0.14 CPU s per side in 8 MiB packets, 0.21 in
# 2 MiB ones (16 MiB ones were no better).
PACKET_PAGES = 2048
_OFFSETS = np.dtype(">u8")


@dataclass(frozen=True)
class InitPacket:
    """The first bytes of a multifd channel."""

    uuid: bytes  # 16 bytes: the migration's, from the capabilities section
    channel: int

    def encode(self) -> bytes:
        if len(self.uuid) != 16 or not 0 <= self.channel < MULTIFD_MAX_CHANNELS:
            raise LocalProtocolError(f"bad multifd initial packet {self!r}")
        return _INIT.pack(MULTIFD_MAGIC, MULTIFD_VERSION, self.uuid, self.channel)

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> InitPacket:
        magic, version, uuid, channel = _INIT.unpack(bytes(data))
        _check_magic("initial packet", magic, version)
        return cls(uuid, channel)


@dataclass(frozen=True)
class PacketHeader:
    """A page packet's header; ``offsets_size`` bytes of offsets follow it, then
    ``data_size`` bytes of page data."""

    flags: int
    normal: int
    zero: int
    packet_num: int
    block: str
    next_packet_size: int = 0

    @property
    def sync(self) -> bool:
        return bool(self.flags & MULTIFD_FLAG_SYNC)

    @property
    def offsets_size(self) -> int:
        return 8 * (self.normal + self.zero)

    @property
    def data_size(self) -> int:
        return self.normal * PAGE_SIZE


def encode_packet(packet_num: int, block: str, normal: npt.NDArray[np.int64],
                  zero: npt.NDArray[np.int64], *, flags: int = 0) -> bytes:
    """Header and offsets of a packet with pages ``normal`` and ``zero`` (indexes of
    4 KiB pages of ``block``); the normal pages' data must follow, in that order."""
    if len(normal) + len(zero) > PACKET_PAGES:
        raise LocalProtocolError(f"a multifd packet holds at most {PACKET_PAGES} pages")
    name = local_name(block) if block else b""
    head = _HEADER.pack(MULTIFD_MAGIC, MULTIFD_VERSION, flags, PACKET_PAGES, len(normal),
                        len(normal) * PAGE_SIZE, packet_num, len(zero), name)
    offsets = np.concatenate((normal, zero)).astype(np.uint64) * np.uint64(PAGE_SIZE)
    return head + offsets.astype(_OFFSETS).tobytes()


def sync_packet(packet_num: int) -> bytes:
    """The packet that ends a round on a channel (no pages)."""
    empty = np.empty(0, dtype=np.int64)
    return encode_packet(packet_num, "", empty, empty, flags=MULTIFD_FLAG_SYNC)


def decode_header(data: bytes | bytearray | memoryview,
                  blocks: Mapping[str, BlockInfo]) -> PacketHeader:
    """A packet header, checked against the block table."""
    (magic, version, flags, alloc, normal, next_size, num, zero,
     raw) = _HEADER.unpack(bytes(data))
    _check_magic("packet", magic, version)
    if flags & ~KNOWN_FLAGS:
        raise RemoteProtocolError(f"multifd packet {num} has unknown flags {flags:#x}")
    if alloc > PACKET_PAGES or normal + zero > alloc:
        raise RemoteProtocolError(f"multifd packet {num} holds {normal} + {zero} pages "
                                  f"of at most {min(alloc, PACKET_PAGES)}")
    if next_size != normal * PAGE_SIZE:
        raise RemoteProtocolError(f"multifd packet {num} announces {next_size} bytes of "
                                  f"data for {normal} pages")
    name = raw.rstrip(b"\0").decode("utf-8", "replace")
    if normal + zero and name not in blocks:
        raise RemoteProtocolError(f"multifd packet {num} names unknown RAM block {name!r}")
    return PacketHeader(flags, normal, zero, num, name, next_size)


def decode_offsets(header: PacketHeader, data: bytes | bytearray | memoryview,
                   blocks: Mapping[str, BlockInfo]) -> npt.NDArray[np.uint64]:
    """The packet's page offsets (normal pages first), each checked to be a page of
    its block."""
    offsets = np.frombuffer(data, dtype=_OFFSETS, count=header.normal + header.zero)
    offsets = offsets.astype(np.uint64)
    if len(offsets):
        length = blocks[header.block].length
        bad = (offsets % np.uint64(PAGE_SIZE) != 0) | (offsets > np.uint64(length - PAGE_SIZE))
        if bad.any():
            off = int(offsets[np.argmax(bad)])
            raise RemoteProtocolError(f"multifd packet {header.packet_num}: page offset "
                                      f"{off:#x} is not a page of RAM block "
                                      f"{header.block!r} ({length} bytes)")
    return offsets


def _check_magic(what: str, magic: int, version: int) -> None:
    if magic != MULTIFD_MAGIC:
        raise RemoteProtocolError(f"multifd {what} has magic {magic:#x}, expected "
                                  f"{MULTIFD_MAGIC:#x}")
    if version != MULTIFD_VERSION:
        raise RemoteProtocolError(f"multifd {what} has version {version}, expected "
                                  f"{MULTIFD_VERSION}")
