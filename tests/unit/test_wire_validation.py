"""The decoder refuses every malformed or inconsistent stream with a clear, typed error."""

from __future__ import annotations

import struct
from typing import Any

import pytest

from livemig.errors import ChannelClosedError, RemoteProtocolError
from livemig.wire import (
    NEED_DATA,
    PAGE_SIZE,
    BlockInfo,
    ChannelKind,
    Decoder,
    Encoder,
    PageBatch,
    PageHeader,
    StreamEnd,
)
from livemig.wire.events import Event

HUGE = 2 * 1024 * 1024
BLOCKS = {"pc.ram": BlockInfo(16 * PAGE_SIZE), "mem-huge": BlockInfo(HUGE, HUGE)}
PREAMBLE = Encoder().preamble()
START = b"\x01" + struct.pack(">I", 0) + b"\x03ram" + struct.pack(">II", 0, 4)
PART = b"\x02" + struct.pack(">I", 0)
EOS_FOOTER = struct.pack(">Q", 0x10) + b"\x7e" + struct.pack(">I", 0)
PAGE = b"\xcd" * PAGE_SIZE


def be64(v: int) -> bytes:
    return struct.pack(">Q", v)


def be32(v: int) -> bytes:
    return struct.pack(">I", v)


def cmd(number: int, payload: bytes) -> bytes:
    return struct.pack(">BHH", 8, number, len(payload)) + payload


def mem_size(*entries: tuple[str, int], total: int | None = None, extra: bytes = b"") -> bytes:
    body = b"".join(bytes([len(n)]) + n.encode() + be64(length) for n, length in entries)
    size = sum(length for _, length in entries) if total is None else total
    return be64(size | 0x04) + body + extra


GOOD_MEM = mem_size(("pc.ram", 16 * PAGE_SIZE), ("mem-huge", HUGE))
# A stream positioned inside an open RAM PART section.
IN_PART = PREAMBLE + START + GOOD_MEM + EOS_FOOTER + PART


def drain(stream: bytes, **kwargs: Any) -> list[Event]:
    """Decode ``stream`` + EOF until an error propagates."""
    dec = Decoder(kwargs.pop("blocks", BLOCKS), **kwargs)
    dec.receive_data(stream)
    dec.receive_eof()
    events: list[Event] = []
    for _ in range(1000):
        ev = dec.next_event()
        assert ev is not NEED_DATA
        events.append(ev)
    raise AssertionError("no error")


def refused(stream: bytes, match: str, **kwargs: Any) -> list[Event]:
    """Assert ``stream`` is refused with RemoteProtocolError matching ``match``."""
    dec = Decoder(kwargs.pop("blocks", BLOCKS), **kwargs)
    dec.receive_data(stream)
    dec.receive_eof()
    events: list[Event] = []
    with pytest.raises(RemoteProtocolError, match=match):
        for _ in range(1000):
            ev = dec.next_event()
            assert ev is not NEED_DATA
            events.append(ev)
    return events


# --------------------------------------------------------------- preamble
@pytest.mark.parametrize(
    ("stream", "match"),
    [
        (b"QEVX" + PREAMBLE[4:], "Not a migration stream"),
        (b"QEVM" + be32(2) + PREAMBLE[8:], "version 2 is obsolete"),
        (b"QEVM" + be32(4) + PREAMBLE[8:], "Unsupported stream format version 4"),
        (PREAMBLE[:8] + b"\x01", "CONFIGURATION section is missing"),
        (PREAMBLE[:9] + be32(5) + b"pc-q3", "Machine type received is 'pc-q3'"),
        (PREAMBLE[:9] + be32(1 << 20), "Machine name length"),
        (PREAMBLE[:9] + be32(2) + b"\xff\xfe", "not valid UTF-8"),
    ],
)
def test_bad_main_preamble_is_refused(stream: bytes, match: str) -> None:
    refused(stream, match)


def test_bad_magic_is_detected_from_the_first_four_bytes() -> None:
    dec = Decoder(BLOCKS)
    dec.receive_data(b"GET ")
    with pytest.raises(RemoteProtocolError, match="Not a migration stream"):
        dec.next_event()


