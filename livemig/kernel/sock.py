"""Batched, zero-copy socket and file I/O for migration channels.

Theory of operation
-------------------
The sender hands over a list of buffers: small header ``bytes`` interleaved with
memoryviews of guest RAM.  :func:`send_buffers` passes them to ``sendmsg`` up to
``IOV_MAX`` at a time, so one syscall moves hundreds of pages and no page is copied in
user space; partial sends are resumed from the exact buffer and byte where the kernel
stopped.  :func:`write_buffers` does the same for files with ``os.writev``.

:func:`recv_exact_into` fills a caller-provided memoryview (guest RAM, or a temporary
huge page) with ``recv_into`` until it is full; EOF before that raises
:class:`ChannelClosedError` so a short read can never become a page of zeroes.

All these calls block in the kernel with the GIL released (CPython releases it around
socket and os I/O).

Dead links
~~~~~~~~~~
A cut cable or a silent peer does not close a TCP socket: a ``recv`` waits forever and
a ``send`` retransmits for many minutes.  :func:`set_dead_peer_timeout` bounds both by one
timeout: ``TCP_USER_TIMEOUT`` aborts the connection when sent data stays unacknowledged
that long, and keepalive probes (``SO_KEEPALIVE`` with ``TCP_KEEPIDLE`` /
``TCP_KEEPINTVL`` / ``TCP_KEEPCNT``) make an idle connection send something to be
acknowledged; with a user timeout set, Linux aborts an idle connection at the first probe
after the peer has been silent for the timeout.  The blocked call then fails with
``ETIMEDOUT``.

:func:`unread_bytes` (SIOCINQ) and :func:`peek_raw` (MSG_PEEK) look at what has arrived
and not been read yet, below any TLS session: the TLS reader uses them to tell a record
that has arrived whole from one still arriving, and :func:`recv_arrived` to read what
has arrived without allocating a chunk of the largest size for each read.

:func:`socket_in_netns` creates a socket inside another network namespace (tests and the
network lab use it): a socket stays in the namespace it was created in.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import struct
import threading
from collections.abc import Callable, Sequence
from typing import Final

import numpy as np
import numpy.typing as npt

from livemig.errors import ChannelClosedError, ConfigError, KernelError
from livemig.units import PAGE_SIZE

Buffer = bytes | bytearray | memoryview
IOV_MAX: Final = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


def _advance(buffers: list[memoryview], sent: int) -> list[memoryview]:
    """Drop ``sent`` bytes from the front of ``buffers``."""
    i = 0
    while i < len(buffers) and sent >= len(buffers[i]):
        sent -= len(buffers[i])
        i += 1
    rest = buffers[i:]
    if sent and rest:
        rest[0] = rest[0][sent:]
    return rest


def send_buffers(sock: socket.socket, buffers: Sequence[Buffer]) -> int:
    """Send every byte of ``buffers`` with as few ``sendmsg`` calls as possible.

    Buffers are byte-format (the encoder's headers and memoryview slices of guest
    RAM).  A blocking stream socket nearly always takes a whole batch, so the
    per-buffer bookkeeping of a partial send is only done when one happens.
    """
    total = 0
    try:
        for i in range(0, len(buffers), IOV_MAX):
            batch = buffers[i : i + IOV_MAX]
            want = sum(map(len, batch))
            sent = sock.sendmsg(batch)
            while sent < want:
                rest = _advance([memoryview(b).cast("B") for b in batch], sent)
                want -= sent
                total += sent
                batch = rest
                sent = sock.sendmsg(batch)
            total += sent
    except (BrokenPipeError, ConnectionResetError) as e:
        raise ChannelClosedError(f"peer closed the connection while sending: {e}") from None
    return total


def write_buffers(fd: int, buffers: Sequence[Buffer]) -> int:
    """Write every byte of ``buffers`` to a file descriptor with ``writev``."""
    pending = [memoryview(b).cast("B") for b in buffers if len(b)]
    total = 0
    while pending:
        batch = pending[:IOV_MAX]
        written = os.writev(fd, batch)
        total += written
        pending = _advance(batch, written) + pending[IOV_MAX:]
    return total


def recv_exact_into(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` completely from ``sock``; EOF first raises ChannelClosedError."""
    got = 0
    n = len(view)
    try:
        while got < n:
            r = sock.recv_into(view[got:], n - got)
            if r == 0:
                raise ChannelClosedError(f"peer closed the connection after {got} of "
                                         f"{n} bytes")
            got += r
    except ConnectionResetError as e:
        raise ChannelClosedError(f"connection reset: {e}") from None


