"""Hot paths: no copies of page data when encoding, views when decoding, and the
single-page payload protocol."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from livemig.errors import LocalProtocolError
from livemig.wire import (
    NEED_DATA,
    PAGE_SIZE,
    BlockInfo,
    Decoder,
    Encoder,
    PageBatch,
    PageHeader,
    SectionBegin,
    ZeroPages,
)

NPAGES = 1024
BLOCKS = {"pc.ram": BlockInfo(NPAGES * PAGE_SIZE)}


def ram_section_encoder() -> Encoder:
    enc = Encoder()
    enc.preamble()
    enc.ram_start(0)
    return enc


def test_encoding_a_1000_page_batch_passes_ram_slices_through_uncopied() -> None:
    ram = bytearray(NPAGES * PAGE_SIZE)
    view = memoryview(ram)
    offsets = np.arange(1000, dtype=np.uint64) * PAGE_SIZE
    bufs = ram_section_encoder().pages("pc.ram", offsets, view)
    payloads = bufs[2::2]  # [hdr, idstr, page, hdr, page, ...]
    assert len(payloads) == 1000
    assert all(isinstance(p, memoryview) and p.obj is ram for p in payloads)
    ram[5 * PAGE_SIZE] = 0x5A  # a write to guest RAM shows through: nothing was copied
    assert bytes(payloads[5][:1]) == b"\x5a"
    headers = [bufs[0], *bufs[3::2]]
    assert len({id(h.obj) for h in headers if isinstance(h, memoryview)}) == 1  # one array


def test_encoded_headers_are_offset_or_page_or_continue_in_big_endian() -> None:
    bufs = ram_section_encoder().pages("pc.ram", [0, 7 * PAGE_SIZE], bytes(NPAGES * PAGE_SIZE))
    assert bytes(bufs[3]) == struct.pack(">Q", 7 * PAGE_SIZE | 0x28)


def test_decoded_batch_is_a_read_only_view_of_the_received_bytes() -> None:
    rng = np.random.default_rng(3)
    ram = rng.integers(0, 256, NPAGES * PAGE_SIZE, dtype=np.uint8)
    enc = ram_section_encoder()
    offsets = np.arange(0, 300, 3, dtype=np.uint64) * PAGE_SIZE
    stream = b"".join(bytes(b) for b in enc.pages("pc.ram", offsets, ram.data))
    dec = _decoder_in_section()
    dec.receive_data(stream)
    first, run = dec.next_event(), dec.next_event()
    assert isinstance(first, PageBatch) and isinstance(run, PageBatch)
    assert len(first.offsets) == 1 and len(run.offsets) == 99  # one run, validated at once
    assert np.shares_memory(run.data, np.frombuffer(stream, dtype=np.uint8))
    assert not run.data.flags.writeable and run.data.shape == (99, PAGE_SIZE)
    dest = np.zeros((NPAGES, PAGE_SIZE), dtype=np.uint8)
    dest[run.offsets // PAGE_SIZE] = run.data  # the one vectorised copy a caller does
    assert np.array_equal(dest[run.offsets // PAGE_SIZE], ram.reshape(-1, PAGE_SIZE)[3::3][:99])


def test_zero_runs_decode_as_one_event() -> None:
    enc = ram_section_encoder()
    dec = _decoder_in_section()
    dec.receive_data(enc.zero_pages("pc.ram", np.arange(50, dtype=np.uint64) * PAGE_SIZE))
    events = [dec.next_event(), dec.next_event()]
    assert all(isinstance(e, ZeroPages) for e in events)
    assert [len(e.offsets) for e in events if isinstance(e, ZeroPages)] == [1, 49]
    assert dec.next_event() is NEED_DATA


def _decoder_in_section() -> Decoder:
    enc = Encoder()
    dec = Decoder(BLOCKS)
    dec.receive_data(enc.preamble() + enc.ram_start(0))
    dec.next_event()
    assert isinstance(dec.next_event(), SectionBegin)
    return dec


def _page_record(offset: int, fill: int) -> bytes:
    return struct.pack(">Q", offset | 0x08) + b"\x06pc.ram" + bytes([fill]) * PAGE_SIZE


def test_single_page_payload_can_be_read_straight_into_its_slot() -> None:
    record = _page_record(PAGE_SIZE, 0x77)
    dec = _decoder_in_section()
    dec.receive_data(record[:20])  # header + 5 payload bytes
    ev = dec.next_event()
    assert ev == PageHeader("pc.ram", PAGE_SIZE)
    slot = bytearray(PAGE_SIZE)
    assert dec.take_payload(memoryview(slot)) == 5
    assert dec.payload_remaining == PAGE_SIZE - 5
    with pytest.raises(LocalProtocolError):
        dec.next_event()  # the payload must be taken first
    slot[5:] = record[20:]  # as recv_into(slot[5:]) would
    dec.payload_received(PAGE_SIZE - 5)
    assert dec.payload_remaining == 0 and bytes(slot) == b"\x77" * PAGE_SIZE
    dec.receive_data(_page_record(2 * PAGE_SIZE, 1))
    nxt = dec.next_event()
    assert isinstance(nxt, PageBatch) and nxt.offsets.tolist() == [2 * PAGE_SIZE]


def test_payload_can_also_be_fed_through_the_decoder() -> None:
    record = _page_record(0, 0x11)
    dec = _decoder_in_section()
    dec.receive_data(record[:15])
    assert isinstance(dec.next_event(), PageHeader)
    slot = np.zeros(PAGE_SIZE, dtype=np.uint8)
    got = 0
    for at in range(15, len(record), 1000):
        dec.receive_data(record[at : at + 1000])
        got += dec.take_payload(slot.data[got:])
    assert got == PAGE_SIZE and dec.payload_remaining == 0 and (slot == 0x11).all()
    assert dec.next_event() is NEED_DATA


def test_payload_protocol_misuse_is_a_local_error() -> None:
    dec = _decoder_in_section()
    with pytest.raises(LocalProtocolError):
        dec.take_payload(bytearray(PAGE_SIZE))
    with pytest.raises(LocalProtocolError):
        dec.payload_received(1)
    dec.receive_data(_page_record(0, 1)[:100])
    assert isinstance(dec.next_event(), PageHeader)
    with pytest.raises(LocalProtocolError):
        dec.payload_received(1)  # 85 bytes are still buffered: they come first
    with pytest.raises(LocalProtocolError):
        dec.take_payload(memoryview(bytes(PAGE_SIZE)))  # read-only destination
    dec.take_payload(bytearray(PAGE_SIZE))
    with pytest.raises(LocalProtocolError):
        dec.payload_received(PAGE_SIZE)  # more than is pending
