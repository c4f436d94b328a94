"""Destination side of postcopy: atomic placement, the fault thread, latency statistics.

Theory of operation
-------------------
At POSTCOPY_LISTEN guest RAM is registered with a userfaultfd (missing mode).  From
then on a page must never be written in place: a vCPU could see half of it.  Instead:

* :class:`ChannelPlacer` (one per receiving channel) takes the page events the decoder
  yields.  4 KiB host pages are placed with one ``UFFDIO_COPY`` per run of consecutive
  pages (a page alone straight from the received bytes), the calls for a whole batch
  in one loop in ``kernel/placement.py``: late in a migration the pages left are
  scattered, and the Python work per run, not the kernel's, sets the pace.  A huge page is
  first assembled in that channel's *temporary huge page* and placed only when all of
  its 4 KiB pieces have arrived.  Pieces must arrive in order, on one channel: anything
  else is a protocol error (a huge page split across channels could otherwise be
  placed half-stale).
* :class:`FaultThread` reads userfaultfd events in batches.  For each faulting host page
  it skips pages already placed or already requested, and sends one REQ_PAGES on the
  return path.  A page that was received in precopy, not discarded, and still faults
  was a zero page we never wrote (so it stayed unallocated): it is placed as zeroes
  locally instead of being requested.
* :class:`PostcopyState` is what both share: per host page ``received`` and
  ``precopy_present`` flags, fault and placement times, the vCPU that faulted, the
  channel assembling a huge page (:class:`PageArrays`).  Each field has one writer per
  page, so only the huge-page ownership needs the lock.  With the fault server
  (faultserver.py) the arrays live in memory shared with that process.

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
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from livemig.errors import RemoteProtocolError
from livemig.kernel.placement import PagePlacer
from livemig.kernel.shared import (
    Counters,
    Field,
    SharedLayout,
    SharedViews,
    counters_field,
    grouped,
)
from livemig.kernel.uffd import Userfaultfd
from livemig.migration.channel import Channel
from livemig.migration.handshake import SizedBlock
from livemig.migration.pagesink import dispatch_page_event, read_payload
from livemig.runtime import NamedThread, UrgentPriority
from livemig.units import PAGE_SIZE
from livemig.vmm.memory import RamBlock
from livemig.wire import events as ev
from livemig.wire.blocks import BlockInfo
from livemig.wire.channel import ChannelKind
from livemig.wire.decoder import Decoder

log = logging.getLogger("livemig.postcopy")

LATENCY_BUCKETS = 24
RECV_CHUNK = 4 << 20


@dataclass(frozen=True)
class LatencySummary:
    count: int
    mean_ns: int
    p50_us: float
    p90_us: float
    p99_us: float
    max_us: float
    dist: tuple[int, ...]  # power-of-two microsecond buckets


class PageArrays:
    """Per host page of one block: what the placers and the fault handler share.

    Plain NumPy arrays, either private or laid over a :class:`SharedMemory` that a
    helper process maps too (``x-postcopy-urgent-sender=process``).  Times are
    ``CLOCK_MONOTONIC`` nanoseconds, which every process on the host shares.
    """

    FIELDS: tuple[tuple[str, type[np.generic]], ...] = (
        ("fault_ns", np.int64),      # the first fault on the page was read (0: none)
        ("placed_ns", np.int64),     # the page was placed (0: not yet)
        ("fault_vcpu", np.int16),    # 1 + the vCPU that faulted (0: none / not a vCPU)
        ("received", np.bool_),
        ("precopy_present", np.bool_),
        ("owner", np.int8),          # the channel assembling this huge page (0: none)
    )

    def __init__(self, arrays: Mapping[str, npt.NDArray[Any]]) -> None:
        self.fault_ns: npt.NDArray[np.int64] = arrays["fault_ns"]
        self.placed_ns: npt.NDArray[np.int64] = arrays["placed_ns"]
        self.fault_vcpu: npt.NDArray[np.int16] = arrays["fault_vcpu"]
        self.received: npt.NDArray[np.bool_] = arrays["received"]
        self.precopy_present: npt.NDArray[np.bool_] = arrays["precopy_present"]
        self.owner: npt.NDArray[np.int8] = arrays["owner"]

    @classmethod
    def fields(cls, n: int) -> list[Field]:
        """The arrays of a block of ``n`` host pages, for a :class:`SharedLayout`."""
        return [Field.of(name, t, n) for name, t in cls.FIELDS]

    @classmethod
    def private(cls, n: int) -> PageArrays:
        return cls(SharedLayout(cls.fields(n)).private())

    def copy(self) -> PageArrays:
        return PageArrays({name: getattr(self, name).copy() for name, _ in self.FIELDS})


# Written by the fault handler only (one thread or the fault server), so without a lock.
COUNTERS = ("zero_filled", "requests")
_COUNTERS_FIELD = "counters"


def postcopy_layout(host_pages: Mapping[str, int]) -> SharedLayout:
    """The postcopy state of blocks of so many host pages in one buffer: the counters,
    then each block's :class:`PageArrays` (grouped under the block's name)."""
    return SharedLayout([counters_field(_COUNTERS_FIELD, COUNTERS),
                         *(f for name, n in host_pages.items()
                           for f in grouped(name, PageArrays.fields(n)))])


def host_pages(blocks: Mapping[str, SizedBlock]) -> dict[str, int]:
    return {n: b.size // b.host_page_size for n, b in blocks.items()}


def _private_counters() -> Counters:
    return SharedLayout([counters_field(_COUNTERS_FIELD, COUNTERS)]).private().counters(
        _COUNTERS_FIELD)


class BlockState:
    """Per-block postcopy bookkeeping, one entry per host page."""

    def __init__(self, name: str, size: int, host_page: int, placer: Placer,
                 arrays: PageArrays | None = None) -> None:
        self.name = name
        self.host_page = host_page
        self.pages = size // self.host_page
        self.arrays = arrays or PageArrays.private(self.pages)
        self.received = self.arrays.received
        self.precopy_present = self.arrays.precopy_present
        self.placer = placer


def uffd_block_states(blocks: Mapping[str, RamBlock], uffd: Userfaultfd,
                      views: SharedViews) -> dict[str, BlockState]:
    """Block states that place through ``uffd`` into the VM's guest RAM, their arrays
    in ``views`` (of :func:`postcopy_layout`, private or shared)."""
    return {name: BlockState(name, b.size, b.host_page_size, PagePlacer(uffd, b.mapping),
                             PageArrays(views.group(name)))
            for name, b in blocks.items()}


def postcopy_counters(views: SharedViews) -> Counters:
    """The counters of a :func:`postcopy_layout`."""
    return views.counters(_COUNTERS_FIELD)


class LatencyStats:
    """Fault-to-placement latencies and vCPU blocktime, from the page arrays."""

    def __init__(self, blocks: Mapping[str, BlockState]) -> None:
        self._blocks = blocks

    def _samples(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int16],
                                npt.NDArray[np.int64]]:
        """Latencies, the vCPU that faulted, and when the fault was read."""
        lat, vcpu, at = [], [], []
        for st in self._blocks.values():
            a = st.arrays
            done = np.flatnonzero((a.fault_ns > 0) & (a.placed_ns > 0))
            # A fault read just after its page was placed waited for nothing.
            lat.append(np.maximum(a.placed_ns[done] - a.fault_ns[done], 0))
            vcpu.append(a.fault_vcpu[done])
            at.append(a.fault_ns[done])
        return (np.concatenate(lat) if lat else np.zeros(0, np.int64),
                np.concatenate(vcpu) if vcpu else np.zeros(0, np.int16),
                np.concatenate(at) if at else np.zeros(0, np.int64))

    def samples_ns(self, since_ns: int) -> tuple[list[int], list[int]]:
        """Every fault-to-placement latency so far (ns), for exact distributions, and
        when each fault was read (ns after ``since_ns``, the start of postcopy): where
        in the postcopy phase the slow requests were."""
        lat, _, at = self._samples()
        return [int(x) for x in lat], [int(x) for x in at - since_ns]

    def slow_pages(self, min_ns: int) -> list[dict[str, Any]]:
        """The requests that waited at least ``min_ns``: block, offset, and when the
        fault was read and the page placed (CLOCK_MONOTONIC ns, the clock of the
        source's trace events on the same host: a slow request can be split at the
        moment the source sent its page)."""
        out: list[dict[str, Any]] = []
        for name, st in self._blocks.items():
            a = st.arrays
            slow = np.flatnonzero((a.fault_ns > 0) & (a.placed_ns > 0)
                                  & (a.placed_ns - a.fault_ns >= min_ns))
            out += [{"block": name, "offset": int(i) * st.host_page,
                     "fault-ns": int(a.fault_ns[i]), "placed-ns": int(a.placed_ns[i])}
                    for i in slow.tolist()]
        return out

    def summary(self) -> LatencySummary:
        ns, _, _ = self._samples()
        if not len(ns):
            return LatencySummary(0, 0, 0.0, 0.0, 0.0, 0.0, (0,) * LATENCY_BUCKETS)
        us = ns / 1000.0
        p50, p90, p99 = np.percentile(us, [50, 90, 99])
        buckets = np.clip(np.floor(np.log2(np.maximum(us, 1.0))), 0, LATENCY_BUCKETS - 1)
        dist = np.bincount(buckets.astype(np.int64), minlength=LATENCY_BUCKETS)
        return LatencySummary(len(ns), int(ns.mean()), float(p50), float(p90), float(p99),
                              float(us.max()), tuple(int(x) for x in dist))

    def to_qmp(self, nvcpus: int) -> dict[str, object]:
        s = self.summary()
        ns, vcpu, _ = self._samples()
        per = np.bincount(vcpu.astype(np.int64), weights=ns, minlength=nvcpus + 1)
        per_vcpu = [int(per[i + 1]) // 1_000_000 for i in range(nvcpus)]
        faults = np.bincount(vcpu.astype(np.int64), minlength=nvcpus + 1)
        # QEMU 10's postcopy-vcpu-latency: each vCPU's mean wait for a page (ns).
        vcpu_latency = [int(per[i + 1] // faults[i + 1]) if faults[i + 1] else 0
                        for i in range(nvcpus)]
        return {
            "postcopy-blocktime": sum(per_vcpu),
            "postcopy-vcpu-blocktime": per_vcpu,
            "postcopy-vcpu-latency": vcpu_latency,
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
    def copy_runs(self, offsets: npt.NDArray[np.uint64], lengths: npt.NDArray[np.int64],
                  rows: npt.NDArray[np.uint8]) -> npt.NDArray[np.int64]: ...
    def zero_runs(self, offsets: npt.NDArray[np.uint64],
                  lengths: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]: ...
    def discard(self, ranges: npt.NDArray[np.uint64]) -> None: ...


class StateLock(Protocol):
    def __enter__(self) -> object: ...
    def __exit__(self, *exc: Any) -> Any: ...


# Channel numbers in PageArrays.owner.
CHANNEL_IDS = {"main": 1, "postcopy": 2}


class PostcopyState:
    """What the fault handler and every channel placer share (see module docstring).

    When the arrays and ``counters`` live in memory a helper process maps too, ``lock``
    must exclude that process as well (a ProcessLock)."""

    def __init__(self, blocks: Mapping[str, BlockState], uffd: Userfaultfd | None,
                 vcpu_tids: Mapping[int, int], *, lock: StateLock | None = None,
                 counters: Counters | None = None) -> None:
        self.uffd = uffd
        self.blocks = dict(blocks)
        self.lock: StateLock = lock or threading.Lock()
        self.stats = LatencyStats(self.blocks)
        self.vcpu_of_tid = {tid: i for i, tid in vcpu_tids.items()}
        self.counters = counters or _private_counters()
        self._zero_page = mmap.mmap(-1, max(b.host_page for b in self.blocks.values()))

    def unshare(self) -> None:
        """Copy the arrays and counters into private memory (the shared memory is about
        to go; the statistics must outlive it)."""
        for st in self.blocks.values():
            st.arrays = st.arrays.copy()
            st.received, st.precopy_present = st.arrays.received, st.arrays.precopy_present
        private = _private_counters()
        for name, value in self.counters.as_dict().items():
            private.add(name, value)
        self.counters = private
        self.lock = threading.Lock()

    @property
    def placed(self) -> int:
        return sum(int(np.count_nonzero(st.received)) for st in self.blocks.values())

    @property
    def zero_filled(self) -> int:
        return self.counters["zero_filled"]

    @property
    def requests(self) -> int:
        return self.counters["requests"]

    def missing(self) -> dict[str, tuple[int, int]]:
        """Host pages that came neither in precopy nor in postcopy, per block: (how
        many, offset of the first).  At the end of the stream there must be none."""
        return self._gaps({name: ~(st.received | st.precopy_present)
                           for name, st in self.blocks.items()})

    def lost(self, mapped: Mapping[str, npt.NDArray[np.bool_]]) -> dict[str, tuple[int, int]]:
        """Host pages recorded as placed that the kernel does not have, per block (of
        those in ``mapped``: which host pages are in memory): (how many, offset of the
        first).  A placement the kernel answered "already there" without a page there
        (no huge page could be allocated) shows here, instead of as a zero page or a
        SIGBUS once userfaultfd is gone."""
        return self._gaps({name: self.blocks[name].received & ~here
                           for name, here in mapped.items()})

    def _gaps(self, absent: Mapping[str, npt.NDArray[np.bool_]]) -> dict[str, tuple[int, int]]:
        out = {}
        for name, gaps in absent.items():
            idx = np.flatnonzero(gaps)
            if len(idx):
                out[name] = (len(idx), int(idx[0]) * self.blocks[name].host_page)
        return out

    # --- recovery ------------------------------------------------------------------------
    def received_pages(self, name: str) -> npt.NDArray[np.bool_]:
        """One bool per 4 KiB page of block ``name``: here (placed in postcopy, or
        loaded in precopy and not discarded since), for MIG_RP_MSG_RECV_BITMAP."""
        st = self.blocks[name]
        here = st.received | st.precopy_present
        return np.repeat(here, st.host_page // PAGE_SIZE)

    def pending_requests(self) -> list[tuple[str, int, int]]:
        """Host pages asked for and not placed yet (block, offset, length): after a
        recovery they are asked for again (the old request may have been lost)."""
        out = []
        for name, st in self.blocks.items():
            for hp in np.flatnonzero((st.arrays.fault_ns > 0) & ~st.received).tolist():
                out.append((name, hp * st.host_page, st.host_page))
        return out

    def rerequest(self, request: Callable[[str, int, int], None]) -> int:
        """Ask again for every pending page; returns how many."""
        pending = self.pending_requests()
        for block, offset, length in pending:
            request(block, offset, length)
        return len(pending)

    def release_owner(self, channel: str) -> None:
        """Forget the huge pages ``channel`` was assembling (its connection is gone;
        they will be sent again whole)."""
        cid = CHANNEL_IDS[channel]
        with self.lock:
            for st in self.blocks.values():
                st.arrays.owner[st.arrays.owner == cid] = 0

    # --- precopy bookkeeping ----------------------------------------------------------
    def mark_precopy(self, name: str, offsets: npt.NDArray[np.uint64]) -> None:
        st = self.blocks[name]
        st.precopy_present[offsets // st.host_page] = True

    def discard(self, name: str, ranges: npt.NDArray[np.uint64]) -> None:
        """Drop the whole host pages under the (start, length) byte rows of
        ``ranges`` (checked against the block by the decoder) in one step."""
        st = self.blocks[name]
        hp = np.uint64(st.host_page)
        first = ranges[:, 0] // hp
        end = (ranges[:, 0] + ranges[:, 1] + hp - np.uint64(1)) // hp
        st.placer.discard(np.stack([first * hp, (end - first) * hp], axis=1))
        # Host pages in any [first, end): a running count of range starts and ends.
        edges = np.zeros(st.pages + 1, dtype=np.int32)
        np.add.at(edges, first.astype(np.int64), 1)
        np.add.at(edges, end.astype(np.int64), -1)
        st.precopy_present[np.cumsum(edges[:-1]) > 0] = False

    # --- placement ----------------------------------------------------------------------
    def place(self, st: BlockState, offset: int, src: npt.NDArray[np.uint8] | mmap.mmap
              ) -> None:
        """Place one whole host page and account for a request it answers."""
        st.placer.copy(offset, src, st.host_page)  # False = already there: fine
        self._mark_placed(st, np.array([offset // st.host_page], dtype=np.intp))

    def place_pages(self, st: BlockState, offsets: npt.NDArray[np.uint64],
                    data: npt.NDArray[np.uint8] | None) -> None:
        """Place 4 KiB pages (rows of ``data``, or zero pages) at ``offsets``, however
        scattered: one UFFDIO_COPY or UFFDIO_ZEROPAGE per run of consecutive pages,
        then one per page past any page that was already there (the kernel stops at
        it; someone else placed it)."""
        first, n = _runs(offsets)
        pages = st.placer.zero_runs(offsets[first], n) if data is None else \
            st.placer.copy_runs(offsets[first], n, data)
        short = np.flatnonzero(pages < n)
        if len(short):  # page first+pages exists: try the rest of such runs one by one
            rest = np.concatenate([np.arange(first[i] + pages[i] + 1, first[i] + n[i])
                                   for i in short.tolist()])
            if len(rest):
                ones = np.ones(len(rest), dtype=np.int64)
                if data is None:
                    st.placer.zero_runs(offsets[rest], ones)
                else:
                    st.placer.copy_runs(offsets[rest], ones, data[rest])
        self._mark_placed(st, (offsets // np.uint64(PAGE_SIZE)).astype(np.intp))

    def _mark_placed(self, st: BlockState, pages: npt.NDArray[np.intp]) -> None:
        """Record placed host pages.  No lock: each element is written by whoever
        placed that page (twice at worst, for a page sent on both channels)."""
        now = time.monotonic_ns()
        st.received[pages] = True  # first: a placement seen is a page kept
        placed = st.arrays.placed_ns[pages]
        st.arrays.placed_ns[pages] = np.where(placed == 0, now, placed)  # the first answers a fault

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
        a = st.arrays
        # No lock: only the fault handler writes fault_ns and these counters.  A page
        # placed while we look may still be requested; the source then finds it sent
        # already, and the latency recorded is (about) zero, which it was.
        if st.received[hp] or a.fault_ns[hp]:
            return  # placed, or already asked for
        zero_fill = bool(st.precopy_present[hp])
        a.fault_ns[hp] = now_ns
        a.fault_vcpu[hp] = self.vcpu_of_tid.get(tid, -1) + 1
        self.counters.add("zero_filled" if zero_fill else "requests")
        if zero_fill:
            self.place(st, offset, self._zero_page)
        else:
            request(st.name, offset, st.host_page)

    def close(self) -> None:
        self._zero_page.close()


def _runs(offsets: npt.NDArray[np.uint64]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Runs of consecutive pages in ``offsets``: the index of each run's first page,
    and its length in pages."""
    first = np.flatnonzero(np.diff(offsets) != PAGE_SIZE) + 1
    first = np.concatenate(([0], first)).astype(np.int64)
    return first, np.diff(np.append(first, len(offsets)))


