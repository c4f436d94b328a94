"""Sans-IO codec of the return path: destination-to-source messages (QEMU 7.2).

Theory of operation: after MIG_CMD_OPEN_RETURN_PATH the destination writes
messages back on the main connection: ``be16 type, be16 len, len bytes``
(QEMU's migrate_send_rp_message).  livemig speaks four of QEMU's types:

====  ============  ============================================================
type  name          payload
====  ============  ============================================================
1     SHUT          be32 status (0 = fine); nothing may follow
2     PONG          be32 value echoed from a PING
3     REQ_PAGES_ID  be64 start, be32 length, u8 len + block name
4     REQ_PAGES     be64 start, be32 length (same block as before)
5     RECV_BITMAP   u8 len + block name; *then, outside the message*: be64 size,
                    ``size`` bytes of bitmap (bit i = 4 KiB page i received, in
                    little-endian 64-bit words), be64 0x0123456789abcdef
6     RESUME_ACK    be32 1
====  ============  ============================================================

RECV_BITMAP and RESUME_ACK are postcopy recovery's (QEMU's
``migrate_send_rp_recv_bitmap`` / ``ramblock_recv_bitmap_send`` and
``migrate_send_rp_resume_ack``): the destination answers MIG_CMD_RECV_BITMAP with what
it has placed, and MIG_CMD_POSTCOPY_RESUME with the acknowledgement.

Like QEMU, the encoder names the block only when it differs from the last one
it requested, and the decoder resolves REQ_PAGES to the last named block
(refusing it if none was named yet).  Both sides yield a single ``ReqPages``
event/call, so callers never see the difference.  When the decoder knows the
source's block table it also checks the block and that the range is made of
whole pages inside the block; without one it checks 4096-byte alignment.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

import numpy as np
import numpy.typing as npt

from livemig.errors import (
    ChannelClosedError,
    LocalProtocolError,
    RemoteProtocolError,
)
from livemig.units import PAGE_SIZE
from livemig.wire.blocks import BlockInfo, local_name
from livemig.wire.buffer import (
    PayloadReader,
    Reader,
    ReceiveBuffer,
    Short,
    StickyError,
    decode_name,
)
from livemig.wire.events import NEED_DATA, Closed, NeedData

_HEADER = struct.Struct(">HH")
_REQ = struct.Struct(">QI")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")
MAX_RP_PAYLOAD = 512  # QEMU's source_return_path_thread buffer


class RpType(IntEnum):
    """QEMU's MIG_RP_MSG_* values that livemig speaks."""

    SHUT = 1
    PONG = 2
    REQ_PAGES_ID = 3
    REQ_PAGES = 4
    RECV_BITMAP = 5
    RESUME_ACK = 6


_FIXED_LENGTHS = {RpType.SHUT: 4, RpType.PONG: 4, RpType.REQ_PAGES: 12,
                  RpType.RESUME_ACK: 4}
RECV_BITMAP_ENDING: Final = 0x0123456789ABCDEF  # QEMU's RAMBLOCK_RECV_BITMAP_ENDING
RESUME_ACK_VALUE: Final = 1  # QEMU's MIGRATION_RESUME_ACK_VALUE
# Without the block table a bitmap is bounded by this (1 TiB of 4 KiB pages).
MAX_BITMAP_BYTES: Final = (1 << 40) // PAGE_SIZE // 8


@dataclass(frozen=True, slots=True)
class Shut:
    """The destination will send nothing more; ``status`` 0 means success."""

    status: int


@dataclass(frozen=True, slots=True)
class Pong:
    """Answer to MIG_CMD_PING."""

    value: int


@dataclass(frozen=True, slots=True)
class ReqPages:
    """The destination faulted on ``length`` bytes at ``start`` of ``block``."""

    block: str
    start: int
    length: int


@dataclass(frozen=True, slots=True, eq=False)
class RecvBitmap:
    """The destination's received pages of ``block``: one bool per 4 KiB page."""

    block: str
    received: npt.NDArray[np.bool_]


@dataclass(frozen=True, slots=True)
class ResumeAck:
    """The destination took MIG_CMD_POSTCOPY_RESUME: postcopy goes on."""

    value: int


