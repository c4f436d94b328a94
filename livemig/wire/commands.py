"""QEMU_VM_COMMAND records: framing, payload encoders and payload parsers.

Theory of operation: a command is ``0x08, be16 cmd, be16 len, len bytes``
(QEMU's qemu_savevm_command_send).  Because the length is explicit, the
decoder first collects the whole payload and only then parses it with a
``PayloadReader``, which turns any overrun or leftover into a protocol error.
Fixed-size commands must carry exactly QEMU's length (mig_cmd_args).
PACKAGED is framed here but its blob is handled by the decoder, because the
blob is itself stream records.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from livemig.errors import LocalProtocolError, RemoteProtocolError
from livemig.units import PAGE_SIZE
from livemig.wire.blocks import BlockInfo, host_page_summary, local_name
from livemig.wire.buffer import PayloadReader, decode_name
from livemig.wire.constants import (
    DISCARD_VERSION,
    MAX_COMMAND_PAYLOAD,
    Command,
    SectionType,
)
from livemig.wire.events import (
    Event,
    OpenReturnPath,
    Ping,
    PostcopyAdvise,
    PostcopyListen,
    PostcopyRamDiscard,
    PostcopyResume,
    PostcopyRun,
    RecvBitmapRequest,
)

_HEADER = struct.Struct(">BHH")
_DISCARD_RANGE = 16  # be64 start + be64 length


def encode_command(cmd: Command, payload: bytes = b"") -> bytes:
    """Frame one command record."""
    if len(payload) > MAX_COMMAND_PAYLOAD:
        raise LocalProtocolError(f"{cmd.name} payload of {len(payload)} bytes exceeds 65535.")
    return _HEADER.pack(SectionType.COMMAND, cmd, len(payload)) + payload


# (start, length) byte ranges: pairs, or an (n, 2) array of them.
DiscardRanges = Sequence[tuple[int, int]] | npt.NDArray[np.uint64]


def encode_discard(block: str, ranges: DiscardRanges) -> bytes:
    """POSTCOPY_RAM_DISCARD commands for ``ranges``, split to fit the be16 length."""
    name = local_name(block)
    if not len(ranges):
        raise LocalProtocolError("POSTCOPY_RAM_DISCARD needs at least one range.")
    arr = _ranges_array(ranges)
    prefix = bytes([DISCARD_VERSION, len(name)]) + name + b"\0"
    per_cmd = (MAX_COMMAND_PAYLOAD - len(prefix)) // _DISCARD_RANGE
    out = [
        encode_command(Command.POSTCOPY_RAM_DISCARD, prefix + arr[i : i + per_cmd].tobytes())
        for i in range(0, len(arr), per_cmd)
    ]
    return b"".join(out)


def _ranges_array(ranges: DiscardRanges) -> np.ndarray:
    try:
        arr = np.array(ranges, dtype=np.uint64)
    except (OverflowError, ValueError, TypeError):
        raise LocalProtocolError("Discard ranges must be (start, length) u64 pairs.") from None
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise LocalProtocolError("Discard ranges must be (start, length) pairs.")
    return arr.astype(">u8")


def parse_command(cmd_no: int, payload: bytes, blocks: Mapping[str, BlockInfo]) -> Event:
    """Turn a command payload into its event (PACKAGED is not handled here)."""
    cmd = Command(cmd_no)
    r = PayloadReader(payload, f"Command {cmd.name}")
    event: Event
    if cmd is Command.OPEN_RETURN_PATH:
        event = OpenReturnPath()
    elif cmd is Command.PING:
        event = Ping(r.be32())
    elif cmd is Command.POSTCOPY_ADVISE:
        event = _parse_advise(r, blocks)
    elif cmd is Command.POSTCOPY_LISTEN:
        event = PostcopyListen()
    elif cmd is Command.POSTCOPY_RUN:
        event = PostcopyRun()
    elif cmd is Command.POSTCOPY_RAM_DISCARD:
        event = _parse_discard(r, blocks)
    elif cmd is Command.POSTCOPY_RESUME:
        event = PostcopyResume()
    elif cmd is Command.RECV_BITMAP:
        name = decode_name(r.counted(), "RECV_BITMAP block")
        if name not in blocks:
            raise RemoteProtocolError(f"RECV_BITMAP names unknown RAM block {name!r}.")
        event = RecvBitmapRequest(name)
    else:  # pragma: no cover - the decoder handles PACKAGED itself
        raise AssertionError(cmd)
    r.finish()
    return event


def _parse_advise(r: PayloadReader, blocks: Mapping[str, BlockInfo]) -> PostcopyAdvise:
    summary, tps = r.be64(), r.be64()
    if tps != PAGE_SIZE:
        raise RemoteProtocolError(
            f"POSTCOPY_ADVISE target page size {tps} does not match ours ({PAGE_SIZE})."
        )
    local = host_page_summary(blocks)
    if summary != local:
        raise RemoteProtocolError(
            f"POSTCOPY_ADVISE page size summary {summary:#x} does not match the local "
            f"RAM blocks ({local:#x}); postcopy needs matching page sizes."
        )
    return PostcopyAdvise(summary, tps)


def _parse_discard(r: PayloadReader, blocks: Mapping[str, BlockInfo]) -> PostcopyRamDiscard:
    version = r.u8()
    if version != DISCARD_VERSION:
        raise RemoteProtocolError(f"POSTCOPY_RAM_DISCARD has unknown version {version}.")
    name = decode_name(r.counted(), "POSTCOPY_RAM_DISCARD block")
    if r.u8() != 0:
        raise RemoteProtocolError("POSTCOPY_RAM_DISCARD block name lacks its NUL terminator.")
    info = blocks.get(name)
    if info is None:
        raise RemoteProtocolError(f"POSTCOPY_RAM_DISCARD names unknown RAM block {name!r}.")
    left = r.remaining()
    if left == 0 or left % _DISCARD_RANGE:
        raise RemoteProtocolError(
            f"POSTCOPY_RAM_DISCARD carries {left} range bytes, not a positive multiple of 16."
        )
    raw = np.frombuffer(r.take(left), dtype=">u8").reshape(-1, 2).astype(np.uint64)
    _check_discard_ranges(name, info, raw)
    return PostcopyRamDiscard(name, raw)


def _check_discard_ranges(name: str, info: BlockInfo, raw: np.ndarray) -> None:
    starts, lengths = raw[:, 0], raw[:, 1]
    ps = np.uint64(info.page_size)
    if ((starts % ps) | (lengths % ps)).any() or not lengths.all():
        raise RemoteProtocolError(
            f"POSTCOPY_RAM_DISCARD range of block {name!r} is empty or not aligned "
            f"to its {info.page_size}-byte pages."
        )
    size = np.uint64(info.length)
    # Compare in two steps so start + length cannot wrap around 2**64.
    if (starts > size).any() or (lengths > size - np.minimum(starts, size)).any():
        raise RemoteProtocolError(
            f"POSTCOPY_RAM_DISCARD range lies outside block {name!r} ({info.length} bytes)."
        )
