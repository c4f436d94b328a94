"""Every stream message: exact QEMU 7.2 bytes from the encoder, and a decode round trip."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from livemig.errors import LocalProtocolError, RemoteProtocolError
from livemig.wire import (
    NEED_DATA,
    PAGE_SIZE,
    BlockInfo,
    ChannelKind,
    Closed,
    Decoder,
    DeviceState,
    Encoder,
    MemSize,
    MemSizeEntry,
    OpenReturnPath,
    Packaged,
    PackagedEnd,
    PageBatch,
    Ping,
    PostcopyAdvise,
    PostcopyListen,
    PostcopyRamDiscard,
    PostcopyRun,
    SectionBegin,
    SectionComplete,
    SectionType,
    StreamEnd,
    StreamStart,
    ZeroPages,
    host_page_summary,
    identify_channel,
)
from livemig.wire.events import Event

HUGE = 2 * 1024 * 1024
BLOCKS = {"pc.ram": BlockInfo(16 * PAGE_SIZE), "mem-huge": BlockInfo(HUGE, HUGE)}
RAM = np.arange(16 * PAGE_SIZE, dtype=np.uint32).view(np.uint8)[: 16 * PAGE_SIZE].copy()

PREAMBLE = b"QEVM" + struct.pack(">I", 3) + b"\x07" + struct.pack(">I", 7) + b"livemig"
RAM_START_0 = b"\x01" + struct.pack(">I", 0) + b"\x03ram" + struct.pack(">II", 0, 4)


def be64(v: int) -> bytes:
    return struct.pack(">Q", v)


def main_encoder(postcopy: bool = False) -> Encoder:
    enc = Encoder(postcopy=postcopy)
    enc.preamble()
    return enc


def decode_all(stream: bytes, postcopy: bool = False,
               channel: ChannelKind = ChannelKind.MAIN) -> list[Event]:
    dec = Decoder(BLOCKS, postcopy=postcopy, channel=channel)
    dec.receive_data(stream)
    dec.receive_eof()
    events: list[Event] = []
    while not events or not isinstance(events[-1], Closed):
        ev = dec.next_event()
        assert ev is not NEED_DATA
        events.append(ev)
    return events


def joined(bufs: list[bytes | memoryview]) -> bytes:
    return b"".join(bytes(b) for b in bufs)


# --------------------------------------------------------------- exact bytes
def test_main_preamble_is_qevm_v3_then_configuration_with_machine_name() -> None:
    assert Encoder().preamble() == PREAMBLE


def test_postcopy_preamble_is_lmpc_version_1() -> None:
    assert Encoder(channel=ChannelKind.POSTCOPY).preamble() == b"LMPC\x00\x00\x00\x01"


def test_ram_sections_use_qemu_headers_and_footers() -> None:
    enc = main_encoder()
    assert enc.ram_start(0) == RAM_START_0
    assert enc.close_ram_section() == be64(0x10) + b"\x7e" + struct.pack(">I", 0)
    assert enc.ram_part(0) == b"\x02" + struct.pack(">I", 0)
    enc.close_ram_section()
    assert enc.ram_end(0) == b"\x03" + struct.pack(">I", 0)


def test_mem_size_lists_blocks_and_adds_page_size_only_for_postcopy_huge_blocks() -> None:
    total = 16 * PAGE_SIZE + HUGE
    common = (be64(total | 0x04) + b"\x06pc.ram" + be64(16 * PAGE_SIZE)
              + b"\x08mem-huge" + be64(HUGE))
    for postcopy, tail in ((False, b""), (True, be64(HUGE))):
        enc = main_encoder(postcopy)
        enc.ram_start(0)
        assert enc.mem_size(BLOCKS) == common + tail


def test_pages_name_the_block_once_then_use_continue() -> None:
    enc = main_encoder()
    enc.ram_start(0)
    bufs = enc.pages("pc.ram", [0, 2 * PAGE_SIZE], RAM.data)
    assert joined(bufs) == (
        be64(0x08) + b"\x06pc.ram" + RAM[:PAGE_SIZE].tobytes()
        + be64(2 * PAGE_SIZE | 0x28) + RAM[2 * PAGE_SIZE : 3 * PAGE_SIZE].tobytes()
    )
    again = enc.pages("pc.ram", [PAGE_SIZE], RAM.data)
    assert bytes(again[0]) == be64(PAGE_SIZE | 0x28) and len(again) == 2


def test_zero_pages_carry_one_zero_fill_byte() -> None:
    enc = main_encoder()
    enc.ram_start(0)
    assert enc.zero_pages("pc.ram", [PAGE_SIZE, 3 * PAGE_SIZE]) == (
        be64(PAGE_SIZE | 0x02) + b"\x06pc.ram" + b"\0" + be64(3 * PAGE_SIZE | 0x22) + b"\0"
    )


def test_device_state_is_a_full_section_with_be32_length_and_footer() -> None:
    enc = main_encoder()
    assert joined(enc.device_state(9, "livemig/cpu", b"abc", instance_id=1, version_id=2)) == (
        b"\x04" + struct.pack(">I", 9) + b"\x0blivemig/cpu" + struct.pack(">III", 1, 2, 3)
        + b"abc" + b"\x7e" + struct.pack(">I", 9)
    )


@pytest.mark.parametrize(
    ("method", "args", "expected"),
    [
        ("open_return_path", (), b"\x08\x00\x01\x00\x00"),
        ("ping", (0xDEADBEEF,), b"\x08\x00\x02\x00\x04\xde\xad\xbe\xef"),
        ("postcopy_advise", (4096,), b"\x08\x00\x03\x00\x10" + be64(4096) + be64(4096)),
        ("postcopy_listen", (), b"\x08\x00\x04\x00\x00"),
        ("postcopy_run", (), b"\x08\x00\x05\x00\x00"),
        ("postcopy_ram_discard", ("pc.ram", [(0, 8192)]),
         b"\x08\x00\x06\x00\x19" + b"\x00\x06pc.ram\x00" + be64(0) + be64(8192)),
    ],
)
def test_commands_use_qemu_framing(method: str, args: tuple[object, ...], expected: bytes) -> None:
    assert getattr(main_encoder(), method)(*args) == expected


def test_packaged_sends_be32_length_then_the_blob_untouched() -> None:
    blob = memoryview(b"\x08\x00\x05\x00\x00")
    bufs = main_encoder().packaged(blob)
    assert bufs[0] == b"\x08\x00\x08\x00\x04" + struct.pack(">I", 5)
    assert bufs[1] is blob


def test_eof_is_a_zero_byte_on_main_and_eos_on_postcopy() -> None:
    assert main_encoder().eof() == b"\x00"
    enc = Encoder(channel=ChannelKind.POSTCOPY)
    enc.preamble()
    assert enc.eof() == be64(0x10)


# ---------------------------------------------------------------- round trips
def test_full_precopy_stream_round_trips() -> None:
    enc = main_encoder()
    parts = [PREAMBLE, enc.open_return_path(), enc.ping(7), enc.ram_start(0),
             enc.mem_size(BLOCKS), enc.close_ram_section(), enc.ram_part(0),
             joined(enc.pages("pc.ram", [0, PAGE_SIZE], RAM.data)),
             enc.zero_pages("pc.ram", [5 * PAGE_SIZE]), enc.close_ram_section(),
             joined(enc.device_state(3, "livemig/serial", b"uart")), enc.ram_end(0),
             enc.close_ram_section(), enc.eof()]
    events = decode_all(b"".join(parts))
    pages = [(e.block, int(o), e.data[i].tobytes()) for e in events if isinstance(e, PageBatch)
             for i, o in enumerate(e.offsets)]
    assert pages == [("pc.ram", 0, RAM[:PAGE_SIZE].tobytes()),
                     ("pc.ram", PAGE_SIZE, RAM[PAGE_SIZE : 2 * PAGE_SIZE].tobytes())]
    zeros = [e for e in events if isinstance(e, ZeroPages)]
    assert [(z.block, z.offsets.tolist()) for z in zeros] == [("pc.ram", [5 * PAGE_SIZE])]
    events = [e for e in events if not isinstance(e, PageBatch | ZeroPages)]
    assert events == [
        StreamStart(ChannelKind.MAIN, "livemig"), OpenReturnPath(), Ping(7),
        SectionBegin(SectionType.START, 0, "ram", 0, 4),
        MemSize(16 * PAGE_SIZE + HUGE, (MemSizeEntry("pc.ram", 16 * PAGE_SIZE, None),
                                        MemSizeEntry("mem-huge", HUGE, None))),
        SectionComplete(SectionType.START, 0),
        SectionBegin(SectionType.PART, 0, "ram", 0, 4),
        SectionComplete(SectionType.PART, 0),
        DeviceState(3, "livemig/serial", 0, 1, b"uart"),
        SectionBegin(SectionType.END, 0, "ram", 0, 4), SectionComplete(SectionType.END, 0),
        StreamEnd(), Closed(),
    ]


def test_postcopy_commands_and_package_round_trip() -> None:
    enc = main_encoder(postcopy=True)
    child = enc.package()
    blob = b"".join([child.postcopy_listen(), joined(child.device_state(4, "livemig/cpu", b"r")),
                     child.ping(3), child.postcopy_run()])
    summary = host_page_summary(BLOCKS)
    parts = [PREAMBLE, enc.postcopy_advise(summary),
             enc.postcopy_ram_discard("mem-huge", [(0, HUGE)]), joined(enc.packaged(blob)),
             enc.eof()]
    assert decode_all(b"".join(parts), postcopy=True) == [
        StreamStart(ChannelKind.MAIN, "livemig"), PostcopyAdvise(summary, PAGE_SIZE),
        PostcopyRamDiscard("mem-huge", ((0, HUGE),)), Packaged(len(blob)), PostcopyListen(),
        DeviceState(4, "livemig/cpu", 0, 1, b"r"), Ping(3), PostcopyRun(), PackagedEnd(),
        StreamEnd(), Closed(),
    ]


def test_pages_inside_a_package_do_not_confuse_continue_after_it() -> None:
    enc = main_encoder()
    parts = [PREAMBLE, enc.ram_start(0), enc.close_ram_section(), enc.ram_part(0),
             joined(enc.pages("pc.ram", [0], RAM.data)), enc.close_ram_section()]
    child = enc.package()
    blob = b"".join([child.ram_part(0), joined(child.pages("mem-huge", [0], RAM.data)),
                     child.close_ram_section()])
    parts += [joined(enc.packaged(blob)), enc.ram_end(0),
              joined(enc.pages("pc.ram", [PAGE_SIZE], RAM.data)),
              enc.close_ram_section(), enc.eof()]
    pages = [(e.block, int(e.offsets[0])) for e in decode_all(b"".join(parts))
             if isinstance(e, PageBatch)]
    assert pages == [("pc.ram", 0), ("mem-huge", 0), ("pc.ram", PAGE_SIZE)]


def test_mem_size_with_postcopy_round_trips_page_sizes() -> None:
    enc = main_encoder(postcopy=True)
    stream = PREAMBLE + enc.ram_start(0) + enc.mem_size(BLOCKS)
    events = decode_all(stream + enc.close_ram_section() + enc.eof(), postcopy=True)
    assert events[2] == MemSize(16 * PAGE_SIZE + HUGE, (
        MemSizeEntry("pc.ram", 16 * PAGE_SIZE, None), MemSizeEntry("mem-huge", HUGE, HUGE)))


def test_many_discard_ranges_are_split_over_commands_and_all_decoded() -> None:
    ranges = [(i * PAGE_SIZE, PAGE_SIZE) for i in range(16)] * 300  # 4800 > one command
    enc = main_encoder()
    stream = PREAMBLE + enc.postcopy_ram_discard("pc.ram", ranges) + enc.eof()
    discards = [e for e in decode_all(stream) if isinstance(e, PostcopyRamDiscard)]
    assert len(discards) == 2
    assert [tuple(r) for d in discards for r in d.ranges.tolist()] == ranges


def test_postcopy_channel_round_trips_pages_and_ends_with_eos() -> None:
    enc = Encoder(channel=ChannelKind.POSTCOPY)
    parts = [enc.preamble(), joined(enc.pages("mem-huge", [PAGE_SIZE], RAM.data)),
             enc.zero_pages("pc.ram", [0]), enc.eof()]
    events = decode_all(b"".join(parts), channel=ChannelKind.POSTCOPY)
    assert events[0] == StreamStart(ChannelKind.POSTCOPY, None)
    assert isinstance(events[1], PageBatch) and events[1].block == "mem-huge"
    assert events[1].data.tobytes() == RAM[PAGE_SIZE : 2 * PAGE_SIZE].tobytes()
    assert isinstance(events[2], ZeroPages) and events[2].block == "pc.ram"
    assert events[3:] == [StreamEnd(), Closed()]


def test_identify_channel_tells_main_from_postcopy() -> None:
    assert identify_channel(PREAMBLE[:4]) is ChannelKind.MAIN
    assert identify_channel(b"LMPC") is ChannelKind.POSTCOPY
    with pytest.raises(RemoteProtocolError):
        identify_channel(b"HTTP")
    with pytest.raises(RemoteProtocolError):
        identify_channel(b"QEV")


# ------------------------------------------------------- encoder's own checks
def test_encoder_refuses_records_out_of_order() -> None:
    with pytest.raises(LocalProtocolError):
        Encoder().ram_start(0)  # before the preamble
    enc = main_encoder()
    with pytest.raises(LocalProtocolError):
        enc.pages("pc.ram", [0], RAM.data)  # outside a ram section
    enc.ram_start(0)
    with pytest.raises(LocalProtocolError):
        enc.ping(1)  # inside a section
    enc.close_ram_section()
    with pytest.raises(LocalProtocolError):
        enc.ram_start(0)  # section id reused
    enc.eof()
    with pytest.raises(LocalProtocolError):
        enc.ping(1)  # after EOF


def test_encoder_refuses_bad_pages() -> None:
    enc = main_encoder()
    enc.ram_start(0)
    for offsets in ([1], [-4096], [16 * PAGE_SIZE], [[0]]):
        with pytest.raises(LocalProtocolError):
            enc.pages("pc.ram", offsets, RAM.data)
    with pytest.raises(LocalProtocolError):
        enc.pages("x" * 256, [0], RAM.data)


def test_encoder_refuses_sections_and_commands_on_the_postcopy_channel() -> None:
    enc = Encoder(channel=ChannelKind.POSTCOPY)
    enc.preamble()
    for call in (lambda: enc.ram_start(0), lambda: enc.ping(1),
                 lambda: enc.device_state(1, "livemig/cpu", b"")):
        with pytest.raises(LocalProtocolError):
            call()


def test_page_header_is_the_single_page_form_of_page_records_and_zero_pages() -> None:
    """The scalar path of one requested page writes the bytes the batch path writes,
    naming the block only when it changes, and decodes to the same events."""
    enc = Encoder(channel=ChannelKind.POSTCOPY)
    preamble = enc.preamble()
    headers = [enc.page_header("pc.ram", 0), enc.page_header("pc.ram", PAGE_SIZE, zero=True),
               enc.page_header("mem-huge", 0), enc.page_header("pc.ram", 2 * PAGE_SIZE)]
    assert headers == [be64(0x08) + b"\x06pc.ram", be64(PAGE_SIZE | 0x22) + b"\0",
                       be64(0x08) + b"\x08mem-huge", be64(2 * PAGE_SIZE | 0x08) + b"\x06pc.ram"]
    batch = Encoder(channel=ChannelKind.POSTCOPY)
    batch.preamble()
    assert joined(batch.pages("pc.ram", [0], RAM.data))[:-PAGE_SIZE] == headers[0]
    assert batch.zero_pages("pc.ram", [PAGE_SIZE]) == headers[1]
    page = RAM[:PAGE_SIZE].tobytes()
    events = decode_all(b"".join([preamble, headers[0], page, headers[1], headers[2], page,
                                  headers[3], page, enc.eof()]), channel=ChannelKind.POSTCOPY)
    assert [(type(e).__name__, e.block, e.offsets.tolist())
            for e in events if isinstance(e, (PageBatch, ZeroPages))] == [
        ("PageBatch", "pc.ram", [0]), ("ZeroPages", "pc.ram", [PAGE_SIZE]),
        ("PageBatch", "mem-huge", [0]), ("PageBatch", "pc.ram", [2 * PAGE_SIZE])]
    with pytest.raises(LocalProtocolError):
        enc.page_header("pc.ram", 100)