RpEvent = Shut | Pong | ReqPages | RecvBitmap | ResumeAck | Closed


def _bitmap_words(received: npt.NDArray[np.bool_]) -> bytes:
    """QEMU's layout: bit i of little-endian 64-bit word i // 64 is page i."""
    n = len(received)
    padded = np.zeros(-(-n // 64) * 64, dtype=np.bool_)
    padded[:n] = received
    return np.packbits(padded, bitorder="little").tobytes()


def _bitmap_bools(raw: bytes, pages: int) -> npt.NDArray[np.bool_]:
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")
    return bits[:pages].astype(np.bool_)


class ReturnPathEncoder:
    """Encode return-path messages (destination side)."""

    def __init__(self) -> None:
        self._last_block: str | None = None
        self._shut = False

    def shut(self, status: int = 0) -> bytes:
        data = self._message(RpType.SHUT, _BE32.pack(status))
        self._shut = True
        return data

    def pong(self, value: int) -> bytes:
        return self._message(RpType.PONG, _BE32.pack(value))

    def req_pages(self, block: str, start: int, length: int) -> bytes:
        """Request pages; names the block only if it changed since the last request."""
        if start % PAGE_SIZE or length <= 0 or length % PAGE_SIZE:
            raise LocalProtocolError(
                f"Page request {start:#x}+{length:#x} is not made of whole {PAGE_SIZE}-byte pages."
            )
        if block == self._last_block:
            return self._message(RpType.REQ_PAGES, _REQ.pack(start, length))
        raw = local_name(block)
        payload = _REQ.pack(start, length) + bytes([len(raw)]) + raw
        data = self._message(RpType.REQ_PAGES_ID, payload)
        self._last_block = block
        return data

    def recv_bitmap(self, block: str, received: npt.NDArray[np.bool_]) -> bytes:
        """Postcopy recovery: the bitmap of ``block``'s received 4 KiB pages."""
        raw = local_name(block)
        words = _bitmap_words(received)
        return (self._message(RpType.RECV_BITMAP, bytes([len(raw)]) + raw)
                + _BE64.pack(len(words)) + words + _BE64.pack(RECV_BITMAP_ENDING))

    def resume_ack(self) -> bytes:
        return self._message(RpType.RESUME_ACK, _BE32.pack(RESUME_ACK_VALUE))

    def _message(self, kind: RpType, payload: bytes) -> bytes:
        if self._shut:
            raise LocalProtocolError("Nothing may be sent on the return path after SHUT.")
        return _HEADER.pack(kind, len(payload)) + payload


class ReturnPathDecoder:
    """Decode return-path messages (source side); same calling style as ``Decoder``."""

    def __init__(self, blocks: Mapping[str, BlockInfo] | None = None) -> None:
        self._blocks = None if blocks is None else dict(blocks)
        self._buf = ReceiveBuffer()
        self._eof = False
        self._done = False
        self._sticky = StickyError()
        self._last_block: str | None = None

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer received bytes; ``b""`` means EOF."""
        if self._eof:
            raise LocalProtocolError("receive_data() was called after receive_eof().")
        if len(data) == 0:
            self._eof = True
            return
        self._buf.feed(data if isinstance(data, bytes) else bytes(data))

    def receive_eof(self) -> None:
        self._eof = True

    def next_event(self) -> RpEvent | NeedData:
        """Return the next message event, or NEED_DATA; errors are sticky."""
        return self._sticky.guard(self._next_event)

    def _next_event(self) -> RpEvent | NeedData:
        if self._done:
            return self._after_shut()
        while True:
            start = self._buf.pos
            reader = Reader(self._buf.head, start, len(self._buf.head))
            try:
                event = self._parse(reader)
            except Short as short:
                if not self._buf.contiguous(short.end - start):
                    return self._starved()
                continue
            self._buf.advance(reader.pos - start)
            return event

    def _starved(self) -> NeedData:
        if not self._eof:
            return NEED_DATA
        if self._buf.available() == 0:
            raise ChannelClosedError("The return path closed before SHUT.")
        raise RemoteProtocolError("The return path is truncated in the middle of a message.")

    def _after_shut(self) -> Closed | NeedData:
        if self._buf.available():
            raise RemoteProtocolError("The return path carries data after SHUT.")
        return Closed() if self._eof else NEED_DATA

    def _parse(self, r: Reader) -> RpEvent:
        number, length = r.be16(), r.be16()
        try:
            kind = RpType(number)
        except ValueError:
            raise RemoteProtocolError(f"Unknown return path message type {number}.") from None
        expected = _FIXED_LENGTHS.get(kind)
        if (expected is not None and length != expected) or length > MAX_RP_PAYLOAD:
            raise RemoteProtocolError(f"Return path {kind.name} has bad length {length}.")
        event = self._parse_payload(kind, PayloadReader(r.take(length), f"Return path {kind.name}"))
        if isinstance(event, RecvBitmap):
            event = self._parse_bitmap(r, event.block)
        if kind is RpType.SHUT:
            self._done = True
        return event

    def _parse_payload(self, kind: RpType, p: PayloadReader) -> RpEvent:
        if kind in (RpType.SHUT, RpType.PONG, RpType.RESUME_ACK):
            value = p.be32()
            p.finish()
            if kind is RpType.RESUME_ACK:
                if value != RESUME_ACK_VALUE:
                    raise RemoteProtocolError(f"RESUME_ACK carries {value}, not "
                                              f"{RESUME_ACK_VALUE}.")
                return ResumeAck(value)
            return Shut(value) if kind is RpType.SHUT else Pong(value)
        if kind is RpType.RECV_BITMAP:
            block = decode_name(p.counted(), "RECV_BITMAP block")
            p.finish()
            if self._blocks is not None and block not in self._blocks:
                raise RemoteProtocolError(f"RECV_BITMAP for unknown RAM block {block!r}.")
            return RecvBitmap(block, np.zeros(0, dtype=np.bool_))  # bitmap follows
        start, length = p.be64(), p.be32()
        name = p.counted() if kind is RpType.REQ_PAGES_ID else None
        p.finish()
        block = self._request_block(name)
        self._check_request(block, start, length)
        self._last_block = block
        return ReqPages(block, start, length)

    def _parse_bitmap(self, r: Reader, block: str) -> RecvBitmap:
        """The bitmap after a RECV_BITMAP message: its size, the words, the end mark."""
        size = r.be64()
        if self._blocks is not None:
            pages = self._blocks[block].length // PAGE_SIZE
            expected = -(-pages // 64) * 8
            if size != expected:
                raise RemoteProtocolError(f"RECV_BITMAP of {block!r} has {size} bytes; its "
                                          f"{pages} pages need {expected}.")
        elif size > MAX_BITMAP_BYTES or size % 8:
            raise RemoteProtocolError(f"RECV_BITMAP of {block!r} has a bad size {size}.")
        else:
            pages = size * 8
        raw = r.take(size)
        ending = r.be64()
        if ending != RECV_BITMAP_ENDING:
            raise RemoteProtocolError(f"RECV_BITMAP of {block!r} ends with {ending:#x}, not "
                                      f"{RECV_BITMAP_ENDING:#x}.")
        return RecvBitmap(block, _bitmap_bools(raw, pages))

    def _request_block(self, raw: bytes | None) -> str:
        if raw is None:
            if self._last_block is None:
                raise RemoteProtocolError(
                    "REQ_PAGES arrived before any REQ_PAGES_ID named a block."
                )
            return self._last_block
        block = decode_name(raw, "REQ_PAGES_ID block")
        if not block:
            raise RemoteProtocolError("REQ_PAGES_ID carries an empty block name.")
        return block

    def _check_request(self, block: str, start: int, length: int) -> None:
        page = PAGE_SIZE
        if self._blocks is not None:
            info = self._blocks.get(block)
            if info is None:
                raise RemoteProtocolError(f"Page request for unknown RAM block {block!r}.")
            if start + length > info.length:
                raise RemoteProtocolError(
                    f"Page request {start:#x}+{length:#x} lies outside block {block!r}."
                )
            page = info.page_size
        if length == 0 or start % page or length % page:
            raise RemoteProtocolError(
                f"Page request {start:#x}+{length:#x} of {block!r} is not whole {page}-byte pages."
            )
