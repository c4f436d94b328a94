"""Where the destination's decoded pages go: one dispatcher, two kinds of sink.

Theory of operation
-------------------
The decoder yields three page events (``PageBatch``, ``ZeroPages``, ``PageHeader``);
:func:`dispatch_page_event` hands each to a :class:`PageSink`, and it is the only code
that does so: the main channel's load loop, the postcopy channel's receiver (in the
VMM or in the fault server) and the protocol tests all call it.

* :class:`RamLoader` is the precopy sink: pages go straight to their final place in
  guest RAM (one vectorised NumPy copy per batch; a single page's payload is read by
  ``recv_into`` into guest RAM).  Once postcopy is advised it also reports which pages
  it loaded (:meth:`~RamLoader.report_to`: those loaded so far, then each as it
  lands), so postcopy knows what precopy already brought, including pages a multifd
  channel loaded before the main channel reached POSTCOPY_ADVISE.
* :class:`~livemig.migration.postcopy.ChannelPlacer` is the postcopy sink: guest RAM is
  registered with userfaultfd, so pages are placed atomically (``UFFDIO_COPY``), huge
  pages assembled first in that channel's temporary huge page.

A ``PageHeader``'s payload is read into the slot the sink gives (:func:`read_payload`:
what the decoder buffered, then the rest from the socket); the slot is a memoryview
released at once, even on error, so no traceback pins guest RAM or a temporary page.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np
import numpy.typing as npt

from livemig.errors import MissingPagesError
from livemig.migration.channel import Channel
from livemig.units import PAGE_SIZE
from livemig.vmm.memory import RamBlock
from livemig.wire import events as ev
from livemig.wire.decoder import Decoder

PageEvent = ev.PageBatch | ev.ZeroPages | ev.PageHeader


class PageSink(Protocol):
    """Takes decoded pages of one channel."""

    def batch(self, e: ev.PageBatch) -> None: ...
    def zeros(self, e: ev.ZeroPages) -> None: ...
    def single_slot(self, e: ev.PageHeader) -> memoryview: ...
    def single_done(self, e: ev.PageHeader) -> None: ...


def dispatch_page_event(e: ev.Event, sink: PageSink,
                        fill: Callable[[memoryview], None]) -> bool:
    """Give a page event to ``sink``; ``fill`` reads a single page's payload into the
    slot the sink chose.  False (and nothing done) for any other event."""
    if isinstance(e, ev.PageBatch):
        sink.batch(e)
    elif isinstance(e, ev.ZeroPages):
        sink.zeros(e)
    elif isinstance(e, ev.PageHeader):
        with sink.single_slot(e) as slot:
            fill(slot)
        sink.single_done(e)
    else:
        return False
    return True


def read_payload(dec: Decoder, channel: Channel, slot: memoryview) -> None:
    """A PageHeader's payload: what the decoder has buffered, then the rest straight
    from the socket into ``slot`` (guest RAM or a temporary huge page)."""
    n = dec.take_payload(slot)
    if dec.payload_remaining:
        with slot[n:] as rest:
            channel.recv_exact_into(rest)
        dec.payload_received(len(slot) - n)


Loaded = Callable[[str, npt.NDArray[np.uint64]], None]


class RamLoader:
    """The precopy sink: decoded pages straight into their final place in guest RAM.

    It also keeps, per block, which pages arrived at least once (one bool per page,
    set with the same index array as the copy), so a stream that ends without some
    page is refused (:meth:`check_complete`) instead of leaving stale memory.
    """

    def __init__(self, blocks: dict[str, RamBlock]) -> None:
        self._pages: dict[str, npt.NDArray[np.uint8]] = {}
        self._words: dict[str, npt.NDArray[np.uint64]] = {}
        self._views: dict[str, memoryview] = {}
        self._received: dict[str, npt.NDArray[np.bool_]] = {}
        for name, block in blocks.items():
            arr = block.array()
            self._pages[name] = arr.reshape(-1, PAGE_SIZE)
            self._words[name] = arr.view(np.uint64).reshape(-1, PAGE_SIZE // 8)
            self._views[name] = block.view()
            self._received[name] = np.zeros(block.size // PAGE_SIZE, dtype=np.bool_)
        self.pages = 0
        self.zero_pages = 0
        self._on_loaded: Loaded | None = None

    def report_to(self, on_loaded: Loaded) -> None:
        """Tell ``on_loaded`` of every page loaded: first of those already here, then
        of each as it lands.  Multifd channels load on their own threads and may be
        ahead of the main channel, so pages can land before postcopy is advised; a page
        recorded meanwhile is reported once or twice, never missed (the callback is set
        before the record is read, and :meth:`record` marks before it looks)."""
        self._on_loaded = on_loaded
        for name, got in self._received.items():
            here = np.flatnonzero(got).astype(np.uint64) * np.uint64(PAGE_SIZE)
            if len(here):
                on_loaded(name, here)

    def record(self, block: str, offsets: npt.NDArray[np.uint64]) -> None:
        """Pages at ``offsets`` of ``block`` are in guest RAM (also called by the
        multifd receivers, each for its own pages: no lock)."""
        self._received[block][offsets // PAGE_SIZE] = True
        on_loaded = self._on_loaded
        if on_loaded is not None:
            on_loaded(block, offsets)

    def check_complete(self) -> None:
        """Every page of every block arrived at least once, or MissingPagesError
        naming the first block with a page missing and its first missing page."""
        for name, got in self._received.items():
            missing = np.flatnonzero(~got)
            if len(missing):
                raise MissingPagesError(name, int(missing[0]) * PAGE_SIZE, len(missing))

    def batch(self, e: ev.PageBatch) -> None:
        self._pages[e.block][e.offsets // PAGE_SIZE] = e.data
        self.pages += len(e.offsets)
        self.record(e.block, e.offsets)

    def zeros(self, e: ev.ZeroPages) -> None:
        """Pages that must read as zero: written only where RAM is not zero already, so
        untouched memory stays unallocated."""
        self.zero_fill(e.block, e.offsets)
        self.zero_pages += len(e.offsets)
        self.record(e.block, e.offsets)

    def zero_fill(self, block: str, offsets: npt.NDArray[np.uint64]) -> None:
        """Make the pages at ``offsets`` read as zero, writing only those that are not
        (also called by the multifd receivers)."""
        idx = offsets // PAGE_SIZE
        words = self._words[block]
        dirty = idx[words[idx].any(axis=1)]
        if len(dirty):
            words[dirty] = 0

    def single_slot(self, e: ev.PageHeader) -> memoryview:
        """Where a single page's payload goes (the decoder checked the offset)."""
        return self._views[e.block][e.offset : e.offset + PAGE_SIZE]

    def single_done(self, e: ev.PageHeader) -> None:
        self.pages += 1
        self.record(e.block, np.array([e.offset], dtype=np.uint64))

    def release(self) -> None:
        self._pages.clear()
        self._words.clear()
        for v in self._views.values():
            v.release()
        self._views.clear()
