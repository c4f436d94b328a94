"""Multifd: precopy pages on several connections, each owned by a process of its own.

Theory of operation
-------------------
One Python thread cannot fill a fast link (the GIL serialises whatever Python work
each page needs), so with the ``multifd`` capability precopy pages travel on
``multifd-channels`` extra connections, each owned by a *channel helper process*
(``python -m livemig.migration.multifd``, started through
:class:`~livemig.migration.helper.HelperProcess`).  The main channel keeps the control
records and the device state.  How a migration sends its precopy pages is one
:class:`PrecopyPages` object chosen once (:func:`choose_precopy_pages`):
:class:`MainChannelPages` (the page sender on the main channel, as without multifd) or
:class:`MultifdPages`.

Source
    The migration bitmap's bits live in shared memory
    (:class:`~livemig.migration.urgent.SharedBits`, the same memory the postcopy urgent
    helper uses), and so does guest RAM when it is a memfd (``4K-memfd`` or hugetlb:
    mapped by every helper, pages sent from that mapping with no copy; private 4 KiB
    RAM is read through ``/proc/PID/mem``, one window per read, a kernel copy that
    costs a helper about as much CPU as sending).
    A *round* is: the migration thread syncs the dirty log into the bits, tells every
    helper "round"; helper *i* owns the 2 MiB windows ``i, i+N, i+2N, ...`` of every
    block, scans its own windows' bits (one NumPy step), clears and sends each dirty
    window as one packet (zero pages named, not sent), then sends a SYNC packet and
    answers "synced".  No lock: during a round only helper *i* touches its windows'
    bits, and the migration thread syncs only between rounds.  When every helper has
    synced, the migration thread writes ``MULTIFD_FLUSH`` on the main channel (QEMU's
    ``multifd_send_sync_main``).  A page always belongs to the same channel, and a
    round's pages are all placed before the destination reads past the flush, so a
    newer copy of a page never loses against an older one.  Cancelling, or a request
    for postcopy, bumps a shared ``stop`` counter: helpers end the round early (still
    with their SYNC).  A helper's death (or its connection's) fails the precopy; the
    guest keeps running on the source.  Helpers come from the instance's
    :class:`HelperPool`: started when multifd is enabled (a Python process takes a
    second or so to import under load), released after a migration that went well
    (connection closed, mappings dropped) and reused by the next one.  Before
    postcopy they are released as soon as the last round has synced, while the guest
    still runs on the source: the switchover pause does not wait for them.

Destination
    :class:`MultifdReceivers` gets each multifd connection (accepted when the
    capabilities section announces them), checks its initial packet (magic, version,
    the migration's UUID, a channel id not seen before) and runs one receiver thread
    per channel.  A receiver reads a packet's header and offsets, then receives the
    page data straight into guest RAM with one scatter ``recvmsg`` (the GIL is released
    for the whole transfer, no copy), writes zero pages only where RAM is not zero, and
    records the pages in the loader's per-page record (per channel: no shared lock).
    On ``MULTIFD_FLUSH`` the load thread waits until every receiver has passed one more
    SYNC packet.  Before postcopy's LISTEN (userfaultfd) and at the end of a precopy
    stream, every receiver must have ended (the source closes the channels after the
    last flush): multifd precopy can thus be followed by postcopy (with preemption,
    recovery and the locality hint), which QEMU 7.2 refuses.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from livemig.errors import ChannelClosedError, ConfigError, MigrationError, RemoteProtocolError
from livemig.kernel.shared import (
    Counters,
    ProcessMemory,
    SharedLayout,
    SharedMemory,
    counters_field,
)
from livemig.migration.bitmap import SourceBlock, split_zero_pages
from livemig.migration.channel import Channel, MigrationUri, connect
from livemig.migration.handshake import block_table
from livemig.migration.helper import HelperBlock, HelperConn, HelperProcess, helper_main
from livemig.migration.pagesink import RamLoader
from livemig.migration.ratelimit import RateLimiter
from livemig.migration.sender import PageSender
from livemig.migration.state import Capabilities, Parameters, RamStats, detached
from livemig.migration.tls import TlsEndpoint
from livemig.migration.urgent import SharedBits, bits_layout
from livemig.units import PAGE_SIZE
from livemig.wire.channel import ChannelKind
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

log = logging.getLogger("livemig.multifd")

MODULE = "livemig.migration.multifd"
START_TIMEOUT = 30.0
INIT_TIMEOUT = 30.0  # for a multifd connection's initial packet
ROUND_POLL_S = 0.05
CHANNEL_COUNTERS = ("normal", "zero", "bytes", "packets")
_WORDS = PAGE_SIZE // 8


def state_layout(channels: int) -> SharedLayout:
    """The shared counters: ``control`` (written by the VMM: ``stop`` cuts a round
    short) and one group per channel (written by that channel's helper only)."""
    return SharedLayout([counters_field("control", ("stop",)),
                         *(counters_field(f"channel{i}", CHANNEL_COUNTERS)
                           for i in range(channels))])


# --- the source: how precopy pages travel ------------------------------------------------
class PrecopyPages(ABC):
    """How one migration sends its precopy pages (chosen once, at setup)."""

    def handshake(self) -> dict[str, Any]:
        """What the capabilities section says of this design (Handshake fields)."""
        return {}

    def start(self) -> None:  # noqa: B027 - optional hook
        """The main stream's head is sent: open the page channels, if any."""

    @abstractmethod
    def send_round(self, interrupted: Callable[[], bool]) -> None:
        """Send every page dirty now (stop early when ``interrupted``)."""

    @abstractmethod
    def send_rest(self) -> None:
        """Stop-and-copy, inside the open ``ram`` END section: every dirty page."""

    def end(self) -> None:  # noqa: B027 - optional hook
        """Precopy is over (postcopy starts, or the stream ends): close page channels."""

    def bytes_sent(self) -> int:
        """Bytes sent outside the main channel."""
        return 0

    def update_stats(self, ram: RamStats) -> None:  # noqa: B027 - optional hook
        """Add pages counted outside the page sender to ``ram``."""

    def to_qmp(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release everything (idempotent)."""


class MainChannelPages(PrecopyPages):
    """Without multifd: the page sender on the main channel, in PART sections."""

    def __init__(self, sender: PageSender) -> None:
        self.sender = sender

    def send_round(self, interrupted: Callable[[], bool]) -> None:
        self.sender.send_round(interrupted)

    def send_rest(self) -> None:
        self.sender.send_all_remaining()


class HelperPool:
    """Channel helper processes kept ready between migrations (owned by the VMM's
    instance): a helper started ahead imports while idle, and one released after a
    migration that went well serves the next one, so ``setup`` does not pay for
    starting Python N times."""

    def __init__(self) -> None:
        self._idle: list[HelperProcess] = []
        self._lock = threading.Lock()

    def warm(self, count: int) -> None:
        """Have at least ``count`` helpers started."""
        with self._lock:
            while len(self._idle) < count:
                self._idle.append(HelperProcess(MODULE))

    def take(self, count: int) -> list[HelperProcess]:
        """``count`` helpers for a migration (started now if the pool has too few)."""
        with self._lock:
            got, self._idle = self._idle[:count], self._idle[count:]
        return got + [HelperProcess(MODULE) for _ in range(count - len(got))]

    def give_back(self, helpers: list[HelperProcess]) -> None:
        with self._lock:
            self._idle += helpers

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for h in idle:
            h.close()


class MultifdSource:
    """The VMM's side of the channel helpers (see the module docstring)."""

    def __init__(self, uri: MigrationUri, channels: int, bits: SharedBits,
                 dead_link_timeout_ms: int, pool: HelperPool,
                 tls: TlsEndpoint | None = None) -> None:
        self.uri = uri
        self.tls = tls  # each helper opens its own TLS session from the same credentials
        self.channels = channels
        self.bits = bits
        self.uuid = uuid.uuid4().bytes
        self.dead_link_timeout_ms = dead_link_timeout_ms
        layout = state_layout(channels)
        self.memory, views = layout.create("livemig-multifd")
        self._control = views.counters("control")
        self._counters = [views.counters(f"channel{i}") for i in range(channels)]
        views.release()
        self.pool = pool
        self.helpers = pool.take(channels)
        self._released = False

    def start(self, blocks: Mapping[str, HelperBlock]) -> None:
        """Each helper connects its channel and sends the initial packet."""
        fds = [self.bits.memory.fd, self.memory.fd]
        table = []
        for name, b in blocks.items():
            if b.mapping.fd >= 0:
                table.append([name, b.size, "memfd", len(fds)])
                fds.append(b.mapping.fd)
            else:
                table.append([name, b.size, "pid", b.mapping.host_addr])
        for i, h in enumerate(self.helpers):
            h.send({"msg": "start", "channel": i, "channels": self.channels,
                    "uri": str(self.uri), "uuid": self.uuid.hex(), "blocks": table,
                    "tls": None if self.tls is None else self.tls.describe(),
                    "pid": os.getpid(), "bits_size": self.bits.memory.size,
                    "state_size": self.memory.size,
                    "dead_link_timeout": self.dead_link_timeout_ms}, fds)
        for i, h in enumerate(self.helpers):
            self._expect(i, h, "ready", START_TIMEOUT)

    @staticmethod
    def _expect(i: int, h: HelperProcess, kind: str, timeout: float | None) -> None:
        try:
            h.expect(kind, timeout)
        except (ChannelClosedError, MigrationError) as e:
            raise MigrationError(f"multifd channel {i} failed: {e}") from None

    def round(self, limit: int, interrupted: Callable[[], bool]) -> None:
        """One round on every channel, until each has sent its SYNC packet."""
        per_channel = limit // self.channels if limit > 0 else 0
        for h in self.helpers:
            h.send({"msg": "round", "limit": per_channel})
        pending = {h.ctl.fileno(): (i, h) for i, h in enumerate(self.helpers)}
        stopped = False
        while pending:
            if not stopped and interrupted():
                self._control.add("stop")
                stopped = True
            for fd in select.select(list(pending), [], [], ROUND_POLL_S)[0]:
                i, h = pending.pop(fd)
                self._expect(i, h, "synced", None)

    def counter(self, name: str) -> int:
        return sum(c[name] for c in self._counters)

    def per_channel(self, name: str) -> list[int]:
        return [c[name] for c in self._counters]

    def release_helpers(self) -> None:
        """Precopy went well: each helper closes its connection and goes back to the
        pool (one that does not answer is stopped)."""
        if self._released:
            return
        self._released = True
        kept = []
        for h in self.helpers:
            try:
                h.send({"msg": "release"})
                h.expect("released", START_TIMEOUT)
                kept.append(h)
            except (ChannelClosedError, MigrationError) as e:
                log.warning("multifd helper %d not reused: %s", h.pid, e)
                h.close()
        self.pool.give_back(kept)

    def close(self) -> None:
        """Stop the helpers not given back (a failed or cancelled migration)."""
        if not self._released:
            self._released = True
            for h in self.helpers:
                h.close()
        del self._control
        self._counters.clear()
        self.memory.close()


class MultifdPages(PrecopyPages):
    """With multifd: rounds on the channel helpers, a flush on the main channel."""

    def __init__(self, sender: PageSender, source: MultifdSource,
                 blocks: Mapping[str, HelperBlock], limit: Callable[[], int]) -> None:
        self.sender = sender
        self.source = source
        self._blocks = blocks
        self._limit = limit
        self._counted = (0, 0)  # normal, zero pages already added to the stats
        self._pids = [h.pid for h in source.helpers]
        self._final: dict[str, int] | None = None
        self._final_bytes: list[int] = []

    def handshake(self) -> dict[str, Any]:
        return {"multifd_channels": self.source.channels, "multifd_uuid": self.source.uuid}

    def start(self) -> None:
        self.source.start(self._blocks)

    def _flush(self) -> None:
        main = self.sender.main
        main.writer.write([main.encoder.multifd_flush()])

    def send_round(self, interrupted: Callable[[], bool]) -> None:
        self.source.round(self._limit(), interrupted)
        main = self.sender.main
        main.writer.write([main.encoder.ram_part(self.sender.section_id)])
        self._flush()
        main.writer.write([main.encoder.close_ram_section()])
        main.writer.flush()

    def send_rest(self) -> None:
        self.source.round(0, lambda: False)
        self._flush()
        self.end()

    def end(self) -> None:
        if self._final is None:
            self._final = {"bytes": self.source.counter("bytes"),
                           "normal": self.source.counter("normal"),
                           "zero": self.source.counter("zero")}
            self._final_bytes = self.source.per_channel("bytes")
            self.source.release_helpers()

    def _count(self, name: str) -> int:
        return self._final[name] if self._final is not None else self.source.counter(name)

    def bytes_sent(self) -> int:
        return self._count("bytes")

    def update_stats(self, ram: RamStats) -> None:
        normal, zero = self._count("normal"), self._count("zero")
        ram.normal += normal - self._counted[0]
        ram.duplicate += zero - self._counted[1]
        self._counted = (normal, zero)

    def to_qmp(self) -> dict[str, Any]:
        per_channel = (self.source.per_channel("bytes") if self._final is None
                       else self._final_bytes)
        return {"x-multifd": {"channels": self.source.channels,
                              "helper-pids": list(self._pids), "bytes": per_channel}}

    def close(self) -> None:
        self.end()
        self.source.close()


def choose_precopy_pages(caps: Capabilities, params: Parameters, uri: MigrationUri,
                         sender: PageSender, blocks: Mapping[str, HelperBlock],
                         bits: SharedBits | None, pool: HelperPool,
                         tls: TlsEndpoint | None = None) -> PrecopyPages:
    """The precopy design of one migration.  With multifd, ``bits`` is the shared
    memory the page sender's bitmaps live in, ``pool`` where its helpers come from."""
    if not caps.multifd:
        return MainChannelPages(sender)
    assert bits is not None, "multifd needs the bitmaps in shared memory"
    source = MultifdSource(uri, params.multifd_channels, bits, params.x_dead_link_timeout,
                           pool, tls)
    return MultifdPages(sender, source, blocks, lambda: sender.limiter.limit)


def require_socket_uri(caps: Capabilities, uri: MigrationUri) -> None:
    """multifd opens several connections: a file: URI cannot have them."""
    if caps.multifd and uri.scheme == "file":
        raise ConfigError("multifd needs a tcp: or unix: URI (a file: image has one stream)")


def shared_pages(blocks: Mapping[str, SourceBlock]) -> SharedBits:
    """Bitmaps' bits in shared memory, for a migration whose urgent design has none."""
    return SharedBits({n: b.pages for n, b in blocks.items()})


# --- the destination -----------------------------------------------------------------------
class MultifdReceivers:
    """The destination's receiver threads, one per multifd channel (see the module
    docstring)."""

    def __init__(self, blocks: Mapping[str, Any], loader: RamLoader, channels: int,
                 migration_uuid: bytes, on_error: Callable[[Exception], None]) -> None:
        self.table = block_table(blocks)
        self.loader = loader
        self.channels = channels
        self.uuid = migration_uuid
        self._on_error = on_error
        self._views: dict[str, memoryview] = {n: b.view() for n, b in blocks.items()}
        self._cond = threading.Condition()
        self._synced = [0] * channels
        self._ended = [False] * channels
        self._pages = [0] * channels
        self._zero = [0] * channels
        self._channels: dict[int, Channel] = {}
        self._threads: list[threading.Thread] = []
        self._error: Exception | None = None
        self.flushes = 0

    def add(self, channel: Channel) -> None:
        """A multifd connection: check its initial packet and start its receiver."""
        channel.peek(INIT_SIZE, INIT_TIMEOUT)  # a silent peer cannot hold the load
        head = bytearray(INIT_SIZE)
        channel.recv_exact_into(memoryview(head))
        init = InitPacket.decode(head)
        if init.uuid != self.uuid:
            raise RemoteProtocolError(f"multifd channel {init.channel} belongs to migration "
                                      f"{init.uuid.hex()}, not {self.uuid.hex()}")
        if not 0 <= init.channel < self.channels or init.channel in self._channels:
            raise RemoteProtocolError(f"multifd channel id {init.channel} is out of range "
                                      f"or arrives twice ({self.channels} channels)")
        channel.name = f"multifd{init.channel}"
        self._channels[init.channel] = channel
        t = threading.Thread(target=self._run, args=(init.channel, channel),
                             name=f"multifd/recv{init.channel}", daemon=True)
        self._threads.append(t)
        t.start()

    @property
    def pages(self) -> int:
        return sum(self._pages)

    @property
    def zero_pages(self) -> int:
        return sum(self._zero)

    def bytes_received(self) -> int:
        return sum(ch.bytes_received for ch in self._channels.values())

    def _run(self, index: int, channel: Channel) -> None:
        try:
            self._receive(index, channel)
        except Exception as e:
            with self._cond:
                self._error = self._error or detached(e)
            self._on_error(e)
        finally:
            with self._cond:
                self._ended[index] = True
                self._cond.notify_all()

    def _receive(self, index: int, channel: Channel) -> None:
        head = bytearray(HEADER_SIZE)
        view = memoryview(head)
        while True:
            got = channel.recv_into(view)
            if got == 0:
                return  # the source closed the channel between packets: the end
            if got < HEADER_SIZE:
                channel.recv_exact_into(view[got:])
            h = decode_header(head, self.table)
            if h.offsets_size:
                raw = bytearray(h.offsets_size)
                channel.recv_exact_into(memoryview(raw))
                offsets = decode_offsets(h, raw, self.table)
                if h.normal:
                    channel.recv_scatter(self._views[h.block], offsets[: h.normal])
                if h.zero:
                    self.loader.zero_fill(h.block, offsets[h.normal :])
                self.loader.record(h.block, offsets)
                self._pages[index] += h.normal
                self._zero[index] += h.zero
            if h.sync:
                with self._cond:
                    self._synced[index] += 1
                    self._cond.notify_all()

    def _failed(self, what: str) -> Exception | None:
        if self._error is not None:
            return self._error
        if len(self._channels) < self.channels:
            return RemoteProtocolError(f"{what}: only {len(self._channels)} of "
                                       f"{self.channels} multifd channels arrived")
        return None

    def flush(self) -> None:
        """MULTIFD_FLUSH on the main channel: wait until every channel passed one more
        SYNC packet (its pages are in guest RAM)."""
        self.flushes += 1
        want = self.flushes

        def done() -> bool:
            return self._error is not None or all(
                s >= want or e for s, e in zip(self._synced, self._ended, strict=True))

        with self._cond:
            self._cond.wait_for(done)
            err = self._failed("MULTIFD_FLUSH")
            behind = [i for i, s in enumerate(self._synced) if s < want]
        if err is not None:
            raise err
        if behind:
            raise RemoteProtocolError(f"multifd channels {behind} ended before the SYNC "
                                      f"of round {want}")

    def finish(self, timeout: float) -> None:
        """The source closed every channel after its last flush: wait for the
        receivers to end (before postcopy's LISTEN, or at the end of the stream)."""
        with self._cond:
            ok = self._cond.wait_for(lambda: all(self._ended) or self._error is not None,
                                     timeout)
            err = self._failed("end of precopy")
        if err is not None:
            raise err
        if not ok:
            raise MigrationError(f"multifd channels still open {timeout:.0f} s after "
                                 "the end of precopy")
        for t in self._threads:
            t.join()

    def close(self) -> None:
        """Stop every receiver and drop the views of guest RAM (idempotent)."""
        for ch in self._channels.values():
            ch.shutdown()
        for t in self._threads:
            t.join(10)
        for ch in self._channels.values():
            ch.close()
        for v in self._views.values():
            v.release()
        self._views.clear()


# --- the channel helper process ------------------------------------------------------------
class _WindowRam:
    """One block's guest RAM as a channel helper sees it: the VMM's memfd mapped here
    (no copy), or a window read through ``/proc/PID/mem`` into a buffer."""

    def __init__(self, size: int, kind: str, where: int, mem: ProcessMemory,
                 fds: list[int]) -> None:
        self._shared: SharedMemory | None = None
        self._mem = mem
        self._addr = where
        if kind == "memfd":
            self._shared = SharedMemory.attach(fds[where], size)
            self._bytes = self._shared.array(0, np.uint8, size)
        else:
            self._bytes = np.empty(PACKET_PAGES * PAGE_SIZE, dtype=np.uint8)
        self._words = self._bytes.view(np.uint64).reshape(-1, _WORDS)

    def window(self, first: int, count: int
               ) -> tuple[npt.NDArray[np.uint64], memoryview, int]:
        """Pages [first, first+count): RAM as 64-bit words one row per page, the same
        as bytes, and the page index that row 0 stands for."""
        if self._shared is not None:
            return self._words, self._bytes.data, 0
        view = self._bytes.data
        self._mem.read_into(self._addr + first * PAGE_SIZE, view[: count * PAGE_SIZE])
        return self._words, view, first


class _ChannelHelper:
    """One multifd channel's sender, in its own process."""

    def __init__(self, conn: HelperConn, msg: dict[str, Any], fds: list[int]) -> None:
        self.conn = conn
        self._fds = fds
        self.index, self.count = int(msg["channel"]), int(msg["channels"])
        blocks = {str(b[0]): b for b in msg["blocks"]}
        pages = {n: int(b[1]) // PAGE_SIZE for n, b in blocks.items()}
        bits = bits_layout(pages).views(SharedMemory.attach(fds[0], int(msg["bits_size"])))
        self.bits = {n: bits[f"{n}/bits"] for n in blocks}
        state = state_layout(self.count).views(SharedMemory.attach(fds[1],
                                                                   int(msg["state_size"])))
        self.control: Counters = state.counters("control")
        self.counters: Counters = state.counters(f"channel{self.index}")
        mem = self._mem = ProcessMemory(int(msg["pid"]))
        self.ram = {n: _WindowRam(int(b[1]), str(b[2]), int(b[3]), mem, fds)
                    for n, b in blocks.items()}
        tls = msg.get("tls")
        self.channel = connect(MigrationUri.parse(str(msg["uri"])),
                               name=f"multifd{self.index}",
                               tls=None if tls is None else TlsEndpoint.of(tls),
                               kind=ChannelKind.MULTIFD)
        self.channel.detect_dead_peer(int(msg["dead_link_timeout"]))
        self.channel.send([InitPacket(bytes.fromhex(str(msg["uuid"])), self.index).encode()])
        self._seq = 0

    def _packet_num(self) -> int:
        """Unique over all channels without a shared counter: seq * N + channel."""
        self._seq += 1
        return self._seq * self.count + self.index

    def round(self, limit: int) -> None:
        stop = self.control["stop"]
        limiter = RateLimiter(limit)
        for name, bits in self.bits.items():
            starts = np.arange(0, len(bits), PACKET_PAGES)
            dirty = np.logical_or.reduceat(bits, starts)
            mine = starts[self.index :: self.count][dirty[self.index :: self.count]]
            for first in mine.tolist():
                if self.control["stop"] != stop:
                    break
                limiter.account(self._send_window(name, bits, first,
                                                  min(PACKET_PAGES, len(bits) - first)))
        self.channel.send([sync_packet(self._packet_num())])
        self.counters.add("packets")

    def _send_window(self, name: str, bits: npt.NDArray[np.bool_], first: int,
                     count: int) -> int:
        """Clear and send the dirty pages of one window as one packet."""
        sl = bits[first : first + count]
        idx = np.flatnonzero(sl)
        if not len(idx):
            return 0
        sl[idx] = False
        words, view, base = self.ram[name].window(first, count)
        pages = idx + first
        w = split_zero_pages(words, pages - base, pages)
        head = encode_packet(self._packet_num(), name, w.pages, w.zeros)
        offsets = (w.pages - base).astype(np.uint64) * np.uint64(PAGE_SIZE)
        self.channel.send_gather(head, view, offsets)
        nbytes = len(head) + len(w.pages) * PAGE_SIZE
        self.counters.add("normal", len(w.pages))
        self.counters.add("zero", len(w.zeros))
        self.counters.add("bytes", nbytes)
        self.counters.add("packets")
        return nbytes

    def serve(self) -> bool:
        """Rounds until the VMM releases this helper (True: it may serve another
        migration) or stops it (False)."""
        self.conn.send({"msg": "ready"})
        while True:
            msg, _ = self.conn.recv()
            kind = msg.get("msg")
            if kind == "round":
                self.round(int(msg["limit"]))
                self.conn.send({"msg": "synced"})
            elif kind in ("release", "stop"):
                return bool(kind == "release")

    def close(self) -> None:
        """Close the channel and every fd and mapping of this migration (guest RAM's
        memfd mapping too: its huge pages must go back when the VM goes)."""
        self.channel.close()
        self.ram.clear()
        self.bits.clear()
        self._mem.close()
        for fd in self._fds:
            os.close(fd)


def _serve(conn: HelperConn, msg: dict[str, Any], fds: list[int]) -> None:
    """Serve migrations one after the other: a released helper waits in the VMM's
    pool for the next migration's "start"."""
    while True:
        helper = _ChannelHelper(conn, msg, fds)
        again = helper.serve()
        helper.close()
        del helper
        if not again:
            return
        conn.send({"msg": "released"})
        msg, fds = conn.recv()
        if msg.get("msg") != "start":
            return


if __name__ == "__main__":
    helper_main(_serve)