@pytest.mark.parametrize(
    ("stream", "match"),
    [
        (PREAMBLE, "Not a postcopy channel"),
        (b"LMPC" + be32(2), "Unsupported postcopy channel version 2"),
    ],
)
def test_bad_postcopy_preamble_is_refused(stream: bytes, match: str) -> None:
    refused(stream, match, channel=ChannelKind.POSTCOPY)


# --------------------------------------------------------------- sections
@pytest.mark.parametrize(
    ("tail", "match"),
    [
        (b"\x05", "Unknown or misplaced section type 0x05"),
        (b"\x06", "section type 0x06"),
        (b"\x7e" + be32(0), "section type 0x7e"),
        (b"\x42", "section type 0x42"),
        (PART, "Unknown section id 0 in a PART"),
        (b"\x03" + be32(9), "Unknown section id 9 in a END"),
        (b"\x01" + be32(0) + b"\x05block" + be32(0) + be32(1), "Unknown live section 'block'"),
        (b"\x01" + be32(0) + b"\x03ram" + be32(0) + be32(3), "expected instance 0 version 4"),
        (b"\x01" + be32(0) + b"\x03ram" + be32(1) + be32(4), "expected instance 0 version 4"),
        (START + GOOD_MEM + EOS_FOOTER + START, "started twice"),
        (START + GOOD_MEM + EOS_FOOTER + b"\x03" + be32(0) + EOS_FOOTER + PART, "after its END"),
    ],
)
def test_unknown_section_types_and_ids_are_refused(tail: bytes, match: str) -> None:
    refused(PREAMBLE + tail, match)


def test_footer_with_another_section_id_is_refused() -> None:
    bad = be64(0x10) + b"\x7e" + be32(1)
    refused(PREAMBLE + START + GOOD_MEM + bad, "Mismatched section id in footer for 'ram'")


def test_missing_footer_is_refused() -> None:
    refused(PREAMBLE + START + GOOD_MEM + be64(0x10) + b"\x00" + be32(0), "Missing section footer")


def device(idstr: bytes, body: bytes, footer: bytes | None = None, sid: int = 5) -> bytes:
    tail = b"\x7e" + be32(sid) if footer is None else footer
    return (b"\x04" + be32(sid) + bytes([len(idstr)]) + idstr + be32(0) + be32(1)
            + be32(len(body)) + body + tail)


@pytest.mark.parametrize(
    ("record", "match"),
    [
        (device(b"livemig/cpu", b"x", b"\x7e" + be32(6)), "Mismatched section id in footer"),
        (device(b"livemig/cpu", b"x", b"\x00" + be32(5)), "Missing section footer"),
        (device(b"ram", b""), "Unknown device section 'ram'"),
        (device(b"cpu", b""), "Unknown device section 'cpu'"),
        (device(b"livemig/", b""), "Unknown device section"),
        (device(b"livemig/cpu", b"", sid=0), "reuses live section id 0"),
    ],
)
def test_bad_device_sections_are_refused(record: bytes, match: str) -> None:
    refused(PREAMBLE + START + GOOD_MEM + EOS_FOOTER + record, match)


def test_device_state_over_the_limit_is_refused_before_buffering_it() -> None:
    header = b"\x04" + be32(5) + b"\x0blivemig/cpu" + be32(0) + be32(1) + be32(17 << 20)
    refused(PREAMBLE + header, "exceeds the 16777216-byte limit")


def test_device_allow_list_is_enforced() -> None:
    stream = PREAMBLE + device(b"livemig/cpu", b"") + b"\x00"
    refused(stream, "Unknown device section 'livemig/cpu'", devices={"livemig/serial"})
    assert isinstance(drain_ok(stream, devices={"livemig/cpu"})[-1], StreamEnd)


def drain_ok(stream: bytes, **kwargs: Any) -> list[Event]:
    dec = Decoder(BLOCKS, **kwargs)
    dec.receive_data(stream)
    events: list[Event] = []
    while (ev := dec.next_event()) is not NEED_DATA:
        events.append(ev)
    return events


