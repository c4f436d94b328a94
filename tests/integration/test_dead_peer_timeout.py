"""A silent peer becomes an error within about the dead-peer timeout (real TCP, real cut).

Over a :class:`~livemig.netlab.NetnsPair` the link is taken down under an established
connection: without :func:`set_dead_peer_timeout` a blocked ``recv`` would wait forever;
with it, both a ``recv`` on an idle connection (keepalive) and a ``send`` with data in
flight (``TCP_USER_TIMEOUT``) fail with ``ETIMEDOUT`` within twice the timeout.
"""

from __future__ import annotations

import errno
import socket
import time
from collections.abc import Callable

import pytest
from conftest import needs_netlab
from netlab_helpers import connection

from livemig.kernel.sock import set_dead_peer_timeout
from livemig.netlab import NetnsPair

pytestmark = needs_netlab

TIMEOUT_MS = 2000
LIMIT_S = 2 * TIMEOUT_MS / 1000


def blocked_recv(sock: socket.socket) -> None:
    sock.recv(1)


def sending(sock: socket.socket) -> None:
    data = bytes(1 << 20)
    while True:
        sock.sendall(data)


def error_after_cut(fail: Callable[[socket.socket], None], dead_peer_ms: int | None) -> \
        tuple[OSError, float]:
    """Cut the link under a connection and run ``fail`` on the client: the error it
    ends with (a Python-level timeout at 2x the limit if nothing else) and when."""
    with NetnsPair() as pair, connection(pair) as (client, server):
        if dead_peer_ms is not None:
            set_dead_peer_timeout(client, dead_peer_ms)
        client.settimeout(2 * LIMIT_S)  # a safety net: the test must not hang
        pair.link_down()
        start = time.monotonic()
        with pytest.raises(OSError) as info:
            fail(client)
        return info.value, time.monotonic() - start


@pytest.mark.parametrize("fail", [blocked_recv, sending], ids=["idle-recv", "send-in-flight"])
def test_a_cut_link_times_out_within_twice_the_dead_peer_timeout(
        fail: Callable[[socket.socket], None]) -> None:
    error, elapsed = error_after_cut(fail, TIMEOUT_MS)
    assert error.errno == errno.ETIMEDOUT
    assert TIMEOUT_MS / 2000 <= elapsed <= LIMIT_S


def test_without_a_dead_peer_timeout_a_cut_link_is_silent() -> None:
    error, elapsed = error_after_cut(blocked_recv, None)
    assert isinstance(error, TimeoutError) and error.errno is None  # Python's own timeout
    assert elapsed >= 2 * LIMIT_S - 0.1