def read_exact_into(fd: int, view: memoryview) -> None:
    """Fill ``view`` completely from a file; EOF first raises ChannelClosedError."""
    got = 0
    while got < len(view):
        r = os.readv(fd, [view[got:]])
        if r == 0:
            raise ChannelClosedError(f"file ended after {got} of {len(view)} bytes")
        got += r


def set_nodelay(sock: socket.socket) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def set_notsent_lowat(sock: socket.socket, nbytes: int) -> None:
    """Keep at most ``nbytes`` unsent in the kernel (TCP only): a short send queue."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, "TCP_NOTSENT_LOWAT", 25), nbytes)


IP_MTU: Final = 14  # linux/in.h
IPV6_MTU: Final = 24  # linux/in6.h


def path_mtu(sock: socket.socket) -> int:
    """The path MTU of a connected TCP socket, the largest packet its link carries
    (65536 on loopback, 1500 on Ethernet); 0 for other sockets."""
    if sock.family == socket.AF_INET:
        return int(sock.getsockopt(socket.IPPROTO_IP, IP_MTU))
    if sock.family == socket.AF_INET6:
        return int(sock.getsockopt(socket.IPPROTO_IPV6, IPV6_MTU))
    return 0


SO_SNDBUFFORCE: Final = 32
SO_RCVBUFFORCE: Final = 33


def set_buffer_sizes(sock: socket.socket, nbytes: int) -> None:
    """Large socket buffers: a migration stream wants megabytes in flight, and the
    default (~200 KiB) makes the sender block and wake the receiver far too often.
    As root the *FORCE options pass the net.core.{w,r}mem_max caps."""
    set_send_buffer(sock, nbytes)
    set_receive_buffer(sock, nbytes)


def set_send_buffer(sock: socket.socket, nbytes: int) -> None:
    """The send buffer alone (see :func:`set_buffer_sizes`)."""
    _set_buffer(sock, SO_SNDBUFFORCE, socket.SO_SNDBUF, nbytes)


def set_receive_buffer(sock: socket.socket, nbytes: int) -> None:
    """The receive buffer alone (see :func:`set_buffer_sizes`)."""
    _set_buffer(sock, SO_RCVBUFFORCE, socket.SO_RCVBUF, nbytes)


def _set_buffer(sock: socket.socket, force: int, plain: int, nbytes: int) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, force, nbytes)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, plain, nbytes)


def congestion_control(sock: socket.socket) -> str:
    """The TCP congestion control algorithm of ``sock`` ("" for other sockets)."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return ""
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16)
    return raw.split(b"\0", 1)[0].decode()


def set_congestion_control(sock: socket.socket, name: str) -> bool:
    """Use the TCP congestion control ``name`` on ``sock``; False where the kernel has
    not got it or does not let this process choose it (TCP only)."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, name.encode())
    except OSError:
        return False
    return True


def receive_buffer_size(sock: socket.socket) -> int:
    """The receive buffer the kernel allows this socket (SO_RCVBUF: twice what was set,
    for the kernel's own overhead); no window it advertises is larger."""
    return int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))