# ------------------------------------------------------------ RAM records
@pytest.mark.parametrize(
    ("record", "match"),
    [
        (be64(0x08) + b"\x03rom" + PAGE, "Unknown RAM block 'rom'"),
        (be64(0x08) + b"\x02\xff\xfe" + PAGE, "not valid UTF-8"),
        (be64(0x28) + PAGE, "CONTINUE record arrived before any block"),
        (be64(0x22) + b"\0", "CONTINUE record arrived before any block"),
        (be64(0x1000 | 0x01 | 0x08) + b"\x06pc.ram" + PAGE, "unknown flag bits 0x1 "),
        (be64(0x08 | 0x40) + b"\x06pc.ram" + PAGE, "unknown flag bits 0x40"),
        (be64(0x08 | 0x100) + b"\x06pc.ram" + PAGE, "unknown flag bits 0x100"),
        (be64(0x08 | 0x800) + b"\x06pc.ram" + PAGE, "unknown flag bits 0x800"),
        (be64(0x08 | 0x02) + b"\x06pc.ram" + PAGE, "invalid flag combination 0xa"),
        (be64(0x04 | 0x20), "invalid flag combination"),
        (be64(0x10 | 0x1000), "EOS record carries a non-zero offset"),
        (be64(16 * PAGE_SIZE | 0x08) + b"\x06pc.ram" + PAGE, "outside RAM block 'pc.ram'"),
        (be64(1 << 63 | 0x02) + b"\x06pc.ram\0", "outside RAM block 'pc.ram'"),
        (be64(0x02) + b"\x06pc.ram\x01", "fill byte 0x01; only 0 is valid"),
        (GOOD_MEM, "MEM_SIZE is only valid once, in the START section"),
    ],
)
def test_bad_ram_records_are_refused(record: bytes, match: str) -> None:
    refused(IN_PART + record, match)


def test_unaligned_page_offset_is_refused() -> None:
    # QEMU's offsets are page aligned, so low bits can only be flags: 0x800 is unknown.
    refused(IN_PART + be64(0x800 | 0x08) + b"\x06pc.ram" + PAGE, "not 4096-aligned")


def test_batched_run_stops_before_a_bad_record_and_then_refuses_it() -> None:
    good = [be64(i * PAGE_SIZE | 0x28) + PAGE for i in range(1, 4)]
    bad = be64(16 * PAGE_SIZE | 0x28) + PAGE
    first = be64(0x08) + b"\x06pc.ram" + PAGE
    events = refused(IN_PART + first + b"".join(good) + bad, "outside RAM block")
    offsets = [int(o) for e in events if isinstance(e, PageBatch) for o in e.offsets]
    assert offsets == [0, PAGE_SIZE, 2 * PAGE_SIZE, 3 * PAGE_SIZE]


def test_batched_zero_run_refuses_a_nonzero_fill_byte() -> None:
    first = be64(0x02) + b"\x06pc.ram\0"
    refused(IN_PART + first + be64(PAGE_SIZE | 0x22) + b"\0" + be64(2 * PAGE_SIZE | 0x22) + b"\7",
            "fill byte 0x07")


def test_continue_is_per_channel_not_shared_between_decoders() -> None:
    main = Decoder(BLOCKS)
    main.receive_data(IN_PART + be64(0x08) + b"\x06pc.ram" + PAGE)
    while main.next_event() is not NEED_DATA:
        pass
    assert main.last_block == "pc.ram"
    refused(b"LMPC" + be32(1) + be64(PAGE_SIZE | 0x28) + PAGE, "before any block on the postcopy",
            channel=ChannelKind.POSTCOPY)


def test_mem_size_is_refused_on_the_postcopy_channel() -> None:
    refused(b"LMPC" + be32(1) + GOOD_MEM, "MEM_SIZE is only valid", channel=ChannelKind.POSTCOPY)


