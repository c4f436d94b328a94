"""The postcopy background queue: its limit follows what the link drains, and neither
it nor the bandwidth limit keeps a page request waiting."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from livemig.kernel.sock import unsent_bytes
from livemig.migration.bgqueue import DELAY_BUDGET_S, MAX_QUEUE, MIN_QUEUE, BackgroundQueue
from livemig.migration.ratelimit import RateLimiter
from livemig.migration.returnpath import PageRequest, RequestQueue


class Link:
    """A scripted channel: bytes written, bytes still queued, and a clock."""

    def __init__(self) -> None:
        self.sent = 0
        self.queued = 0
        self.now = 0.0

    def probe(self) -> tuple[int, int]:
        return self.sent, self.queued

    def clock(self) -> float:
        return self.now

    def write(self, nbytes: int) -> None:
        self.sent += nbytes
        self.queued += nbytes

    def drain(self, seconds: float, rate: float) -> None:
        self.now += seconds
        self.queued = max(0, self.queued - int(seconds * rate))


def make() -> tuple[Link, BackgroundQueue]:
    link = Link()
    return link, BackgroundQueue(link.probe, link.clock)


def test_the_sender_is_held_while_the_queue_is_above_its_limit() -> None:
    link, q = make()
    assert q.wait_s() == 0
    link.write(MIN_QUEUE + 4096)
    assert q.wait_s() > 0
    link.drain(0.001, 10e6)  # 10 kB gone: below the limit again
    assert q.wait_s() == 0


def test_a_link_that_runs_dry_after_holding_the_sender_doubles_the_limit() -> None:
    link, q = make()
    link.write(2 * MIN_QUEUE)
    assert q.wait_s() > 0
    link.drain(0.001, 1e12)  # the peer took everything while the sender waited
    assert q.wait_s() == 0
    assert q.limit == 2 * MIN_QUEUE


def test_an_empty_queue_the_sender_was_not_held_for_leaves_the_limit() -> None:
    link, q = make()
    link.write(MIN_QUEUE // 2)
    assert q.wait_s() == 0
    link.drain(0.001, 1e12)
    assert q.wait_s() == 0
    assert q.limit == MIN_QUEUE


@pytest.mark.parametrize("rate", [125e6, 1e9])  # 1 Gbit/s, loopback-like
def test_the_limit_stays_within_what_the_link_drains_in_the_delay_budget(rate: float) -> None:
    link, q = make()
    for _ in range(400):
        # Keep the queue full, let it drain at ``rate``; now and then it runs dry.
        while q.wait_s() == 0:
            link.write(128 * 1024)
        link.drain(0.0025, rate)
        q.wait_s()
        link.drain(1.0, 1e12)
        q.wait_s()
    cap = max(MIN_QUEUE, rate * DELAY_BUDGET_S)
    assert q.rate == pytest.approx(rate, rel=0.1)
    assert cap * 0.9 <= q.limit <= min(MAX_QUEUE, cap * 1.1)


def test_an_urgent_page_behind_the_queue_halves_the_limit_down_to_the_minimum() -> None:
    link, q = make()
    link.write(2 * MIN_QUEUE)
    q.wait_s()
    link.drain(0.001, 1e12)
    q.wait_s()
    link.write(4 * MIN_QUEUE)
    q.wait_s()
    link.drain(0.001, 1e12)
    q.wait_s()
    assert q.limit == 4 * MIN_QUEUE
    q.urgent_waited()
    assert q.limit == 2 * MIN_QUEUE
    q.urgent_waited()
    q.urgent_waited()
    assert q.limit == MIN_QUEUE


def test_unsent_bytes_of_a_unix_socket_are_those_its_peer_has_not_read() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"x" * 100_000)
        # The kernel counts the buffers' memory: a little more than the bytes.
        assert 100_000 <= unsent_bytes(a) < 120_000
        while b.recv(1 << 20, socket.MSG_DONTWAIT) and unsent_bytes(a):
            pass
        assert unsent_bytes(a) == 0


def test_unsent_bytes_of_tcp_are_those_not_yet_sent() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        a = socket.create_connection(server.getsockname())
        b, _ = server.accept()
        with a, b:
            a.sendall(b"x" * 1000)  # sent at once (never read by b, and never acked
            time.sleep(0.05)         # maybe: that is no longer waiting to leave)
            assert unsent_bytes(a) == 0


def test_a_page_request_ends_the_postcopy_rate_limit_pause() -> None:
    requests = RequestQueue()
    limiter = RateLimiter(1000, sleep=requests.wait)  # 1 kB/s: 10 kB owe 10 s
    request = PageRequest("pc.ram", 0, 4096, time.monotonic_ns())
    threading.Timer(0.05, requests.put, [request]).start()
    t0 = time.monotonic()
    limiter.account(10_000)
    assert time.monotonic() - t0 < 2.0


def test_without_requests_the_rate_limit_pause_is_kept() -> None:
    slept: list[float] = []
    now = [0.0]
    limiter = RateLimiter(1000, clock=lambda: now[0], sleep=slept.append)
    limiter.account(10_000)
    assert slept == [pytest.approx(10.0)]