def clamp_window(sock: socket.socket, nbytes: int) -> None:
    """Advertise at most ``nbytes`` of receive window from now on (TCP only), keeping
    the receive buffer as it is.  Shrinking the receive buffer instead, under a window
    advertised earlier, makes the kernel prune the receive queue and drop segments
    already allowed in flight: the sender then waits for a retransmission timeout (at
    least 200 ms)."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_WINDOW_CLAMP, nbytes)


class _Msghdr(ctypes.Structure):
    """struct msghdr (x86_64)."""

    _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32),
                ("iov", ctypes.c_void_p), ("iovlen", ctypes.c_size_t),
                ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]


_IOVEC = np.dtype([("base", np.uint64), ("len", np.uint64)])  # struct iovec
_LIBC = ctypes.CDLL(None, use_errno=True)  # immutable handle; CDLL calls drop the GIL
_LIBC.sendmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
_LIBC.sendmsg.restype = ctypes.c_ssize_t
MSG_NOSIGNAL: Final = 0x4000
MSG_WAITALL: Final = 0x100


def send_pages(sock: socket.socket, words: npt.NDArray[np.generic], prefix: bytes,
               ram: memoryview, offsets: npt.NDArray[np.uint64],
               stop: Callable[[], bool] | None = None, step: int = 0) -> int:
    """Send PAGE records [header i, (prefix after the first), 4 KiB of ``ram`` at
    ``offsets[i]``] with scatter-gather ``sendmsg``, building the iovec array with
    NumPy: no Python object per page, no copy of page data.  Returns how many records
    were sent: all of them, unless ``stop`` is given.  Then they go ``step`` records at
    a time, and once ``stop()`` is true after a step, the rest are left unsent (the
    stream ends on a whole record).

    Memory: ``ram`` is a writable view of guest RAM owned by the caller, ``words`` and
    ``prefix`` are caller-owned too; all stay alive until this returns, which is after
    the kernel has copied every byte.
    """
    n = len(offsets)
    if n == 0:
        return 0
    ram_base = ctypes.addressof(ctypes.c_char.from_buffer(ram))
    hdr = np.ascontiguousarray(words)
    lead = 1 if prefix else 0  # the idstr, after the first header
    iov = np.empty(2 * n + lead, dtype=_IOVEC)
    hdr_at = np.arange(0, 2 * n, 2)
    hdr_at[1:] += lead
    page_at = hdr_at + 1
    page_at[0] += lead
    iov["base"][hdr_at] = hdr.ctypes.data + 8 * np.arange(n, dtype=np.uint64)
    iov["len"][hdr_at] = 8
    iov["base"][page_at] = np.uint64(ram_base) + offsets.astype(np.uint64)
    iov["len"][page_at] = PAGE_SIZE
    if prefix:
        iov[1] = (ctypes.cast(ctypes.c_char_p(prefix), ctypes.c_void_p).value, len(prefix))
    if stop is None or step <= 0 or step >= n:
        _sendmsg_all(sock.fileno(), iov)
        return n
    sent = 0
    while sent < n:
        end = min(sent + step, n)
        # Record i starts at iovec 2i (+ the prefix's after the first record).
        _sendmsg_all(sock.fileno(), iov[2 * sent + (lead if sent else 0) : 2 * end + lead])
        sent = end
        if sent < n and stop():
            break
    return sent


def _page_iov(ram: memoryview, offsets: npt.NDArray[np.uint64], lead: int) -> npt.NDArray[np.void]:
    """An iovec array: ``lead`` entries left for the caller, then the 4 KiB pages of
    ``ram`` at ``offsets``, in that order, one entry per run of consecutive pages (a
    dense 2 MiB window is one entry, not 512); built with NumPy, no Python object per
    page."""
    off = offsets.astype(np.uint64)
    first = np.ones(len(off), dtype=np.bool_)  # does a run start at this page?
    first[1:] = off[1:] != off[:-1] + np.uint64(PAGE_SIZE)
    starts = np.flatnonzero(first)
    iov = np.empty(lead + len(starts), dtype=_IOVEC)
    ram_base = ctypes.addressof(ctypes.c_char.from_buffer(ram))
    iov["base"][lead:] = np.uint64(ram_base) + off[starts]
    iov["len"][lead:] = np.diff(starts, append=len(off)).astype(np.uint64) * np.uint64(PAGE_SIZE)
    return iov


def send_gather(sock: socket.socket, head: bytes, ram: memoryview,
                offsets: npt.NDArray[np.uint64]) -> int:
    """Send ``head`` then the 4 KiB pages of ``ram`` at ``offsets`` with scatter-gather
    ``sendmsg`` (a multifd packet: header, offsets, page data).

    Memory: ``ram`` (guest RAM, or a copy of it) and ``head`` are the caller's and stay
    alive until this returns, after the kernel copied every byte.
    """
    iov = _page_iov(ram, offsets, 1)
    iov[0] = (ctypes.cast(ctypes.c_char_p(head), ctypes.c_void_p).value, len(head))
    return _sendmsg_all(sock.fileno(), iov)


_LIBC.recvmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
_LIBC.recvmsg.restype = ctypes.c_ssize_t


def recv_scatter(sock: socket.socket, ram: memoryview,
                 offsets: npt.NDArray[np.uint64]) -> None:
    """Receive ``len(offsets)`` pages straight into ``ram`` at ``offsets`` (scatter
    ``recvmsg``; the GIL is released in the call); EOF first raises ChannelClosedError.

    Memory: ``ram`` is a writable view of guest RAM the caller keeps alive until this
    returns.
    """
    iov = _page_iov(ram, offsets, 0)
    msg = _Msghdr()
    start, total, want = 0, 0, PAGE_SIZE * len(offsets)
    while start < len(iov):
        chunk = iov[start : start + IOV_MAX]
        msg.iov, msg.iovlen = chunk.ctypes.data, len(chunk)
        # MSG_WAITALL: one call fills the whole chunk (unless a signal or EOF cuts it
        # short), not one call per segment the peer's stack happened to deliver.
        got = _LIBC.recvmsg(sock.fileno(), ctypes.byref(msg), MSG_WAITALL)
        if got < 0:
            err = ctypes.get_errno()
            if err == errno.EINTR:
                continue
            raise ChannelClosedError(f"receiving pages: {os.strerror(err)}")
        if got == 0:
            raise ChannelClosedError(f"peer closed the connection after {total} of "
                                     f"{want} bytes of pages")
        total += got
        start += _consumed(chunk, got)


def _sendmsg_all(fd: int, iov: npt.NDArray[np.void]) -> int:
    total = 0
    start = 0
    msg = _Msghdr()
    while start < len(iov):
        chunk = iov[start : start + IOV_MAX]
        msg.iov, msg.iovlen = chunk.ctypes.data, len(chunk)
        sent = _LIBC.sendmsg(fd, ctypes.byref(msg), MSG_NOSIGNAL)
        if sent < 0:
            err = ctypes.get_errno()
            if err == errno.EINTR:
                continue
            if err in (errno.EPIPE, errno.ECONNRESET):
                raise ChannelClosedError("peer closed the connection while sending")
            raise OSError(err, os.strerror(err))
        total += sent
        start += _consumed(chunk, sent)
    return total


def _consumed(chunk: npt.NDArray[np.void], nbytes: int) -> int:
    """How many whole iovecs of ``chunk`` the kernel moved in ``nbytes``; the one it
    stopped in (a partial send or receive) is trimmed to its rest."""
    ends = np.cumsum(chunk["len"])
    done = int(np.searchsorted(ends, nbytes, side="right"))
    if done < len(chunk):
        into = nbytes - (int(ends[done - 1]) if done else 0)
        chunk["base"][done] += np.uint64(into)
        chunk["len"][done] -= np.uint64(into)
    return done


TIOCOUTQ: Final = 0x5411  # SIOCOUTQ: bytes in the send queue (unsent + unacked, TCP)
FIONREAD: Final = 0x541B  # SIOCINQ: bytes received and not read yet


def queued_bytes(sock: socket.socket) -> int:
    """Bytes this socket has not yet had acknowledged (SIOCOUTQ)."""
    buf = fcntl.ioctl(sock.fileno(), TIOCOUTQ, b"\0\0\0\0")
    return int(struct.unpack("i", buf)[0])


def unread_bytes(sock: socket.socket) -> int:
    """Bytes in this socket's receive queue, not read yet (SIOCINQ)."""
    buf = fcntl.ioctl(sock.fileno(), FIONREAD, b"\0\0\0\0")
    return int(struct.unpack("i", buf)[0])


