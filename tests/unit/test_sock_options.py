"""Dead-peer detection options: what set_dead_peer_timeout asks of the kernel.

(The behaviour over a real cut link is tested in
``tests/integration/test_dead_peer_timeout.py``.)
"""

from __future__ import annotations

import socket

import pytest

from livemig.errors import ConfigError
from livemig.kernel.sock import set_dead_peer_timeout


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
