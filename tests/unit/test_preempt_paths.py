"""Postcopy preemption, path by path: each test forces one path deterministically.

The source is livemig's real ``PageSender`` (migration-thread mode, postcopy channel
set); requests come from a scripted queue that releases each one at an exact point of
the stream, and a fake clock decides when a round ends (see ``preempt_harness``).  What
the channels carried is decoded with the real ``Decoder`` and placed by the real
``ChannelPlacer``s into buffers; the destination-side tests feed hand-crafted streams to
the same placers and to the destination's own postcopy-channel receive loop.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from preempt_harness import (
    GIB,
    MIB,
    PAGE,
    POSTCOPY,
    PRECOPY,
    SECTION_ID,
    BufferDestination,
    FakeClock,
    PatternBlock,
    PreemptHarness,
    Released,
    Run,
    ScriptedQueue,
    Step,
    StoryItem,
    Traced,
    decode_all,
    main_head,
    piece_records,
    post_head,
    receive_postcopy_channel,
)

from livemig.errors import ChannelClosedError, RemoteProtocolError
from livemig.migration import sender as sender_module
from livemig.migration.helper import HelperServer
from livemig.migration.ratelimit import RateLimiter
from livemig.migration.returnpath import RequestQueue
from livemig.migration.sender import BACKGROUND_STEP_PAGES, POSTCOPY_CHUNK_PAGES
from livemig.migration.state import Capabilities, Parameters, UrgentMode
from livemig.migration.urgent_sender import choose_urgent_sender
from livemig.wire import events as ev
from livemig.wire.blocks import BlockInfo
from livemig.wire.channel import ChannelKind
from livemig.wire.decoder import Decoder

# host page size, and how sparse the pattern is (1 GiB pages: one non-zero piece in 256)
SIZES = {"4K": (PAGE, 1), "2M": (2 * MIB, 1), "1G": (GIB, 256)}
BLK = "pc.ram"
COMPLETION: list[StoryItem] = [
    (POSTCOPY, "EOF"), (PRECOPY, "END"), (PRECOPY, "EOS"), (PRECOPY, "EOF"),
    ("reset_channel", {}),
]

Make = Callable[..., PreemptHarness]
Blocks = Callable[..., PatternBlock]
Dest = Callable[[dict[str, BlockInfo]], BufferDestination]


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """The sender's clock, frozen: a round ends only when a test says so."""
    fake = FakeClock()
    monkeypatch.setattr(sender_module, "time", fake)
    return fake


@pytest.fixture
def make(clock: FakeClock) -> Iterator[Make]:
    made: list[PreemptHarness] = []

    def build(*blocks: PatternBlock, break_huge: bool = True) -> PreemptHarness:
        h = PreemptHarness(blocks, break_huge=break_huge)
        made.append(h)
        return h

    yield build
    for h in made:
        h.close()


@pytest.fixture
def dest() -> Iterator[Dest]:
    """Makes buffer destinations for a block table; closes them afterwards."""
    made: list[BufferDestination] = []

    def build(table: dict[str, BlockInfo]) -> BufferDestination:
        d = BufferDestination(table)
        made.append(d)
        return d

    yield build
    for d in made:
        d.close()


@pytest.fixture
def block() -> Iterator[Blocks]:
    """Makes source blocks (``size``, host pages, name, tag); unmaps them afterwards."""
    made: list[PatternBlock] = []

    def build(size: str, host_pages: int, name: str = BLK, tag: int = 1) -> PatternBlock:
        host_page, every = SIZES[size]
        made.append(PatternBlock(name, host_page, host_pages, tag, every))
        return made[-1]

    yield build
    for blk in made:
        blk.close()


def half_chunks(nonzero: int) -> int:
    """About half of a huge page's non-zero pieces, in whole chunks of the sender."""
    return nonzero // 2 // POSTCOPY_CHUNK_PAGES * POSTCOPY_CHUNK_PAGES


def placed_once_and_exact(d: BufferDestination, blk: PatternBlock) -> None:
    size = blk.host_page_size
    n = blk.size // size
    assert sorted(d.placements(blk.name)) == [(hp * size, size) for hp in range(n)]
    assert all(d.holds(blk, hp) for hp in range(n))
    assert all(not ch.pending() for ch in d.channels.values())


def flushed_at_once(run: Run, records: list[int]) -> bool:
    """The send carrying the last of these records happened before any later write."""
    last = run.records[records[-1]]
    return last.send < run.next_write_after(last.write)


def indexes(run: Run, channel: str, blk: PatternBlock, hp: int) -> list[int]:
    recs = run.page_records(channel, blk.name, hp)
    return [run.records.index(r) for r in recs]