# What a read asks for when nothing has arrived yet: it wakes with the first segment, and
# what comes after is sized by SIOCINQ.  Below glibc's mmap threshold (128 KiB).
FIRST_READ: Final = 64 * 1024


def recv_arrived(sock: socket.socket, max_bytes: int) -> bytes:
    """Up to ``max_bytes`` of what has arrived, waiting for the first byte if nothing
    has (``b""`` at EOF).  ``socket.recv(n)`` allocates ``n`` bytes and then shrinks
    them to what it read: asked for megabytes, every call maps and unmaps fresh memory
    and faults its pages in (26 µs of CPU for an 8 KiB read on this project's machine,
    against 6 µs).  So the read asks for what the receive queue holds (SIOCINQ), which
    costs one system call more and allocates only what it returns."""
    waiting = unread_bytes(sock)
    return sock.recv(min(max_bytes, waiting or FIRST_READ))


def peek_raw(sock: socket.socket, nbytes: int) -> bytes:
    """The next ``nbytes`` (or fewer) of the socket's receive queue, left there, without
    waiting -- the kernel's bytes even under a TLS session (``ssl.SSLSocket`` refuses
    flags, so the plain socket's ``recv`` is called on it)."""
    try:
        return socket.socket.recv(sock, nbytes, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return b""


KEEPALIVE_PROBES_PER_TIMEOUT: Final = 3  # keepalive probes sent within one timeout


def set_dead_peer_timeout(sock: socket.socket, timeout_ms: int) -> None:
    """Make a silent peer an error (``ETIMEDOUT``) after about ``timeout_ms``, whether or
    not data is in flight (TCP only; other sockets are left alone).

    Keepalive probes go out every third of the timeout (at least every second: the
    kernel counts keepalive times in seconds), so the connection dies at most one probe
    interval after the timeout.
    """
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    if timeout_ms <= 0:
        raise ConfigError(f"dead-peer timeout must be positive, not {timeout_ms} ms")
    interval_s = max(1, timeout_ms // (1000 * KEEPALIVE_PROBES_PER_TIMEOUT))
    probes = max(1, -(-timeout_ms // (1000 * interval_s)))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, interval_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, probes)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, timeout_ms)


CLONE_NEWNET: Final = 0x40000000
_LIBC.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_LIBC.setns.restype = ctypes.c_int


def socket_in_netns(netns_path: str, family: int = socket.AF_INET,
                    kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A new socket in the network namespace at ``netns_path`` (``/run/netns/NAME``).

    ``setns`` moves only the calling thread, so a short-lived thread enters the
    namespace, creates the socket and ends: this process's own threads never change
    namespace.  Needs CAP_SYS_ADMIN.
    """
    made: list[socket.socket] = []
    failed: list[KernelError] = []

    def create() -> None:
        try:
            fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _LIBC.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            finally:
                os.close(fd)
            made.append(socket.socket(family, kind))
        except OSError as e:
            failed.append(KernelError(f"socket in network namespace {netns_path}",
                                      e.errno or errno.EIO))

    thread = threading.Thread(target=create, name="netns-socket")
    thread.start()
    thread.join()
    if failed:
        raise failed[0]
    return made[0]
