"""Property tests of the stream codec: split invariance, corruption, truncation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from livemig.errors import ChannelClosedError, RemoteProtocolError, StreamError
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
    PageHeader,
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
)
from livemig.wire.events import Event

HUGE = 2 * 1024 * 1024
BLOCKS = {
    "pc.ram": BlockInfo(32 * PAGE_SIZE),
    "vga.vram": BlockInfo(4 * PAGE_SIZE),
    "mem-huge": BlockInfo(HUGE, HUGE),
}
_RNG = np.random.default_rng(7)
RAM = {name: _RNG.integers(0, 256, info.length, dtype=np.uint8) for name, info in BLOCKS.items()}

Norm = tuple[Any, ...] | Event


@dataclass
class Sample:
    """An encoded stream and the events (normalised) it must decode to."""

    stream: bytes
    expected: list[Norm]
    channel: ChannelKind = ChannelKind.MAIN
    postcopy: bool = False
    parts: list[bytes] = field(default_factory=list)
    payload: list[tuple[int, int]] = field(default_factory=list)  # page data byte ranges

    def add(self, data: bytes | list[bytes | memoryview]) -> None:
        if isinstance(data, bytes):
            self.parts.append(data)
            return
        for buf in data:
            if isinstance(buf, memoryview) and len(buf) == PAGE_SIZE:
                at = sum(map(len, self.parts))
                self.payload.append((at, at + PAGE_SIZE))
            self.parts.append(bytes(buf))

    def structural(self) -> list[int]:
        """Stream offsets that are framing, not opaque page data."""
        mask = np.ones(len(self.stream), dtype=bool)
        for a, b in self.payload:
            mask[a:b] = False
        return np.flatnonzero(mask).tolist()


# ---------------------------------------------------------------- generation
page_groups = st.lists(
    st.tuples(
        st.sampled_from(sorted(BLOCKS)),
        st.booleans(),  # zero pages?
        st.lists(st.integers(0, 31), min_size=1, max_size=6),
    ),
    max_size=4,
)


def _emit_pages(enc: Encoder, sample: Sample, groups: list[tuple[str, bool, list[int]]]) -> None:
    for block, zero, idx in groups:
        npages = BLOCKS[block].length // PAGE_SIZE
        offs = np.array([(i % npages) * PAGE_SIZE for i in idx], dtype=np.uint64)
        if zero:
            sample.add(enc.zero_pages(block, offs))
            sample.expected += [("zero", block, int(o)) for o in offs]
        else:
            sample.add(enc.pages(block, offs, RAM[block].data))
            sample.expected += [("page", block, int(o), _page(block, int(o))) for o in offs]


def _page(block: str, off: int) -> bytes:
    return RAM[block][off : off + PAGE_SIZE].tobytes()


def _emit(sample: Sample, data: bytes | list[bytes | memoryview], *events: Norm) -> None:
    sample.add(data)
    sample.expected.extend(events)


@st.composite
def main_streams(draw: st.DrawFn) -> Sample:
    postcopy = draw(st.booleans())
    enc = Encoder(postcopy=postcopy)
    s = Sample(b"", [], postcopy=postcopy)
    _emit(s, enc.preamble(), StreamStart(ChannelKind.MAIN, "livemig"))
    _emit(s, enc.open_return_path(), OpenReturnPath())
    if postcopy:
        summary = host_page_summary(BLOCKS)
        _emit(s, enc.postcopy_advise(summary), PostcopyAdvise(summary, PAGE_SIZE))
    ram_id = draw(st.integers(0, 3))
    _emit(s, enc.ram_start(ram_id), SectionBegin(SectionType.START, ram_id, "ram", 0, 4))
    entries = tuple(
        MemSizeEntry(n, b.length, b.page_size if postcopy and b.page_size != PAGE_SIZE else None)
        for n, b in BLOCKS.items()
    )
    total = sum(b.length for b in BLOCKS.values())
    _emit(s, enc.mem_size(BLOCKS), MemSize(total, entries))
    _emit(s, enc.close_ram_section(), SectionComplete(SectionType.START, ram_id))
    steps = draw(st.lists(st.sampled_from(["part", "ping", "discard", "device", "package"]),
                          max_size=5))
    dev_id = 10
    for step in steps:
        if step == "part":
            _emit(s, enc.ram_part(ram_id), SectionBegin(SectionType.PART, ram_id, "ram", 0, 4))
            _emit_pages(enc, s, draw(page_groups))
            _emit(s, enc.close_ram_section(), SectionComplete(SectionType.PART, ram_id))
        elif step == "ping":
            value = draw(st.integers(0, 2**32 - 1))
            _emit(s, enc.ping(value), Ping(value))
        elif step == "discard":
            start, count = draw(st.integers(0, 15)), draw(st.integers(1, 16))
            ranges = ((start * PAGE_SIZE, count * PAGE_SIZE),)
            discard = enc.postcopy_ram_discard("pc.ram", ranges)
            _emit(s, discard, PostcopyRamDiscard("pc.ram", ranges))
        elif step == "device":
            blob = draw(st.binary(max_size=64))
            _emit(s, enc.device_state(dev_id, "livemig/dev", blob),
                  DeviceState(dev_id, "livemig/dev", 0, 1, blob))
            dev_id += 1
        else:
            child = enc.package()
            blob = draw(st.binary(max_size=32))
            inner = [child.postcopy_listen(), *child.device_state(dev_id, "livemig/cpu", blob),
                     child.postcopy_run()]
            dev_id += 1
            packed = b"".join(bytes(b) for b in inner)
            _emit(s, enc.packaged(packed), Packaged(len(packed)), PostcopyListen(),
                  DeviceState(dev_id - 1, "livemig/cpu", 0, 1, blob), PostcopyRun(), PackagedEnd())
    _emit(s, enc.ram_end(ram_id), SectionBegin(SectionType.END, ram_id, "ram", 0, 4))
    _emit_pages(enc, s, draw(page_groups))
    _emit(s, enc.close_ram_section(), SectionComplete(SectionType.END, ram_id))
    _emit(s, enc.eof(), StreamEnd(), Closed())
    s.stream = b"".join(s.parts)
    return s


@st.composite
def postcopy_streams(draw: st.DrawFn) -> Sample:
    enc = Encoder(channel=ChannelKind.POSTCOPY, postcopy=True)
    s = Sample(b"", [], channel=ChannelKind.POSTCOPY, postcopy=True)
    _emit(s, enc.preamble(), StreamStart(ChannelKind.POSTCOPY, None))
    _emit_pages(enc, s, draw(page_groups))
    _emit(s, enc.eof(), StreamEnd(), Closed())
    s.stream = b"".join(s.parts)
    return s


any_stream = st.one_of(main_streams(), postcopy_streams())


# ------------------------------------------------------------------ decoding
def decode(
    sample: Sample, chunks: list[bytes], direct: bool = False, eager: bool = False
) -> list[Norm]:
    """Feed ``chunks`` then EOF; return normalised events.  ``direct`` reads payloads
    "from the socket" (the next chunk) with payload_received(); ``eager`` buffers
    every chunk before asking for events."""
    dec = Decoder(BLOCKS, channel=sample.channel, postcopy=sample.postcopy)
    feeds = list(chunks)
    while eager and feeds:
        dec.receive_data(feeds.pop(0))
    out: list[Norm] = []
    pending: tuple[PageHeader, bytearray] | None = None
    eof_sent = False
    while True:
        if pending is not None:
            header, page = pending
            _fill(dec, page, feeds, direct)
            if dec.payload_remaining == 0:
                out.append(("page", header.block, header.offset, bytes(page)))
                pending = None
                continue
        else:
            ev = dec.next_event()
            if ev is not NEED_DATA:
                if isinstance(ev, PageHeader):
                    pending = (ev, bytearray(PAGE_SIZE))
                else:
                    out.extend(_normalise(ev))
                if isinstance(ev, Closed):
                    return out
                continue
        if feeds:
            dec.receive_data(feeds.pop(0))
        elif not eof_sent:
            dec.receive_eof()
            eof_sent = True
        else:
            dec.next_event()  # payload pending at EOF: must raise
            raise AssertionError("decoder stalled without an error")


def _fill(dec: Decoder, page: bytearray, feeds: list[bytes], direct: bool) -> None:
    done = PAGE_SIZE - dec.payload_remaining
    done += dec.take_payload(memoryview(page)[done:])
    if direct and dec.payload_remaining and feeds:
        chunk = feeds.pop(0)
        k = min(len(chunk), dec.payload_remaining)
        page[done : done + k] = chunk[:k]  # as if recv_into() had read it
        dec.payload_received(k)
        if k < len(chunk):
            feeds.insert(0, chunk[k:])


def _normalise(ev: Event) -> list[Norm]:
    if isinstance(ev, PageBatch):
        assert len(ev.offsets) == len(ev.data) >= 1
        return [("page", ev.block, int(o), ev.data[i].tobytes()) for i, o in enumerate(ev.offsets)]
    if isinstance(ev, ZeroPages):
        return [("zero", ev.block, int(o)) for o in ev.offsets]
    return [ev]


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


SETTINGS = settings(max_examples=60, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# -------------------------------------------------------------------- tests
@SETTINGS
@given(sample=any_stream)
def test_whole_stream_decodes_to_exactly_what_was_encoded(sample: Sample) -> None:
    assert decode(sample, [sample.stream]) == sample.expected


@SETTINGS
@given(sample=any_stream, cuts=st.lists(st.integers(0, 10**7), max_size=40),
       mode=st.sampled_from(["plain", "direct", "eager", "records"]))
def test_any_split_points_give_the_same_events(
    sample: Sample, cuts: list[int], mode: str
) -> None:
    # "records" feeds the encoder's own pieces, so chunks end exactly at record ends.
    chunks = [p for p in sample.parts if p] if mode == "records" else split(sample.stream, cuts)
    events = decode(sample, chunks, direct=mode == "direct", eager=mode in ("eager", "records"))
    assert events == sample.expected


@SETTINGS
@given(sample=any_stream, data=st.data())
def test_byte_at_a_time_around_a_boundary_gives_the_same_events(
    sample: Sample, data: st.DataObject
) -> None:
    cut = data.draw(st.integers(0, len(sample.stream)))
    chunks = [sample.stream[:cut]] + [bytes([b]) for b in sample.stream[cut : cut + 64]]
    chunks.append(sample.stream[cut + 64 :])
    assert decode(sample, [c for c in chunks if c]) == sample.expected


@SETTINGS
@given(sample=any_stream, data=st.data())
def test_truncation_yields_a_prefix_then_a_typed_error(
    sample: Sample, data: st.DataObject
) -> None:
    cut = data.draw(st.integers(0, len(sample.stream) - 1))
    truncated = Sample(sample.stream[:cut], [], sample.channel, sample.postcopy)
    with pytest.raises((RemoteProtocolError, ChannelClosedError)):
        decode(truncated, split(truncated.stream, data.draw(st.lists(st.integers()))))
    # Events decoded before the error are a prefix of the real ones (never invented).
    partial = _collect_until_error(truncated)
    assert partial == sample.expected[: len(partial)]


def _collect_until_error(sample: Sample) -> list[Norm]:
    dec = Decoder(BLOCKS, channel=sample.channel, postcopy=sample.postcopy)
    dec.receive_data(sample.stream)
    dec.receive_eof()
    out: list[Norm] = []
    try:
        while (ev := dec.next_event()) is not NEED_DATA:
            assert not isinstance(ev, PageHeader)  # everything is buffered
            out.extend(_normalise(ev))
    except StreamError:
        return out
    raise AssertionError("truncated stream decoded without error")


corruptions = st.lists(st.tuples(st.integers(0, 10**7), st.integers(0, 255)), min_size=1,
                       max_size=4)


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(sample=any_stream, edits=corruptions, cut=st.none() | st.integers(0, 10**7),
       cuts=st.lists(st.integers(0, 10**7), max_size=8), framing=st.booleans())
def test_corruption_yields_only_typed_errors_and_only_real_data(
    sample: Sample, edits: list[tuple[int, int]], cut: int | None, cuts: list[int],
    framing: bool,
) -> None:
    raw = bytearray(sample.stream)
    targets = sample.structural() if framing else range(len(raw))  # framing: hit headers
    for pos, value in edits:
        raw[targets[pos % len(targets)]] = value
    if cut is not None:
        del raw[cut % len(raw) :]
    bad = Sample(bytes(raw), [], sample.channel, sample.postcopy)
    try:
        events = decode(bad, split(bad.stream, cuts))
    except (RemoteProtocolError, ChannelClosedError):
        return  # the only acceptable failures; anything else propagates and fails
    for ev in events:
        _assert_backed_by_input(ev, bad.stream)


def _assert_backed_by_input(ev: Norm, stream: bytes) -> None:
    if isinstance(ev, tuple):
        block, off = ev[1], ev[2]
        assert block in BLOCKS and off % PAGE_SIZE == 0
        assert off + PAGE_SIZE <= BLOCKS[block].length
        if ev[0] == "page":
            assert ev[3] in stream
    elif isinstance(ev, DeviceState):
        assert ev.data in stream and ev.idstr.encode() in stream