# --- source: preemption inside a huge page --------------------------------------------------
@pytest.mark.parametrize("size", ["2M", "1G"])
def test_request_mid_huge_page_preempts_then_restores_at_the_next_page(
        size: str, block: Blocks, make: Make, dest: Dest) -> None:
    pages = 3 if size == "2M" else 2
    blk = block(size, pages)
    h = make(blk)
    zeros0, nz0 = blk.pieces(0)
    half = half_chunks(len(nz0))
    nxt = int(nz0[half])
    q = h.queue(Step(h.after_pages(half), h.request(BLK, 1)))
    h.run(q)
    h.complete()
    run = h.finish()

    per, hsz = blk.per, blk.host_page_size
    rest: list[StoryItem] = [(PRECOPY, BLK, 2, per)] if pages == 3 else []
    assert run.story() == [
        (PRECOPY, "PART"),
        (PRECOPY, BLK, 0, len(zeros0) + half),
        ("request", BLK, hsz),
        ("triggered", {"block": BLK, "page": nxt}),
        ("switch_channel", {"channel": POSTCOPY}),
        ("send_host_page", {"channel": POSTCOPY, "block": BLK, "offset": hsz}),
        (POSTCOPY, BLK, 1, per),
        ("restored", {"block": BLK, "page": 0}),
        ("switch_channel", {"channel": PRECOPY}),
        (PRECOPY, BLK, 0, len(nz0) - half),
        *rest,
        (PRECOPY, "EOS"),
        ("reset_channel", {}),
        *COMPLETION,
    ]
    # H1 on the precopy channel: every piece once, in order; it resumes at the very
    # piece the trigger named.
    h1 = run.pieces(PRECOPY, BLK, 0)
    assert h1 == zeros0.tolist() + nz0.tolist()
    assert h1[len(zeros0) + half] == nxt
    # H2: whole on the postcopy channel, in one write, on the socket before anything else
    # is written; what H1 had sent before the preemption was already on the socket.
    h2 = indexes(run, POSTCOPY, blk, 1)
    assert sorted(run.pieces(POSTCOPY, BLK, 1)) == list(range(per, 2 * per))
    assert len({run.records[i].write for i in h2}) == 1
    assert flushed_at_once(run, h2)
    before = [run.records[i] for i in indexes(run, PRECOPY, blk, 0)]
    h2_write = run.records[h2[0]].write
    assert all(r.send < h2_write for r in before if r.write < h2_write)
    assert h.sender.preempted is None and q.unreleased == 0

    d = dest(h.table)
    d.replay(run)
    placed_once_and_exact(d, blk)


@pytest.mark.parametrize("size", ["2M", "1G"])
def test_request_inside_the_interrupted_huge_page_is_a_hit_not_a_split(
        size: str, block: Blocks, make: Make, dest: Dest) -> None:
    blk = block(size, 2)
    h = make(blk)
    zeros0, nz0 = blk.pieces(0)
    half = half_chunks(len(nz0))
    q = h.queue(Step(h.after_pages(half), h.request(BLK, 0)))
    h.run(q)
    h.complete()
    run = h.finish()

    assert run.story() == [
        (PRECOPY, "PART"),
        (PRECOPY, BLK, 0, len(zeros0) + half),
        ("request", BLK, 0),
        ("triggered", {"block": BLK, "page": int(nz0[half])}),
        ("hit", {"block": BLK, "offset": 0}),
        (PRECOPY, BLK, 0, len(nz0) - half),  # H1 is finished next, where it was
        (PRECOPY, BLK, 1, blk.per),
        (PRECOPY, "EOS"),
        ("reset_channel", {}),
        *COMPLETION,
    ]
    assert run.page_records(POSTCOPY) == []  # no piece of H1 on the other channel
    assert run.pieces(PRECOPY, BLK, 0) == zeros0.tolist() + nz0.tolist()
    d = dest(h.table)
    d.replay(run)
    placed_once_and_exact(d, blk)


def test_hit_page_is_on_the_socket_before_anything_else_is_written(
        block: Blocks, make: Make) -> None:
    # Preempted after 5 chunks: the 10 chunks left are not a multiple of the writer's
    # 512-buffer batch, so only an explicit flush gets the last ones out.
    blk = block("2M", 2)
    h = make(blk)
    q = h.queue(Step(h.after_pages(5 * POSTCOPY_CHUNK_PAGES), h.request(BLK, 0)))
    h.run(q)
    h.complete()
    run = h.finish()
    assert "postcopy_preempt_hit" in run.traces()
    assert flushed_at_once(run, indexes(run, PRECOPY, blk, 0))