def _huge_runs(offsets: npt.NDArray[np.uint64], host_page: int) -> list[tuple[int, int]]:
    """[start, end) index ranges of ``offsets`` that fall in one host page, in order."""
    hp = offsets // np.uint64(host_page)
    return _ranges(np.flatnonzero(np.diff(hp)) + 1, len(offsets))


def _ranges(breaks: npt.NDArray[np.intp], n: int) -> list[tuple[int, int]]:
    """[start, end) pairs of 0..n cut at ``breaks``."""
    cuts = breaks.tolist()
    return list(zip([0, *cuts], [*cuts, n], strict=True))


class ChannelPlacer:
    """Places the pages arriving on one channel; owns that channel's temporary huge page."""

    def __init__(self, state: PostcopyState, channel: str) -> None:
        self.state = state
        self.channel = channel
        self._id = CHANNEL_IDS[channel]
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

    def reset(self) -> None:
        """The channel's connection is gone: drop the huge pages half assembled (the
        source sends them again whole after recovery)."""
        self._cur.clear()
        self.state.release_owner(self.channel)

    def pending(self) -> list[tuple[str, int]]:
        """Huge pages this channel has started but not finished (block, offset)."""
        return [(name, off) for name, (off, _got) in self._cur.items()]

    def _pieces(self, st: BlockState, offsets: npt.NDArray[np.uint64]) -> int:
        """Record pieces of this channel's current huge page; returns the host page offset.

        Pieces of one huge page may come in any order (zero pages are batched apart from
        the others) but all on this channel and each once; a piece of another huge page
        before the current one is complete means the sender split a huge page.
        """
        first, last = int(offsets[0]), int(offsets[-1])
        hp_off = first - first % st.host_page
        cur = self._cur.get(st.name)
        if cur is None:
            self._claim(st, hp_off)
            cur = (hp_off, np.zeros(st.host_page // PAGE_SIZE, dtype=np.bool_))
            self._cur[st.name] = cur
        if cur[0] != hp_off or last - hp_off >= st.host_page:
            raise RemoteProtocolError(
                f"{self.channel} channel: got {st.name}@{first:#x} while huge page "
                f"{cur[0]:#x} has {int(cur[1].sum())} of {len(cur[1])} pieces "
                "(a huge page split across channels?)")
        idx = (offsets.astype(np.int64) - hp_off) // PAGE_SIZE
        if cur[1][idx].any():
            raise RemoteProtocolError(f"{self.channel} channel: piece of {st.name}@"
                                      f"{hp_off:#x} sent twice")
        cur[1][idx] = True
        return hp_off

    def _claim(self, st: BlockState, hp_off: int) -> None:
        """Start assembling a huge page on this channel; refuse one already started or
        placed through another channel."""
        hp = hp_off // st.host_page
        with self.state.lock:
            owner = int(st.arrays.owner[hp])
            if owner and owner != self._id:
                other = next(n for n, i in CHANNEL_IDS.items() if i == owner)
                raise RemoteProtocolError(
                    f"huge page {st.name}@{hp_off:#x} arrives on the {self.channel} channel "
                    f"while the {other} channel is assembling it: a split huge page")
            if st.received[hp]:
                raise RemoteProtocolError(
                    f"huge page {st.name}@{hp_off:#x} was already placed; the "
                    f"{self.channel} channel sent it again")
            st.arrays.owner[hp] = self._id

    def _complete_if_full(self, st: BlockState) -> None:
        hp_off, got = self._cur[st.name]
        if got.all():
            del self._cur[st.name]
            self.state.place(st, hp_off, self._tmp_page(st))
            with self.state.lock:
                st.arrays.owner[hp_off // st.host_page] = 0

    def _fill_huge(self, st: BlockState, offsets: npt.NDArray[np.uint64],
                   data: npt.NDArray[np.uint8] | None) -> None:
        """Copy pieces (``data`` rows, or zeroes) into the temporary huge page, one
        huge page's run at a time, placing each huge page as it completes."""
        for a, b in _huge_runs(offsets, st.host_page):
            hp_off = self._pieces(st, offsets[a:b])
            rows = (offsets[a:b] - np.uint64(hp_off)) // np.uint64(PAGE_SIZE)
            self._tmp_page(st)[rows] = 0 if data is None else data[a:b]
            self._complete_if_full(st)

    def batch(self, e: ev.PageBatch) -> None:
        st = self.state.blocks[e.block]
        self.pages += len(e.offsets)
        if st.host_page == PAGE_SIZE and len(e.offsets) == 1:
            self.state.place(st, int(e.offsets[0]), e.data[0])  # a requested page
            return
        if st.host_page == PAGE_SIZE:
            self.state.place_pages(st, e.offsets, e.data)
            return
        self._fill_huge(st, e.offsets, e.data)

    def zeros(self, e: ev.ZeroPages) -> None:
        st = self.state.blocks[e.block]
        self.pages += len(e.offsets)
        if st.host_page == PAGE_SIZE:
            self.state.place_pages(st, e.offsets, None)
            return
        self._fill_huge(st, e.offsets, None)

    def single_slot(self, e: ev.PageHeader) -> memoryview:
        """Where a single page's payload is read to (then :meth:`single_done`)."""
        st = self.state.blocks[e.block]
        if st.host_page == PAGE_SIZE:
            return memoryview(self._tmp_page(st)[0]).cast("B")
        hp_off = self._pieces(st, np.array([e.offset], dtype=np.uint64))
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


class PostcopyChannelReceiver:
    """The postcopy channel's receiving end: requested pages only, until its EOS."""

    def __init__(self, channel: Channel, placer: ChannelPlacer,
                 blocks: Mapping[str, BlockInfo], recv_chunk: int = RECV_CHUNK) -> None:
        self.channel = channel
        self.recv_chunk = recv_chunk
        self.placer = placer
        self.dec = Decoder(blocks, channel=ChannelKind.POSTCOPY, postcopy=True)
        self.ended = False

    def run(self) -> None:
        """Blocking: receive and place until the channel's end."""
        while not self.pump():
            self.receive()

    def receive(self) -> None:
        self.dec.receive_data(self.channel.recv(self.recv_chunk))  # b"" = EOF

    def pump(self) -> bool:
        """Place what has been received; True once the channel has ended."""
        placer, dec = self.placer, self.dec
        while not self.ended:
            e = dec.next_event()
            if e is ev.NEED_DATA:
                return False
            if dispatch_page_event(e, placer, self._fill):
                continue
            if isinstance(e, ev.StreamEnd):
                if placer.pending():
                    raise RemoteProtocolError(f"postcopy channel ended inside huge "
                                              f"pages {placer.pending()}")
                self.ended = True
            elif not isinstance(e, ev.StreamStart):
                raise RemoteProtocolError(f"unexpected {type(e).__name__} on the "
                                          "postcopy channel")
        return True

    def _fill(self, slot: memoryview) -> None:
        read_payload(self.dec, self.channel, slot)


class FaultThread:
    """Reads userfaultfd events and turns them into page requests (see module doc)."""

    def __init__(self, state: PostcopyState, request: Callable[[str, int, int], None],
                 on_error: Callable[[Exception], None], priority: UrgentPriority) -> None:
        """The thread reads faults at ``priority`` (livemig.runtime)."""
        self.state = state
        self._request = request
        self._on_error = on_error
        self._priority = priority
        self._stop_r, self._stop_w = os.pipe()
        self._thread = NamedThread(target=self._run, name="postcopy/fault", daemon=True)

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
        self._priority.apply()
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
