"""livemig's migration stream codec: QEMU 7.2's wire format, sans-IO.

Theory of operation: nothing in this package performs I/O.  ``Encoder``
turns intentions into bytes (or lists of buffers for ``sendmsg``), ``Decoder``
turns received bytes into typed events (see ``events``), and
``returnpath`` does the same for destination-to-source messages.  The format,
byte by byte, and every deviation from QEMU are described in docs/STREAM.md.
"""

from livemig.units import PAGE_SIZE
from livemig.wire.blocks import BlockInfo, host_page_summary
from livemig.wire.channel import ChannelKind, identify_channel
from livemig.wire.constants import Command, RamFlag, SectionType
from livemig.wire.decoder import Decoder
from livemig.wire.encoder import Buffers, Encoder
from livemig.wire.events import (
    NEED_DATA,
    Closed,
    DeviceState,
    Event,
    MemSize,
    MemSizeEntry,
    NeedData,
    OpenReturnPath,
    Packaged,
    PackagedEnd,
    PageBatch,
    PageHeader,
    Ping,
    PostcopyAdvise,
    PostcopyListen,
    PostcopyRamDiscard,
    PostcopyRun,
    SectionBegin,
    SectionComplete,
    StreamEnd,
    StreamStart,
    ZeroPages,
)
from livemig.wire.returnpath import (
    Pong,
    ReqPages,
    ReturnPathDecoder,
    ReturnPathEncoder,
    RpEvent,
    RpType,
    Shut,
)

__all__ = [
    "NEED_DATA",
    "PAGE_SIZE",
    "BlockInfo",
    "Buffers",
    "ChannelKind",
    "Closed",
    "Command",
    "Decoder",
    "DeviceState",
    "Encoder",
    "Event",
    "MemSize",
    "MemSizeEntry",
    "NeedData",
    "OpenReturnPath",
    "Packaged",
    "PackagedEnd",
    "PageBatch",
    "PageHeader",
    "Ping",
    "Pong",
    "PostcopyAdvise",
    "PostcopyListen",
    "PostcopyRamDiscard",
    "PostcopyRun",
    "RamFlag",
    "ReqPages",
    "ReturnPathDecoder",
    "ReturnPathEncoder",
    "RpEvent",
    "RpType",
    "SectionBegin",
    "SectionComplete",
    "SectionType",
    "Shut",
    "StreamEnd",
    "StreamStart",
    "ZeroPages",
    "host_page_summary",
    "identify_channel",
]
