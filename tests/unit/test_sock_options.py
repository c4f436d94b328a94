"""Socket options: dead-peer detection (what set_dead_peer_timeout asks of the kernel;
the behaviour over a real cut link is in ``tests/integration/test_dead_peer_timeout.py``)
and the postcopy background queue (``quiet_background``).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from livemig.errors import ConfigError
from livemig.kernel.sock import (
    path_mtu,
    send_pages,
    set_buffer_sizes,
    set_dead_peer_timeout,
    unread_bytes,
)
from livemig.migration.channel import Channel, background_queue_bytes, quiet_background
from livemig.units import KIB, MIB, PAGE_SIZE


@pytest.mark.parametrize(("timeout_ms", "interval_s"), [(500, 1), (2000, 1), (9000, 3),
                                                          (30000, 10)])
def test_tcp_socket_gets_keepalive_and_user_timeout(timeout_ms: int, interval_s: int) -> None:
    with socket.socket() as s:
        set_dead_peer_timeout(s, timeout_ms)
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == timeout_ms
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == interval_s
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == interval_s
        probes = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT)
        # The probes cover the timeout: the kernel gives up after them without a user
        # timeout, and aborts at the first probe past the timeout with one.
        assert (probes - 1) * interval_s < timeout_ms / 1000 <= probes * interval_s


def test_unix_sockets_are_left_alone() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        set_dead_peer_timeout(a, 2000)
        assert a.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0


def test_timeout_must_be_positive() -> None:
    with socket.socket() as s, pytest.raises(ConfigError, match="positive"):
        set_dead_peer_timeout(s, 0)


@pytest.fixture
def loopback_tcp() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected TCP pair over 127.0.0.1 (client, accepted)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        with socket.create_connection(listener.getsockname()) as client:
            accepted, _ = listener.accept()
            with accepted:
                yield client, accepted


def test_a_read_of_a_few_arrived_bytes_allocates_about_what_it_read(
        loopback_tcp: tuple[socket.socket, socket.socket],
        peak_allocated: Callable[[Callable[[], bytes]], tuple[bytes, int]]) -> None:
    """A channel read asks for up to 4 MiB; on a slow link it gets a few KiB each time,
    and must not allocate (map, fault in, unmap) the 4 MiB to return them."""
    client, accepted = loopback_tcp
    ch = Channel(sock=accepted)
    client.sendall(b"x" * 5000)
    got = b""
    while len(got) < 5000:
        data, peak = peak_allocated(lambda: ch.recv(4 * MIB))
        assert peak < 128 * KIB
        got += data
    assert got == b"x" * 5000
    client.sendall(b"y" * 300_000)  # more than the first read of an empty queue takes
    got = b""
    while len(got) < 300_000:
        got += ch.recv(4 * MIB)
    assert got == b"y" * 300_000
    client.close()
    assert ch.recv(4 * MIB) == b""


def test_background_queue_holds_sixteen_packets_of_the_link() -> None:
    assert background_queue_bytes(65536) == MIB  # loopback
    assert background_queue_bytes(9000) == 144000  # jumbo frames


def test_background_queue_is_64k_on_ethernet_and_off_ip() -> None:
    assert background_queue_bytes(1500) == 64 * KIB
    assert background_queue_bytes(0) == 64 * KIB  # a unix socket


def test_path_mtu_of_loopback_tcp_is_loopbacks(loopback_tcp: tuple[socket.socket,
                                                                    socket.socket]) -> None:
    for s in loopback_tcp:
        assert path_mtu(s) >= 65535


def test_path_mtu_off_ip_is_zero() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        assert path_mtu(a) == 0


def test_postcopy_queue_on_loopback_holds_a_megabyte_both_ends(
        loopback_tcp: tuple[socket.socket, socket.socket]) -> None:
    """Both ends of a loopback connection get about 1 MiB of send buffer (Linux reports
    twice what was set) and of receive window, half of it as the unsent limit; the
    receive buffer keeps its size for now (a window advertised before may be in
    flight)."""
    for s in loopback_tcp:
        before = s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        quiet_background(Channel(sock=s))
        assert 2 * (MIB - 16) <= s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) <= 2 * MIB
        assert MIB - 16 <= s.getsockopt(socket.IPPROTO_TCP, socket.TCP_WINDOW_CLAMP) <= MIB
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT) >= MIB // 2 - 8
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == before


def test_what_waits_for_a_slow_reader_stays_in_the_senders_queue(
        loopback_tcp: tuple[socket.socket, socket.socket]) -> None:
    """Once the backlog is bounded (postcopy), a reader that falls behind holds about
    the bound unread, not its whole receive buffer: the rest waits on the sender's
    side, where a requested page can still go first.  Every byte still arrives, in
    order, across the moment the buffer shrinks."""
    client, accepted = loopback_tcp
    for s in loopback_tcp:
        set_buffer_sizes(s, 4 * MIB)  # as a migration channel has them
    bound = 64 * KIB
    data = np.random.default_rng(7).integers(0, 256, 48 * MIB, np.uint8).tobytes()
    caught_up = threading.Event()

    def send() -> None:
        client.sendall(data[:16 * MIB])  # past any window advertised before the bound
        caught_up.wait(30)
        client.sendall(data[16 * MIB:])

    sender = threading.Thread(target=send)
    sender.start()
    ch = Channel(sock=accepted)
    ch.bound_backlog(bound)
    got = bytearray()
    while len(got) < 16 * MIB:
        got += ch.recv(MIB)
    caught_up.set()
    while len(got) < 17 * MIB:
        got += ch.recv(MIB)
    # The reader stalls: what arrives stops at a few times the bound (the kernel's
    # buffer for it, 4x on loopback), not at the megabytes of the buffer before.
    queued = -1
    while queued != (queued := unread_bytes(accepted)):
        sender.join(0.2)
    assert queued <= 8 * bound
    while len(got) < len(data):
        got += ch.recv(MIB)
    sender.join()
    assert got == data


def test_postcopy_queue_on_a_unix_socket_stays_64k() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        quiet_background(Channel(sock=a))
        assert a.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == 2 * 64 * KIB


@pytest.mark.parametrize(("stop_after", "sent"), [(1, 3), (2, 6), (None, 10)])
def test_send_pages_stops_between_steps_on_a_record_boundary(
        stop_after: int | None, sent: int) -> None:
    """Ten records three at a time: once ``stop()`` says so after a step, the stream ends
    with that step's last whole record and the count says how many went."""
    ram = bytearray(np.repeat(np.arange(1, 21, dtype=np.uint8), PAGE_SIZE).tobytes())
    offsets = np.arange(0, 20, 2, dtype=np.uint64) * np.uint64(PAGE_SIZE)
    words = np.arange(100, 110, dtype=">u8")
    prefix = b"\x06pc.ram"
    looks: list[int] = []

    def stop() -> bool:
        looks.append(1)
        return len(looks) == stop_after

    a, b = socket.socketpair()
    with a, b:
        assert send_pages(a, words, prefix, memoryview(ram), offsets, stop, 3) == sent
        a.shutdown(socket.SHUT_WR)
        got = b"".join(iter(lambda: b.recv(1 << 20), b""))
    want = b"".join(words[i : i + 1].tobytes() + (prefix if i == 0 else b"")
                    + bytes(ram[int(offsets[i]) : int(offsets[i]) + PAGE_SIZE])
                    for i in range(sent))
    assert got == want
