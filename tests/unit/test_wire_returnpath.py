"""Return path codec: QEMU 7.2 bytes, REQ_PAGES vs REQ_PAGES_ID, validation, splits."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from livemig.errors import ChannelClosedError, LocalProtocolError, RemoteProtocolError
from livemig.wire import (
    NEED_DATA,
    PAGE_SIZE,
    BlockInfo,
    Closed,
    Pong,
    ReqPages,
    ReturnPathDecoder,
    ReturnPathEncoder,
    RpEvent,
    Shut,
)

HUGE = 2 * 1024 * 1024
BLOCKS = {"pc.ram": BlockInfo(16 * PAGE_SIZE), "mem-huge": BlockInfo(2 * HUGE, HUGE)}


def msg(kind: int, payload: bytes) -> bytes:
    return struct.pack(">HH", kind, len(payload)) + payload


def req(start: int, length: int, name: bytes | None = None) -> bytes:
    body = struct.pack(">QI", start, length)
    if name is None:
        return msg(4, body)
    return msg(3, body + bytes([len(name)]) + name)


def decode(data: bytes, blocks: dict[str, BlockInfo] | None = BLOCKS) -> list[RpEvent]:
    dec = ReturnPathDecoder(blocks)
    dec.receive_data(data)
    dec.receive_eof()
    out: list[RpEvent] = []
    while not out or not isinstance(out[-1], Closed):
        ev = dec.next_event()
        assert ev is not NEED_DATA
        out.append(ev)
    return out


def test_encoder_writes_qemu_messages_and_names_a_block_only_when_it_changes() -> None:
    enc = ReturnPathEncoder()
    assert enc.pong(7) == msg(2, struct.pack(">I", 7))
    assert enc.req_pages("pc.ram", PAGE_SIZE, PAGE_SIZE) == req(PAGE_SIZE, PAGE_SIZE, b"pc.ram")
    assert enc.req_pages("pc.ram", 0, 2 * PAGE_SIZE) == req(0, 2 * PAGE_SIZE)
    assert enc.req_pages("mem-huge", 0, HUGE) == req(0, HUGE, b"mem-huge")
    assert enc.shut(0) == msg(1, struct.pack(">I", 0))
    with pytest.raises(LocalProtocolError):
        enc.pong(1)  # nothing after SHUT


def test_encoder_refuses_partial_pages() -> None:
    with pytest.raises(LocalProtocolError):
        ReturnPathEncoder().req_pages("pc.ram", 1, PAGE_SIZE)
    with pytest.raises(LocalProtocolError):
        ReturnPathEncoder().req_pages("pc.ram", 0, 0)


def test_round_trip_resolves_req_pages_to_the_last_named_block() -> None:
    enc = ReturnPathEncoder()
    stream = (enc.pong(1) + enc.req_pages("pc.ram", 0, PAGE_SIZE)
              + enc.req_pages("pc.ram", 3 * PAGE_SIZE, PAGE_SIZE)
              + enc.req_pages("mem-huge", HUGE, HUGE) + enc.shut(0))
    assert decode(stream) == [
        Pong(1), ReqPages("pc.ram", 0, PAGE_SIZE), ReqPages("pc.ram", 3 * PAGE_SIZE, PAGE_SIZE),
        ReqPages("mem-huge", HUGE, HUGE), Shut(0), Closed(),
    ]


@settings(max_examples=50, deadline=None, database=None)
@given(cuts=st.lists(st.integers(0, 200), max_size=20))
def test_any_split_points_give_the_same_messages(cuts: list[int]) -> None:
    enc = ReturnPathEncoder()
    stream = (enc.req_pages("pc.ram", 0, PAGE_SIZE) + enc.pong(9)
              + enc.req_pages("pc.ram", PAGE_SIZE, PAGE_SIZE) + enc.shut(3))
    dec = ReturnPathDecoder(BLOCKS)
    points = sorted({c % (len(stream) + 1) for c in cuts})
    out: list[RpEvent] = []
    for a, b in zip([0, *points], [*points, len(stream)], strict=True):
        if b > a:
            dec.receive_data(stream[a:b])
        while (ev := dec.next_event()) is not NEED_DATA:
            out.append(ev)
    assert out == [ReqPages("pc.ram", 0, PAGE_SIZE), Pong(9),
                   ReqPages("pc.ram", PAGE_SIZE, PAGE_SIZE), Shut(3)]


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (req(0, PAGE_SIZE), "REQ_PAGES arrived before any REQ_PAGES_ID"),
        (msg(0, b""), "Unknown return path message type 0"),
        (msg(7, b""), "Unknown return path message type 7"),
        (msg(1, b"\0\0"), "SHUT has bad length 2"),
        (msg(2, b"\0" * 5), "PONG has bad length 5"),
        (msg(4, b"\0" * 16), "REQ_PAGES has bad length 16"),
        (msg(3, b"\0" * 600), "REQ_PAGES_ID has bad length 600"),
        (msg(3, struct.pack(">QI", 0, PAGE_SIZE) + b"\x09pc.ram"), "too short"),
        (msg(3, struct.pack(">QI", 0, PAGE_SIZE) + b"\x02pc.ram"), "trailing bytes"),
        (req(0, PAGE_SIZE, b""), "empty block name"),
        (req(0, PAGE_SIZE, b"rom"), "unknown RAM block 'rom'"),
        (req(16 * PAGE_SIZE, PAGE_SIZE, b"pc.ram"), "outside block 'pc.ram'"),
        (req(100, PAGE_SIZE, b"pc.ram"), "not whole 4096-byte pages"),
        (req(0, 0, b"pc.ram"), "not whole"),
        (req(0, PAGE_SIZE, b"mem-huge"), "not whole 2097152-byte pages"),
        (msg(1, b"\0\0\0\0") + b"x", "data after SHUT"),
        (msg(2, b"\0\0"), "bad length"),
        (msg(2, b"\0\0\0\0")[:5], "truncated"),
    ],
)
def test_bad_return_path_messages_are_refused(data: bytes, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        decode(data)


def test_without_a_block_table_alignment_is_still_checked() -> None:
    events = decode(req(0, PAGE_SIZE, b"any") + msg(1, b"\0\0\0\0"), blocks=None)
    assert events[0] == ReqPages("any", 0, PAGE_SIZE)
    with pytest.raises(RemoteProtocolError, match="not whole 4096-byte pages"):
        decode(req(0, 10, b"any"), blocks=None)


def test_eof_before_shut_is_channel_closed() -> None:
    with pytest.raises(ChannelClosedError, match="closed before SHUT"):
        decode(msg(2, b"\0\0\0\1"))
