"""Bandwidth limiting and measurement for the migration stream.

QEMU's rate limit counts bytes in 100 ms windows; so does :class:`RateLimiter`, sleeping
at the end of a window whose budget is spent.  A limit of 0 means unlimited.
:class:`BandwidthMeter` measures what a round actually achieved, which drives the
convergence decision (expected downtime = remaining bytes / bandwidth).
"""

from __future__ import annotations

import time
from collections.abc import Callable

WINDOW_S = 0.1


class RateLimiter:
    def __init__(self, bytes_per_second: int, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], object] = time.sleep) -> None:
        """``sleep`` may return early (a postcopy request ends it): the window's
        budget stays owed, and the next :meth:`account` sleeps for the rest."""
        self.limit = bytes_per_second
        self._clock = clock
        self._sleep = sleep
        self._window_start = clock()
        self._used = 0

    def account(self, nbytes: int) -> None:
        """Record ``nbytes`` sent; sleep if this window's budget is spent."""
        if self.limit <= 0:
            return
        self._used += nbytes
        now = self._clock()
        # Sleep until the bytes sent in this window are paid for at the limit; a
        # window may be overdrawn by one batch, which the sleep then covers.
        due = self._paid_at()
        if due > now:
            self._sleep(due - now)
            now = self._clock()
        # A new window only once this one is paid for: a pause a request cut short
        # leaves its bytes owed (forgiving them would let a stream of requests lift the
        # limit altogether).
        if now >= due and now - self._window_start >= WINDOW_S:
            self._window_start, self._used = now, 0


    def settle(self) -> bool:
        """Sleep off what the bytes sent still owe (a request may end the sleep
        first); True once nothing is owed."""
        self.account(0)
        return self.limit <= 0 or self._clock() >= self._paid_at()

    def _paid_at(self) -> float:
        """When the bytes sent in this window are paid for at the limit."""
        return self._window_start + self._used / self.limit


class BandwidthMeter:
    """Bytes per second over an interval of the stream."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._t0 = clock()
        self._b0 = 0
        self.bytes_per_second = 0.0

    def start(self, total_bytes: int) -> None:
        self._t0, self._b0 = self._clock(), total_bytes

    def stop(self, total_bytes: int) -> float:
        dt = self._clock() - self._t0
        if dt > 0 and total_bytes > self._b0:
            self.bytes_per_second = (total_bytes - self._b0) / dt
        return self.bytes_per_second