@pytest.mark.parametrize(
    ("record", "match", "postcopy"),
    [
        (mem_size(("pc.ram", 8 * PAGE_SIZE), ("mem-huge", HUGE)),
         "'pc.ram' is 32768 bytes on the source but 65536 here", False),
        (mem_size(("pc.ram", 16 * PAGE_SIZE)), "does not announce local RAM block", False),
        (mem_size(("pc.ram", 16 * PAGE_SIZE), ("rom", PAGE_SIZE)), "unknown RAM block 'rom'",
         False),
        (mem_size(("pc.ram", 16 * PAGE_SIZE), ("pc.ram", 16 * PAGE_SIZE)), "twice", False),
        (mem_size(("pc.ram", 16 * PAGE_SIZE), ("mem-huge", HUGE), total=17 * PAGE_SIZE),
         "smaller than the sum", False),
        (mem_size(("pc.ram", 16 * PAGE_SIZE), ("mem-huge", HUGE), extra=be64(PAGE_SIZE)),
         "uses 4096-byte pages on the source but 2097152 here", True),
    ],
)
def test_mem_size_must_match_the_local_blocks(record: bytes, match: str, postcopy: bool) -> None:
    refused(PREAMBLE + START + record, match, postcopy=postcopy)


def test_mem_size_may_come_only_once() -> None:
    refused(PREAMBLE + START + GOOD_MEM + GOOD_MEM, "only valid once")


# ----------------------------------------------------------------- commands
@pytest.mark.parametrize(
    ("record", "match"),
    [
        (cmd(0, b""), "Unknown or unsupported command 0x0"),
        (cmd(11, b""), "Unknown or unsupported command 0xb"),
        (cmd(9, b""), "Unknown or unsupported command 0x9"),
        (cmd(0xFFFF, b""), "command 0xffff"),
        (cmd(1, b"\0"), "OPEN_RETURN_PATH has length 1; expected 0"),
        (cmd(2, b"\0\0"), "PING has length 2; expected 4"),
        (cmd(3, be64(4096)), "POSTCOPY_ADVISE has length 8; expected 16"),
        (cmd(8, b"\0\0"), "PACKAGED has length 2; expected 4"),
        (cmd(3, be64(4096 | HUGE) + be64(8192)), "target page size 8192"),
        (cmd(3, be64(4096) + be64(4096)), "page size summary 0x1000 does not match"),
        (cmd(6, b"\x01\x06pc.ram\0" + be64(0) + be64(PAGE_SIZE)), "unknown version 1"),
        (cmd(6, b"\x00\x06pc.ram\x07" + be64(0) + be64(PAGE_SIZE)), "NUL terminator"),
        (cmd(6, b"\x00\x03rom\0" + be64(0) + be64(PAGE_SIZE)), "unknown RAM block 'rom'"),
        (cmd(6, b"\x00\x06pc.ram\0"), "not a positive multiple of 16"),
        (cmd(6, b"\x00\x06pc.ram\0" + be64(0) + be32(1)), "not a positive multiple of 16"),
        (cmd(6, b"\x00\x06pc.ram\0" + be64(1) + be64(PAGE_SIZE)), "not aligned"),
        (cmd(6, b"\x00\x06pc.ram\0" + be64(0) + be64(0)), "empty or not aligned"),
        (cmd(6, b"\x00\x08mem-huge\0" + be64(0) + be64(PAGE_SIZE)), "2097152-byte pages"),
        (cmd(6, b"\x00\x06pc.ram\0" + be64(0) + be64(17 * PAGE_SIZE)), "outside block"),
        (cmd(6, b"\x00\x06pc.ram\0" + be64(2**64 - PAGE_SIZE) + be64(2 * PAGE_SIZE)),
         "outside block"),
        (cmd(6, b"\x00\x3fpc.ram\0" + be64(0) + be64(PAGE_SIZE)), "payload is too short"),
    ],
)
def test_bad_commands_are_refused(record: bytes, match: str) -> None:
    refused(PREAMBLE + record, match)


def test_packaged_blob_over_the_limit_is_refused() -> None:
    refused(PREAMBLE + cmd(8, be32(1 << 30)), "PACKAGED blob of 1073741824 bytes exceeds")