def test_without_break_huge_a_request_waits_for_the_end_of_the_huge_page(
        block: Blocks, make: Make, dest: Dest) -> None:
    blk = block("2M", 3)
    h = make(blk, break_huge=False)
    zeros0, nz0 = blk.pieces(0)
    half = half_chunks(len(nz0))
    hsz, per = blk.host_page_size, blk.per
    q = h.queue(Step(h.after_pages(half), h.request(BLK, 2)))
    h.run(q)
    h.complete()
    run = h.finish()

    assert run.story() == [
        (PRECOPY, "PART"),
        (PRECOPY, BLK, 0, len(zeros0) + half),
        ("request", BLK, 2 * hsz),
        (PRECOPY, BLK, 0, len(nz0) - half),  # no preemption: H1 goes on to its end
        ("switch_channel", {"channel": POSTCOPY}),
        ("send_host_page", {"channel": POSTCOPY, "block": BLK, "offset": 2 * hsz}),
        (POSTCOPY, BLK, 2, per),
        ("switch_channel", {"channel": PRECOPY}),
        (PRECOPY, BLK, 1, per),
        (PRECOPY, "EOS"),
        ("reset_channel", {}),
        *COMPLETION,
    ]
    assert "postcopy_preempt_triggered" not in run.traces()
    assert flushed_at_once(run, indexes(run, POSTCOPY, blk, 2))
    d = dest(h.table)
    d.replay(run)
    placed_once_and_exact(d, blk)


# --- source: block names across channel switches -----------------------------------------
def test_continue_records_never_refer_to_the_other_channels_block(
        block: Blocks, make: Make, dest: Dest) -> None:
    """main: A.H0 | post: B.H1 | main: A.H0 rest, A.H1 | post: A.H2 | main: A.H1 rest, B.H0.

    Each channel switches block at a moment the *other* channel last named the block
    it switches to, so a CONTINUE resolved against the wrong channel's block would put
    pages into the wrong block (the two blocks' bytes differ everywhere).
    """
    a = block("2M", 3, "pc.ram", tag=1)
    b = block("2M", 2, "ram1", tag=2)
    h = make(a, b)
    za, nza = a.pieces(0)
    half = half_chunks(len(nza))
    per = a.per
    q = h.queue(Step(h.after_pages(half), h.request("ram1", 1)),
                Step(h.after_pages(2 * len(nza) + half), h.request("pc.ram", 2)))
    h.run(q)
    h.complete()
    run = h.finish()

    hsz = a.host_page_size
    assert run.story() == [
        (PRECOPY, "PART"),
        (PRECOPY, "pc.ram", 0, len(za) + half),
        ("request", "ram1", hsz),
        ("triggered", {"block": "pc.ram", "page": int(nza[half])}),
        ("switch_channel", {"channel": POSTCOPY}),
        ("send_host_page", {"channel": POSTCOPY, "block": "ram1", "offset": hsz}),
        (POSTCOPY, "ram1", 1, per),
        ("restored", {"block": "pc.ram", "page": 0}),
        ("switch_channel", {"channel": PRECOPY}),
        (PRECOPY, "pc.ram", 0, len(nza) - half),
        (PRECOPY, "pc.ram", 1, len(za) + half),
        ("request", "pc.ram", 2 * hsz),
        ("triggered", {"block": "pc.ram", "page": int(a.pieces(1)[1][half])}),
        ("switch_channel", {"channel": POSTCOPY}),
        ("send_host_page", {"channel": POSTCOPY, "block": "pc.ram", "offset": 2 * hsz}),
        (POSTCOPY, "pc.ram", 2, per),
        ("restored", {"block": "pc.ram", "page": per}),
        ("switch_channel", {"channel": PRECOPY}),
        (PRECOPY, "pc.ram", 1, len(nza) - half),
        (PRECOPY, "ram1", 0, per),
        (PRECOPY, "EOS"),
        ("reset_channel", {}),
        *COMPLETION,
    ]

    def switches(channel: str) -> list[str]:
        out: list[str] = []
        for r in run.page_records(channel):
            assert isinstance(r.event, ev.PageBatch | ev.ZeroPages)
            if not out or out[-1] != r.event.block:
                out.append(r.event.block)
        return out

    assert switches(PRECOPY) == ["pc.ram", "ram1"]
    assert switches(POSTCOPY) == ["ram1", "pc.ram"]
    d = dest(h.table)
    d.replay(run)
    placed_once_and_exact(d, a)
    placed_once_and_exact(d, b)


# --- source: background piece size -----------------------------------------------------
def switch_over(h: PreemptHarness, design: UrgentMode, background_queue: int,
               preempt: bool = True) -> None:
    """Postcopy starts with ``design`` serving requests, as ``SourceMigration`` does
    (without ``preempt``: no postcopy channel, the migration thread serves them)."""
    urgent = choose_urgent_sender(Capabilities(postcopy_ram=True, postcopy_preempt=preempt),
                                  Parameters(x_postcopy_urgent_sender=design), HelperServer())
    if not preempt:
        h.sender.post = None
    urgent.attach(h.sender)
    # The process design lowers the calling thread's priority: not the test's thread.
    t = threading.Thread(target=urgent.switchover, args=(background_queue,))
    t.start()
    t.join()


