"""livemig's migration stream codec: QEMU 7.2's wire format, sans-IO.

Theory of operation: nothing in this package performs I/O.  ``Encoder``
turns intentions into bytes (or lists of buffers for ``sendmsg``), ``Decoder``
turns received bytes into typed events (see ``events``), and
``returnpath`` does the same for destination-to-source messages.  The format,
byte by byte, and every deviation from QEMU are described in docs/STREAM.md.
"""

from typing import TYPE_CHECKING

from livemig.lazy import lazy_exports

if TYPE_CHECKING:
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

__getattr__ = lazy_exports(__name__, {
    "BlockInfo": "livemig.wire.blocks",
    "Buffers": "livemig.wire.encoder",
    "ChannelKind": "livemig.wire.channel",
    "Closed": "livemig.wire.events",
    "Command": "livemig.wire.constants",
    "Decoder": "livemig.wire.decoder",
    "DeviceState": "livemig.wire.events",
    "Encoder": "livemig.wire.encoder",
    "Event": "livemig.wire.events",
    "MemSize": "livemig.wire.events",
    "MemSizeEntry": "livemig.wire.events",
    "NEED_DATA": "livemig.wire.events",
    "NeedData": "livemig.wire.events",
    "OpenReturnPath": "livemig.wire.events",
    "PAGE_SIZE": "livemig.units",
    "Packaged": "livemig.wire.events",
    "PackagedEnd": "livemig.wire.events",
    "PageBatch": "livemig.wire.events",
    "PageHeader": "livemig.wire.events",
    "Ping": "livemig.wire.events",
    "Pong": "livemig.wire.returnpath",
    "PostcopyAdvise": "livemig.wire.events",
    "PostcopyListen": "livemig.wire.events",
    "PostcopyRamDiscard": "livemig.wire.events",
    "PostcopyRun": "livemig.wire.events",
    "RamFlag": "livemig.wire.constants",
    "ReqPages": "livemig.wire.returnpath",
    "ReturnPathDecoder": "livemig.wire.returnpath",
    "ReturnPathEncoder": "livemig.wire.returnpath",
    "RpEvent": "livemig.wire.returnpath",
    "RpType": "livemig.wire.returnpath",
    "SectionBegin": "livemig.wire.events",
    "SectionComplete": "livemig.wire.events",
    "SectionType": "livemig.wire.constants",
    "Shut": "livemig.wire.returnpath",
    "StreamEnd": "livemig.wire.events",
    "StreamStart": "livemig.wire.events",
    "ZeroPages": "livemig.wire.events",
    "host_page_summary": "livemig.wire.blocks",
    "identify_channel": "livemig.wire.channel",
})
