"""The postcopy bandwidth limit never keeps a page request waiting."""

from __future__ import annotations

import threading
import time

import pytest

from livemig.migration.ratelimit import RateLimiter
from livemig.migration.returnpath import PageRequest, RequestQueue


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


def test_bytes_sent_while_requests_cut_every_pause_short_stay_owed() -> None:
    """A request ends the pause, not the debt: when every pause is cut short and the
    window's time has passed, the next batch still waits for every byte sent before
    (else a guest that keeps faulting would lift the limit altogether)."""
    slept: list[float] = []
    now = [0.0]

    def interrupted(seconds: float) -> None:
        slept.append(seconds)
        now[0] += 0.2  # a request came: the pause ended long before its end

    limiter = RateLimiter(1000, clock=lambda: now[0], sleep=interrupted)
    for _ in range(3):
        limiter.account(10_000)
    # 30 kB at 1 kB/s are paid for at t = 30 s, whatever the interruptions.
    assert slept == [pytest.approx(10.0), pytest.approx(19.8), pytest.approx(29.6)]