def background_pieces(h: PreemptHarness) -> tuple[Run, list[int]]:
    """Run the postcopy to its end: the run, and the pages each write carried."""
    h.run(h.queue())
    h.complete()
    run = h.finish()
    pieces: dict[int, int] = {}
    for r in run.page_records(PRECOPY):
        assert isinstance(r.event, ev.PageBatch | ev.ZeroPages)
        pieces[r.write] = pieces.get(r.write, 0) + len(r.event.offsets)
    return run, sorted(pieces.values())


class ArrivingQueue(ScriptedQueue):
    """Requests that arrive while the migration thread is inside a write: the sender's
    look at the queue between two steps of a piece sees them (a real request queue is
    filled by the return-path thread at any moment)."""

    def __len__(self) -> int:
        self.poll()
        return super().__len__()


def test_a_request_cuts_a_background_piece_after_the_step_in_hand(
        block: Blocks, make: Make, dest: Dest) -> None:
    """Without preemption the migration thread serves requests between 256-page
    pieces: a request that arrives while one goes out waits for the 32-page step in
    hand only; the piece's other pages go after it, and every page arrives once."""
    blk = block("4K", 1024)
    h = make(blk)
    switch_over(h, UrgentMode.MIGRATION, MIB, preempt=False)
    assert h.sender.background_piece == MIB // PAGE
    # Released as soon as the sender looks while a piece is going out.
    q = ArrivingQueue(h.timeline, [Step(lambda: h.sender.stats.normal > 0,
                                        h.request(BLK, 1000))])
    h.run(q)
    h.complete()
    run = h.finish()

    writes: dict[int, list[int]] = {}  # write -> the pages it carried, in order
    for r in run.records:
        if isinstance(r.event, ev.PageBatch):
            writes.setdefault(r.write, []).extend(
                (r.event.offsets // PAGE).astype(int).tolist())
    order = sorted(writes)
    released = next(i for i, m in enumerate(run.marks)
                    if isinstance(m, Released) and m.start == 1000 * PAGE)
    before = [w for w in order if w < released]
    after = [w for w in order if w > released]
    piece = blk.nonzero[blk.nonzero < MIB // PAGE].tolist()  # its zero pages go first
    # The piece in hand stopped after its first step...
    assert before == [order[0]]
    assert writes[before[0]] == piece[:BACKGROUND_STEP_PAGES]
    # ... the requested page was the next write (on the one channel) ...
    assert writes[after[0]] == [1000]
    # ... and the rest of that piece came later.
    later = {p for w in after[1:] for p in writes[w]}
    assert set(piece[BACKGROUND_STEP_PAGES:]) <= later
    d = dest(h.table)
    d.replay(run)
    placed = sorted(d.placements(blk.name))
    assert sum(n for _, n in placed) == blk.size
    assert all(a + n <= b for (a, n), (b, _) in zip(placed, placed[1:], strict=False))
    assert all(d.holds(blk, hp) for hp in range(blk.pages))


def test_without_preemption_a_background_piece_fills_the_kernel_queue(
        block: Blocks, make: Make) -> None:
    """A request cuts the piece after the step in hand (the test above)."""
    h = make(block("4K", 64))
    switch_over(h, UrgentMode.MIGRATION, MIB, preempt=False)
    assert h.sender.background_piece == MIB // PAGE


@pytest.mark.parametrize(("design", "queue", "piece"), [
    (UrgentMode.MIGRATION, MIB, MIB // PAGE),  # loopback: one queue a piece
    (UrgentMode.RETURN_PATH, MIB, MIB // PAGE),
    (UrgentMode.PROCESS, MIB, MIB // PAGE),
    (UrgentMode.MIGRATION, 64 * 1024, POSTCOPY_CHUNK_PAGES),  # Ethernet: at least 32
    (UrgentMode.PROCESS, 64 * 1024, POSTCOPY_CHUNK_PAGES),
])
def test_background_pieces_are_cut_by_the_kernel_queue(
        design: UrgentMode, queue: int, piece: int, block: Blocks, make: Make,
        dest: Dest) -> None:
    """A 1 MiB main-channel queue (loopback): every background write carries 256
    pages, whoever serves requests; on a 64 KiB queue (Ethernet) 32 (a piece is at
    least that); all arrive once."""
    blk = block("4K", 1024)
    h = make(blk)
    switch_over(h, design, queue)
    run, pieces = background_pieces(h)
    assert pieces == [piece] * (blk.pages // piece)
    d = dest(h.table)
    d.replay(run)
    placed = sorted(d.placements(blk.name))  # runs of 4 KiB pages, none twice
    assert sum(n for _, n in placed) == blk.size
    assert all(a + n <= b for (a, n), (b, _) in zip(placed, placed[1:], strict=False))
    assert all(d.holds(blk, hp) for hp in range(blk.pages))


class LookCountingQueue(ScriptedQueue):
    """Counts how often the sender looks at its request queue between two steps of a
    background piece (``len``; serving it is ``pop``)."""

    looks = 0

    def __len__(self) -> int:
        self.looks += 1
        return super().__len__()


@pytest.mark.parametrize(("design", "steps"), [
    (UrgentMode.MIGRATION, True), (UrgentMode.RETURN_PATH, True),
    (UrgentMode.PROCESS, False)])
def test_a_background_piece_goes_in_steps_only_where_requests_are_answered_in_the_vmm(
        design: UrgentMode, steps: bool, block: Blocks, make: Make, dest: Dest) -> None:
    """The migration thread sends a piece in 32-page steps, with a look at its queue
    between two, where requests are answered in its process (by itself, or by the
    return-path thread, which gets the CPU back between steps); with the helper
    process a piece goes in one system call (steps cost the loop a quarter of its CPU
    per GB).  Every page arrives."""
    blk = block("4K", 1024)
    h = make(blk)
    switch_over(h, design, MIB)
    q = LookCountingQueue(h.timeline, [])
    h.run(q)
    h.complete()
    run = h.finish()
    pieces = blk.pages // (MIB // PAGE)
    steps_per_piece = MIB // PAGE // BACKGROUND_STEP_PAGES
    if steps:
        assert q.looks >= pieces * (steps_per_piece - 1)
    else:
        assert q.looks == 0
    d = dest(h.table)
    d.replay(run)
    assert all(d.holds(blk, hp) for hp in range(blk.pages))


@pytest.mark.parametrize("design", [UrgentMode.MIGRATION, UrgentMode.PROCESS])
def test_a_background_piece_carries_the_next_dirty_pages_however_scattered(
        design: UrgentMode, block: Blocks, make: Make, dest: Dest) -> None:
    """Late in a migration the dirty pages left are scattered: a piece is the next
    ``background_piece`` of them, not the few an aligned window of that many covers."""
    blk = block("4K", 4096)
    h = make(blk)
    switch_over(h, design, MIB)
    h.sender.bitmaps[blk.name].bits[np.arange(blk.pages) % 8 != 0] = False
    run, pieces = background_pieces(h)
    piece = h.sender.background_piece
    assert pieces == [piece] * (blk.pages // 8 // piece)
    d = dest(h.table)
    d.replay(run)
    placed = sorted(o for o, _ in d.placements(blk.name))
    assert placed == [p * PAGE for p in range(0, blk.pages, 8)]


@pytest.mark.parametrize("stage", ["round", "stop-and-copy"])
def test_precopy_sends_scattered_dirty_pages_in_full_pieces(
        stage: str, block: Blocks, make: Make, dest: Dest) -> None:
    """A late round or the stop-and-copy finds few dirty pages spread over all of RAM
    (one every 64 KiB here): a piece is the next 2 MiB worth of them, one write, not
    the few that an aligned 2 MiB window covers (a write each, each paying the
    per-piece work).  Every dirty page arrives, and only those."""
    blk = block("4K", 8192)
    h = make(blk)
    every = 16
    h.sender.bitmaps[blk.name].bits[:] = np.arange(blk.pages) % every == 0
    main = h.sender.main
    if stage == "round":
        h.sender.send_round(lambda: False)
        h.complete()
    else:  # what SourceMigration's stop-and-copy writes around it
        main.writer.write([main.encoder.ram_end(SECTION_ID)])
        h.sender.send_all_remaining()
        main.writer.write([main.encoder.close_ram_section(), main.encoder.eof()])
        main.writer.flush()
        h.urgent.finish()
    run = h.finish()
    data = [r for r in run.page_records(PRECOPY) if isinstance(r.event, ev.PageBatch)]
    assert len({r.write for r in data}) == 1
    d = dest(h.table)
    d.replay(run)
    placed = sorted(o for o, _ in d.placements(blk.name))
    assert placed == [p * PAGE for p in range(0, blk.pages, every)]


def data_pages_per_write(h: PreemptHarness,
                         queue: ScriptedQueue | None = None) -> tuple[Run, list[int]]:
    """Run the postcopy to its end: the run, and the data pages (not zero pages) each
    write of the precopy channel carried."""
    h.run(queue if queue is not None else h.queue())
    h.complete()
    run = h.finish()
    pages: dict[int, int] = {}
    for r in run.page_records(PRECOPY):
        if isinstance(r.event, ev.PageBatch):
            pages[r.write] = pages.get(r.write, 0) + len(r.event.offsets)
    return run, list(pages.values())


@pytest.mark.parametrize(("design", "preempt", "queue", "piece"), [
    (UrgentMode.MIGRATION, False, MIB, 0),  # vanilla: whole, no urgent channel waits
    (UrgentMode.PROCESS, True, MIB, MIB // PAGE),  # one kernel queue of loopback
    (UrgentMode.PROCESS, True, 64 * 1024, POSTCOPY_CHUNK_PAGES),  # Ethernet
    (UrgentMode.RETURN_PATH, True, MIB, MIB // PAGE),
    (UrgentMode.MIGRATION, True, MIB, 0),  # a request may break in: steps of one write
])
def test_a_huge_page_goes_out_in_pieces_as_large_as_the_design_allows(
        design: UrgentMode, preempt: bool, queue: int, piece: int, block: Blocks,
        make: Make, dest: Dest) -> None:
    """A huge page's data pages go in one write without an urgent channel, and where
    the migration thread may break it for a request (one encoding, sent in steps:
    the next test); otherwise in background pieces (one kernel queue) when urgent
    pages share the link."""
    blk = block("2M", 3)
    h = make(blk)
    switch_over(h, design, queue, preempt=preempt)
    run, pages = data_pages_per_write(h)
    expected = []
    for hp in range(3):
        n = len(blk.pieces(hp)[1])
        step = piece or n
        expected += [min(step, n - i) for i in range(0, n, step)]
    assert sorted(pages) == sorted(expected)
    d = dest(h.table)
    d.replay(run)
    placed_once_and_exact(d, blk)


def test_a_huge_page_a_request_may_break_goes_in_steps_with_a_look_at_the_queue(
        block: Blocks, make: Make, dest: Dest) -> None:
    """Where the migration thread may break a huge page for a request, its one write
    goes POSTCOPY_CHUNK_PAGES pages per system call, and the thread looks at its queue
    between two (a request waits for one step in hand)."""
    blk = block("2M", 3)
    h = make(blk)
    switch_over(h, UrgentMode.MIGRATION, MIB)
    q = LookCountingQueue(h.timeline, [])
    run, pages = data_pages_per_write(h, q)
    assert len(pages) == 3
    steps = sum(-(-len(blk.pieces(hp)[1]) // POSTCOPY_CHUNK_PAGES) for hp in range(3))
    assert q.looks >= steps - 3
    d = dest(h.table)
    d.replay(run)
    placed_once_and_exact(d, blk)


# --- source: back to the precopy channel ---------------------------------------------------
def test_end_of_round_resets_to_the_precopy_channel(
        block: Blocks, make: Make, clock: FakeClock) -> None:
    blk = block("2M", 3)
    h = make(blk)
    _, nz0 = blk.pieces(0)
    hsz, per = blk.host_page_size, blk.per
    q = h.queue(Step(h.after_pages(len(nz0)), h.request(BLK, 2)))
    # The round ends right after the requested page went out on the postcopy channel.
    clock.end_round_when(lambda: any(isinstance(m, Traced) and m.name.endswith("host_page")
                                     for m in h.timeline.marks))
    h.run(q)
    h.complete()
    run = h.finish()

    assert run.story() == [
        (PRECOPY, "PART"),
        (PRECOPY, BLK, 0, per),
        ("request", BLK, 2 * hsz),
        ("switch_channel", {"channel": POSTCOPY}),
        ("send_host_page", {"channel": POSTCOPY, "block": BLK, "offset": 2 * hsz}),
        (POSTCOPY, BLK, 2, per),
        (PRECOPY, "EOS"),
        ("reset_channel", {}),
        (PRECOPY, "PART"),
        (PRECOPY, BLK, 1, per),  # no switch needed: the reset already went back
        (PRECOPY, "EOS"),
        ("reset_channel", {}),
        *COMPLETION,
    ]
    assert h.sender.current == PRECOPY


def test_completion_resets_to_the_precopy_channel(block: Blocks, make: Make) -> None:
    blk = block("2M", 2)
    h = make(blk)
    h.sender.serve_request(h.request(BLK, 1))  # the postcopy channel is now current
    assert h.sender.current == POSTCOPY
    h.complete()
    run = h.finish()
    assert run.story() == [
        ("switch_channel", {"channel": POSTCOPY}),
        ("send_host_page", {"channel": POSTCOPY, "block": BLK, "offset": blk.host_page_size}),
        (POSTCOPY, BLK, 1, blk.per),
        *COMPLETION,
    ]
    assert h.sender.current == PRECOPY


# --- destination: a huge page never spans two channels --------------------------------------
@pytest.mark.parametrize("size", ["2M", "1G"])
def test_destination_refuses_huge_page_pieces_after_the_other_channel_started_it(
        size: str, block: Blocks, dest: Dest) -> None:
    """Main channel first: the postcopy channel's receive loop refuses the rest."""
    blk = block(size, 2)
    table = {BLK: BlockInfo(blk.size, blk.host_page_size)}
    d = dest(table)
    menc, mhead = main_head(table)
    for e in decode_all(Decoder(table, postcopy=True),
                        mhead + piece_records(menc, blk, range(64))):
        d.apply(PRECOPY, e)
    penc, phead = post_head()
    rest = piece_records(penc, blk, range(64, blk.per))
    errors = receive_postcopy_channel(phead + rest + penc.eof(), table, d.channels[POSTCOPY])
    assert len(errors) == 1 and isinstance(errors[0], RemoteProtocolError)
    assert "split" in str(errors[0])
    assert d.placements(BLK) == [] and not d.state.blocks[BLK].received.any()


@pytest.mark.parametrize("size", ["2M", "1G"])
def test_destination_refuses_huge_page_pieces_on_main_after_postcopy_started_it(
        size: str, block: Blocks, dest: Dest) -> None:
    blk = block(size, 2)
    table = {BLK: BlockInfo(blk.size, blk.host_page_size)}
    d = dest(table)
    penc, phead = post_head()
    pdec = Decoder(table, channel=ChannelKind.POSTCOPY, postcopy=True)
    for e in decode_all(pdec, phead + piece_records(penc, blk, range(64))):
        d.apply(POSTCOPY, e)
    menc, mhead = main_head(table)
    events = decode_all(Decoder(table, postcopy=True),
                        mhead + piece_records(menc, blk, range(64, blk.per)))
    with pytest.raises(RemoteProtocolError, match="split"):
        for e in events:
            d.apply(PRECOPY, e)
    assert d.placements(BLK) == [] and not d.state.blocks[BLK].received.any()


def test_destination_refuses_a_huge_page_sent_again_on_the_other_channel(
        block: Blocks, dest: Dest) -> None:
    blk = block("2M", 2)
    table = {BLK: BlockInfo(blk.size, blk.host_page_size)}
    d = dest(table)
    menc, mhead = main_head(table)
    for e in decode_all(Decoder(table, postcopy=True),
                        mhead + piece_records(menc, blk, range(blk.per))):
        d.apply(PRECOPY, e)
    assert d.placements(BLK) == [(0, blk.host_page_size)]
    penc, phead = post_head()
    again = piece_records(penc, blk, range(blk.per))
    errors = receive_postcopy_channel(phead + again + penc.eof(), table, d.channels[POSTCOPY])
    assert len(errors) == 1 and isinstance(errors[0], RemoteProtocolError)
    assert d.placements(BLK) == [(0, blk.host_page_size)]


@pytest.mark.parametrize("ending", ["eof-between-records", "eof-inside-a-page", "eos"])
@pytest.mark.parametrize("size", ["2M", "1G"])
def test_hostile_postcopy_channel_never_causes_a_partial_placement(
        size: str, ending: str, block: Blocks, dest: Dest) -> None:
    """The first pieces of H1 (after a whole H0, for 2 MiB pages), then the channel
    ends: H1 is never placed, not even partly, and the receive loop reports a typed
    error; H0, complete, was placed."""
    blk = block(size, 2)
    table = {BLK: BlockInfo(blk.size, blk.host_page_size)}
    d = dest(table)
    whole = size == "2M"  # a whole 1 GiB page would cost a second of page faults
    data, first = hostile_stream(blk, whole, ending)
    errors = receive_postcopy_channel(data, table, d.channels[POSTCOPY], first=first)
    assert len(errors) == 1
    expected = (RemoteProtocolError,) if ending == "eos" else \
        (RemoteProtocolError, ChannelClosedError)
    assert isinstance(errors[0], expected), errors
    if ending == "eos":
        assert "inside huge pages" in str(errors[0])
    hsz = blk.host_page_size
    assert d.placements(BLK) == ([(0, hsz)] if whole else [])
    assert list(d.state.blocks[BLK].received) == [whole, False]
    assert d.holds(blk, 0) if whole else not d.placers[BLK].mem[:hsz].any()
    assert not d.placers[BLK].mem[hsz:].any()


def hostile_stream(blk: PatternBlock, whole: bool, ending: str) -> tuple[bytes, int]:
    """A postcopy channel: [whole H0,] 41 pieces of H1, then ``ending``; and where to
    cut it so that the receive loop reads its first page through the single-page path."""
    per = blk.per
    penc, phead = post_head()
    lead_piece = int(blk.pieces(0 if whole else 1)[1][0])
    lead = piece_records(penc, blk, [lead_piece])  # one named PAGE record
    data = phead + lead
    if whole:
        data += piece_records(penc, blk, [p for p in range(per) if p != lead_piece])
    data += piece_records(penc, blk, [p for p in range(per, per + 41) if p != lead_piece])
    if ending == "eof-inside-a-page":
        data += piece_records(penc, blk, [int(blk.pieces(1)[1][-1])])[:-1000]
    elif ending == "eos":
        data += penc.eof()
    return data, len(phead) + len(lead) - 1000


def test_destination_can_close_its_placers_after_a_postcopy_channel_error(
        block: Blocks, dest: Dest) -> None:
    """The load keeps the receive loop's error until it closes the placers:
    that error must not pin the temporary huge page."""
    blk = block("2M", 2)
    table = {BLK: BlockInfo(blk.size, blk.host_page_size)}
    d = dest(table)
    data, first = hostile_stream(blk, False, "eof-between-records")
    errors = receive_postcopy_channel(data, table, d.channels[POSTCOPY], first=first)
    assert len(errors) == 1 and isinstance(errors[0], ChannelClosedError)
    try:
        d.channels[POSTCOPY].close()  # BufferError if anything still views its huge page
    finally:
        errors.clear()  # so the fixture can close what this test could not


# --- destination: CONTINUE is resolved per channel ------------------------------------------
def test_destination_resolves_continue_against_its_own_channels_block(
        block: Blocks, dest: Dest) -> None:
    a = block("2M", 2, "pc.ram", tag=1)
    b = block("2M", 2, "ram1", tag=2)
    table = {n: BlockInfo(x.size, x.host_page_size) for n, x in (("pc.ram", a), ("ram1", b))}
    d = dest(table)
    per = a.per
    menc, mhead = main_head(table)
    penc, phead = post_head()
    mdec = Decoder(table, postcopy=True)
    pdec = Decoder(table, channel=ChannelKind.POSTCOPY, postcopy=True)
    main1 = mhead + piece_records(menc, a, range(0, 100))           # names pc.ram
    post = phead + piece_records(penc, b, range(per, 2 * per))      # names ram1
    main2 = piece_records(menc, a, range(100, per))                 # CONTINUE only
    word = struct.unpack(">Q", main2[:8])[0]
    assert word & 0x20  # main2 starts with a CONTINUE record
    for e in decode_all(mdec, main1):
        d.apply(PRECOPY, e)
    for e in decode_all(pdec, post):
        d.apply(POSTCOPY, e)
    later = decode_all(mdec, main2)
    assert {e.block for e in later if isinstance(e, ev.PageBatch | ev.ZeroPages)} == {"pc.ram"}
    for e in later:
        d.apply(PRECOPY, e)
    assert d.placements("pc.ram") == [(0, a.host_page_size)]
    assert d.placements("ram1") == [(b.host_page_size, b.host_page_size)]
    assert d.holds(a, 0) and d.holds(b, 1)


def test_postcopy_continue_before_any_block_named_on_that_channel_is_refused(
        block: Blocks, dest: Dest) -> None:
    blk = block("2M", 2)
    table = {BLK: BlockInfo(blk.size, blk.host_page_size)}
    d = dest(table)
    menc, mhead = main_head(table)
    for e in decode_all(Decoder(table, postcopy=True), mhead + piece_records(menc, blk, [0])):
        d.apply(PRECOPY, e)  # the main channel has named pc.ram
    _, phead = post_head()
    page = np.frombuffer(blk.view(), dtype=np.uint8)[blk.host_page_size:][:PAGE].tobytes()
    hostile = phead + struct.pack(">Q", blk.host_page_size | 0x08 | 0x20) + page
    errors = receive_postcopy_channel(hostile, table, d.channels[POSTCOPY])
    assert len(errors) == 1 and isinstance(errors[0], RemoteProtocolError)
    assert "CONTINUE" in str(errors[0])
    assert d.placements(BLK) == []


def test_destination_names_host_pages_that_never_arrived(block: Blocks, dest: Dest) -> None:
    """At the end of the stream every host page came in precopy or in postcopy; the
    destination can name the ones that did not (it fails the migration with them)."""
    blk = block("2M", 3)
    table = {BLK: BlockInfo(blk.size, blk.host_page_size)}
    d = dest(table)
    d.state.mark_precopy(BLK, np.array([0, 4096], dtype=np.uint64))  # host page 0
    penc, phead = post_head()
    pieces = piece_records(penc, blk, range(2 * blk.per, 3 * blk.per))  # host page 2
    assert receive_postcopy_channel(phead + pieces + penc.eof(), table,
                                    d.channels[POSTCOPY]) == []
    assert d.state.missing() == {BLK: (1, blk.host_page_size)}
    # Stale in precopy: must come again.
    d.state.discard(BLK, np.array([[0, blk.host_page_size]], np.uint64))
    assert d.state.missing() == {BLK: (2, 0)}


# --- source: the postcopy bandwidth limit -----------------------------------------------
def test_requests_that_cut_every_limit_pause_short_do_not_lift_the_postcopy_limit(
        block: Blocks, make: Make) -> None:
    """``max-postcopy-bandwidth`` without preemption, and a guest that keeps faulting: a
    request ends every pause of the limit after 10 ms.  Each request is served at once,
    but the migration thread sleeps the rest off before its next background piece, so
    the block's 1 MiB still takes about a second at 1 MiB/s."""
    blk = block("4K", 256)
    h = make(blk)
    switch_over(h, UrgentMode.MIGRATION, MIB, preempt=False)
    queue = RequestQueue()
    now = [0.0]

    def cut_short(seconds: float) -> None:
        now[0] += min(seconds, 0.01)
        queue.put(h.request(BLK, 0))  # page 0: sent by the first, then nothing to send

    h.sender.limiter = RateLimiter(MIB, clock=lambda: now[0], sleep=cut_short)
    h.run(queue)
    h.complete()
    h.finish()
    assert h.sender.stats.postcopy_requests > 50  # every pause was cut short
    assert now[0] >= (blk.size - 2 * PAGE) / MIB - 0.1  # one window's budget ahead
