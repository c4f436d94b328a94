"""Migration channels: URIs, connections, and buffered batched sends.

Theory of operation
-------------------
A migration URI is QEMU's: ``tcp:HOST:PORT``, ``unix:PATH`` or ``file:PATH``.
:func:`connect` opens the source end, :class:`Listener` the destination end.  A
:class:`Channel` is one byte stream with exactly one owning thread per direction; it
offers batched zero-copy sends (:meth:`Channel.send`), reads into caller buffers
(:meth:`Channel.recv_into`), and ``file:`` channels that behave the same, so a whole
migration stream can be saved to a file and loaded back.  A saved image ends with a
CRC32 of all its bytes (:meth:`Channel.seal`), checked before anything of it is loaded
(:func:`check_image`), as snapshot formats do.

:class:`ChannelWriter` collects encoded records (header bytes + memoryviews of guest RAM)
and flushes them with one ``sendmsg`` when enough are queued or when told to, and counts
the bytes it moved.

TLS (:mod:`livemig.migration.tls`) is a property of the channel: :meth:`Channel.secure`
is the one call that turns a connected channel into a TLS session (handshake and peer
checks), for every kind of channel a migration opens.  A channel may start with a few
bytes in clear (the postcopy channel's preamble, which routes it); then it is secured
by its first read or write after them, in whichever process owns it by then
(:meth:`Channel.handover` / :meth:`Channel.adopt` move an unsecured channel to a helper
process).  Over TLS, sends are encrypted copies (one ``SSL_write`` per batch, without
the GIL) instead of zero-copy ``sendmsg``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
import threading
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from livemig.errors import ChannelClosedError, ConfigError, RemoteProtocolError, TlsError
from livemig.kernel.sock import (
    Buffer,
    clamp_window,
    congestion_control,
    path_mtu,
    queued_bytes,
    read_exact_into,
    receive_buffer_size,
    recv_arrived,
    recv_exact_into,
    recv_scatter,
    send_buffers,
    send_gather,
    send_pages,
    set_buffer_sizes,
    set_congestion_control,
    set_dead_peer_timeout,
    set_nodelay,
    set_notsent_lowat,
    set_receive_buffer,
    set_send_buffer,
    unread_bytes,
    write_buffers,
)
from livemig.migration.tls import (
    HANDSHAKE_TIMEOUT,
    PAGES_PER_WRITE,
    READ_CHUNK,
    RECORD_PLAINTEXT,
    RecordGauge,
    TlsEndpoint,
    gather_pages,
    looks_like_tls,
    send_all,
)
from livemig.units import PAGE_SIZE
from livemig.wire.channel import ChannelKind, clear_prefix, identify_channel
from livemig.wire.constants import POSTCOPY_MAGIC
from livemig.wire.encoder import PageRecords

log = logging.getLogger("livemig.channel")

Scheme = Literal["tcp", "unix", "file"]
SOCKET_BUFFER = 4 << 20

# The postcopy channel carries requested pages in bursts.  BBR, the default of many
# hosts, re-measures the path's round trip when its minimum is 10 s old: for 200 ms its
# window is 4 segments, and a 2 MiB page then takes twice as long (the requests of
# the last ~200 ms of a 10 s postcopy on the 1 Gbit/s link: 28-41 ms against 19-20).
# CUBIC has no such timer; the precopy channel keeps the host's choice.
URGENT_CONGESTION_CONTROL = "cubic"

# A file: image ends with a checksum trailer after the stream: "LMCK" and the CRC32 of
# every byte before it as 8 lowercase hex digits (no NUL byte and no '{', so QEMU's
# analyze-migration.py still finds the VM description before it).  docs/STREAM.md.
IMAGE_MAGIC = b"LMCK"
IMAGE_TRAILER = len(IMAGE_MAGIC) + 8
_CHECK_CHUNK = 4 << 20


def image_trailer(crc: int) -> bytes:
    return IMAGE_MAGIC + b"%08x" % (crc & 0xFFFFFFFF)


def check_image(fd: int) -> int:
    """Check the checksum of the image open at ``fd`` before anything of it is loaded;
    return the length of the stream it holds (the image without its trailer)."""
    size = os.fstat(fd).st_size
    if size < IMAGE_TRAILER:
        raise RemoteProtocolError(f"the image is {size} bytes long: too short for a "
                                  "livemig image and its checksum")
    stream, crc = size - IMAGE_TRAILER, 0
    for pos in range(0, stream, _CHECK_CHUNK):
        crc = zlib.crc32(os.pread(fd, min(_CHECK_CHUNK, stream - pos), pos), crc)
    trailer = os.pread(fd, IMAGE_TRAILER, stream)
    if trailer[: len(IMAGE_MAGIC)] != IMAGE_MAGIC:
        raise RemoteProtocolError("the image has no checksum trailer: it is truncated, "
                                  "or not a livemig image")
    if trailer != image_trailer(crc):
        raise RemoteProtocolError(
            f"the image is corrupt: its checksum is {trailer[len(IMAGE_MAGIC):]!r} but its "
            f"bytes give CRC32 {crc:08x}")
    return stream


@dataclass(frozen=True)
class MigrationUri:
    scheme: Scheme
    host: str = ""
    port: int = 0
    path: str = ""

    @classmethod
    def parse(cls, uri: str) -> MigrationUri:
        scheme, _, rest = uri.partition(":")
        if scheme == "tcp":
            host, _, port = rest.rpartition(":")
            host = host.strip("[]")
            if not host or not port.isdigit() or not 0 <= int(port) < 65536:
                raise ConfigError(f"invalid migration URI {uri!r}: expected tcp:HOST:PORT")
            return cls("tcp", host=host, port=int(port))
        if scheme in ("unix", "file"):
            if not rest:
                raise ConfigError(f"invalid migration URI {uri!r}: expected {scheme}:PATH")
            return cls(scheme, path=rest)  # type: ignore[arg-type]
        raise ConfigError(f"unsupported migration URI {uri!r}: use tcp:HOST:PORT, "
                          "unix:PATH or file:PATH")

    def __str__(self) -> str:
        if self.scheme == "tcp":
            return f"tcp:{self.host}:{self.port}"
        return f"{self.scheme}:{self.path}"


class Channel:
    """One end of a migration byte stream (a socket or a file)."""

    def __init__(self, sock: socket.socket | None = None, fd: int = -1,
                 name: str = "main", file_stream: int = 0, *,
                 tls: TlsEndpoint | None = None, clear_in: int = 0, clear_out: int = 0
                 ) -> None:
        """``file_stream``: for an image being read, the length of its stream (reads
        stop there, before the checksum trailer).  ``tls``: the session this channel
        opens after ``clear_in`` / ``clear_out`` bytes in clear (see the module doc)."""
        self.sock = sock
        self.fd = fd
        self.name = name
        self.bytes_sent = 0
        self.bytes_received = 0
        self._closed = False
        self._crc = 0  # of the bytes written to a file, for its trailer
        self._file_left = file_stream
        self._tls = tls  # until secured
        self._clear_in = clear_in
        self._clear_out = clear_out
        self._tls_lock = threading.Lock()
        self._unread = b""  # clear bytes read by the handshake, not yet by the reader
        self._plain: socket.socket | None = None  # under a TLS session (secure())
        self.secured = False
        # bound_backlog: the bound whose receive buffer is still to be set (0: none
        # pending), and how many bytes must have been read first.
        self._shrink_to = 0
        self._shrink_after = 0

    @property
    def is_file(self) -> bool:
        return self.sock is None

    # --- TLS ----------------------------------------------------------------------------
    def secure(self, tls: TlsEndpoint | None = None,
               timeout: float | None = None) -> None:
        """Make this channel a TLS session now (``tls``, or the endpoint it was made
        with); nothing if it has no TLS or is secured already.  The handshake runs in
        the calling thread; the peer's refusal or ours raises TlsError."""
        with self._tls_lock:
            endpoint = tls or self._tls
            if endpoint is None or self.secured:
                return
            if self._clear_out or self.sock is None:
                raise TlsError(f"the {self.name} channel cannot start TLS here")
            if self._clear_in:  # the clear bytes come first: keep them for the reader
                head = bytearray(self._clear_in)
                recv_exact_into(self.sock, memoryview(head))
                self._unread, self._clear_in = bytes(head), 0
            # The session takes over a duplicate: other threads may still use the plain
            # socket object (queued bytes, socket options, shutdown) meanwhile, so it
            # stays open, and its descriptor valid, until the channel closes.
            raw = self.sock
            try:
                tls_sock = endpoint.handshake(raw.dup(), self.name, timeout)
            except TlsError:
                if self._closed:
                    raise ChannelClosedError(f"{self.name} channel closed during its "
                                             "TLS handshake") from None
                raise
            self.sock, self.secured, self._tls = tls_sock, True, None
            self._plain = raw

    def expect_tls(self, tls: TlsEndpoint, clear_in: int) -> None:
        """An accepted connection: TLS after ``clear_in`` bytes in clear."""
        self._tls, self._clear_in = tls, clear_in

    def _ready(self) -> None:
        """Before reading or writing past the clear prefix: the TLS handshake (which
        reads what is left of a clear prefix first)."""
        if self._tls is not None and not self._clear_out:
            self.secure()

    def _take_unread(self, n: int) -> bytes:
        data, self._unread = self._unread[:n], self._unread[n:]
        self._received(len(data))
        return data

    def _received(self, n: int) -> None:
        self.bytes_received += n
        if self._shrink_to and self.bytes_received >= self._shrink_after:
            self._shrink_receive_buffer()

    def bound_backlog(self, nbytes: int) -> None:
        """From now on let about ``nbytes`` at most of the stream arrive ahead of this
        end's reader (TCP; nothing for other channels): what this end has not read yet
        then waits in the sender's queue, where the sender can still put a requested
        page in front of it.

        The window is clamped at once.  The receive buffer, which bounds what waits
        unread, shrinks only once the reader has read past the window the kernel may
        have advertised before the clamp, and its queue is short (a buffer shrunk
        under a queue or a window already advertised makes the kernel drop segments
        allowed in flight: the sender then waits for a retransmission timeout)."""
        sock = self.sock
        if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
            return
        clamp_window(sock, nbytes)
        self._shrink_after = self.bytes_received + receive_buffer_size(sock)
        self._shrink_to = nbytes

    def _shrink_receive_buffer(self) -> None:
        assert self.sock is not None
        try:
            if unread_bytes(self.sock) > self._shrink_to:
                self._shrink_after = self.bytes_received + self._shrink_to
                return
            # Room for a queue and a window of the bound each, in the kernel's
            # accounting (which doubles what is set: its overhead per segment).
            set_receive_buffer(self.sock, 2 * self._shrink_to)
        except OSError:
            pass  # the connection is going away: its next read says so
        self._shrink_to = 0

    def handover(self) -> dict[str, Any]:
        """What a helper process needs to take this unsecured socket over (a TLS
        session cannot move between processes: the helper makes its own)."""
        if self.secured:
            raise TlsError(f"the {self.name} channel's TLS session cannot move to "
                           "another process")
        return {"tls": None if self._tls is None else self._tls.describe(),
                "clear_in": self._clear_in, "clear_out": self._clear_out}

    @classmethod
    def adopt(cls, sock: socket.socket, desc: Mapping[str, Any], name: str) -> Channel:
        """A helper process's channel over a socket it was handed (:meth:`handover`)."""
        tls = desc.get("tls")
        return cls(sock, name=name, tls=None if tls is None else TlsEndpoint.of(tls),
                   clear_in=int(desc["clear_in"]), clear_out=int(desc["clear_out"]))

    def buffered(self) -> int:
        """Bytes already received and decrypted but not read yet (a poll loop must
        read them: the socket will not signal them again)."""
        return self.sock.pending() if isinstance(self.sock, ssl.SSLSocket) else 0

    def fileno(self) -> int:
        return self.sock.fileno() if self.sock is not None else self.fd

    def _send_clear(self, buffers: Sequence[Buffer]) -> list[Buffer]:
        """Send the part of ``buffers`` that goes in clear; the rest is returned."""
        assert self.sock is not None
        data = b"".join(buffers)
        n = min(self._clear_out, len(data))
        self.bytes_sent += send_buffers(self.sock, [data[:n]])
        self._clear_out -= n
        return [data[n:]] if len(data) > n else []

    # --- I/O ----------------------------------------------------------------------------
    def send(self, buffers: Sequence[Buffer]) -> None:
        if self._clear_out:
            buffers = self._send_clear(buffers)
            if not buffers:
                return
        self._ready()
        if self.secured:
            assert isinstance(self.sock, ssl.SSLSocket)
            try:
                self.bytes_sent += send_all(self.sock, buffers)
            except OSError as e:
                raise ChannelClosedError(f"{self.name} channel: {e}") from None
        elif self.sock is not None:
            self.bytes_sent += send_buffers(self.sock, buffers)
        else:
            self._write_file(buffers)

    def _write_file(self, buffers: Sequence[Buffer]) -> None:
        # One snapshot, checksummed and written: the buffers may be views of the RAM of
        # a guest that runs on (a live save), whose pages can change between the two.
        data = b"".join(buffers)
        self._crc = zlib.crc32(data, self._crc)
        self.bytes_sent += write_buffers(self.fd, [data])

    def seal(self) -> None:
        """The stream is complete: a file gets its checksum trailer (a socket nothing)."""
        if self.sock is None:
            write_buffers(self.fd, [image_trailer(self._crc)])

    def send_pages(self, rec: PageRecords, ram: memoryview,
                   stop: Callable[[], bool] | None = None, step: int = 0) -> int:
        """PAGE records with payloads straight from guest RAM (one scatter-gather
        sendmsg per IOV_MAX buffers on a socket; writev of views for a file).  Returns
        how many records were sent: all, or with ``stop`` (sockets), those sent before
        ``stop()`` was true after a group of ``step`` records (the stream ends on a
        whole record)."""
        self._ready()
        n = len(rec.offsets)
        if self.secured:
            per = min(step, PAGES_PER_WRITE) if stop is not None and step else PAGES_PER_WRITE
            for i in range(0, n, per):
                j = i + per
                self.send([gather_pages(rec.words[i:j], b"" if i else rec.prefix, ram,
                                        rec.offsets[i:j]).data])
                if j < n and stop is not None and stop():
                    return j
            return n
        if self.sock is not None:
            sent = send_pages(self.sock, rec.words, rec.prefix, ram, rec.offsets, stop, step)
            self.bytes_sent += rec.bytes_of(sent)
            return sent
        hdr = memoryview(rec.words.data).cast("B")
        bufs: list[Buffer] = []
        for i, off in enumerate(rec.offsets.tolist()):
            bufs.append(hdr[8 * i : 8 * i + 8])
            if i == 0 and rec.prefix:
                bufs.append(rec.prefix)
            bufs.append(ram[off : off + PAGE_SIZE])
        self._write_file(bufs)
        return n

    def send_gather(self, head: bytes, ram: memoryview, offsets: npt.NDArray[np.uint64]) -> None:
        """``head`` then the 4 KiB pages of ``ram`` at ``offsets``, in one scatter-gather
        send (a multifd packet; sockets only)."""
        if self.sock is None:
            raise ChannelClosedError(f"{self.name} channel: multifd needs a socket")
        self._ready()
        if self.secured:  # TLS encrypts a copy anyway: gather the pages into one
            self.send([head, _pages(ram)[offsets // PAGE_SIZE].data])
            return
        self.bytes_sent += send_gather(self.sock, head, ram, offsets)

    def recv_scatter(self, ram: memoryview, offsets: npt.NDArray[np.uint64]) -> None:
        """Receive pages straight into ``ram`` at ``offsets`` (sockets only)."""
        if self.sock is None:
            raise ChannelClosedError(f"{self.name} channel: multifd needs a socket")
        self._ready()
        if self.secured:  # records are decrypted in user space: into one buffer first
            data = np.empty((len(offsets), PAGE_SIZE), np.uint8)
            self.recv_exact_into(data.data.cast("B"))
            _pages(ram)[offsets // PAGE_SIZE] = data
            return
        try:
            recv_scatter(self.sock, ram, offsets)
        except ChannelClosedError as e:
            raise ChannelClosedError(f"{self.name} channel: {e}") from None
        self._received(PAGE_SIZE * len(offsets))

    def recv_into(self, view: memoryview) -> int:
        """Read what is available (at least one byte); 0 means EOF."""
        if self._clear_in:
            view = view[: self._clear_in]
        else:
            self._ready()
            if self._unread:
                data = self._take_unread(len(view))
                view[: len(data)] = data
                return len(data)
        try:
            if self.sock is not None:
                n = self.sock.recv_into(view)
            else:
                n = os.readv(self.fd, [view[: self._file_left]]) if self._file_left else 0
                self._file_left -= n
        except (ConnectionResetError, OSError) as e:
            if self._closed:
                return 0
            raise ChannelClosedError(f"{self.name} channel: {e}") from None
        self._clear_in = max(0, self._clear_in - n)
        self._received(n)
        return n

    def detect_dead_peer(self, timeout_ms: int) -> None:
        """A TCP peer silent for ``timeout_ms`` (0: never) makes this channel fail with
        ETIMEDOUT, with or without data in flight: a cut link becomes an error, not a
        hang (keepalive and TCP_USER_TIMEOUT)."""
        if self.sock is not None and timeout_ms > 0:
            set_dead_peer_timeout(self.sock, timeout_ms)

    def queued(self) -> int:
        """Bytes sent but not yet acknowledged by the peer (0 for files)."""
        return queued_bytes(self.sock) if self.sock is not None else 0

    def recv(self, max_bytes: int) -> bytes:
        """Read up to ``max_bytes`` (at least one); ``b""`` means EOF."""
        if self._clear_in:
            max_bytes = min(max_bytes, self._clear_in)
        else:
            self._ready()
            if self._unread:
                return self._take_unread(max_bytes)
        try:
            if self.secured:
                data = self._recv_records(max_bytes)
            elif self.sock is not None:
                data = recv_arrived(self.sock, max_bytes)
            else:
                data = os.read(self.fd, min(max_bytes, self._file_left))
                self._file_left -= len(data)
        except OSError as e:
            if self._closed:
                return b""
            raise ChannelClosedError(f"{self.name} channel: {e}") from None
        self._clear_in = max(0, self._clear_in - len(data))
        self._received(len(data))
        return data

    def _recv_records(self, max_bytes: int) -> bytes:
        """A TLS read returns one record (16 KiB): go on reading the records of the
        same write that have already arrived whole, up to
        :data:`~livemig.migration.tls.READ_CHUNK` (decrypting costs far more than a
        copy: a larger chunk would hold back a requested page behind it), so the
        reader handles large chunks as on a plain socket -- and never waits for a
        record still arriving while it holds others.  A short record (a page, a
        request) is read alone (:class:`~livemig.migration.tls.RecordGauge`)."""
        assert isinstance(self.sock, ssl.SSLSocket)
        sock = self.sock
        max_bytes = min(max_bytes, READ_CHUNK)
        # One read returns one record's plaintext at most: asking for more only makes
        # the read allocate (and map) more (see recv_arrived).
        parts = [sock.recv(min(max_bytes, RECORD_PLAINTEXT))]
        got = len(parts[0])
        gauge = RecordGauge(sock)
        while got < max_bytes and parts[-1] and gauge.read_on(len(parts[-1])):
            parts.append(sock.recv(min(max_bytes - got, RECORD_PLAINTEXT)))
            got += len(parts[-1])
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def peek(self, n: int, timeout: float = 30.0) -> bytes:
        """The first ``n`` bytes of the stream, left in place (identifies a channel)."""
        assert self.sock is not None
        if self.secured:
            return self._peek_secured(n, timeout)
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(n, socket.MSG_PEEK | socket.MSG_WAITALL)
        except OSError as e:
            raise ChannelClosedError(f"{self.name} channel: no preamble: {e}") from None
        finally:
            self.sock.settimeout(None)
        if len(data) < n:
            raise ChannelClosedError(f"{self.name} channel closed before its preamble")
        return data

    def _peek_secured(self, n: int, timeout: float) -> bytes:
        """TLS has no MSG_PEEK: read the plaintext and keep it for the reader."""
        assert self.sock is not None
        self.sock.settimeout(timeout)
        try:
            while len(self._unread) < n:
                data = self.sock.recv(n - len(self._unread))
                if not data:
                    raise ChannelClosedError(f"{self.name} channel closed before its "
                                             "preamble")
                self._unread += data
        except OSError as e:
            raise ChannelClosedError(f"{self.name} channel: no preamble: {e}") from None
        finally:
            self.sock.settimeout(None)
        return self._unread[:n]

    def recv_exact_into(self, view: memoryview) -> None:
        if self._clear_in or self._tls is not None or self._unread or self.secured:
            got = 0
            while got < len(view):
                n = self.recv_into(view[got:])
                if n == 0:
                    raise ChannelClosedError(f"{self.name} channel closed after {got} of "
                                             f"{len(view)} bytes")
                got += n
            return
        if self.sock is not None:
            recv_exact_into(self.sock, view)
        else:
            if len(view) > self._file_left:
                raise ChannelClosedError(f"{self.name} channel: the stream ends after "
                                         f"{self._file_left} of {len(view)} bytes")
            read_exact_into(self.fd, view)
            self._file_left -= len(view)
        self._received(len(view))

    def shutdown(self) -> None:
        """Wake any thread blocked on this channel (used by cancel and on failure)."""
        self._closed = True
        if self.sock is not None:
            with contextlib.suppress(OSError):
                # The plain socket's shutdown: SSLSocket.shutdown would also drop the
                # session that a blocked reader still uses.
                socket.socket.shutdown(self.sock, socket.SHUT_RDWR)

    def close(self) -> None:
        self._closed = True
        if self.sock is not None:
            self.sock.close()
            if self._plain is not None:
                self._plain.close()
        elif self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _pages(ram: memoryview) -> npt.NDArray[np.uint8]:
    """``ram`` as an array of 4 KiB pages (a view, no copy)."""
    return np.frombuffer(ram, np.uint8).reshape(-1, PAGE_SIZE)


def connect(uri: MigrationUri, name: str = "main", timeout: float = 10.0, *,
            tls: TlsEndpoint | None = None, kind: ChannelKind = ChannelKind.MAIN,
            send_buffer: int = SOCKET_BUFFER) -> Channel:
    """Open the source end of a channel; with ``tls``, a main channel is secured at
    once, a postcopy channel after its clear preamble (``wire.channel.clear_prefix``).
    ``send_buffer`` is what this connection may have in flight (SO_SNDBUF)."""
    try:
        if uri.scheme == "file":
            fd = os.open(uri.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            return Channel(fd=fd, name=name)
        if uri.scheme == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(uri.path)
        else:
            sock = socket.create_connection((uri.host, uri.port), timeout=timeout)
            set_nodelay(sock)
        sock.settimeout(None)
        set_send_buffer(sock, send_buffer)
        set_receive_buffer(sock, SOCKET_BUFFER)
    except OSError as e:
        raise ChannelClosedError(f"cannot connect to {uri}: {e.strerror or e}") from None
    if (kind is ChannelKind.POSTCOPY and uri.scheme == "tcp"
            and not set_congestion_control(sock, URGENT_CONGESTION_CONTROL)):
        log.info("the postcopy channel keeps TCP congestion control %s: %s is not "
                 "available here", congestion_control(sock) or "-",
                 URGENT_CONGESTION_CONTROL)
    if tls is None:
        return Channel(sock=sock, name=name)
    ch = Channel(sock=sock, name=name, tls=tls.toward(uri.host), clear_out=clear_prefix(kind))
    if not clear_prefix(kind):
        try:
            ch.secure(timeout=timeout)
        except BaseException:
            ch.close()
            raise
    return ch


def identify_incoming(ch: Channel, tls: TlsEndpoint | None) -> ChannelKind:
    """Which channel a connection just accepted is, by its first bytes: with ``tls`` a
    main channel is secured now (QEMU's: TLS from its first byte) and a postcopy
    channel after its clear preamble; a plain peer against TLS, or a TLS peer without
    it, is refused with TlsError.  A refused connection is closed."""
    try:
        return _identify_incoming(ch, tls)
    except BaseException:
        ch.close()
        raise


def _identify_incoming(ch: Channel, tls: TlsEndpoint | None) -> ChannelKind:
    if ch.is_file:
        return ChannelKind.MAIN
    head = ch.peek(4)
    if tls is None:
        if looks_like_tls(head):
            raise TlsError("a TLS client connected, but this side has no tls-creds: "
                           "refused")
        return identify_channel(head)
    if head == POSTCOPY_MAGIC:  # routed in clear, secured by its owner (docs/STREAM.md)
        ch.expect_tls(tls, clear_in=clear_prefix(ChannelKind.POSTCOPY))
        return ChannelKind.POSTCOPY
    if not looks_like_tls(head):
        raise TlsError(f"a peer without TLS connected (it sent {head!r}), but tls-creds "
                       "is set here: refused")
    ch.secure(tls, timeout=HANDSHAKE_TIMEOUT)
    kind = identify_channel(ch.peek(4))  # the channel's preamble, inside TLS
    if clear_prefix(kind):
        raise RemoteProtocolError(f"the {kind.value} channel's preamble must come before "
                                  "its TLS session")
    return kind


class Listener:
    """The destination end: listens on a URI and accepts channels."""

    def __init__(self, uri: MigrationUri) -> None:
        self.uri = uri
        self._sock: socket.socket | None = None
        try:
            if uri.scheme == "tcp":
                self._sock = socket.create_server((uri.host, uri.port), reuse_port=False,
                                                  backlog=4)
            elif uri.scheme == "unix":
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(uri.path)
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self._sock.bind(uri.path)
                self._sock.listen(4)
        except OSError as e:
            raise ConfigError(f"cannot listen on {uri}: {e.strerror or e}") from None
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        """The bound TCP port (useful with port 0)."""
        if self._sock is None or self.uri.scheme != "tcp":
            return 0
        return int(self._sock.getsockname()[1])

    def accept(self, timeout: float | None = None, name: str = "main") -> Channel:
        if self.uri.scheme == "file":
            try:
                fd = os.open(self.uri.path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                raise ChannelClosedError(f"cannot open {self.uri}: {e.strerror}") from None
            try:
                stream = check_image(fd)
            except BaseException:
                os.close(fd)
                raise
            return Channel(fd=fd, name=name, file_stream=stream)
        sock = self._sock
        if sock is None:
            raise ChannelClosedError(f"stopped listening on {self.uri}")
        sock.settimeout(timeout)
        try:
            conn, _ = sock.accept()
        except (TimeoutError, OSError) as e:
            raise ChannelClosedError(f"no connection on {self.uri}: {e}") from None
        conn.settimeout(None)
        set_nodelay(conn)
        set_buffer_sizes(conn, SOCKET_BUFFER)
        return Channel(sock=conn, name=name)

    def close(self) -> None:
        # Called from the load thread and from abort() (quit): swap under the lock.
        with self._lock:
            sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
            if self.uri.scheme == "unix":
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.uri.path)


class ChannelWriter:
    """Queues encoded buffers and sends them in large batches on one channel."""

    def __init__(self, channel: Channel, flush_buffers: int = 512,
                 flush_bytes: int = 4 << 20) -> None:
        self.channel = channel
        self._queue: list[Buffer] = []
        self._queued_bytes = 0
        self._flush_buffers = flush_buffers
        self._flush_bytes = flush_bytes

    def write(self, buffers: Sequence[Buffer]) -> None:
        self._queue.extend(buffers)
        self._queued_bytes += sum(len(b) for b in buffers)
        if len(self._queue) >= self._flush_buffers or self._queued_bytes >= self._flush_bytes:
            self.flush()

    def write_pages(self, rec: PageRecords, ram: memoryview, lead: Sequence[Buffer] = (),
                    stop: Callable[[], bool] | None = None, step: int = 0) -> int:
        """Send ``lead`` (e.g. the window's ZERO records) and page records now, after
        whatever is queued (stream order is kept); returns how many page records went
        (see :meth:`Channel.send_pages` for ``stop`` and ``step``)."""
        self._queue.extend(lead)
        self.flush()
        return self.channel.send_pages(rec, ram, stop, step)

    def write_now(self, buffers: Sequence[Buffer]) -> None:
        """Queue and flush at once (urgent data)."""
        self._queue.extend(buffers)
        self.flush()

    def flush(self) -> None:
        if self._queue:
            queue, self._queue, self._queued_bytes = self._queue, [], 0
            self.channel.send(queue)

    @property
    def bytes_sent(self) -> int:
        return self.channel.bytes_sent


# Once postcopy runs, background pages must not pile up in front of urgent ones (the
# same stream without preemption; the same qdisc on a shaped link with it), yet the
# queue must hold many packets of the link: TCP's windows open a segment at a time, so
# a queue of one or two segments (loopback's are 64 KiB) leaves the link idle while the
# two ends wait for each other to be scheduled.  The queue is BACKGROUND_PACKETS path
# MTUs, at least BACKGROUND_QUEUE_MIN: 64 KiB on an Ethernet link, 1 MiB on loopback.
BACKGROUND_PACKETS = 16
BACKGROUND_QUEUE_MIN = 64 * 1024


def background_queue_bytes(mtu: int) -> int:
    """The postcopy background queue on a link that carries ``mtu``-byte packets
    (0: not an IP link)."""
    return max(BACKGROUND_QUEUE_MIN, BACKGROUND_PACKETS * mtu)


def quiet_background(channel: Channel) -> int:
    """Postcopy: size the precopy channel's kernel queues by the packets of its link:
    the send buffer, the unsent part, and what may arrive ahead of the reader
    (:meth:`Channel.bound_backlog`; TCP); returns that size (0 for a channel without a
    socket of its own).  A reader slower than the link for a while (TLS, a busy CPU)
    otherwise holds megabytes unread in its receive buffer, and without preemption a
    requested page waits behind them."""
    if channel.sock is None:
        return 0
    queue = background_queue_bytes(path_mtu(channel.sock))
    set_send_buffer(channel.sock, queue)
    channel.bound_backlog(queue)
    set_notsent_lowat(channel.sock, queue // 2)
    return queue
