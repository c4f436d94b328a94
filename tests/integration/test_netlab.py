"""The network lab: two namespaces joined by a veth link, and real faults on it.

Each test builds its own pair (random names), connects real TCP sockets created inside
the namespaces, breaks the link the way the kernel would see a real failure, and checks
what both ends observe.  Every bound is generous (a loaded nested VM), but a hang always
becomes a failure.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import needs_kvm, needs_netlab, needs_nft
from netlab_helpers import connection

from livemig.errors import NetlabError
from livemig.kernel.sock import path_mtu, set_buffer_sizes
from livemig.migration.channel import Channel, quiet_background
from livemig.netlab import NETNS_PORT, Endpoint, NetnsPair, Shaping

pytestmark = needs_netlab

CHUNK = 64 * 1024


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def link_exists(dev: str) -> bool:
    return subprocess.run(["ip", "link", "show", "dev", dev], capture_output=True,
                          check=False).returncode == 0


def assert_removed(pair: NetnsPair) -> None:
    assert not {e.ns for e in pair.ends} & namespaces()
    assert not any(link_exists(e.dev) for e in pair.ends)


class Sender:
    """Sends zeroes on a socket from a thread until stopped."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._send)
        sock.settimeout(0.2)
        self.thread.start()

    def _send(self) -> None:
        data = bytes(CHUNK)
        while not self.stop.is_set():
            with contextlib.suppress(TimeoutError):  # a full buffer: check stop, go on
                self.sock.send(data)

    def join(self) -> None:
        self.stop.set()
        self.thread.join(10)
        assert not self.thread.is_alive()


def received_within(sock: socket.socket, seconds: float) -> int:
    """Bytes that arrive on ``sock`` within ``seconds``."""
    got = 0
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            n = len(sock.recv(1 << 20))
        except TimeoutError:
            break
        assert n, "the sender closed the connection"
        got += n
    return got


def drain(sock: socket.socket, limit: float = 10.0) -> None:
    """Read until nothing more arrives for half a second (what was already on its way
    when the link broke); data that keeps flowing is a failure."""
    deadline = time.monotonic() + limit
    while received_within(sock, 0.5):
        assert time.monotonic() < deadline, "data still flows over the broken link"


# --- the pair itself ------------------------------------------------------------------------
def test_pair_joins_two_namespaces_and_is_removed_on_exit() -> None:
    with NetnsPair() as pair:
        assert {e.ns for e in pair.ends} <= namespaces()
        with connection(pair) as (client, server):
            client.sendall(b"ping")
            assert server.recv(4) == b"ping"
            assert server.getpeername()[0] == pair.source.addr
    assert_removed(pair)


def test_an_error_inside_the_block_leaves_nothing_behind() -> None:
    with pytest.raises(RuntimeError, match="boom"), NetnsPair(Shaping()) as pair:
        pair.link_down()
        raise RuntimeError("boom")
    assert_removed(pair)


def test_a_setup_failure_half_way_leaves_nothing_behind() -> None:
    pair = NetnsPair(Shaping(rate="not-a-rate"))
    with pytest.raises(NetlabError, match="tc qdisc add"), pair:
        pass
    assert_removed(pair)


def test_shaping_puts_tbf_with_the_rate_on_both_ends() -> None:
    with NetnsPair(Shaping(rate="100mbit")) as pair:
        for end in pair.ends:
            out = pair.run(end, ["tc", "qdisc", "show", "dev", end.dev])
            assert "tbf" in out and "100Mbit" in out


def test_commands_run_inside_the_namespace() -> None:
    with NetnsPair() as pair:
        assert f"inet {pair.source.addr}/24" in pair.run(pair.source, ["ip", "-4", "addr"])
        proc = pair.popen(pair.dest, ["ip", "-4", "addr"], stdout=subprocess.PIPE, text=True)
        out, _ = proc.communicate(timeout=30)
        assert f"inet {pair.dest.addr}/24" in out


@needs_kvm
@pytest.mark.kvm
def test_livemig_run_inside_a_namespace(tmp_path: Path) -> None:
    with NetnsPair() as pair:
        vmm = pair.vmm(pair.source, tmp_path, "src", ["--mem", "16M", "--guest", "ab"])
        try:
            assert vmm.qmp.execute("query-status")["status"] == "running"
            assert os.stat(f"/proc/{vmm.pid}/ns/net").st_ino == \
                os.stat(f"/run/netns/{pair.source.ns}").st_ino
        finally:
            assert vmm.stop() == 0


# Inside a namespace whose default is reno: the congestion control of a postcopy and of a
# main channel the source opens.
_CONGESTION_PROBE = """
import socket
from livemig.kernel.sock import congestion_control
from livemig.migration.channel import MigrationUri, connect
from livemig.wire.channel import ChannelKind
with socket.create_server(("127.0.0.1", 0)) as listener:
    uri = MigrationUri.parse(f"tcp:127.0.0.1:{listener.getsockname()[1]}")
    for kind in (ChannelKind.POSTCOPY, ChannelKind.MAIN):
        ch = connect(uri, name=kind.value, kind=kind)
        print(congestion_control(ch.sock))
        ch.close()
"""


def test_requested_pages_leave_under_cubic_whatever_the_hosts_default() -> None:
    """The source's postcopy channel uses CUBIC (BBR's round-trip probe would cut its
    window to 4 segments for 200 ms every 10 s); the precopy channel keeps the host's
    choice."""
    with NetnsPair() as pair:
        pair.run(pair.source, ["ip", "link", "set", "lo", "up"])
        pair.run(pair.source, ["sysctl", "-qw", "net.ipv4.tcp_congestion_control=reno"])
        out = pair.run(pair.source, [sys.executable, "-c", _CONGESTION_PROBE])
        assert out.split() == ["cubic", "reno"]