@pytest.mark.parametrize(
    ("blob", "match"),
    [
        (cmd(8, be32(0)), "nested"),
        (b"\x00", "QEMU_VM_EOF inside a PACKAGED blob"),
        (cmd(2, be32(1))[:-1], "runs past the end of its PACKAGED blob"),
        (START + GOOD_MEM, "ends in the middle of a section"),
        (START + be64(0x08) + b"\x06pc.ram" + PAGE[:100], "runs past the end"),
    ],
)
def test_bad_packaged_blobs_are_refused(blob: bytes, match: str) -> None:
    refused(PREAMBLE + cmd(8, be32(len(blob))) + blob + cmd(2, be32(1)) + b"\x00", match)


# ---------------------------------------------------------- limits and ends
def test_record_needing_more_than_max_record_is_refused() -> None:
    header = b"\x04" + be32(5) + b"\x0blivemig/cpu" + be32(0) + be32(1) + be32(5000)
    dec = Decoder(BLOCKS, max_record=4096)
    dec.receive_data(PREAMBLE + header)  # the state itself never arrives
    dec.next_event()
    with pytest.raises(RemoteProtocolError, match="Device state"):
        dec.next_event()
    dec2 = Decoder(BLOCKS, max_record=4096, max_device_state=1 << 20)
    dec2.receive_data(PREAMBLE + cmd(8, be32(8000)))
    dec2.next_event()
    with pytest.raises(RemoteProtocolError, match="4096-byte limit"):
        dec2.next_event()


def test_any_record_over_max_record_is_refused_without_waiting_for_it() -> None:
    dec = Decoder(BLOCKS, max_record=1000)
    dec.receive_data(PREAMBLE + struct.pack(">BHH", 8, 6, 60000))  # a 60 kB discard command
    dec.next_event()
    with pytest.raises(RemoteProtocolError, match="more than the 1000-byte limit"):
        dec.next_event()


def test_trailing_garbage_after_eof_is_refused() -> None:
    events = refused(PREAMBLE + b"\x00" + b"\x07", "1 bytes of trailing garbage")
    assert isinstance(events[-1], StreamEnd)


def test_trailing_garbage_after_postcopy_eos_is_refused() -> None:
    refused(b"LMPC" + be32(1) + be64(0x10) + b"xx", "trailing garbage",
            channel=ChannelKind.POSTCOPY)


def test_eof_between_records_is_channel_closed() -> None:
    with pytest.raises(ChannelClosedError, match="before the end of the stream"):
        drain(IN_PART)


@pytest.mark.parametrize("cut", [1, 9, 21, len(PREAMBLE) + 3, len(IN_PART) + 5])
def test_eof_inside_a_record_is_truncation(cut: int) -> None:
    stream = IN_PART + be64(0x08) + b"\x06pc.ram" + PAGE
    with pytest.raises(RemoteProtocolError, match="truncated"):
        drain(stream[:cut])


def test_eof_inside_a_page_payload_is_truncation() -> None:
    dec = Decoder(BLOCKS)
    dec.receive_data(IN_PART + be64(0x08) + b"\x06pc.ram" + PAGE[:10])
    while not isinstance(dec.next_event(), PageHeader):
        pass
    assert dec.take_payload(bytearray(PAGE_SIZE)) == 10
    dec.receive_eof()
    with pytest.raises(RemoteProtocolError, match="truncated inside a page payload"):
        dec.next_event()


def test_errors_are_sticky() -> None:
    dec = Decoder(BLOCKS)
    dec.receive_data(b"XXXX")
    for _ in range(2):
        with pytest.raises(RemoteProtocolError, match="Not a migration stream"):
            dec.next_event()


def test_a_single_record_never_yields_made_up_pages() -> None:
    # A huge-page block still carries exactly 4096 bytes per PAGE record.
    stream = IN_PART + be64(HUGE - PAGE_SIZE | 0x08) + b"\x08mem-huge" + PAGE + EOS_FOOTER
    pages = [e for e in drain_ok(stream) if isinstance(e, PageBatch)]
    assert len(pages) == 1 and pages[0].data.shape == (1, PAGE_SIZE)
    assert pages[0].data.tobytes() == PAGE
