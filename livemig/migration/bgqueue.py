"""How much of the postcopy background stream may wait in the kernel, sized by the link.

Theory of operation
-------------------
In postcopy the source's migration thread streams background pages on the main
channel.  Whatever it has handed to the kernel and the peer has not yet taken (the
socket's send queue, and on a shaped link the qdisc: SIOCOUTQ counts both) is a queue
in front of anything sent after it.  A request in vanilla postcopy waits behind all of
it; with preemption the urgent pages travel on another socket but, on a real link,
through the same qdisc.  A short queue keeps requests fast; a queue too short for the
link starves it: the sender must wake up, take the GIL and refill the socket before the
receiver runs dry, so on a busy machine a 64 KiB queue moved loopback postcopy at a
fraction of what the link carries.

:class:`BackgroundQueue` keeps the queue at a *limit* that follows what the link drains,
the way Linux's byte queue limits size a NIC's ring:

* it measures the **drain rate**: bytes the peer took per second, over intervals that
  start and end with a good part of a queue waiting (an empty queue means the link may
  have idled, and a few bytes left unacknowledged by a delayed ACK are no measure of
  the link either);
* it **grows** the limit (doubling) when it finds the queue empty after having held
  the sender back: the link starved, the queue was too short;
* it **caps** the limit at what the link drains in :data:`DELAY_BUDGET_S`, so no
  request waits longer than that behind background pages (plus what it itself takes),
  however fast the sender refills; never below :data:`MIN_QUEUE`;
* it **halves** the limit when an urgent page had to go behind the queue (vanilla
  postcopy: :meth:`BackgroundQueue.urgent_waited`): while the guest faults, latency
  matters more than throughput.

On loopback the drain rate is GB/s and the limit settles near a megabyte; on a
1 Gbit/s link it stays near 64 KiB, the queue that link's latency goals were set with.
The probe gives (bytes written to the channel, bytes still queued); a channel that is
not a socket (a file) reports nothing queued and is never held.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from livemig.units import MIB

MIN_QUEUE = 64 * 1024
MAX_QUEUE = 4 * MIB
DELAY_BUDGET_S = 0.001  # at most this much background drain in front of a request
RATE_INTERVAL_S = 0.002  # drain rate measured over intervals at least this long
# ...that start and end with at least this much queued: a few bytes left unacknowledged
# (a delayed ACK for the end of a section) are no measure of the link.
RATE_MIN_QUEUED = 32 * 1024
RATE_WEIGHT = 0.25  # weight of a new interval in the rate's moving average
MIN_WAIT_S = 0.00005
MAX_WAIT_S = 0.002

Probe = Callable[[], tuple[int, int]]  # () -> (bytes written, bytes still queued)


class BackgroundQueue:
    """The adaptive limit of one channel's background queue (see the module docstring)."""

    def __init__(self, probe: Probe, clock: Callable[[], float] = time.monotonic) -> None:
        self._probe = probe
        self._clock = clock
        self.limit = MIN_QUEUE
        self.rate = 0.0  # bytes/s drained, 0 until measured
        self._ref: tuple[float, int] | None = None  # (time, bytes drained), queue busy
        self._held = False  # the last wait_s() asked the sender to wait

    def wait_s(self) -> float:
        """0 if the sender may hand the kernel more background data now, else how long
        to wait before asking again."""
        sent, queued = self._probe()
        self._observe(sent - queued, queued)
        if queued <= self.limit:
            self._held = False
            return 0.0
        self._held = True
        excess = queued - self.limit
        return min(max(excess / self.rate if self.rate else MAX_WAIT_S, MIN_WAIT_S),
                   MAX_WAIT_S)

    def urgent_waited(self) -> None:
        """An urgent page was queued behind the background: shorten the queue."""
        self.limit = max(MIN_QUEUE, self.limit // 2)

    def _observe(self, drained: int, queued: int) -> None:
        now = self._clock()
        if queued == 0 and self._held:  # held back, then the link ran dry: too short
            self.limit = min(self._cap(), self.limit * 2)
        if queued < RATE_MIN_QUEUED:
            self._ref = None
            return
        ref = self._ref
        if ref is None or drained < ref[1]:  # first busy sample, or a new connection
            self._ref = (now, drained)
            return
        dt = now - ref[0]
        if dt < RATE_INTERVAL_S:
            return
        sample = (drained - ref[1]) / dt
        self.rate = sample if not self.rate else self.rate + RATE_WEIGHT * (sample - self.rate)
        self._ref = (now, drained)
        self.limit = min(self.limit, self._cap())

    def _cap(self) -> int:
        if not self.rate:
            return MAX_QUEUE
        return int(min(MAX_QUEUE, max(MIN_QUEUE, self.rate * DELAY_BUDGET_S)))
