"""Postcopy recovery on the wire: RECV_BITMAP / POSTCOPY_RESUME commands, the
RECV_BITMAP and RESUME_ACK return-path messages, and a resumed main channel whose
``ram`` section goes on without a START."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from livemig.errors import LocalProtocolError, RemoteProtocolError
from livemig.units import PAGE_SIZE
from livemig.wire import events as ev
from livemig.wire.blocks import BlockInfo
from livemig.wire.decoder import Decoder
from livemig.wire.encoder import Encoder
from livemig.wire.returnpath import (
    RECV_BITMAP_ENDING,
    RecvBitmap,
    ResumeAck,
    ReturnPathDecoder,
    ReturnPathEncoder,
)

TABLE = {"pc.ram": BlockInfo(130 * PAGE_SIZE, PAGE_SIZE), "small": BlockInfo(PAGE_SIZE, PAGE_SIZE)}


def decode_rp(data: bytes, cuts: list[int] | None = None,
              table: dict[str, BlockInfo] | None = TABLE) -> list[object]:
    dec = ReturnPathDecoder(table)
    out: list[object] = []
    pieces = [data] if not cuts else [data[a:b] for a, b in
                                      zip([0, *cuts], [*cuts, len(data)], strict=True)]
    for piece in pieces:
        if piece:
            dec.receive_data(piece)
        while (e := dec.next_event()) is not ev.NEED_DATA:
            out.append(e)
    return out


@given(st.lists(st.booleans(), min_size=130, max_size=130),
       st.lists(st.integers(0, 400), max_size=4))
def test_a_received_bitmap_survives_the_return_path(bits: list[bool], cuts: list[int]) -> None:
    received = np.array(bits, dtype=np.bool_)
    enc = ReturnPathEncoder()
    data = enc.recv_bitmap("pc.ram", received) + enc.resume_ack()
    events = decode_rp(data, sorted(min(c, len(data)) for c in cuts))
    assert len(events) == 2
    bm, ack = events
    assert isinstance(bm, RecvBitmap) and bm.block == "pc.ram"
    assert np.array_equal(bm.received, received)
    assert ack == ResumeAck(1)


def test_the_bitmap_uses_qemus_layout() -> None:
    received = np.zeros(130, dtype=np.bool_)
    received[[0, 65, 129]] = True
    data = ReturnPathEncoder().recv_bitmap("pc.ram", received)
    name = b"\x06pc.ram"
    assert data[:4] == bytes([0, 5, 0, len(name)]) and data[4:4 + len(name)] == name
    tail = data[4 + len(name):]
    assert int.from_bytes(tail[:8], "big") == 24  # 130 bits -> three 64-bit words
    words = np.frombuffer(tail[8:32], dtype="<u8")
    assert words.tolist() == [1, 2, 2]  # pages 0, 65 (bit 1 of word 1), 129 (bit 1 of 2)
    assert int.from_bytes(tail[32:], "big") == RECV_BITMAP_ENDING


@pytest.mark.parametrize(("mutate", "says"), [
    (lambda d: d[:-1] + bytes([d[-1] ^ 1]), "ends with"),
    (lambda d: d[:11] + (16).to_bytes(8, "big") + d[19:], "need 24"),
    (lambda d: d.replace(b"pc.ram", b"pc.rom"), "unknown RAM block"),
])
def test_a_bad_bitmap_is_refused(mutate: object, says: str) -> None:
    data = ReturnPathEncoder().recv_bitmap("pc.ram", np.ones(130, dtype=np.bool_))
    with pytest.raises(RemoteProtocolError, match=says):
        decode_rp(mutate(data))  # type: ignore[operator]


def test_a_resume_ack_with_another_value_is_refused() -> None:
    data = bytearray(ReturnPathEncoder().resume_ack())
    data[-1] = 2
    with pytest.raises(RemoteProtocolError, match="RESUME_ACK"):
        decode_rp(bytes(data))


def test_a_resumed_main_channel_goes_on_with_the_ram_section() -> None:
    """The new connection: preamble, RECV_BITMAP per block, POSTCOPY_RESUME, then PART
    sections of the ram section started on the first connection, END, EOF."""
    ram = bytearray(130 * PAGE_SIZE)
    ram[PAGE_SIZE:2 * PAGE_SIZE] = b"\x5a" * PAGE_SIZE
    enc = Encoder(postcopy=True, resumed=[0])
    parts = [enc.preamble(), enc.recv_bitmap("pc.ram"), enc.recv_bitmap("small"),
             enc.postcopy_resume(), enc.ram_part(0)]
    parts += enc.pages("pc.ram", np.array([PAGE_SIZE], dtype=np.uint64), memoryview(ram))
    parts += [enc.close_ram_section(), enc.ram_end(0), enc.close_ram_section(), enc.eof()]
    dec = Decoder(TABLE, postcopy=True, resumed=[0])
    dec.receive_data(b"".join(bytes(p) for p in parts))
    seen = []
    while (e := dec.next_event()) is not ev.NEED_DATA:
        seen.append(e)
    kinds = [type(e).__name__ for e in seen]
    assert kinds[:4] == ["StreamStart", "RecvBitmapRequest", "RecvBitmapRequest",
                         "PostcopyResume"]
    assert [e.block for e in seen if isinstance(e, ev.RecvBitmapRequest)] == ["pc.ram", "small"]
    batches = [e for e in seen if isinstance(e, ev.PageBatch)]
    assert batches and bytes(batches[0].data[0]) == b"\x5a" * PAGE_SIZE
    assert isinstance(seen[-1], ev.StreamEnd)


def test_without_resume_a_part_section_needs_its_start() -> None:
    with pytest.raises(LocalProtocolError):
        enc = Encoder(postcopy=True)
        enc.preamble()
        enc.ram_part(0)
    enc = Encoder(postcopy=True, resumed=[0])
    data = enc.preamble() + enc.ram_part(0)
    dec = Decoder(TABLE, postcopy=True)
    dec.receive_data(data)
    assert isinstance(dec.next_event(), ev.StreamStart)
    with pytest.raises(RemoteProtocolError, match="Unknown section id 0"):
        dec.next_event()


def test_a_bitmap_request_for_an_unknown_block_is_refused() -> None:
    enc = Encoder(postcopy=True)
    data = enc.preamble() + enc.recv_bitmap("nope")
    dec = Decoder(TABLE, postcopy=True)
    dec.receive_data(data)
    dec.next_event()
    with pytest.raises(RemoteProtocolError, match="unknown RAM block"):
        dec.next_event()
