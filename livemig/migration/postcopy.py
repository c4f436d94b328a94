"""Destination side of postcopy: atomic placement, the fault thread, latency statistics.

Theory of operation
-------------------
At POSTCOPY_LISTEN guest RAM is registered with a userfaultfd (missing mode).  From
then on a page must never be written in place: a vCPU could see half of it.  Instead:

* :class:`ChannelPlacer` (one per receiving channel) takes the page events the decoder
  yields.  A 4 KiB host page is placed directly from the received bytes with
  ``UFFDIO_COPY``; a huge page is first assembled in that channel's *temporary huge
  page* and placed only when all of its 4 KiB pieces have arrived.  Pieces must arrive
  in order, on one channel: anything else is a protocol error (a huge page split across
  channels could otherwise be placed half-stale).
* :class:`FaultThread` reads userfaultfd events in batches.  For each faulting host page
  it skips pages already placed or already requested, and sends one REQ_PAGES on the
  return path.  A page that was received in precopy, not discarded, and still faults
  was a zero page we never wrote (so it stayed unallocated): it is placed as zeroes
  locally instead of being requested.
* :class:`PostcopyState` is what both share, under one lock: per-block ``received`` and
  ``precopy_present`` flags per host page, the request times, and the statistics.

Latency is measured from the moment the fault thread reads the fault to the moment the
page is placed (which wakes the vCPU); blocktime sums it for faults raised by vCPUs.
"""

from __future__ import annotations

import logging
import mmap
import os
import select
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from livemig.errors import RemoteProtocolError
from livemig.kernel.mman import PAGE_SIZE
from livemig.kernel.placement import PagePlacer
from livemig.kernel.uffd import Userfaultfd
from livemig.vmm.memory import RamBlock
from livemig.wire import events as ev

log = logging.getLogger("livemig.postcopy")

LATENCY_BUCKETS = 24


@dataclass(frozen=True)
class LatencySummary:
    count: int
    mean_ns: int
    p50_us: float
    p90_us: float
    p99_us: float
    max_us: float
    dist: tuple[int, ...]  # power-of-two microsecond buckets


