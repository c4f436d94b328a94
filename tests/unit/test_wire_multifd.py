"""The multifd channels' format (wire/multifd.py) and the capabilities section's
multifd options: what is sent decodes to the same values, and what a hostile or
mismatched source sends is refused with a RemoteProtocolError naming the problem."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from livemig.errors import LocalProtocolError, RemoteProtocolError
from livemig.migration.handshake import Handshake
from livemig.wire.blocks import BlockInfo
from livemig.wire.channel import ChannelKind, identify_channel
from livemig.wire.constants import MULTIFD_MAGIC
from livemig.wire.decoder import Decoder
from livemig.wire.encoder import Encoder
from livemig.wire.events import MultifdFlush, SectionBegin
from livemig.wire.multifd import (
    HEADER_SIZE,
    INIT_SIZE,
    PACKET_PAGES,
    InitPacket,
    decode_header,
    decode_offsets,
    encode_packet,
    sync_packet,
)

BLOCKS = {"pc.ram": BlockInfo(64 << 20), "extra": BlockInfo(8 << 20)}
UUID = bytes(range(16))


def test_sizes_are_qemus() -> None:
    assert (INIT_SIZE, HEADER_SIZE) == (64, 320)


def test_initial_packet_round_trips_and_starts_with_the_magic() -> None:
    raw = InitPacket(UUID, 7).encode()
    assert raw[:4] == MULTIFD_MAGIC.to_bytes(4, "big")
    assert identify_channel(raw[:4]) is ChannelKind.MULTIFD
    assert InitPacket.decode(raw) == InitPacket(UUID, 7)


@pytest.mark.parametrize("at,value,match", [(0, 0x55, "magic"), (7, 9, "version")])
def test_initial_packet_with_wrong_magic_or_version_is_refused(at: int, value: int,
                                                               match: str) -> None:
    raw = bytearray(InitPacket(UUID, 0).encode())
    raw[at] = value
    with pytest.raises(RemoteProtocolError, match=match):
        InitPacket.decode(raw)


@given(st.sets(st.integers(0, (8 << 20) // 4096 - 1), max_size=PACKET_PAGES),
       st.integers(0, 1 << 40))
def test_packet_round_trips(pages: set[int], num: int) -> None:
    idx = np.array(sorted(pages), dtype=np.int64)
    normal, zero = idx[: len(idx) // 2], idx[len(idx) // 2 :]
    raw = encode_packet(num, "extra", normal, zero)
    h = decode_header(raw[:HEADER_SIZE], BLOCKS)
    assert (h.normal, h.zero, h.packet_num, h.block, h.sync) == (
        len(normal), len(zero), num, "extra", False)
    assert h.data_size == 4096 * len(normal)
    offsets = decode_offsets(h, raw[HEADER_SIZE:], BLOCKS)
    assert offsets.tolist() == [int(i) * 4096 for i in (*normal, *zero)]


def test_sync_packet_has_no_pages_and_the_sync_flag() -> None:
    h = decode_header(sync_packet(3)[:HEADER_SIZE], BLOCKS)
    assert h.sync and (h.normal, h.zero, h.offsets_size) == (0, 0, 0)


def test_more_pages_than_a_packet_holds_is_refused_both_ways() -> None:
    many = np.arange(PACKET_PAGES + 1)
    with pytest.raises(LocalProtocolError):
        encode_packet(1, "pc.ram", many, many[:0])
    raw = bytearray(encode_packet(1, "pc.ram", many[:2], many[:0]))
    raw[16:20] = (PACKET_PAGES + 1).to_bytes(4, "big")  # normal_pages
    with pytest.raises(RemoteProtocolError, match="pages"):
        decode_header(raw[:HEADER_SIZE], BLOCKS)


def test_unknown_block_and_out_of_range_offsets_are_refused() -> None:
    raw = encode_packet(1, "nope", np.array([1]), np.array([], dtype=np.int64))
    with pytest.raises(RemoteProtocolError, match="unknown RAM block 'nope'"):
        decode_header(raw[:HEADER_SIZE], BLOCKS)
    raw = encode_packet(1, "extra", np.array([(8 << 20) // 4096]), np.array([], dtype=np.int64))
    h = decode_header(raw[:HEADER_SIZE], BLOCKS)
    with pytest.raises(RemoteProtocolError, match="is not a page of RAM block 'extra'"):
        decode_offsets(h, raw[HEADER_SIZE:], BLOCKS)


def test_data_size_must_match_the_pages() -> None:
    raw = bytearray(encode_packet(1, "pc.ram", np.array([1]), np.array([], dtype=np.int64)))
    raw[20:24] = (1).to_bytes(4, "big")  # next_packet_size
    with pytest.raises(RemoteProtocolError, match="announces 1 bytes"):
        decode_header(raw[:HEADER_SIZE], BLOCKS)


def test_multifd_flush_record_decodes_on_the_main_channel() -> None:
    enc = Encoder()
    data = (enc.preamble() + b"".join([enc.ram_start(0), enc.mem_size(BLOCKS),
                                       enc.close_ram_section(), enc.ram_part(0),
                                       enc.multifd_flush(), enc.close_ram_section()]))
    dec = Decoder(BLOCKS)
    dec.receive_data(data)
    events = []
    while (e := dec.next_event()) is not None and not isinstance(e, MultifdFlush):
        events.append(e)
        assert len(events) < 20, events
    assert isinstance(events[-1], SectionBegin)


def test_capabilities_section_carries_multifd_channels_and_uuid() -> None:
    h = Handshake(multifd=True, multifd_channels=4, multifd_uuid=UUID)
    assert Handshake.decode(h.encode()) == h
    assert b"multifd-channels=4" in h.encode()


HEX = UUID.hex().encode()


@pytest.mark.parametrize("text", [b"multifd;multifd-channels=0,multifd-uuid=" + HEX,
                                  b"multifd;multifd-channels=2,multifd-uuid=00",
                                  b"multifd;multifd-channels=2",
                                  b"multifd;multifd-channels=x,multifd-uuid=" + HEX])
def test_capabilities_section_with_bad_multifd_options_is_refused(text: bytes) -> None:
    with pytest.raises(RemoteProtocolError, match="multifd"):
        Handshake.decode(text)
