"""Multifd: precopy pages on several connections, each sent by a thread of its own.

Theory of operation
-------------------
One connection cannot fill a fast link, so with the ``multifd`` capability precopy
pages travel on ``multifd-channels`` extra connections; the main channel keeps the
control records and the device state.  How a migration sends its precopy pages is one
:class:`PrecopyPages` object chosen once (:func:`choose_precopy_pages`):
:class:`MainChannelPages` (the page sender on the main channel, as without multifd) or
:class:`MultifdPages`.

Source
    :class:`MultifdSource` holds one :class:`ChannelSender` per channel (its
    connection, its share of the pages, its counters) and a pool of as many threads.
    Each channel's work per 8 MiB window is a few NumPy steps and one gather
    ``sendmsg`` straight from the VMM's own mapping of guest RAM: no copy but the
    kernel's into the socket.  The send (a ctypes call) releases the GIL, and it is
    most of a window's time, so the channels' threads run in parallel: the GIL is held
    for a few tens of microseconds of Python and NumPy per 8 MiB.  Threads, not processes: a helper
    process cannot map private guest RAM (it had to copy it through
    ``/proc/PID/mem``) and builds new page tables for shared RAM in every migration,
    which cost a process design 0.1-0.2 CPU s per GiB more than these threads.
    The channels share one connection's send buffer (:func:`channel_send_buffer`).
    A *round* is: the migration thread syncs the dirty log into the migration
    bitmaps' bits, then runs every channel's round on the pool; channel *i* owns the
    8 MiB windows (``PACKET_PAGES``) ``i, i+N, i+2N, ...`` of every block, scans its
    own windows' bits (one NumPy step), clears and sends each dirty window as one
    packet (zero pages named, not sent), then sends a SYNC packet.  No lock: during a
    round only channel *i* touches its windows' bits, and the migration thread syncs
    only between rounds.
    When every channel has synced, the migration thread writes ``MULTIFD_FLUSH`` on the
    main channel (QEMU's ``multifd_send_sync_main``).  A page always belongs to the
    same channel, and a round's pages are all placed before the destination reads past
    the flush, so a newer copy of a page never loses against an older one.
    Cancelling, a request for postcopy, or a channel's failure ends the other
    channels' round early, after the window each is sending (one 8 MiB ``sendmsg``;
    still with their SYNC); a failed channel fails the precopy
    and the guest keeps running on the source.  The channels close as soon as the
    last round has synced (before postcopy, while the guest still runs on the source).

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
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from concurrent.futures import ALL_COMPLETED, FIRST_EXCEPTION, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import Any

import numpy as np
import numpy.typing as npt

from livemig.errors import ConfigError, LivemigError, MigrationError, RemoteProtocolError
from livemig.migration.bitmap import SourceBlock, split_zero_pages
from livemig.migration.channel import SOCKET_BUFFER, Channel, MigrationUri, connect
from livemig.migration.handshake import block_table
from livemig.migration.pagesink import RamLoader
from livemig.migration.ratelimit import RateLimiter
from livemig.migration.sender import PageSender
from livemig.migration.state import Capabilities, Parameters, RamStats, detached
from livemig.migration.tls import TlsEndpoint
from livemig.runtime import NamedThread, name_this_thread
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

INIT_TIMEOUT = 30.0  # for a multifd connection's initial packet
MIN_CHANNEL_BUFFER = 256 << 10
ROUND_POLL_S = 0.05
_WORDS = PAGE_SIZE // 8


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


def channel_send_buffer(channels: int) -> int:
    """What one multifd connection may have in flight (its SO_SNDBUF): the channels
    share one connection's budget (``SOCKET_BUFFER``), so more channels do not mean
    more data in flight -- more than the link needs only evicts the data being copied
    from the caches (on loopback, 4 channels of 4 MiB each moved 10-20 % less than 4 of
    1 MiB).  Never below ``MIN_CHANNEL_BUFFER`` (about the kernel's default)."""
    return max(MIN_CHANNEL_BUFFER, SOCKET_BUFFER // channels)


class ChannelSender:
    """One multifd channel of the source: its connection, its share of every round
    (the windows ``index, index + count, ...`` of each block) and its counters
    (written by the thread that runs its round, read by anyone)."""

    def __init__(self, index: int, count: int, channel: Channel,
                 bits: Mapping[str, npt.NDArray[np.bool_]],
                 blocks: Mapping[str, SourceBlock]) -> None:
        self.index, self.count = index, count
        self.channel = channel
        self._bits = bits
        self._ram = {n: b.view() for n, b in blocks.items()}  # released by close()
        self._words = {n: np.frombuffer(v, dtype=np.uint64).reshape(-1, _WORDS)
                       for n, v in self._ram.items()}
        self.normal = self.zero = self.bytes = self.packets = 0
        self._seq = 0
        # The TCP port of this end of the connection (None on a unix socket).
        name = channel.sock.getsockname() if channel.sock is not None else None
        self.local_port = int(name[1]) if isinstance(name, tuple) else None

    def _packet_num(self) -> int:
        """Unique over all channels without a shared counter: seq * N + channel."""
        self._seq += 1
        return self._seq * self.count + self.index

    def round(self, limit: int, stop: threading.Event) -> None:
        """Send this channel's dirty windows (until ``stop``), then its SYNC packet."""
        limiter = RateLimiter(limit)
        for name, bits in self._bits.items():
            starts = np.arange(0, len(bits), PACKET_PAGES)
            dirty = np.logical_or.reduceat(bits, starts)
            mine = starts[self.index :: self.count][dirty[self.index :: self.count]]
            for first in mine.tolist():
                if stop.is_set():
                    break
                limiter.account(self._send_window(name, bits, first,
                                                  min(PACKET_PAGES, len(bits) - first)))
        self.channel.send([sync_packet(self._packet_num())])
        self.packets += 1

    def _send_window(self, name: str, bits: npt.NDArray[np.bool_], first: int,
                     count: int) -> int:
        """Clear and send the dirty pages of one window as one packet: the header,
        then the non-zero pages straight from guest RAM (one gather send)."""
        sl = bits[first : first + count]
        idx = np.flatnonzero(sl)
        if not len(idx):
            return 0
        sl[idx] = False
        pages = idx + first
        w = split_zero_pages(self._words[name], pages, pages)
        head = encode_packet(self._packet_num(), name, w.pages, w.zeros)
        self.channel.send_gather(head, self._ram[name],
                                 w.pages.astype(np.uint64) * np.uint64(PAGE_SIZE))
        nbytes = len(head) + len(w.pages) * PAGE_SIZE
        self.normal += len(w.pages)
        self.zero += len(w.zeros)
        self.bytes += nbytes
        self.packets += 1
        return nbytes

    def close(self) -> None:
        """Close the connection and let go of guest RAM."""
        self.channel.close()
        self._words.clear()
        for v in self._ram.values():
            v.release()
        self._ram.clear()


class MultifdSource:
    """The source's multifd channels (see the module docstring): one
    :class:`ChannelSender` per channel, each round run on a pool of as many threads."""

    def __init__(self, uri: MigrationUri, channels: int, dead_link_timeout_ms: int,
                 tls: TlsEndpoint | None = None) -> None:
        self.uri = uri
        self.tls = tls
        self.channels = channels
        self.uuid = uuid.uuid4().bytes
        self.dead_link_timeout_ms = dead_link_timeout_ms
        self.senders: list[ChannelSender] = []
        self._threads = ThreadPoolExecutor(channels, thread_name_prefix="multifd",
                                           initializer=name_this_thread)
        self._stop = threading.Event()
        self._ended = False

    def _open(self, index: int, bits: Mapping[str, npt.NDArray[np.bool_]],
              blocks: Mapping[str, SourceBlock]) -> ChannelSender:
        ch = connect(self.uri, name=f"multifd{index}", tls=self.tls, kind=ChannelKind.MULTIFD,
                     send_buffer=channel_send_buffer(self.channels))
        try:
            ch.detect_dead_peer(self.dead_link_timeout_ms)
            ch.send([InitPacket(self.uuid, index).encode()])
        except BaseException:
            ch.close()
            raise
        return ChannelSender(index, self.channels, ch, bits, blocks)

    def start(self, bits: Mapping[str, npt.NDArray[np.bool_]],
              blocks: Mapping[str, SourceBlock]) -> None:
        """Connect every channel (in parallel: a TLS handshake each) and send its
        initial packet."""
        jobs = [self._threads.submit(self._open, i, bits, blocks)
                for i in range(self.channels)]
        wait_futures(jobs)
        self.senders = [j.result() for j in jobs if j.exception() is None]
        self._raise_failures(jobs)

    @staticmethod
    def _raise_failures(jobs: list[Future[Any]]) -> None:
        """Every channel that failed, in one error: when one connection dies the
        destination gives up on all of them, so which broke first cannot be told here."""
        failed = [(i, e) for i, e in enumerate(j.exception() for j in jobs) if e is not None]
        for _i, e in failed:
            if not isinstance(e, (LivemigError, OSError)):
                raise e
        if failed:
            raise MigrationError("; ".join(f"multifd channel {i} failed: {e}"
                                           for i, e in failed))

    def round(self, limit: int, interrupted: Callable[[], bool]) -> None:
        """One round on every channel, until each has sent its SYNC packet; a channel
        that fails ends the others' round early, and its error is raised."""
        per_channel = limit // self.channels if limit > 0 else 0
        self._stop.clear()
        jobs = [self._threads.submit(s.round, per_channel, self._stop) for s in self.senders]
        until = FIRST_EXCEPTION
        while True:
            done, pending = wait_futures(jobs, ROUND_POLL_S, until)
            if not pending:
                break
            if interrupted() or any(j.exception() is not None for j in done):
                self._stop.set()
                until = ALL_COMPLETED  # the others end their round; nothing to watch
        self._raise_failures(jobs)

    def counter(self, name: str) -> int:
        return sum(self.per_channel(name))

    def per_channel(self, name: str) -> list[int]:
        return [int(getattr(s, name)) for s in self.senders]

    def end(self) -> None:
        """Precopy is over: close every channel (the destination's receivers end on
        it) and the threads (idempotent)."""
        if self._ended:
            return
        self._ended = True
        self._threads.shutdown()
        for s in self.senders:
            s.close()


class MultifdPages(PrecopyPages):
    """With multifd: rounds on the channels, a flush on the main channel."""

    def __init__(self, sender: PageSender, source: MultifdSource,
                 blocks: Mapping[str, SourceBlock], limit: Callable[[], int]) -> None:
        self.sender = sender
        self.source = source
        self._blocks = blocks
        self._limit = limit
        self._counted = (0, 0)  # normal, zero pages already added to the stats

    def handshake(self) -> dict[str, Any]:
        return {"multifd_channels": self.source.channels, "multifd_uuid": self.source.uuid}

    def start(self) -> None:
        self.source.start({n: bm.bits for n, bm in self.sender.bitmaps.items()},
                          self._blocks)

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
        self.source.end()

    def bytes_sent(self) -> int:
        return self.source.counter("bytes")

    def update_stats(self, ram: RamStats) -> None:
        normal, zero = self.source.counter("normal"), self.source.counter("zero")
        ram.normal += normal - self._counted[0]
        ram.duplicate += zero - self._counted[1]
        self._counted = (normal, zero)

    def to_qmp(self) -> dict[str, Any]:
        return {"x-multifd": {"channels": self.source.channels,
                              "bytes": self.source.per_channel("bytes"),
                              "local-ports": [s.local_port for s in self.source.senders]}}

    def close(self) -> None:
        self.end()


def choose_precopy_pages(caps: Capabilities, params: Parameters, uri: MigrationUri,
                         sender: PageSender, blocks: Mapping[str, SourceBlock],
                         tls: TlsEndpoint | None = None) -> PrecopyPages:
    """The precopy design of one migration."""
    if not caps.multifd:
        return MainChannelPages(sender)
    source = MultifdSource(uri, params.multifd_channels, params.x_dead_link_timeout, tls)
    return MultifdPages(sender, source, blocks, lambda: sender.limiter.limit)


def require_socket_uri(caps: Capabilities, uri: MigrationUri) -> None:
    """multifd opens several connections: a file: URI cannot have them."""
    if caps.multifd and uri.scheme == "file":
        raise ConfigError("multifd needs a tcp: or unix: URI (a file: image has one stream)")


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
        t = NamedThread(target=self._run, args=(init.channel, channel),
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
