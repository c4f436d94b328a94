"""The VM description after EOF: encoded as QEMU does, decoded strictly, at most once."""

from __future__ import annotations

import json
import struct

import pytest

from livemig.errors import LocalProtocolError, RemoteProtocolError
from livemig.wire import NEED_DATA, PAGE_SIZE, BlockInfo, Decoder, Encoder, StreamEnd
from livemig.wire.events import Closed, Event, VmDescriptionEvent
from livemig.wire.vmdesc import (
    DeviceDescription,
    VmDescription,
    field,
    parse_description,
    struct_field,
)

BLOCKS = {"pc.ram": BlockInfo(4 * PAGE_SIZE)}
DESC = VmDescription(PAGE_SIZE, (DeviceDescription(
    "livemig/serial", 0, 1,
    (field("length", "uint32", 4), field("magic", "buffer", 4),
     struct_field("regs", "regs", [field("a", "uint8", 1, count=3)]))),))


def stream_with(tail: bytes) -> bytes:
    enc = Encoder()
    return enc.preamble() + enc.eof() + tail


def decode_all(data: bytes, chunk: int = 0) -> list[Event]:
    dec = Decoder(BLOCKS)
    pieces = [data] if chunk == 0 else [data[i:i + chunk] for i in range(0, len(data), chunk)]
    out: list[Event] = []
    for piece in pieces:
        dec.receive_data(piece)
        while (e := dec.next_event()) is not NEED_DATA:
            out.append(e)
    dec.receive_eof()
    last = dec.next_event()
    assert last is not NEED_DATA
    out.append(last)
    return out


def encoded_description() -> bytes:
    enc = Encoder()
    enc.preamble()
    enc.eof()
    return enc.vm_description(DESC)


def test_description_follows_eof_as_qemu_writes_it() -> None:
    raw = encoded_description()
    assert raw[0] == 0x06
    (n,) = struct.unpack(">I", raw[1:5])
    doc = json.loads(raw[5:])
    assert len(raw) == 5 + n and doc["page_size"] == PAGE_SIZE
    assert doc["devices"][0]["name"] == "livemig/serial"
    assert doc["devices"][0]["fields"][2]["struct"]["fields"][0]["array_len"] == 3


@pytest.mark.parametrize("chunk", [0, 1, 7])
def test_decoder_yields_the_description_after_eof_in_any_chunking(chunk: int) -> None:
    events = decode_all(stream_with(encoded_description()), chunk)
    assert isinstance(events[-3], StreamEnd)
    assert isinstance(events[-2], VmDescriptionEvent)
    assert events[-2].description == parse_description(DESC.encode())
    assert events[-2].description.devices[0].size == 4 + 4 + 3
    assert isinstance(events[-1], Closed)


def test_a_second_description_is_trailing_garbage() -> None:
    raw = encoded_description()
    with pytest.raises(RemoteProtocolError, match="trailing garbage"):
        decode_all(stream_with(raw + raw))


def test_a_truncated_description_is_refused() -> None:
    with pytest.raises(RemoteProtocolError, match="truncated"):
        decode_all(stream_with(encoded_description()[:-1]))


def test_an_oversized_description_is_refused_from_its_header() -> None:
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        decode_all(stream_with(b"\x06" + struct.pack(">I", 0xFFFFFFFF)))


@pytest.mark.parametrize("doc, match", [
    (b"not json", "not valid JSON"),
    (b"[]", "not a JSON object"),
    (b'{"page_size": 4096}', "'devices' list"),
    (b'{"page_size": 4096, "devices": [{"name": "x"}]}', "lacks"),
    (b'{"page_size": 4096, "devices": [{"name": "x", "instance_id": 0, "version": 1,'
     b' "fields": [{"name": "f", "type": "uint32", "size": 8}]}]}', "has size 8"),
    (b'{"page_size": 4096, "devices": [{"name": "x", "instance_id": 0, "version": 1,'
     b' "fields": [{"name": "f", "type": "exotic", "size": 8}]}]}', "unknown type"),
    (b'{"page_size": 4096, "devices": [{"name": "x", "instance_id": 0, "version": 1,'
     b' "fields": [{"name": "s", "type": "struct", "size": 2, "struct": {"fields": '
     b'[{"name": "f", "type": "uint8", "size": 1}]}}]}]}', "not the size of its fields"),
    (b"[" * 100000 + b"]" * 100000, "JSON"),
])
def test_malformed_descriptions_are_refused(doc: bytes, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        decode_all(stream_with(b"\x06" + struct.pack(">I", len(doc)) + doc))


def test_encoder_sends_the_description_only_once_after_eof() -> None:
    enc = Encoder()
    enc.preamble()
    with pytest.raises(LocalProtocolError):
        enc.vm_description(DESC)
    enc.eof()
    enc.vm_description(DESC)
    with pytest.raises(LocalProtocolError):
        enc.vm_description(DESC)
