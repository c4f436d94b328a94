"""The urgent helper processes for real, without KVM: each test starts the helper as a
process, hands it a real socket (a socketpair plays the network), real memory and, for
the fault server, a real userfaultfd, and plays the other side of the postcopy channel
with the sans-IO codecs.

The source's urgent server must answer a request with exactly the requested host page
(taken from the shared bitmap, so never twice), send zero pages as ZERO records and end
the channel on request.  The destination's fault server must turn a fault into a request
on the postcopy channel and place the answer, which wakes the faulting thread, and must
report protocol errors and its own death to the VMM.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import select
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
from conftest import helper_reads

from livemig.errors import ChannelClosedError, RemoteProtocolError
from livemig.kernel.mman import Backing, Mapping, map_guest_ram
from livemig.kernel.shared import ProcessLock
from livemig.kernel.uffd import FEATURE_THREAD_ID, Userfaultfd
from livemig.migration.channel import Channel
from livemig.migration.faultserver import FaultServer
from livemig.migration.helper import HelperServer
from livemig.migration.pagesink import read_payload
from livemig.migration.postcopy import (
    PostcopyState,
    postcopy_counters,
    postcopy_layout,
    uffd_block_states,
)
from livemig.migration.urgent import SharedBits, UrgentServer
from livemig.runtime import UrgentPriority
from livemig.units import PAGE_SIZE
from livemig.wire import events as ev
from livemig.wire.blocks import BlockInfo
from livemig.wire.channel import ChannelKind
from livemig.wire.decoder import Decoder
from livemig.wire.encoder import Encoder
from livemig.wire.returnpath import ReqPages, ReturnPathDecoder, ReturnPathEncoder

TIMEOUT = 10.0
HUGE = 2 << 20
PAGES = 64


@dataclass
class Block:
    """A RAM block as the helpers see it (a vmm RamBlock without the VM)."""

    mapping: Mapping

    @property
    def size(self) -> int:
        return self.mapping.size

    @property
    def host_page_size(self) -> int:
        return self.mapping.backing.host_page_size


def fill(mapping: Mapping, zero_pages: set[int]) -> np.ndarray:
    """Give every 4 KiB page its own bytes (zero pages stay zero); returns a copy."""
    ram = np.frombuffer(mapping.mm, dtype=np.uint8).reshape(-1, PAGE_SIZE)
    for i in range(len(ram)):
        if i not in zero_pages:
            ram[i] = (np.arange(PAGE_SIZE) + 7 * i + 1) % 251 + 1
    out = ram.copy()
    del ram
    return out


def memfd_mapping(size: int, backing: Backing) -> Mapping:
    """Shared memfd memory that claims ``backing``'s host page size (no huge pages
    need to be reserved: the helper only maps the fd and uses the size it is told)."""
    fd = os.memfd_create("test-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return Mapping(mmap.mmap(fd, size, mmap.MAP_SHARED), size, backing, fd)


class PostcopyPeer:
    """The destination end of the postcopy channel, decoding what the source sends."""

    def __init__(self, sock: socket.socket, blocks: dict[str, BlockInfo]) -> None:
        self.sock = sock
        self.dec = Decoder(blocks, channel=ChannelKind.POSTCOPY, postcopy=True)
        self.requests = ReturnPathEncoder()

    def request(self, block: str, start: int, length: int) -> None:
        self.sock.sendall(self.requests.req_pages(block, start, length))

    def next_event(self) -> ev.Event:
        deadline = time.monotonic() + TIMEOUT
        while True:
            e = self.dec.next_event()
            if e is not ev.NEED_DATA and not isinstance(e, ev.StreamStart):
                return e
            if e is ev.NEED_DATA:
                left = deadline - time.monotonic()
                assert left > 0 and select.select([self.sock], [], [], left)[0], "no data"
                self.dec.receive_data(self.sock.recv(1 << 20))

    def nothing_pending(self) -> bool:
        return not select.select([self.sock], [], [], 0.3)[0]


@pytest.fixture(scope="module")
def helpers() -> Iterator[HelperServer]:
    """The server the helpers of this module's tests are forked from."""
    server = HelperServer()
    server.start()
    yield server
    server.close()


