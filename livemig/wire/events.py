"""Typed events the stream decoder yields, and the NEED_DATA sentinel.

Theory of operation: in the h11 style, the decoder turns bytes into a sequence
of immutable events; the caller dispatches on their type.  Every event holds
only values that were present in (or are implied by) the bytes received, so a
consumer can trust an event as far as the decoder's validation goes.

Page data is special: ``PageBatch.data`` is a read-only NumPy view straight
into a received ``bytes`` object (no copy), which stays valid for as long as the
event is referenced.  Drop the event after copying the pages into guest RAM so
the receive buffer can be freed.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Final, Literal

import numpy as np
import numpy.typing as npt

from livemig.wire.channel import ChannelKind
from livemig.wire.constants import SectionType
from livemig.wire.vmdesc import VmDescription


class _Sentinel(Enum):
    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return self.value


NEED_DATA: Final = _Sentinel.NEED_DATA
"""Returned by ``next_event()`` when more bytes must be received first."""

NeedData = Literal[_Sentinel.NEED_DATA]


@dataclass(frozen=True, slots=True)
class StreamStart:
    """The channel preamble was valid; ``machine`` is the main channel's machine name."""

    channel: ChannelKind
    machine: str | None


@dataclass(frozen=True, slots=True)
class SectionBegin:
    """A START, PART or END section of an iterable ("ram") began."""

    kind: SectionType
    section_id: int
    idstr: str
    instance_id: int
    version_id: int


@dataclass(frozen=True, slots=True)
class SectionComplete:
    """The section's EOS record and its footer arrived and matched."""

    kind: SectionType
    section_id: int


@dataclass(frozen=True, slots=True)
class MemSizeEntry:
    """One block of a MEM_SIZE record; ``page_size`` only when it was on the wire."""

    name: str
    length: int
    page_size: int | None


@dataclass(frozen=True, slots=True)
class MemSize:
    """The RAM setup record: total bytes and every block; already checked locally."""

    total: int
    blocks: tuple[MemSizeEntry, ...]


@dataclass(frozen=True, slots=True)
class PageHeader:
    """A PAGE record whose 4096-byte payload is not yet fully buffered.

    The decoder is now in payload mode: see ``Decoder.take_payload``.
    """

    block: str
    offset: int


@dataclass(frozen=True, slots=True, eq=False)
class PageBatch:
    """``len(offsets)`` whole pages of one block; ``data[i]`` belongs at ``offsets[i]``.

    ``offsets`` is a native uint64 array; ``data`` a read-only (N, 4096) uint8 view
    into the receive buffer.
    """

    block: str
    offsets: npt.NDArray[np.uint64]
    data: npt.NDArray[np.uint8]


@dataclass(frozen=True, slots=True, eq=False)
class ZeroPages:
    """Pages of one block that are entirely zero (QEMU's ZERO records)."""

    block: str
    offsets: npt.NDArray[np.uint64]


@dataclass(frozen=True, slots=True)
class DeviceState:
    """A FULL section with livemig device state (opaque bytes, see docs/STREAM.md)."""

    section_id: int
    idstr: str
    instance_id: int
    version_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class OpenReturnPath:
    """MIG_CMD_OPEN_RETURN_PATH: the destination should start answering."""


@dataclass(frozen=True, slots=True)
class Ping:
    """MIG_CMD_PING: answer with a PONG carrying ``value`` on the return path."""

    value: int


@dataclass(frozen=True, slots=True)
class PostcopyAdvise:
    """MIG_CMD_POSTCOPY_ADVISE: postcopy may follow; page sizes already matched."""

    host_page_summary: int
    target_page_size: int


@dataclass(frozen=True, slots=True)
class PostcopyListen:
    """MIG_CMD_POSTCOPY_LISTEN: be ready to take faults and postcopy pages."""


@dataclass(frozen=True, slots=True)
class PostcopyRun:
    """MIG_CMD_POSTCOPY_RUN: start the guest; missing pages arrive on demand."""


@dataclass(frozen=True, slots=True, eq=False)
class PostcopyRamDiscard:
    """MIG_CMD_POSTCOPY_RAM_DISCARD: drop these (start, length) byte ranges of ``block``,
    one row each (a switchover discards thousands: they stay one array end to end)."""

    block: str
    ranges: npt.NDArray[np.uint64]

    def __post_init__(self) -> None:
        rows = np.asarray(self.ranges, dtype=np.uint64).reshape(-1, 2)
        object.__setattr__(self, "ranges", rows)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, PostcopyRamDiscard) and self.block == other.block
                and np.array_equal(self.ranges, other.ranges))

    __hash__ = None  # type: ignore[assignment]  # mutable payload, as with PageBatch


@dataclass(frozen=True, slots=True)
class RecvBitmapRequest:
    """MIG_CMD_RECV_BITMAP (postcopy recovery): answer with the bitmap of the pages of
    ``block`` received so far, on the return path."""

    block: str


@dataclass(frozen=True, slots=True)
class PostcopyResume:
    """MIG_CMD_POSTCOPY_RESUME (postcopy recovery): the source goes on; acknowledge."""


@dataclass(frozen=True, slots=True)
class MultifdFlush:
    """RAM_SAVE_FLAG_MULTIFD_FLUSH on the main channel: every multifd channel has sent
    a SYNC packet for this round; load nothing further before they all arrived."""


@dataclass(frozen=True, slots=True)
class Packaged:
    """MIG_CMD_PACKAGED: the next ``length`` bytes (all buffered) form a sub-stream.

    Its events follow, then ``PackagedEnd``.
    """

    length: int


@dataclass(frozen=True, slots=True)
class PackagedEnd:
    """The PACKAGED sub-stream was fully decoded."""


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """The sender ended the channel cleanly (QEMU_VM_EOF, or EOS on the postcopy channel)."""


@dataclass(frozen=True, slots=True)
class VmDescriptionEvent:
    """The VM description after QEMU_VM_EOF (well formed; see livemig.wire.vmdesc)."""

    description: VmDescription


@dataclass(frozen=True, slots=True)
class Closed:
    """The transport reached EOF after a clean end; nothing more will come."""


Event = (
    StreamStart
    | SectionBegin
    | SectionComplete
    | MemSize
    | PageHeader
    | PageBatch
    | ZeroPages
    | DeviceState
    | OpenReturnPath
    | Ping
    | PostcopyAdvise
    | PostcopyListen
    | PostcopyRun
    | PostcopyRamDiscard
    | RecvBitmapRequest
    | PostcopyResume
    | MultifdFlush
    | Packaged
    | PackagedEnd
    | StreamEnd
    | VmDescriptionEvent
    | Closed
)