class LatencyStats:
    """Fault-to-placement latencies (ns) and vCPU blocktime."""

    def __init__(self) -> None:
        self.samples: list[int] = []
        self.vcpu_blocktime_ns: dict[int, int] = {}

    def record(self, latency_ns: int, vcpu: int | None) -> None:
        self.samples.append(latency_ns)
        if vcpu is not None:
            self.vcpu_blocktime_ns[vcpu] = self.vcpu_blocktime_ns.get(vcpu, 0) + latency_ns

    def summary(self) -> LatencySummary:
        if not self.samples:
            return LatencySummary(0, 0, 0.0, 0.0, 0.0, 0.0, (0,) * LATENCY_BUCKETS)
        ns = np.asarray(self.samples, dtype=np.int64)
        us = ns / 1000.0
        p50, p90, p99 = np.percentile(us, [50, 90, 99])
        buckets = np.clip(np.floor(np.log2(np.maximum(us, 1.0))), 0, LATENCY_BUCKETS - 1)
        dist = np.bincount(buckets.astype(np.int64), minlength=LATENCY_BUCKETS)
        return LatencySummary(len(ns), int(ns.mean()), float(p50), float(p90), float(p99),
                              float(us.max()), tuple(int(x) for x in dist))

    def to_qmp(self, nvcpus: int) -> dict[str, object]:
        s = self.summary()
        per_vcpu = [self.vcpu_blocktime_ns.get(i, 0) // 1_000_000 for i in range(nvcpus)]
        return {
            "postcopy-blocktime": sum(self.vcpu_blocktime_ns.values()) // 1_000_000,
            "postcopy-vcpu-blocktime": per_vcpu,
            "postcopy-latency": s.mean_ns,
            "postcopy-latency-dist": list(s.dist),
            "x-postcopy-latency-percentiles": {
                "p50": round(s.p50_us, 1), "p90": round(s.p90_us, 1),
                "p99": round(s.p99_us, 1), "max": round(s.max_us, 1), "count": s.count},
        }


class Placer(Protocol):
    """Where a block's pages are placed: PagePlacer (userfaultfd) in livemig; a plain
    buffer in protocol tests (1 GiB pages cannot be reserved on a test machine)."""

    def register(self) -> None: ...
    def unregister(self) -> None: ...
    def offset_of(self, address: int) -> int: ...
    def copy(self, offset: int, src: npt.NDArray[np.uint8] | mmap.mmap | bytearray,
             length: int) -> bool: ...
    def copy_prefix(self, offset: int, src: npt.NDArray[np.uint8], length: int) -> int: ...
    def zero(self, offset: int, length: int) -> bool: ...
    def discard(self, offset: int, length: int) -> None: ...


class BlockState:
    """Per-block postcopy bookkeeping, one entry per host page."""

    def __init__(self, name: str, size: int, host_page: int, placer: Placer) -> None:
        self.name = name
        self.host_page = host_page
        n = size // self.host_page
        self.received = np.zeros(n, dtype=np.bool_)
        self.precopy_present = np.zeros(n, dtype=np.bool_)
        self.requested: dict[int, tuple[int, int | None]] = {}  # hp -> (fault ns, vCPU)
        self.placer = placer


def uffd_block_states(blocks: Mapping[str, RamBlock],
                      uffd: Userfaultfd) -> dict[str, BlockState]:
    """Block states that place through ``uffd`` into the VM's guest RAM."""
    return {name: BlockState(name, b.size, b.host_page_size, PagePlacer(uffd, b.mapping))
            for name, b in blocks.items()}


class PostcopyState:
    """What the fault thread and every channel placer share (see module docstring)."""

    def __init__(self, blocks: Mapping[str, BlockState], uffd: Userfaultfd | None,
                 vcpu_tids: Mapping[int, int]) -> None:
        self.uffd = uffd
        self.blocks = dict(blocks)
        self.lock = threading.Lock()
        self.stats = LatencyStats()
        self.vcpu_of_tid = {tid: i for i, tid in vcpu_tids.items()}
        # Huge pages being assembled, and by which channel: one may never be split.
        self.assembling: dict[tuple[str, int], str] = {}
        self.placed = 0
        self.zero_filled = 0
        self.requests = 0
        self._zero_page = mmap.mmap(-1, max(b.host_page for b in self.blocks.values()))

    # --- precopy bookkeeping ----------------------------------------------------------
    def mark_precopy(self, name: str, offsets: npt.NDArray[np.uint64]) -> None:
        st = self.blocks[name]
        st.precopy_present[offsets // st.host_page] = True

    def discard(self, name: str, start: int, length: int) -> None:
        st = self.blocks[name]
        first, last = start // st.host_page, (start + length - 1) // st.host_page
        st.placer.discard(first * st.host_page, (last - first + 1) * st.host_page)
        st.precopy_present[first : last + 1] = False

    # --- placement ----------------------------------------------------------------------
    def place(self, st: BlockState, offset: int, src: npt.NDArray[np.uint8] | mmap.mmap
              ) -> None:
        """Place one whole host page and account for a request it answers."""
        hp = offset // st.host_page
        st.placer.copy(offset, src, st.host_page)  # False = already there: fine
        self._placed(st, hp)

    def place_run(self, st: BlockState, offset: int, data: npt.NDArray[np.uint8]) -> None:
        """Place consecutive 4 KiB pages (rows of ``data``) with as few UFFDIO_COPYs as
        possible: one for the whole run, then page by page past any page that was
        already there (the kernel stops at the first one)."""
        n = len(data)
        buf = np.ascontiguousarray(data)
        done = st.placer.copy_prefix(offset, buf, n * PAGE_SIZE) // PAGE_SIZE
        for i in range(done + 1, n):  # page `done` exists; try the rest one by one
            st.placer.copy(offset + i * PAGE_SIZE, buf[i], PAGE_SIZE)
        first = offset // PAGE_SIZE
        now = time.monotonic_ns()
        with self.lock:
            st.received[first : first + n] = True
            self.placed += n
            answered = [hp for hp in st.requested if first <= hp < first + n]
            asked = [st.requested.pop(hp) for hp in answered]
        for t_ns, vcpu in asked:
            self.stats.record(now - t_ns, vcpu)

    def placed_zero(self, st: BlockState, hp: int) -> None:
        """A 4 KiB zero page was placed with UFFDIO_ZEROPAGE."""
        self._placed(st, hp)

    def _placed(self, st: BlockState, hp: int) -> None:
        now = time.monotonic_ns()
        with self.lock:
            st.received[hp] = True
            self.placed += 1
            asked = st.requested.pop(hp, None)
        if asked is not None:
            self.stats.record(now - asked[0], asked[1])

    # --- faults ---------------------------------------------------------------------------
    def locate(self, address: int) -> tuple[BlockState, int] | None:
        for st in self.blocks.values():
            off = st.placer.offset_of(address)
            if off >= 0:
                return st, off - off % st.host_page
        return None

    def on_fault(self, address: int, tid: int, now_ns: int,
                 request: Callable[[str, int, int], None]) -> None:
        found = self.locate(address)
        if found is None:
            log.error("fault outside guest RAM at %#x", address)
            return
        st, offset = found
        hp = offset // st.host_page
        with self.lock:
            if st.received[hp] or hp in st.requested:
                return
            zero_fill = bool(st.precopy_present[hp])
            st.requested[hp] = (now_ns, self.vcpu_of_tid.get(tid))
            if not zero_fill:
                self.requests += 1
        if zero_fill:
            self.zero_filled += 1
            self.place(st, offset, self._zero_page)
        else:
            request(st.name, offset, st.host_page)

    def close(self) -> None:
        self._zero_page.close()


class ChannelPlacer:
    """Places the pages arriving on one channel; owns that channel's temporary huge page."""

    def __init__(self, state: PostcopyState, channel: str) -> None:
        self.state = state
        self.channel = channel
        self._tmp: dict[str, npt.NDArray[np.uint8]] = {}
        self._tmp_maps: list[mmap.mmap] = []
        # block -> (offset of the huge page being assembled, which pieces arrived)
        self._cur: dict[str, tuple[int, npt.NDArray[np.bool_]]] = {}
        self.pages = 0

    def _tmp_page(self, st: BlockState) -> npt.NDArray[np.uint8]:
        buf = self._tmp.get(st.name)
        if buf is None:
            m = mmap.mmap(-1, st.host_page)
            self._tmp_maps.append(m)
            buf = np.frombuffer(m, dtype=np.uint8).reshape(-1, PAGE_SIZE)
            self._tmp[st.name] = buf
        return buf

    def pending(self) -> list[tuple[str, int]]:
        """Huge pages this channel has started but not finished (block, offset)."""
        return [(name, off) for name, (off, _got) in self._cur.items()]

    def _pieces(self, st: BlockState, offsets: list[int]) -> int:
        """Record pieces of this channel's current huge page; returns the host page offset.

        Pieces of one huge page may come in any order (zero pages are batched apart from
        the others) but all on this channel and each once; a piece of another huge page
        before the current one is complete means the sender split a huge page.
        """
        hp_off = offsets[0] - offsets[0] % st.host_page
        cur = self._cur.get(st.name)
        if cur is None:
            self._claim(st, hp_off)
            cur = (hp_off, np.zeros(st.host_page // PAGE_SIZE, dtype=np.bool_))
            self._cur[st.name] = cur
        if cur[0] != hp_off or offsets[-1] - hp_off >= st.host_page:
            raise RemoteProtocolError(
                f"{self.channel} channel: got {st.name}@{offsets[0]:#x} while huge page "
                f"{cur[0]:#x} has {int(cur[1].sum())} of {len(cur[1])} pieces "
                "(a huge page split across channels?)")
        idx = (np.asarray(offsets, dtype=np.int64) - hp_off) // PAGE_SIZE
        if cur[1][idx].any():
            raise RemoteProtocolError(f"{self.channel} channel: piece of {st.name}@"
                                      f"{hp_off:#x} sent twice")
        cur[1][idx] = True
        return hp_off

    def _claim(self, st: BlockState, hp_off: int) -> None:
        """Start assembling a huge page on this channel; refuse one already started or
        placed through another channel."""
        key = (st.name, hp_off)
        with self.state.lock:
            owner = self.state.assembling.get(key)
            if owner is not None and owner != self.channel:
                raise RemoteProtocolError(
                    f"huge page {st.name}@{hp_off:#x} arrives on the {self.channel} channel "
                    f"while the {owner} channel is assembling it: a split huge page")
            if st.received[hp_off // st.host_page]:
                raise RemoteProtocolError(
                    f"huge page {st.name}@{hp_off:#x} was already placed; the "
                    f"{self.channel} channel sent it again")
            self.state.assembling[key] = self.channel

    def _complete_if_full(self, st: BlockState) -> None:
        hp_off, got = self._cur[st.name]
        if got.all():
            del self._cur[st.name]
            self.state.place(st, hp_off, self._tmp_page(st))
            with self.state.lock:
                self.state.assembling.pop((st.name, hp_off), None)

    def _huge_run(self, st: BlockState, offs: list[int], i: int) -> int:
        """How many of ``offs[i:]`` belong to the same huge page as ``offs[i]``."""
        start = offs[i] - offs[i] % st.host_page
        end = start + st.host_page
        n = i
        while n < len(offs) and start <= offs[n] < end:
            n += 1
        return n - i

    def _fill_huge(self, st: BlockState, offsets: npt.NDArray[np.uint64],
                   data: npt.NDArray[np.uint8] | None) -> None:
        """Copy pieces (``data`` rows, or zeroes) into the temporary huge page, one
        huge page's run at a time, placing each huge page as it completes."""
        offs = offsets.tolist()
        i = 0
        while i < len(offs):
            run = self._huge_run(st, offs, i)
            hp_off = self._pieces(st, offs[i : i + run])
            rows = (offsets[i : i + run] - np.uint64(hp_off)) // np.uint64(PAGE_SIZE)
            self._tmp_page(st)[rows] = 0 if data is None else data[i : i + run]
            self._complete_if_full(st)
            i += run

    def batch(self, e: ev.PageBatch) -> None:
        st = self.state.blocks[e.block]
        self.pages += len(e.offsets)
        if st.host_page == PAGE_SIZE:
            # Background pages come in runs of consecutive offsets: one ioctl a run.
            breaks = np.flatnonzero(np.diff(e.offsets) != PAGE_SIZE) + 1
            starts = [0, *breaks.tolist()]
            ends = [*breaks.tolist(), len(e.offsets)]
            for a, b in zip(starts, ends, strict=True):
                self.state.place_run(st, int(e.offsets[a]), e.data[a:b])
            return
        self._fill_huge(st, e.offsets, e.data)

    def zeros(self, e: ev.ZeroPages) -> None:
        st = self.state.blocks[e.block]
        self.pages += len(e.offsets)
        offs = e.offsets.tolist()
        if st.host_page == PAGE_SIZE:
            for off in offs:
                st.placer.zero(off, PAGE_SIZE)
                self.state.placed_zero(st, off // PAGE_SIZE)
            return
        self._fill_huge(st, e.offsets, None)

    def single_slot(self, e: ev.PageHeader) -> memoryview:
        """Where a single page's payload is read to (then :meth:`single_done`)."""
        st = self.state.blocks[e.block]
        if st.host_page == PAGE_SIZE:
            return memoryview(self._tmp_page(st)[0]).cast("B")
        hp_off = self._pieces(st, [e.offset])
        return memoryview(self._tmp_page(st)[(e.offset - hp_off) // PAGE_SIZE]).cast("B")

    def single_done(self, e: ev.PageHeader) -> None:
        st = self.state.blocks[e.block]
        self.pages += 1
        if st.host_page == PAGE_SIZE:
            self.state.place(st, e.offset, self._tmp_page(st)[0])
        else:
            self._complete_if_full(st)

    def close(self) -> None:
        self._tmp.clear()
        for m in self._tmp_maps:
            m.close()


class FaultThread:
    """Reads userfaultfd events and turns them into page requests (see module doc)."""

    def __init__(self, state: PostcopyState, request: Callable[[str, int, int], None],
                 on_error: Callable[[Exception], None]) -> None:
        self.state = state
        self._request = request
        self._on_error = on_error
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name="postcopy/fault", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join(10)
        os.close(self._stop_r)
        os.close(self._stop_w)

    def _run(self) -> None:
        uffd = self.state.uffd
        assert uffd is not None
        try:
            while True:
                ready, _, _ = select.select([uffd.fileno(), self._stop_r], [], [])
                if self._stop_r in ready:
                    return
                now = time.monotonic_ns()
                for fault in uffd.read_events():
                    self.state.on_fault(fault.address, fault.thread_id, now, self._request)
        except Exception as e:  # the destination fails the migration
            self._on_error(e)
