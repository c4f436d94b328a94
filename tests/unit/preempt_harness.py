"""Test harness for postcopy preemption: a scripted source and a buffer destination.

Theory of operation
-------------------
The source side is livemig's real :class:`~livemig.migration.sender.PageSender`, with
real encoders and :class:`~livemig.migration.channel.ChannelWriter`s over
``socket.socketpair()`` connections; only its surroundings are scripted, so every test
is deterministic (no timing luck):

* :class:`PatternBlock` is guest RAM: an anonymous ``MAP_NORESERVE`` mapping whose
  non-zero pieces hold one recognisable 64-bit word per (block, piece).  For 1 GiB
  pages the pattern is sparse: untouched memory costs nothing and is sent as ZERO
  records, so a 1 GiB host page stays cheap.
* A :class:`Timeline` records, in order, every ``write`` the sender queues on a channel
  writer, every ``send`` that reaches a socket, every trace event and every page
  request released to the sender.  Tests assert on *what happened in which order*.
* :class:`ScriptedQueue` releases each request once a condition on what was sent holds
  (checked after every write and whenever the sender looks at the queue), so "a request
  arrives while H1 is half sent" is exact.
* :class:`FakeClock` replaces the sender module's clock, so a PART section (a round)
  ends only when a test says so.

Reader threads drain the receiving socket ends, so ``sendmsg`` never blocks.  Each
channel's bytes are then cut at the recorded write and send boundaries (always record
boundaries) and decoded with livemig's :class:`~livemig.wire.decoder.Decoder`; each
decoded :class:`Record` knows the write that queued it and the send that flushed it.
:class:`BufferDestination` replays the records, in the order they reached the sockets,
into livemig's :class:`~livemig.migration.postcopy.ChannelPlacer`s (one per channel)
over a :class:`~livemig.migration.postcopy.PostcopyState` whose placers write into
plain buffers and log every placement.
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import mmap
import socket
import struct
import termios
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from livemig.kernel.sock import Buffer
from livemig.migration.channel import Channel, ChannelWriter, background_queue_bytes
from livemig.migration.fault_handler import receive_postcopy_channel as receive_loop
from livemig.migration.handshake import Handshake
from livemig.migration.helper import HelperServer
from livemig.migration.pagesink import dispatch_page_event
from livemig.migration.postcopy import BlockState, ChannelPlacer, PostcopyState
from livemig.migration.ratelimit import RateLimiter
from livemig.migration.returnpath import PageRequest, RequestQueue
from livemig.migration.sender import OutChannel, PageSender
from livemig.migration.source import end_postcopy_stream, postcopy_out_channel, write_stream_head
from livemig.migration.state import Capabilities, Parameters, RamStats, UrgentMode
from livemig.migration.trace import Tracer
from livemig.migration.urgent_sender import choose_urgent_sender
from livemig.runtime import UrgentPriority
from livemig.vmm.memory import Bitmap
from livemig.wire import events as ev
from livemig.wire.blocks import BlockInfo
from livemig.wire.channel import ChannelKind
from livemig.wire.decoder import Decoder
from livemig.wire.encoder import Encoder, PageRecords

PAGE = 4096
MIB = 1 << 20
GIB = 1 << 30
SECTION_ID = 0
PRECOPY = "precopy"  # the sender's names for its channels
POSTCOPY = "postcopy"
# Not exported by Python 3.11's mmap module; the Linux value.
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
# Compare and copy big buffers in slices, so no temporary is ever 1 GiB.
SLICE = 64 * MIB

StoryItem = tuple[Any, ...]


def anon_map(size: int) -> mmap.mmap:
    """Anonymous memory that costs nothing until touched (1 GiB pages are only buffers)."""
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE)


# --- guest RAM on the source -------------------------------------------------------------
class PatternBlock:
    """One block of source guest RAM (satisfies the sender's ``SourceBlock`` protocol).

    Piece ``i`` (4 KiB page ``i`` of the block) is non-zero iff ``i % every == 0`` and
    ``i % 16 != 5``; then every 64-bit word of it is ``tag << 40 | (i + 1)``.  So each
    host page mixes ZERO and PAGE records, and two blocks never share a piece's bytes.
    """

    def __init__(self, name: str, host_page: int, host_pages: int, tag: int,
                 every: int = 1) -> None:
        self.name = name
        self.host_page_size = host_page
        self.size = host_page * host_pages
        self.pages = self.size // PAGE
        self._map = anon_map(self.size)
        idx = np.arange(0, self.pages, every, dtype=np.int64)
        self.nonzero = idx[idx % 16 != 5]
        words = np.frombuffer(self._map, dtype=np.uint64).reshape(self.pages, PAGE // 8)
        values = (self.nonzero + 1).astype(np.uint64) | np.uint64(tag << 40)
        words[self.nonzero] = values[:, None]
        del words

    @property
    def per(self) -> int:
        """4 KiB pieces per host page."""
        return self.host_page_size // PAGE

    def pieces(self, hp: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """(zero pieces, non-zero pieces) of host page ``hp``, ascending."""
        lo, hi = hp * self.per, (hp + 1) * self.per
        nz = self.nonzero[(self.nonzero >= lo) & (self.nonzero < hi)]
        return np.setdiff1d(np.arange(lo, hi, dtype=np.int64), nz), nz

    def view(self) -> memoryview:
        return memoryview(self._map)

    def sync_dirty(self, into: Bitmap) -> int:
        return 0  # postcopy: the guest runs elsewhere, nothing is dirtied here

    def close(self) -> None:
        self._map.close()


# --- the timeline ----------------------------------------------------------------------
@dataclass(frozen=True)
class Write:
    """The sender queued records on a channel writer; the stream now has ``end`` bytes."""

    channel: str
    end: int


@dataclass(frozen=True)
class Send:
    """A channel put its stream up to ``end`` on the socket."""

    channel: str
    end: int


@dataclass(frozen=True)
class Traced:
    name: str
    fields: dict[str, Any]


@dataclass(frozen=True)
class Released:
    """A scripted page request became visible to the sender."""

    block: str
    start: int


Mark = Write | Send | Traced | Released


@dataclass
class Timeline:
    marks: list[Mark] = field(default_factory=list)


class RecordingChannel(Channel):
    """A socket channel that marks every send on the timeline and counts the PAGE
    records it has sent (``pages_sent``, also between the steps of one send)."""

    def __init__(self, sock: socket.socket, name: str, timeline: Timeline) -> None:
        super().__init__(sock=sock, name=name)
        self._timeline = timeline
        self.pages_sent = 0

    def send(self, buffers: Sequence[Buffer]) -> None:
        super().send(buffers)
        self._timeline.marks.append(Send(self.name, self.bytes_sent))

    def send_pages(self, rec: PageRecords, ram: memoryview,
                   stop: Callable[[], bool] | None = None, step: int = 0) -> int:
        before = self.pages_sent
        counted = stop
        if stop is not None and step:
            inner = stop

            def counted() -> bool:  # asked after each step: ``step`` more records went
                self.pages_sent += step
                return inner()

        sent = super().send_pages(rec, ram, counted, step)
        self.pages_sent = before + sent
        self._timeline.marks.append(Send(self.name, self.bytes_sent))
        return sent


class RecordingWriter(ChannelWriter):
    """A channel writer that marks every write, then runs the write hooks."""

    def __init__(self, channel: RecordingChannel, timeline: Timeline,
                 hooks: list[Callable[[], None]]) -> None:
        super().__init__(channel)
        self._name = channel.name
        self._timeline = timeline
        self._hooks = hooks
        self.written = 0

    def write(self, buffers: Sequence[Buffer]) -> None:
        self._mark(buffers)
        super().write(buffers)
        self._after()

    def write_now(self, buffers: Sequence[Buffer]) -> None:
        self._mark(buffers)
        super().write_now(buffers)
        self._after()

    def write_pages(self, rec: PageRecords, ram: memoryview, lead: Sequence[Buffer] = (),
                    stop: Callable[[], bool] | None = None, step: int = 0) -> int:
        self.written += rec.nbytes + sum(len(b) for b in lead)
        at = len(self._timeline.marks)
        self._timeline.marks.append(Write(self._name, self.written))
        sent = super().write_pages(rec, ram, lead, stop, step)
        if sent < len(rec.offsets):  # a piece cut short: the write ends where it stopped
            self.written -= rec.nbytes - rec.bytes_of(sent)
            self._timeline.marks[at] = Write(self._name, self.written)
        self._after()
        return sent

    def _mark(self, buffers: Sequence[Buffer]) -> None:
        self.written += sum(len(b) for b in buffers)
        self._timeline.marks.append(Write(self._name, self.written))

    def _after(self) -> None:
        for hook in self._hooks:
            hook()


class RecordingTracer(Tracer):
    """Keeps the ``postcopy_preempt*`` events and marks them on the timeline too."""

    def __init__(self, timeline: Timeline) -> None:
        super().__init__(["postcopy_preempt*"])
        self._timeline = timeline

    def __call__(self, name: str, **fields: Any) -> None:
        super().__call__(name, **fields)
        self._timeline.marks.append(Traced(name, dict(fields)))


@dataclass(frozen=True)
class Step:
    """Release ``request`` once ``when()`` holds."""

    when: Callable[[], bool]
    request: PageRequest


class ScriptedQueue(RequestQueue):
    """The source's request queue, fed by a script instead of a return path."""

    def __init__(self, timeline: Timeline, steps: Iterable[Step]) -> None:
        super().__init__()
        self._timeline = timeline
        self._steps = list(steps)

    @property
    def unreleased(self) -> int:
        return len(self._steps)

    def poll(self) -> None:
        while self._steps and self._steps[0].when():
            req = self._steps.pop(0).request
            self._timeline.marks.append(Released(req.block, req.start))
            self.put(req)

    def pop(self) -> PageRequest | None:
        self.poll()
        return super().pop()

    def __len__(self) -> int:
        self.poll()
        return super().__len__()


class FakeClock:
    """Stands in for the sender module's ``time``: frozen, so a round never ends by
    itself; :meth:`end_round_when` makes time jump once a condition holds."""

    def __init__(self) -> None:
        self.now = 0.0
        self._cond: Callable[[], bool] | None = None

    def monotonic(self) -> float:
        if self._cond is not None and self._cond():
            self._cond = None
            self.now += 3600.0
        return self.now

    def end_round_when(self, cond: Callable[[], bool]) -> None:
        self._cond = cond

    def sleep(self, seconds: float) -> None:
        """Frozen time does not pass; a real short sleep lets the drain threads run."""
        time.sleep(min(seconds, 0.001))


# --- the source ----------------------------------------------------------------------------
class _Drain:
    """Reads one receiving socket end to EOF in a thread."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.data = bytearray()
        self._thread = threading.Thread(target=self._run, name="drain", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while chunk := self.sock.recv(1 << 20):
            self.data += chunk

    def join(self) -> bytes:
        """The whole stream (call after closing the sending end)."""
        self._thread.join(30)
        assert not self._thread.is_alive(), "a channel was never closed"
        self.sock.close()
        return bytes(self.data)


class PreemptHarness:
    """A PageSender with the migration-thread urgent design and a postcopy channel, set
    up by the source's own stream functions as ``SourceMigration`` does (see the module
    docstring)."""

    def __init__(self, blocks: Sequence[PatternBlock], *, break_huge: bool = True) -> None:
        self.blocks = {b.name: b for b in blocks}
        self.table = {b.name: BlockInfo(b.size, b.host_page_size) for b in blocks}
        self.timeline = Timeline()
        self._hooks: list[Callable[[], None]] = []
        self._drains: dict[str, _Drain] = {}
        self._socks: list[socket.socket] = []
        self._channels: list[RecordingChannel] = []
        caps = Capabilities(postcopy_ram=True, postcopy_preempt=True)
        params = Parameters(x_postcopy_urgent_sender=UrgentMode.MIGRATION,
                            x_postcopy_preempt_break_huge=break_huge)
        self.urgent = choose_urgent_sender(caps, params, HelperServer())
        main = self._open(PRECOPY, Encoder(postcopy=True))
        write_stream_head(main, self.table, Handshake.of(caps))
        post = postcopy_out_channel(self._writer(POSTCOPY))
        self.sender = PageSender(self.blocks, main, SECTION_ID, RamStats(), RateLimiter(0),
                                 RecordingTracer(self.timeline))
        self.sender.post = post
        self.urgent.attach(self.sender)
        self.urgent.switchover(background_queue_bytes(0))
        # The drained socketpairs make SIOCOUTQ (and so the urgent yield) timing
        # dependent; the yield is measured by benchmarks/preempt_latency.py instead.
        self.sender.yield_to_urgent = False
        self.setup_marks = len(self.timeline.marks)

    def _writer(self, name: str) -> RecordingWriter:
        src, dst = socket.socketpair()
        self._socks.append(src)
        self._drains[name] = _Drain(dst)
        channel = RecordingChannel(src, name, self.timeline)
        self._channels.append(channel)
        return RecordingWriter(channel, self.timeline, self._hooks)

    def _open(self, name: str, encoder: Encoder) -> OutChannel:
        return OutChannel(name, encoder, self._writer(name))

    # --- the script -------------------------------------------------------------------
    def request(self, block: str, hp: int) -> PageRequest:
        """What the destination asks for when host page ``hp`` faults: the whole page."""
        size = self.blocks[block].host_page_size
        return PageRequest(block, hp * size, size, 0)

    def after_pages(self, n: int) -> Callable[[], bool]:
        """True once ``n`` non-zero pieces have been sent (on either channel)."""
        return lambda: sum(ch.pages_sent for ch in self._channels) >= n

    def queue(self, *steps: Step) -> ScriptedQueue:
        q = ScriptedQueue(self.timeline, steps)
        self._hooks.append(q.poll)
        return q

    # --- running ----------------------------------------------------------------------
    def run(self, queue: RequestQueue) -> None:
        self.sender.postcopy_loop(queue, failed=lambda: False)

    def complete(self) -> None:
        """What ``SourceMigration`` does once the postcopy loop is done."""
        end_postcopy_stream(self.sender, self.urgent)

    def finish(self) -> Run:
        """Close the sending ends and decode what each channel carried."""
        for sock in self._socks:
            sock.close()
        marks = list(self.timeline.marks)
        records: list[Record] = []
        for name, kind in ((PRECOPY, ChannelKind.MAIN), (POSTCOPY, ChannelKind.POSTCOPY)):
            data = self._drains[name].join()
            if name == POSTCOPY and self.sender.post is None:
                continue  # postcopy without preemption: that channel was never used
            records += decode_channel(name, kind, data, self.table, marks)
        return Run(marks, records, self.setup_marks,
                   {n: b.host_page_size for n, b in self.blocks.items()})

    def close(self) -> None:
        self.sender.release()
        for sock in self._socks:
            sock.close()  # the drains see EOF and end
        for drain in self._drains.values():
            drain.join()
        for block in self.blocks.values():
            block.close()


# --- decoding what was sent ------------------------------------------------------------
@dataclass(frozen=True)
class Record:
    """One decoded event of one channel, with the timeline indexes of the write that
    queued it and of the send that put it on the socket."""

    channel: str
    seq: int
    write: int
    send: int
    event: ev.Event


def decode_channel(name: str, kind: ChannelKind, data: bytes,
                   table: Mapping[str, BlockInfo], marks: Sequence[Mark]) -> list[Record]:
    writes = [(m.end, i) for i, m in enumerate(marks) if isinstance(m, Write)
              and m.channel == name]
    sends = [(m.end, i) for i, m in enumerate(marks) if isinstance(m, Send)
             and m.channel == name]
    cuts = sorted({end for end, _ in writes} | {end for end, _ in sends})
    assert cuts and cuts[-1] == len(data), f"{name}: unflushed or missing bytes"
    dec = Decoder(table, channel=kind, postcopy=True)
    out: list[Record] = []
    start = 0
    for cut in cuts:
        if cut == start:
            continue
        dec.receive_data(data[start:cut])
        start = cut
        w = writes[bisect.bisect_left(writes, (cut, -1))][1]
        s = sends[bisect.bisect_left(sends, (cut, -1))][1]
        while (e := dec.next_event()) is not ev.NEED_DATA:
            # Writes hold whole records: a lone PageHeader would mean a torn record.
            assert not isinstance(e, ev.PageHeader), f"{name}: record cut at {cut}"
            out.append(Record(name, len(out), w, s, e))
    dec.receive_eof()
    assert isinstance(dec.next_event(), ev.Closed), f"{name}: the stream did not end"
    return out


def _host_pages(e: ev.PageBatch | ev.ZeroPages, host_page: int) -> list[tuple[int, int]]:
    """(host page, piece count) groups of an event's offsets, in stream order."""
    hps = (e.offsets // np.uint64(host_page)).astype(np.int64)
    out: list[tuple[int, int]] = []
    for hp in hps.tolist():
        if out and out[-1][0] == hp:
            out[-1] = (hp, out[-1][1] + 1)
        else:
            out.append((hp, 1))
    return out


@dataclass(frozen=True, repr=False)
class Run:
    """Everything the sender did, and what each channel carried."""

    marks: list[Mark]
    records: list[Record]
    setup_marks: int
    host_pages: dict[str, int]

    def __repr__(self) -> str:
        return f"Run({len(self.marks)} marks, {len(self.records)} records)"

    def story(self) -> list[StoryItem]:
        """What happened after setup, in order, condensed:

        * ``(channel, block, host page, pieces)``: consecutive writes of one host page
          on one channel, merged;
        * ``(channel, "PART" | "END" | "EOS" | "EOF")``: framing;
        * ``(trace name without "postcopy_preempt_", fields)``;
        * ``("request", block, start)``: a scripted request was released.
        """
        by_write: dict[int, list[Record]] = {}
        for r in self.records:
            by_write.setdefault(r.write, []).append(r)
        items: list[StoryItem] = []
        for i, m in enumerate(self.marks[self.setup_marks:], self.setup_marks):
            if isinstance(m, Traced):
                items.append((m.name.removeprefix("postcopy_preempt_"), m.fields))
            elif isinstance(m, Released):
                items.append(("request", m.block, m.start))
            elif isinstance(m, Write):
                for r in by_write.get(i, []):
                    self._tell(items, r)
        return items

    def _tell(self, items: list[StoryItem], r: Record) -> None:
        e = r.event
        if isinstance(e, ev.PageBatch | ev.ZeroPages):
            for hp, n in _host_pages(e, self.host_pages[e.block]):
                last = items[-1] if items else ()
                if len(last) == 4 and last[:3] == (r.channel, e.block, hp):
                    items[-1] = (r.channel, e.block, hp, last[3] + n)
                else:
                    items.append((r.channel, e.block, hp, n))
        elif isinstance(e, ev.SectionBegin):
            items.append((r.channel, e.kind.name))
        elif isinstance(e, ev.SectionComplete):
            items.append((r.channel, "EOS"))
        elif isinstance(e, ev.StreamEnd):
            items.append((r.channel, "EOF"))

    def traces(self) -> list[str]:
        return [m.name for m in self.marks if isinstance(m, Traced)]

    def page_records(self, channel: str | None = None, block: str | None = None,
                     hp: int | None = None) -> list[Record]:
        """Page records (PAGE or ZERO) matching the filters, in stream order."""
        out = []
        for r in self.records:
            e = r.event
            if not isinstance(e, ev.PageBatch | ev.ZeroPages):
                continue
            if channel not in (None, r.channel) or block not in (None, e.block):
                continue
            if hp is not None:
                hps = e.offsets // np.uint64(self.host_pages[e.block])
                if not (hps == np.uint64(hp)).any():
                    continue
            out.append(r)
        return out

    def pieces(self, channel: str, block: str, hp: int) -> list[int]:
        """The 4 KiB piece indexes of host page ``hp`` sent on ``channel``, in order."""
        size = self.host_pages[block]
        out: list[int] = []
        for r in self.page_records(channel, block, hp):
            e = r.event
            assert isinstance(e, ev.PageBatch | ev.ZeroPages)
            offs = e.offsets[(e.offsets // np.uint64(size)) == np.uint64(hp)]
            out += (offs // np.uint64(PAGE)).astype(np.int64).tolist()
        return out

    def next_write_after(self, index: int) -> int:
        """Timeline index of the first write after ``index`` (len(marks) if none)."""
        for i in range(index + 1, len(self.marks)):
            if isinstance(self.marks[i], Write):
                return i
        return len(self.marks)

    def in_send_order(self) -> list[Record]:
        return sorted(self.records, key=lambda r: (r.send, r.seq))


# --- the destination -------------------------------------------------------------------
def _rows(mem: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint64]:
    """Whole 4 KiB pieces as rows of 64-bit words."""
    return mem.view(np.uint64).reshape(-1, PAGE // 8)


class BufferPlacer:
    """A ``Placer`` that writes into a plain buffer and logs every placement."""

    def __init__(self, size: int) -> None:
        self._map = anon_map(size)
        self.mem = np.frombuffer(self._map, dtype=np.uint8)
        self.placements: list[tuple[int, int]] = []

    def register(self) -> None:
        pass

    def unregister(self) -> None:
        pass

    def offset_of(self, address: int) -> int:
        return -1

    def copy(self, offset: int, src: npt.NDArray[np.uint8] | mmap.mmap | bytearray,
             length: int) -> bool:
        self.placements.append((offset, length))
        if isinstance(src, mmap.mmap | bytearray):
            data = np.frombuffer(src, dtype=np.uint8)
        else:
            data = src.reshape(-1)
        for lo in range(0, length, SLICE):
            hi = min(lo + SLICE, length)
            part = _rows(data[lo:hi])
            dst = _rows(self.mem[offset + lo : offset + hi])
            # Only pieces that change are written: a mostly-zero 1 GiB page stays cheap.
            need = part.any(axis=1) | dst.any(axis=1)
            dst[need] = part[need]
        return True

    def copy_runs(self, offsets: npt.NDArray[np.uint64], lengths: npt.NDArray[np.int64],
                  rows: npt.NDArray[np.uint8]) -> npt.NDArray[np.int64]:
        first = 0
        for off, n in zip(offsets.tolist(), lengths.tolist(), strict=True):
            self.copy(off, np.ascontiguousarray(rows[first : first + n]), n * PAGE)
            first += n
        return lengths.copy()

    def zero_runs(self, offsets: npt.NDArray[np.uint64],
                  lengths: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        return np.array([self.zero(off, n * PAGE)
                         for off, n in zip(offsets.tolist(), lengths.tolist(), strict=True)],
                        dtype=np.int64) // PAGE

    def zero(self, offset: int, length: int) -> int:
        """Zero-fill; the bytes placed (all of them here)."""
        self.placements.append((offset, length))
        self.mem[offset : offset + length] = 0
        return length

    def discard(self, ranges: npt.NDArray[np.uint64]) -> None:
        for offset, length in ranges.tolist():
            self.mem[offset : offset + length] = 0

    def close(self) -> None:
        del self.mem
        self._map.close()


def _no_payload_left(slot: memoryview) -> None:
    raise AssertionError("a torn page record reached the buffer destination")


class BufferDestination:
    """The destination's placement machinery over buffers: one ChannelPlacer per
    channel, sharing one PostcopyState (as the load and its fault handler set them up
    at POSTCOPY_LISTEN)."""

    def __init__(self, table: Mapping[str, BlockInfo]) -> None:
        self.table = dict(table)
        self.placers = {name: BufferPlacer(info.length) for name, info in table.items()}
        states = {name: BlockState(name, info.length, info.page_size, self.placers[name])
                  for name, info in table.items()}
        self.state = PostcopyState(states, None, {})
        self.channels = {PRECOPY: ChannelPlacer(self.state, "main"),
                         POSTCOPY: ChannelPlacer(self.state, "postcopy")}

    def apply(self, channel: str, e: ev.Event) -> None:
        """Give a page event to that channel's placer, through the destination's own
        dispatcher (whole records only: no payload is left to read); other events are
        not the placers' business."""
        dispatch_page_event(e, self.channels[channel], _no_payload_left)

    def replay(self, run: Run) -> None:
        """Place every page record, in the order the records reached the sockets."""
        for r in run.in_send_order():
            self.apply(r.channel, r.event)

    def placements(self, block: str) -> list[tuple[int, int]]:
        return self.placers[block].placements

    def holds(self, block: PatternBlock, hp: int) -> bool:
        """Host page ``hp`` of the destination buffer equals the source's, byte for byte."""
        src = np.frombuffer(block.view(), dtype=np.uint64)
        dst = self.placers[block.name].mem.view(np.uint64)
        size = block.host_page_size // 8
        for lo in range(hp * size, (hp + 1) * size, SLICE // 8):
            hi = min(lo + SLICE // 8, (hp + 1) * size)
            if not np.array_equal(src[lo:hi], dst[lo:hi]):
                return False
        return True

    def close(self) -> None:
        for ch in self.channels.values():
            ch.close()
        self.state.close()
        for p in self.placers.values():
            p.close()


# --- hand-crafted streams for the destination ------------------------------------------------
def main_head(table: Mapping[str, BlockInfo]) -> tuple[Encoder, bytes]:
    """A main-channel encoder and its bytes up to an open PART section."""
    enc = Encoder(postcopy=True)
    head = b"".join([enc.preamble(), enc.ram_start(SECTION_ID), enc.mem_size(table),
                     enc.close_ram_section(), enc.ram_part(SECTION_ID)])
    return enc, head


def post_head() -> tuple[Encoder, bytes]:
    enc = Encoder(channel=ChannelKind.POSTCOPY, postcopy=True)
    return enc, enc.preamble()


def piece_records(enc: Encoder, block: PatternBlock, pieces: Sequence[int]) -> bytes:
    """ZERO/PAGE records for ``pieces`` of ``block``, as the sender encodes them."""
    idx = np.asarray(pieces, dtype=np.int64)
    nonzero = np.isin(idx, block.nonzero)
    out: list[bytes | memoryview] = [enc.zero_pages(block.name, idx[~nonzero] * PAGE)]
    out += enc.pages(block.name, idx[nonzero] * PAGE, block.view())
    return b"".join(out)


def decode_all(dec: Decoder, data: bytes) -> list[ev.Event]:
    """Every event ``data`` yields (raising what the decoder raises)."""
    dec.receive_data(data)
    out: list[ev.Event] = []
    while (e := dec.next_event()) is not ev.NEED_DATA:
        out.append(e)
    return out


def receive_postcopy_channel(data: bytes, table: Mapping[str, BlockInfo],
                             placer: ChannelPlacer, *, first: int = 0) -> list[Exception]:
    """Run the destination's own postcopy-channel receive loop (the ``postcopy/recv``
    thread's :func:`~livemig.migration.fault_handler.receive_postcopy_channel`) over a
    socket carrying ``data``, then EOF.

    With ``first`` > 0, the first ``first`` bytes are sent alone and the rest only once
    the loop has read them all: ending ``first`` inside a page payload makes the loop
    take its single-page (PageHeader) path there, whatever the socket's timing.
    Returns the errors the loop reported through its ``on_error``.
    """
    src, dst = socket.socketpair()

    def unread() -> int:
        raw = fcntl.ioctl(dst.fileno(), termios.FIONREAD, b"\0" * 4)
        return int(struct.unpack("i", raw)[0])

    def feed() -> None:
        with contextlib.suppress(OSError):  # the loop may stop reading on an error
            if first:
                src.sendall(data[:first])
                deadline = time.monotonic() + 30
                while unread() and time.monotonic() < deadline:
                    time.sleep(0.001)
            src.sendall(data[first:])
        src.close()

    thread = threading.Thread(target=feed, name="hostile-source", daemon=True)
    thread.start()
    errors: list[Exception] = []
    try:
        receive_loop(Channel(sock=dst, name="postcopy"), placer, table, errors.append,
                     UrgentPriority())
    finally:
        dst.close()
        thread.join(30)
    return errors