# --- faults ---------------------------------------------------------------------------------
def _link_cut(pair: NetnsPair) -> contextlib.AbstractContextManager[None]:
    return pair.link_cut()


def _dropping(pair: NetnsPair) -> contextlib.AbstractContextManager[None]:
    return pair.dropping()


@pytest.mark.parametrize("fault", [_link_cut, pytest.param(_dropping, marks=needs_nft)],
                         ids=["link-down", "drop-all"])
def test_a_stream_stalls_during_the_fault_and_resumes_after_it(
        fault: Callable[[NetnsPair], contextlib.AbstractContextManager[None]]) -> None:
    with NetnsPair() as pair, connection(pair) as (client, server):
        sender = Sender(client)
        try:
            assert received_within(server, 5) > 0
            with fault(pair):
                drain(server)  # what was already on its way
                assert received_within(server, 1.5) == 0
            assert received_within(server, 10) > 0
        finally:
            sender.join()


@needs_nft
def test_connect_times_out_while_everything_is_dropped() -> None:
    with NetnsPair() as pair, pair.socket(pair.dest) as listener:
        listener.bind((pair.dest.addr, NETNS_PORT))
        listener.listen()
        with pair.dropping(), pair.socket(pair.source) as client:
            client.settimeout(2)
            with pytest.raises(TimeoutError):
                client.connect((pair.dest.addr, NETNS_PORT))
        with pair.socket(pair.source) as client:  # and the listener was there all along
            client.settimeout(10)
            client.connect((pair.dest.addr, NETNS_PORT))


def _reset_or_eof(sock: socket.socket) -> str:
    sock.settimeout(10)
    try:
        data = sock.recv(1)
    except (ConnectionResetError, ConnectionAbortedError) as e:
        return type(e).__name__
    assert data == b"", "the connection still delivers data"
    return "EOF"


def test_killing_connections_on_a_port_resets_both_ends_and_spares_others() -> None:
    with NetnsPair() as pair, connection(pair) as (client, server), \
            connection(pair, NETNS_PORT + 1) as (other_client, other_server):
        assert pair.kill_connections(NETNS_PORT) >= 1
        assert _reset_or_eof(client) in ("ConnectionResetError", "ConnectionAbortedError")
        assert _reset_or_eof(server) in ("ConnectionResetError", "ConnectionAbortedError",
                                         "EOF")
        other_client.sendall(b"still here")
        other_server.settimeout(10)
        assert other_server.recv(10) == b"still here"


def test_postcopy_background_queue_over_the_veth_link_stays_64k() -> None:
    """On an Ethernet-sized link (the veth pair, MTU 1500) the postcopy background
    queue stays 64 KiB at both ends: there the background bytes share the qdisc with
    the urgent pages, and a longer queue delays them.  The receive side clamps its
    window, not its buffer."""
    with NetnsPair(Shaping(rate="1gbit")) as pair, connection(pair) as ends:
        for sock in ends:
            assert path_mtu(sock) == 1500
            before = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            quiet_background(Channel(sock=sock))
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == 2 * 64 * 1024
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_WINDOW_CLAMP) == 64 * 1024
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == before


def tcp_counters(pair: NetnsPair, end: Endpoint) -> dict[str, int]:
    """The namespace's TCP counters (nstat, absolute)."""
    out = pair.run(end, ["nstat", "-az"])
    return {f[0]: int(f[1]) for f in (line.split() for line in out.splitlines())
            if len(f) >= 2 and f[1].isdigit()}


def test_a_stream_switched_to_the_postcopy_queue_loses_no_segment() -> None:
    """A precopy-sized stream (4 MiB buffers) over the shaped veth link switches to the
    postcopy queue while it flows, as both ends do at the switchover: the receiver
    drops nothing and the sender never waits for a retransmission timeout (shrinking
    the receive buffer there dropped segments and stalled the first requests about
    200 ms)."""
    with NetnsPair(Shaping(rate="1gbit")) as pair, connection(pair) as (client, server):
        for sock in (client, server):
            set_buffer_sizes(sock, 4 << 20)
        drops0 = tcp_counters(pair, pair.dest).get("TcpExtTCPRcvQDrop", 0)
        rto0 = tcp_counters(pair, pair.source).get("TcpExtTCPTimeouts", 0)
        received = [0]
        switched = threading.Event()

        def drain() -> None:
            buf = bytearray(1 << 20)
            paused = False
            while (n := server.recv_into(buf)) > 0:
                received[0] += n
                if switched.is_set() and not paused:
                    # The destination's load thread is busy at the switch (the
                    # package, userfaultfd, the guest starting): the window fills.
                    time.sleep(0.2)
                    paused = True

        reader = threading.Thread(target=drain)
        reader.start()
        payload = bytes(1 << 20)
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            client.sendall(payload)
            if not switched.is_set() and time.monotonic() > deadline - 0.7:
                quiet_background(Channel(sock=server))
                quiet_background(Channel(sock=client))
                switched.set()
        client.shutdown(socket.SHUT_WR)
        reader.join(30)
        assert received[0] > 40 << 20  # the link was busy throughout
        assert tcp_counters(pair, pair.dest).get("TcpExtTCPRcvQDrop", 0) == drops0
        assert tcp_counters(pair, pair.source).get("TcpExtTCPTimeouts", 0) == rto0