@pytest.fixture
def source_side(helpers: HelperServer) -> Iterator[
        tuple[dict[str, Block], SharedBits, PostcopyPeer, UrgentServer, dict[str, np.ndarray]]]:
    """An urgent server for a private 4 KiB block, a (memfd) 2 MiB block and a 4K-memfd
    block."""
    blocks = {"pc.ram": Block(map_guest_ram(PAGES * PAGE_SIZE, Backing.ANON_4K)),
              "mem-huge": Block(memfd_mapping(2 * HUGE, Backing.HUGETLB_2M)),
              "mem-4k": Block(map_guest_ram(PAGES * PAGE_SIZE, Backing.MEMFD_4K, "mem-4k"))}
    content = {"pc.ram": fill(blocks["pc.ram"].mapping, {5}),
               "mem-huge": fill(blocks["mem-huge"].mapping, set(range(512, 512 + 100))),
               "mem-4k": fill(blocks["mem-4k"].mapping, {2})}
    shared = SharedBits({n: b.size // PAGE_SIZE for n, b in blocks.items()})
    for name in blocks:
        shared.bits[name][:] = True  # the migration bitmap starts all dirty
    src, dst = socket.socketpair()
    src.sendall(Encoder(channel=ChannelKind.POSTCOPY).preamble())  # the VMM's part
    server = UrgentServer(helpers)
    server.start(blocks, shared, Channel(src, name="postcopy"), (), UrgentPriority())
    peer = PostcopyPeer(dst, {n: BlockInfo(b.size, b.host_page_size) for n, b in blocks.items()})
    try:
        yield blocks, shared, peer, server, content
    finally:
        server.close()
        shared.close()
        src.close()
        dst.close()
        for b in blocks.values():
            b.mapping.close()


def assert_answered(peer: PostcopyPeer, content: dict[str, np.ndarray], block: str,
                    page: int) -> None:
    """Request one 4 KiB page: exactly that page comes back, with its contents."""
    peer.request(block, page * PAGE_SIZE, PAGE_SIZE)
    e = peer.next_event()
    assert isinstance(e, ev.PageBatch) and (e.block, e.offsets.tolist()) == (
        block, [page * PAGE_SIZE])
    assert e.data.tobytes() == content[block][page].tobytes()


def test_urgent_server_answers_a_request_with_that_page(source_side) -> None:  # type: ignore[no-untyped-def]
    blocks, shared, peer, server, content = source_side
    assert_answered(peer, content, "pc.ram", 3)
    assert not shared.bits["pc.ram"][3] and shared.bits["pc.ram"][4]
    deadline = time.monotonic() + TIMEOUT  # the counters follow the send
    while shared.counter("host_pages") < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert (shared.counter("requests"), shared.counter("host_pages")) == (1, 1)
    assert shared.counter("urgent_bytes") > PAGE_SIZE


def test_urgent_server_sends_4k_memfd_pages_from_its_mapping_of_the_memfd(source_side) -> None:  # type: ignore[no-untyped-def]
    """A 4K-memfd page comes from the helper's own mapping: /proc/PID/mem is opened
    only once a page of private RAM is asked for."""
    _, _, peer, server, content = source_side
    assert_answered(peer, content, "mem-4k", 7)
    peer.request("mem-4k", 2 * PAGE_SIZE, PAGE_SIZE)
    e = peer.next_event()
    assert isinstance(e, ev.ZeroPages) and e.offsets.tolist() == [2 * PAGE_SIZE]
    assert helper_reads(server.helper.pid, "mem-4k") == (True, False)
    assert_answered(peer, content, "pc.ram", 7)
    assert helper_reads(server.helper.pid, "mem-4k") == (True, True)


def test_urgent_server_answers_a_small_page_the_migration_thread_took(source_side) -> None:  # type: ignore[no-untyped-def]
    """The page may still be in a background piece on its way: the faulting vCPU must
    not wait for that piece."""
    _, shared, peer, _, content = source_side
    with shared.lock:
        shared.bits["pc.ram"][9] = False  # taken by the background stream meanwhile
    assert_answered(peer, content, "pc.ram", 9)


def test_urgent_server_sends_a_zero_page_as_a_zero_record(source_side) -> None:  # type: ignore[no-untyped-def]
    _, _, peer, _, _ = source_side
    peer.request("pc.ram", 5 * PAGE_SIZE, PAGE_SIZE)
    e = peer.next_event()
    assert isinstance(e, ev.ZeroPages) and e.offsets.tolist() == [5 * PAGE_SIZE]


def test_urgent_server_sends_a_huge_page_whole_from_the_memfd(source_side) -> None:  # type: ignore[no-untyped-def]
    _, shared, peer, _, content = source_side
    peer.request("mem-huge", HUGE, HUGE)
    got: dict[int, bytes] = {}
    while len(got) < 512:
        e = peer.next_event()
        assert isinstance(e, (ev.PageBatch, ev.ZeroPages, ev.PageHeader)), e
        if isinstance(e, ev.PageHeader):  # payload not buffered yet: read it in place
            slot = bytearray(PAGE_SIZE)
            read_payload(peer.dec, Channel(peer.sock), memoryview(slot))
            got[e.offset] = bytes(slot)
        elif isinstance(e, ev.ZeroPages):
            got.update((o, bytes(PAGE_SIZE)) for o in e.offsets.tolist())
        else:
            got.update((o, e.data[i].tobytes()) for i, o in enumerate(e.offsets.tolist()))
    assert sorted(got) == [HUGE + i * PAGE_SIZE for i in range(512)]
    assert all(got[HUGE + i * PAGE_SIZE] == content["mem-huge"][512 + i].tobytes()
               for i in range(512))
    assert not shared.bits["mem-huge"][512:].any() and shared.bits["mem-huge"][:512].all()


def test_urgent_server_ends_the_channel_and_reports_its_trace_counters(source_side) -> None:  # type: ignore[no-untyped-def]
    _, _, peer, server, _ = source_side
    peer.request("pc.ram", 0, PAGE_SIZE)
    assert isinstance(peer.next_event(), ev.PageBatch)
    counts = server.finish()
    assert counts == {"postcopy_preempt_send_host_page": 1}
    assert isinstance(peer.next_event(), ev.StreamEnd)


def test_urgent_server_reports_a_bad_request_as_a_protocol_error(source_side) -> None:  # type: ignore[no-untyped-def]
    _, _, peer, server, _ = source_side
    peer.request("pc.ram", PAGES * PAGE_SIZE, PAGE_SIZE)  # past the end of the block
    with pytest.raises(RemoteProtocolError, match="outside|range|beyond|past"):
        server.finish()


# --- the destination's fault server ---------------------------------------------------


class Toucher:
    """A thread that reads guest memory and blocks in a userfault until it is placed."""

    def __init__(self, addr: int, length: int) -> None:
        self.addr, self.buf = addr, ctypes.create_string_buffer(length)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        ctypes.memmove(self.buf, self.addr, len(self.buf))

    def result(self) -> bytes:
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive(), "the faulting thread was never woken"
        return self.buf.raw


@dataclass
class Dest:
    block: Block
    state: PostcopyState
    server: FaultServer
    source: socket.socket  # the source's end of the postcopy channel
    errors: list[Exception]

    def next_request(self) -> ReqPages:
        dec = ReturnPathDecoder()
        while True:
            e = dec.next_event()
            if isinstance(e, ReqPages):
                return e
            assert select.select([self.source], [], [], TIMEOUT)[0], "no request came"
            dec.receive_data(self.source.recv(4096))


@pytest.fixture
def dest_side(request: pytest.FixtureRequest, helpers: HelperServer) -> Iterator[Dest]:
    backing = getattr(request, "param", Backing.ANON_4K)
    size = 2 * HUGE
    mem = map_guest_ram(size, Backing.ANON_4K)
    block = Block(Mapping(mem.mm, size, backing, -1))  # 2M: anonymous memory, 2M pieces
    uffd = Userfaultfd.open()
    uffd.api(FEATURE_THREAD_ID)
    n = size // block.host_page_size
    shared, views = postcopy_layout({"pc.ram": n}).create("test-postcopy")
    state = PostcopyState(uffd_block_states({"pc.ram": block}, uffd, views), uffd, {},
                          lock=ProcessLock(shared.fd), counters=postcopy_counters(views))
    views.release()
    for st in state.blocks.values():
        st.placer.register()
    src, dst = socket.socketpair()
    src.sendall(Encoder(channel=ChannelKind.POSTCOPY).preamble())
    errors: list[Exception] = []
    server = FaultServer(helpers)
    server.start({"pc.ram": block}, uffd, Channel(dst, name="postcopy"), shared, {},
                 errors.append, priority=UrgentPriority())
    try:
        yield Dest(block, state, server, src, errors)
    finally:
        server.close()
        uffd.close()
        state.unshare()
        state.close()
        shared.close()
        src.close()
        dst.close()
        mem.close()


def test_fault_server_requests_a_faulting_page_and_its_answer_wakes_the_thread(
        dest_side: Dest) -> None:
    d = dest_side
    enc = Encoder(channel=ChannelKind.POSTCOPY)
    enc.preamble()
    base = d.block.mapping.host_addr
    toucher = Toucher(base + 7 * PAGE_SIZE, PAGE_SIZE)
    req = d.next_request()
    assert (req.block, req.start, req.length) == ("pc.ram", 7 * PAGE_SIZE, PAGE_SIZE)
    page = bytes(range(256)) * 16
    d.source.sendall(enc.page_header("pc.ram", 7 * PAGE_SIZE) + page)
    assert toucher.result() == page
    # The helper records the placement just after UFFDIO_COPY has woken the thread.
    deadline = time.monotonic() + TIMEOUT
    while d.state.stats.summary().count == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    summary = d.state.stats.summary()
    assert summary.count == 1 and summary.max_us > 0
    assert d.state.requests == 1 and d.state.blocks["pc.ram"].received[7]
    d.source.sendall(enc.eof())
    d.server.wait_done(TIMEOUT)
    assert d.server.pages == 1 and d.errors == []


def test_fault_server_does_not_request_a_page_twice(dest_side: Dest) -> None:
    d = dest_side
    base = d.block.mapping.host_addr
    touchers = [Toucher(base + 3 * PAGE_SIZE, 8) for _ in range(3)]
    req = d.next_request()
    assert req.start == 3 * PAGE_SIZE
    assert not select.select([d.source], [], [], 0.3)[0], "a second request was sent"
    enc = Encoder(channel=ChannelKind.POSTCOPY)
    enc.preamble()
    d.source.sendall(enc.page_header("pc.ram", 3 * PAGE_SIZE, zero=True))
    assert all(t.result() == bytes(8) for t in touchers)


@pytest.mark.parametrize("dest_side", [Backing.HUGETLB_2M], indirect=True)
def test_fault_server_reports_a_split_huge_page_and_places_nothing(dest_side: Dest) -> None:
    d = dest_side
    enc = Encoder(channel=ChannelKind.POSTCOPY)
    enc.preamble()
    page = bytes(PAGE_SIZE)
    # Half of huge page 0, then a piece of huge page 1: the sender split huge page 0.
    d.source.sendall(b"".join(enc.page_header("pc.ram", i * PAGE_SIZE) + page
                              for i in range(256)))
    d.source.sendall(enc.page_header("pc.ram", HUGE) + page)
    with pytest.raises(RemoteProtocolError, match="split"):
        d.server.wait_done(TIMEOUT)
    assert len(d.errors) == 1 and isinstance(d.errors[0], RemoteProtocolError)
    assert not d.state.blocks["pc.ram"].received.any()


def test_fault_server_death_is_reported_to_the_vmm(dest_side: Dest) -> None:
    d = dest_side
    os.kill(d.server.helper.pid, signal.SIGKILL)
    with pytest.raises(ChannelClosedError):
        d.server.wait_done(TIMEOUT)
    assert len(d.errors) == 1


def test_urgent_server_reports_a_destination_that_closed_the_channel(source_side) -> None:  # type: ignore[no-untyped-def]
    _, _, peer, server, _ = source_side
    peer.sock.shutdown(socket.SHUT_RDWR)
    with pytest.raises(ChannelClosedError, match="closed the postcopy channel"):
        server.finish()
