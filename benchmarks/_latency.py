"""Postcopy page-request latency: modes, links, QEMU trace pairing, distributions, goals.

Theory of operation
-------------------
Both latency benchmarks (``postcopy_latency.py``, ``preempt_latency.py``) are the same
matrix: links x page sizes x *modes*, each cell ``--repeat`` migrations of a running
``random`` guest that switch to postcopy right after ``migrate`` (or after
``--precopy-ms``).  The random guest visits random pages, so on the destination almost
every visit faults on a page still at the source: each fault is one *page request*,
and its latency is what a vCPU waits for.

Modes (:data:`MODES`) name an implementation and its settings: livemig ``vanilla``
(postcopy-ram), ``preempt`` (+ postcopy-preempt, urgent pages sent by the migration
thread, which breaks huge pages: QEMU 7.1 style), ``preempt-rp`` (urgent pages sent by
the return-path thread: QEMU 8.0 style), ``preempt-proc`` (urgent pages handled by a
helper process on each side that owns the postcopy channel); QEMU 7.2 ``qemu-vanilla`` and
``qemu-preempt``.  Capabilities go to both sides before ``migrate-incoming`` (QEMU 7.2
needs postcopy-preempt on both; no QEMU version needs ``return-path`` for postcopy, the
return path is opened by postcopy-ram itself).

Links: ``loopback`` runs both peers in this network namespace over 127.0.0.1; a rate
(``1gbit``, ``500mbit``...) builds a :class:`livemig.netlab.NetnsPair` (two namespaces, a veth
pair with ``tbf`` on both ends) and runs the source in one namespace, the destination
in the other.

Per (link, page size, implementation) one source boots and stays up; every migration
goes to a fresh destination process, the source being resumed (``cont``) in between so
the destination starts the guest (postcopy only starts it if the source ran).  One
unmeasured warm-up migration per source comes first: on a nested-KVM machine the
first touch of never-used host memory costs an exit to the outer hypervisor, which
would otherwise land on the first measured cell only.

What is measured, on the destination, for every requested host page: from the fault
thread reading the userfaultfd event to the page being placed (UFFDIO_COPY done, the
vCPU woken).

* livemig: the destination's ``query-migrate`` reports the exact percentiles
  (``x-postcopy-latency-percentiles``, µs) and a histogram in power-of-two µs buckets
  (``postcopy-latency-dist``); :data:`RAW_SAMPLES_COMMAND` gives the raw samples for
  exact CDFs.  A livemig without that command (an older snapshot under test) gets its
  CDFs drawn from the buckets (marked in the plot).
* QEMU 7.2 has no latency statistics, so the destination runs with its ``log`` trace
  backend (``-trace enable=postcopy_ram_fault_thread_request``,
  ``postcopy_place_page*``, ``-msg timestamp=on``, ``-D`` file): lines
  ``tid@sec.usec:event args``.  :func:`pair_trace` pairs each request (first fault on a
  host page not yet placed) with the next placement of that host page: the same
  definition as livemig's (QEMU traces ``postcopy_place_page`` after its UFFDIO_COPY;
  ``postcopy_place_page_zero`` just before it).  Tracing every placed page costs QEMU a
  log line per page (~1-2 µs of its placing thread).

A row's figures are medians over its repeats; its CDF pools the repeats.  Goals
(:func:`check_goals`) are checked on those medians.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import click
import numpy as np
from _harness import HarnessError
from _peers import (
    UNLIMITED_BANDWIDTH,
    LivemigPeer,
    MigrationPlan,
    MigrationResult,
    Peer,
    QemuPeer,
    TlsPlan,
    VmSpec,
    finished,
    free_tcp_port,
    migrate,
    qemu_available,
)
from _profile import PySpy
from qemu.qmp import QMPError
from rich.console import Console
from rich.table import Table

import livemig
from livemig.errors import LivemigError, MigrationError, QmpError
from livemig.netlab import NETNS_PORT, NetnsPair, Shaping
from livemig.runtime import DEFAULT_URGENT_PRIORITY
from livemig.vmm.vm import parse_size

GUEST = "random"
BOOT_PASSES = 1  # one 'B': every page of the range is tagged (non-zero)
BOOT_TIMEOUT_S = 900.0
DEST_DONE_TIMEOUT_S = 120.0
TRIES = 2  # attempts per measured migration (a failed one is reported and retried)
POLL_S = 0.02
LATENCY_BUCKETS = 24  # livemig's postcopy-latency-dist: bucket k = [2^k, 2^(k+1)) µs
# livemig QMP command (destination) returning {"samples-ns": [int, ...], "fault-at-ns":
# [int, ...]} (when each fault was read, after postcopy started).
RAW_SAMPLES_COMMAND = "x-query-postcopy-latency-samples"
SLOWEST_KEPT = 30  # requests per run whose fault time the JSON keeps

REQUEST_EVENT = "postcopy_ram_fault_thread_request"
PLACE_EVENTS = ("postcopy_place_page", "postcopy_place_page_zero")
_TRACE_LINE = re.compile(r"^(\d+)@(\d+)\.(\d{6}):(\w+) (.*)$")
_HVA = re.compile(r"HVA=0x([0-9a-fA-F]+)")
_HOST = re.compile(r"host=0x([0-9a-fA-F]+)")


class BenchmarkError(HarnessError):
    """A latency benchmark could not produce a figure (bad trace, missing statistics)."""


# --- distributions --------------------------------------------------------------------------
@dataclass(frozen=True)
class Latency:
    """One migration's page-request latencies (µs); ``samples_us`` empty if only buckets."""

    p50: float
    p90: float
    p99: float
    max: float
    count: int
    buckets: tuple[int, ...]
    samples_us: tuple[float, ...] = ()

    @classmethod
    def from_samples(cls, samples_us: Sequence[float]) -> Latency:
        if not samples_us:
            return cls(0.0, 0.0, 0.0, 0.0, 0, (0,) * LATENCY_BUCKETS)
        us = np.asarray(samples_us, dtype=np.float64)
        # Same estimator as livemig's LatencyStats (numpy's linear interpolation).
        p50, p90, p99 = (float(x) for x in np.percentile(us, [50, 90, 99]))
        return cls(p50, p90, p99, float(us.max()), len(us), bucketize(us),
                   tuple(float(x) for x in np.sort(us)))

    @classmethod
    def from_livemig(cls, info: Mapping[str, Any],
                     samples_ns: Sequence[int] | None = None) -> Latency:
        """From a livemig destination's ``query-migrate`` (and raw samples if any)."""
        if samples_ns is not None:
            return cls.from_samples([ns / 1000 for ns in samples_ns])
        pct = info.get("x-postcopy-latency-percentiles")
        if pct is None:
            raise BenchmarkError("the livemig destination reports no postcopy latency")
        dist = tuple(int(x) for x in info.get("postcopy-latency-dist", ()))
        return cls(float(pct["p50"]), float(pct["p90"]), float(pct["p99"]),
                   float(pct["max"]), int(pct["count"]), dist)

    @property
    def exact(self) -> bool:
        return bool(self.samples_us) or self.count == 0


def bucketize(samples_us: np.ndarray[Any, Any]) -> tuple[int, ...]:
    """livemig's power-of-two µs histogram of ``samples_us``."""
    idx = np.clip(np.floor(np.log2(np.maximum(samples_us, 1.0))), 0, LATENCY_BUCKETS - 1)
    return tuple(int(x) for x in np.bincount(idx.astype(np.int64), minlength=LATENCY_BUCKETS))


def bucket_cdf(buckets: Sequence[int]) -> list[tuple[float, float]]:
    """CDF points (µs, fraction <= µs) at the upper edge of each non-empty bucket."""
    total = sum(buckets)
    points: list[tuple[float, float]] = []
    seen = 0
    for k, n in enumerate(buckets):
        seen += n
        if n and total:
            points.append((float(2 ** (k + 1)), seen / total))
    return points


def sample_cdf(samples_us: Sequence[float]) -> list[tuple[float, float]]:
    xs = sorted(samples_us)
    return [(x, (i + 1) / len(xs)) for i, x in enumerate(xs)]


# --- QEMU trace pairing ---------------------------------------------------------------------
@dataclass(frozen=True)
class TraceEvent:
    ts_us: int
    event: str
    address: int


@dataclass(frozen=True)
class TracePairing:
    latencies_us: tuple[float, ...]
    requests: int  # request events read (duplicates and already-placed pages included)
    placements: int
    unanswered: int  # requested host pages never placed afterwards (should be 0)


def parse_trace(lines: Iterable[str]) -> list[TraceEvent]:
    """The request/placement events of a QEMU ``log`` trace, in timestamp order."""
    out: list[TraceEvent] = []
    for line in lines:
        m = _TRACE_LINE.match(line)
        if m is None:
            continue
        event, args = m.group(4), m.group(5)
        pattern = _HVA if event == REQUEST_EVENT else _HOST if event in PLACE_EVENTS else None
        addr = None if pattern is None else pattern.search(args)
        if addr is not None:
            ts = int(m.group(2)) * 1_000_000 + int(m.group(3))
            out.append(TraceEvent(ts, event, int(addr.group(1), 16)))
    # Threads take their timestamp before they take the log's lock: lines of different
    # threads may be slightly out of order.  sort() is stable for equal timestamps.
    out.sort(key=lambda e: e.ts_us)
    return out


def pair_trace(events: Iterable[TraceEvent], host_page: int) -> TracePairing:
    """Fault-to-placement latency of every requested host page (see module docstring).

    A request for a page already placed is a stale event (the page arrived between the
    fault and the fault thread reading it) and a request for a page already pending is
    the same wait: neither starts a new latency, as in livemig's fault thread.
    """
    mask = ~(host_page - 1)
    pending: dict[int, int] = {}
    placed: set[int] = set()
    latencies: list[float] = []
    requests = placements = 0
    for e in events:
        page = e.address & mask
        if e.event == REQUEST_EVENT:
            requests += 1
            if page not in placed and page not in pending:
                pending[page] = e.ts_us
        else:
            placements += 1
            placed.add(page)
            asked = pending.pop(page, None)
            if asked is not None:
                latencies.append(float(e.ts_us - asked))
    return TracePairing(tuple(latencies), requests, placements, len(pending))


class TracedQemuPeer(QemuPeer):
    """A QEMU whose destination logs page requests and placements with timestamps.

    QEMU answers a broken postcopy stream by pausing (``postcopy-paused``, waiting for
    a recovery that never comes here), not by failing; the harness would then wait for
    its timeout.  A source reporting that status raises at once instead, and the
    destination is killed: it may no longer answer even ``quit`` (its main loop can
    block on a missing page).
    """

    def execute(self, command: str, **args: Any) -> Any:
        out = super().execute(command, **args)
        if (command == "query-migrate" and isinstance(out, dict)
                and out.get("status") == "postcopy-paused"):
            raise MigrationError(f"{self.label}: postcopy paused (QEMU found the stream "
                                 f"broken; see its log): {self.log_text()[-300:]}")
        return out

    def command(self) -> list[str]:
        args = super().command()
        if not self.incoming:
            return args
        events = [REQUEST_EVENT, "postcopy_place_page*"]
        return [*args, *(a for ev in events for a in ("-trace", f"enable={ev}")),
                "-msg", "timestamp=on", "-D", str(self.trace_path)]

    @property
    def trace_path(self) -> Path:
        return self.workdir / f"{self.name}.trace"

    def latency(self) -> tuple[Latency, TracePairing]:
        """Pair the trace (call once the process has quit: the log is then complete)."""
        with open(self.trace_path, errors="replace") as f:
            pairing = pair_trace(parse_trace(f), self.spec.backing.host_page_size)
        if pairing.requests and not pairing.latencies_us:
            raise BenchmarkError(f"{self.label}: {pairing.requests} requests traced but "
                                 "none paired with a placement")
        return Latency.from_samples(pairing.latencies_us), pairing


# --- modes ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Mode:
    """One implementation and its postcopy settings."""

    name: str
    peer: str  # "livemig" | "qemu"
    preempt: bool
    urgent_sender: str | None = None  # livemig's x-postcopy-urgent-sender
    about: str = ""
    multifd: int = 0  # multifd channels during the precopy phase (0: multifd off)
    tls: bool = False  # "NAME+tls": the same mode over TLS (Config.tls)
    # livemig's x-postcopy-urgent-priority on both sides ("NAME+prioN"; None: the
    # default).  Set on every livemig run: parameters stick on a source.
    urgent_priority: int | None = None

    @property
    def capabilities(self) -> tuple[str, ...]:
        return (("events", "postcopy-ram") + (("postcopy-preempt",) if self.preempt else ())
                + (("multifd",) if self.multifd else ()))

    @property
    def parameters(self) -> dict[str, Any]:
        # downtime-limit 1 ms: QEMU 7.2 completes in precopy as soon as what is left fits
        # in (measured bandwidth x downtime-limit); with the default 300 ms a small guest
        # on loopback does, before migrate-start-postcopy is seen.  Nothing in postcopy
        # depends on it.
        params: dict[str, Any] = {"max-bandwidth": UNLIMITED_BANDWIDTH, "downtime-limit": 1}
        if self.urgent_sender is not None:
            params["x-postcopy-urgent-sender"] = self.urgent_sender
        if self.multifd:
            params["multifd-channels"] = self.multifd
        return params

    @property
    def both_parameters(self) -> dict[str, int]:
        """What the destination must be told too."""
        if self.peer != "livemig":
            return {}
        prio = DEFAULT_URGENT_PRIORITY if self.urgent_priority is None else self.urgent_priority
        return {"x-postcopy-urgent-priority": prio}

    @property
    def peer_class(self) -> type[Peer]:
        return LivemigPeer if self.peer == "livemig" else TracedQemuPeer


MODES: tuple[Mode, ...] = (
    Mode("vanilla", "livemig", False, about="livemig postcopy-ram"),
    Mode("preempt", "livemig", True, "migration",
         "livemig + postcopy-preempt, migration thread breaks huge pages (QEMU 7.1 style)"),
    Mode("preempt-rp", "livemig", True, "return-path",
         "livemig + postcopy-preempt, return-path thread sends urgent pages (QEMU 8.0 style)"),
    Mode("preempt-proc", "livemig", True, "process",
         "livemig + postcopy-preempt, urgent pages by a helper process on each side"),
    Mode("preempt-proc-multifd", "livemig", True, "process",
         "preempt-proc after a multifd precopy (2 channels; QEMU 7.2 cannot)", multifd=2),
    Mode("qemu-vanilla", "qemu", False, about="QEMU 7.2 postcopy-ram"),
    Mode("qemu-preempt", "qemu", True, about="QEMU 7.2 + postcopy-preempt"),
)


TLS_SUFFIX = "+tls"
PRIORITY_SUFFIX = re.compile(r"\+prio(\d+)$")


def parse_mode(name: str) -> Mode:
    """A mode by name: ``NAME+tls`` is mode NAME over TLS, ``NAME+prioN`` (after it, if
    both) a livemig mode with ``x-postcopy-urgent-priority`` N on both sides (``+prio0``:
    page requests answered by time-sharing threads)."""
    by_name = {m.name: m for m in MODES}
    base, priority = name, None
    if (match := PRIORITY_SUFFIX.search(name)) is not None:
        base, priority = name[:match.start()], int(match.group(1))
    tls = base.endswith(TLS_SUFFIX)
    mode = by_name.get(base.removesuffix(TLS_SUFFIX))
    if mode is None or (priority is not None and mode.peer != "livemig"):
        raise HarnessError(f"unknown mode {name}; choose from {', '.join(by_name)}, each "
                           f"with {TLS_SUFFIX} and, for livemig's, +prioN after it")
    if tls:
        mode = replace(mode, tls=True, about=mode.about + ", over TLS")
    if priority is not None:
        mode = replace(mode, urgent_priority=priority,
                       about=mode.about + f", x-postcopy-urgent-priority {priority}")
    return replace(mode, name=name)


def parse_modes(text: str) -> tuple[Mode, ...]:
    """Comma-separated mode names (:func:`parse_mode`)."""
    return tuple(parse_mode(n.strip()) for n in text.split(",") if n.strip())


# --- links ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Endpoints:
    """Where the peers run and where the destination listens."""

    link: str
    source_ns: str | None
    dest_ns: str | None
    host: str

    def uri(self, index: int) -> str:
        # A fresh port per migration: nothing waits for the previous listener to go.
        port = free_tcp_port() if self.dest_ns is None else NETNS_PORT + index
        return f"tcp:{self.host}:{port}"


_RATE = re.compile(r"^\d+(\.\d+)?[kmg]?bit$")


@contextlib.contextmanager
def open_link(name: str, burst: str, latency: str) -> Iterator[Endpoints]:
    """``loopback``, or a tbf-shaped veth link of the rate ``name`` (``1gbit``)."""
    if name == "loopback":
        yield Endpoints(name, None, None, "127.0.0.1")
        return
    if not _RATE.match(name):
        raise HarnessError(f"unknown link {name!r}: loopback or a rate such as 1gbit")
    shaping = Shaping(rate=name, burst=burst, latency=latency)
    with NetnsPair(shaping, prefix="lmbench") as link:
        yield Endpoints(name, link.source.ns, link.dest.ns, link.dest.addr)


# --- one migration and one row ----------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    """One measured migration."""

    latency: Latency
    migration: MigrationResult
    dest_info: Mapping[str, Any]
    pairing: TracePairing | None = None
    # livemig: the slowest requests, (ms after postcopy started, latency µs).
    slowest: tuple[tuple[float, float], ...] = ()

    @property
    def requests(self) -> int:
        return int(self.migration.source_info.get("ram", {}).get("postcopy-requests", 0))

    @property
    def precopy_bytes(self) -> int:
        """What the source sent before the switch (how immediate "immediately" was)."""
        return int(self.migration.source_info.get("ram", {}).get("precopy-bytes", 0))

    def to_json(self, with_samples: bool) -> dict[str, Any]:
        lat = self.latency
        out: dict[str, Any] = {
            "p50_us": lat.p50, "p90_us": lat.p90, "p99_us": lat.p99, "max_us": lat.max,
            "count": lat.count, "buckets": list(lat.buckets), "exact": lat.exact,
            "requests": self.requests, "precopy_bytes": self.precopy_bytes,
            "migration": self.migration.to_json(),
            "destination_info": dict(self.dest_info)}
        if self.pairing is not None:
            out["trace"] = {"requests": self.pairing.requests,
                            "placements": self.pairing.placements,
                            "unanswered": self.pairing.unanswered}
        if self.slowest:
            out["slowest_at_ms_us"] = [[round(t, 1), round(x, 1)] for t, x in self.slowest]
        if with_samples and lat.samples_us:
            out["samples_us"] = [round(x, 1) for x in lat.samples_us]
        return out


@dataclass(frozen=True)
class Row:
    """All measured runs of one (link, page size, mode)."""

    link: str
    page_size: str
    mode: Mode
    runs: tuple[Run, ...]
    failures: tuple[str, ...] = ()

    def median(self, attr: str) -> float:
        return float(statistics.median(getattr(r.latency, attr) for r in self.runs))

    @property
    def ok(self) -> bool:
        return bool(self.runs)

    @property
    def total_s(self) -> float:
        return statistics.median(r.migration.total_time_ms for r in self.runs) / 1000

    @property
    def noise(self) -> float:
        return max(r.migration.noise for r in self.runs)

    @property
    def exact(self) -> bool:
        return all(r.latency.exact for r in self.runs)

    def cdf(self) -> list[tuple[float, float]]:
        """Pooled over the runs: exact from samples, else at the buckets' upper edges."""
        if self.exact:
            return sample_cdf([x for r in self.runs for x in r.latency.samples_us])
        summed = [sum(col) for col in zip(*(r.latency.buckets for r in self.runs),
                                          strict=True)]
        return bucket_cdf(summed)

    def to_json(self, with_samples: bool = True) -> dict[str, Any]:
        keys = ("p50", "p90", "p99", "max") if self.ok else ()
        med = {f"median_{k}_us": self.median(k) for k in keys}
        return {"link": self.link, "page_size": self.page_size, "mode": self.mode.name,
                "about": self.mode.about, **med,
                "median_count": self.median("count") if self.ok else 0,
                "failures": list(self.failures),
                "runs": [r.to_json(with_samples) for r in self.runs]}


@dataclass(frozen=True)
class Config:
    mem: str
    page_sizes: tuple[str, ...]
    links: tuple[str, ...]
    modes: tuple[Mode, ...]
    repeat: int
    precopy_ms: float = 0.0
    warmup: bool = True
    burst: str = "128kb"
    link_latency: str = "50ms"
    timeout: float = 120.0  # per migration; a 1 GiB one takes ~10 s at 1 Gbit/s
    profile_dir: Path | None = None
    tls: TlsPlan | None = None  # the credentials of the +tls modes
    # Switch to postcopy once the source sent this many bytes (0: after precopy_ms).
    precopy_bytes: int = 0
    # Destinations fault their RAM in at start (both peers): huge pages placed in
    # postcopy then come from memory the machine's hypervisor has not taken back.
    prealloc: bool = False


def wait_destination_done(dst: Peer, timeout: float = DEST_DONE_TIMEOUT_S) -> dict[str, Any]:
    """The destination's ``query-migrate`` once its incoming migration has ended."""
    deadline = time.monotonic() + timeout
    while True:
        info: dict[str, Any] = dst.execute("query-migrate")
        if info.get("status") == "completed":
            return info
        if info.get("status") == "failed" or time.monotonic() > deadline:
            raise MigrationError(f"{dst.label}: incoming migration {info.get('status')}: "
                                 f"{info.get('error-desc', '')}")
        time.sleep(POLL_S)


def _check_postcopy(result: MigrationResult) -> None:
    ram = result.source_info.get("ram", {})
    if not ram.get("postcopy-bytes"):
        raise MigrationError(f"{result.peer} finished in precopy, without switching to "
                             f"postcopy ({ram.get('precopy-bytes', 0)} bytes of precopy)")


def check_guest(dst: Peer) -> None:
    """The migrated guest must be intact: no 'E' on its serial port (it checks every
    page it visits) and, for livemig, no bad page in a full host-side check."""
    if b"E" in dst.serial():
        raise MigrationError(f"{dst.label}: the guest found a corrupted page")
    if isinstance(dst, LivemigPeer):
        dst.execute("stop")
        check = dst.execute("x-guest-check", guest=GUEST)
        if check["bad_pages"]:
            raise MigrationError(f"{dst.label}: {check['bad_pages']} bad pages, first "
                                 f"{check['first_bad_pages'][:4]}")


@dataclass(frozen=True)
class RawSamples:
    """A livemig destination's raw samples: latencies and when each fault was read."""

    latency_ns: list[int]
    fault_at_ns: list[int]

    def slowest(self, n: int = SLOWEST_KEPT) -> tuple[tuple[float, float], ...]:
        """The ``n`` slowest requests, (ms after postcopy started, latency µs), by
        fault time."""
        lat = np.asarray(self.latency_ns, dtype=np.int64)
        at = np.asarray(self.fault_at_ns, dtype=np.int64)
        top = np.sort(np.argsort(lat)[-n:]) if len(lat) else np.zeros(0, np.int64)
        top = top[np.argsort(at[top])]
        return tuple((float(at[i]) / 1e6, float(lat[i]) / 1e3) for i in top)


def livemig_raw_samples(dst: Peer) -> RawSamples | None:
    try:
        reply = dst.execute(RAW_SAMPLES_COMMAND)
    except QmpError as e:
        if e.error_class == "CommandNotFound":
            return None
        raise
    return RawSamples([int(x) for x in reply["samples-ns"]],
                      [int(x) for x in reply.get("fault-at-ns", ())])


class Case:
    """One (link, page size, implementation): a running source and its migrations."""

    def __init__(self, cfg: Config, ends: Endpoints, page_size: str, peer: str,
                 console: Console, stack: contextlib.ExitStack) -> None:
        self.cfg, self.ends, self.page_size, self.console = cfg, ends, page_size, console
        self.spec = VmSpec.parse(cfg.mem, page_size, GUEST, prealloc=cfg.prealloc)
        self.cls = LivemigPeer if peer == "livemig" else TracedQemuPeer
        self.workdir = Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix=f"lmlat-{peer}-")))
        self.stack = stack
        self.count = 0
        self.src = self._boot()

    @property
    def label(self) -> str:
        return f"{self.ends.link} {self.page_size} {self.cls.kind}"

    def _boot(self) -> Peer:
        name = f"source{self.count}"
        src = self.stack.enter_context(
            self.cls.source(self.workdir, name, self.spec, netns=self.ends.source_ns))
        with self.console.status(f"{self.label}: random guest tagging {self.cfg.mem}"):
            src.wait_serial(BOOT_PASSES, BOOT_TIMEOUT_S)
        return src

    def recover(self) -> None:
        """After a failed migration: keep the source if it is usable, else boot another
        (it may be stuck, e.g. postcopy-paused, or gone)."""
        with contextlib.suppress(LivemigError, OSError):
            if finished(self.src.execute("query-migrate")) and self.src.runstate() in (
                    "running", "postmigrate", "paused"):
                return
        self.src.close()
        self.count += 1
        self.src = self._boot()

    def migrate(self, mode: Mode, what: str) -> Run:
        if self.src.runstate() != "running":
            # The destination starts the guest only if the source was running.
            self.src.execute("cont")
        self.count += 1
        i = self.count
        plan = MigrationPlan(self.ends.uri(i), mode.capabilities, mode.parameters,
                             postcopy_after_ms=None if self.cfg.precopy_bytes
                             else self.cfg.precopy_ms,
                             postcopy_after_bytes=self.cfg.precopy_bytes or None,
                             timeout=self.cfg.timeout,
                             both_parameters=mode.both_parameters,
                             tls=self.cfg.tls if mode.tls else None)
        with self.console.status(f"{self.label}: {mode.name} {what}"):
            dst = self.cls.destination(self.workdir, f"destination{i}", self.spec,
                                       netns=self.ends.dest_ns)
            # Capabilities stick on a source: a preempt run must not leak into the next
            # vanilla one (a source with preempt and a destination without it lose the
            # requested pages, in QEMU 7.2 as in livemig).
            self.src.execute("migrate-set-capabilities", capabilities=[
                {"capability": "postcopy-ram", "state": True},
                {"capability": "postcopy-preempt", "state": mode.preempt},
                {"capability": "multifd", "state": bool(mode.multifd)}])
            with dst, self._profile(mode, dst, i):
                try:
                    result = migrate(self.src, dst, plan)
                    info = wait_destination_done(dst)
                except LivemigError:
                    if isinstance(dst, TracedQemuPeer):
                        dst.abandon()
                    raise
                _check_postcopy(result)
                samples = livemig_raw_samples(dst) if mode.peer == "livemig" else None
                check_guest(dst)
            # QEMU's trace is complete only once the process has quit.
            if isinstance(dst, TracedQemuPeer):
                latency, pairing = dst.latency()
                return Run(latency, result, info, pairing)
            if samples is None:
                return Run(Latency.from_livemig(info), result, info)
            return Run(Latency.from_livemig(info, samples.latency_ns), result, info,
                       slowest=samples.slowest() if samples.fault_at_ns else ())

    def _profile(self, mode: Mode, dst: Peer, i: int) -> contextlib.AbstractContextManager[Any]:
        pdir = self.cfg.profile_dir
        if pdir is None or mode.peer != "livemig":
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        base = f"{self.ends.link}-{self.page_size}-{mode.name}-{i}"
        stack.enter_context(PySpy(self.src.pid, pdir / f"{base}-source.txt"))
        stack.enter_context(PySpy(dst.pid, pdir / f"{base}-destination.txt"))
        return stack


def _report_run(console: Console, label: str, run: Run) -> None:
    lat, m = run.latency, run.migration
    # When the slowest request's fault came, in ms after postcopy started (livemig).
    at = (f" (at {max(run.slowest, key=lambda s: s[1])[0]:.0f} ms)" if run.slowest
          else "")
    console.print(f"{label}: p50 {lat.p50 / 1000:.2f} p99 {lat.p99 / 1000:.2f} "
                  f"max {lat.max / 1000:.1f} ms{at}, {lat.count} faults, {run.requests} "
                  f"requests, total {m.total_time_ms} ms, downtime {m.downtime_ms} ms, "
                  f"noise {m.noise:.2f} CPUs", soft_wrap=True)


def run_case(cfg: Config, ends: Endpoints, page_size: str, modes: Sequence[Mode],
             console: Console) -> list[Row]:
    """Boot one source, warm up, then ``repeat`` rounds over ``modes`` (interleaved, so a
    slow phase of the machine does not land on one mode only)."""
    runs: dict[str, list[Run]] = {m.name: [] for m in modes}
    failures: dict[str, list[str]] = {m.name: [] for m in modes}
    with contextlib.ExitStack() as stack:
        case = Case(cfg, ends, page_size, modes[0].peer, console, stack)
        if cfg.warmup:
            _attempt(case, modes[0], "warm-up", console, [])
        for n in range(1, cfg.repeat + 1):
            for mode in modes:
                for _ in range(TRIES):
                    run = _attempt(case, mode, f"{n}/{cfg.repeat}", console,
                                   failures[mode.name])
                    if run is not None:
                        runs[mode.name].append(run)
                        break
    return [Row(ends.link, page_size, m, tuple(runs[m.name]), tuple(failures[m.name]))
            for m in modes]


def _attempt(case: Case, mode: Mode, what: str, console: Console,
             failures: list[str]) -> Run | None:
    label = f"{case.label} {mode.name} {what}"
    try:
        run = case.migrate(mode, what)
    except (LivemigError, QMPError) as e:  # QMPError: a VMM died under a command
        console.print(f"[red]{label} failed: {e}", soft_wrap=True)
        failures.append(str(e)[:500])
        case.recover()
        return None
    _report_run(console, label, run)
    return run


def run_matrix(cfg: Config, console: Console) -> list[Row]:
    rows: list[Row] = []
    peers = sorted({m.peer for m in cfg.modes}, key=lambda p: p != "livemig")
    for link in cfg.links:
        with open_link(link, cfg.burst, cfg.link_latency) as ends:
            for ps in cfg.page_sizes:
                for peer in peers:
                    rows += run_case(cfg, ends, ps, [m for m in cfg.modes if m.peer == peer],
                                     console)
    order = {m.name: i for i, m in enumerate(cfg.modes)}
    return sorted(rows, key=lambda r: (cfg.links.index(r.link),
                                       cfg.page_sizes.index(r.page_size), order[r.mode.name]))


# --- goals ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Goal:
    """``metric`` of the rows matching (link, page size, modes) must be <= ``limit_us``,
    or, when ``versus`` maps a mode to a QEMU mode, <= that QEMU row's metric."""

    text: str
    link: str
    page_size: str
    metric: str
    modes: tuple[str, ...]
    limit_us: float | None = None
    versus: Mapping[str, str] = field(default_factory=dict)
    factor: float = 1.0  # with versus: at most this many times the other row's metric


@dataclass(frozen=True)
class GoalCheck:
    goal: Goal
    mode: str
    value_us: float
    limit_us: float
    against: str

    @property
    def met(self) -> bool:
        return self.value_us <= self.limit_us


PREEMPT_MODES = ("preempt", "preempt-rp", "preempt-proc")
GOALS: tuple[Goal, ...] = (
    Goal("1 Gbit/s, 4K: p50 <= 1 ms", "1gbit", "4K", "p50", PREEMPT_MODES, 1000.0),
    Goal("1 Gbit/s, 4K: p99 <= 5 ms", "1gbit", "4K", "p99", PREEMPT_MODES, 5000.0),
    Goal("1 Gbit/s, 2M: p99 <= 25 ms", "1gbit", "2M", "p99", PREEMPT_MODES, 25000.0),
    Goal("loopback, 4K: p50 no worse than QEMU's", "loopback", "4K", "p50",
         ("vanilla", *PREEMPT_MODES),
         versus={"vanilla": "qemu-vanilla", "preempt": "qemu-preempt",
                 "preempt-rp": "qemu-preempt", "preempt-proc": "qemu-preempt"}),
    *(Goal(f"1 Gbit/s, 4K: TLS costs <= 10% at {m}", "1gbit", "4K", m,
           tuple(p + TLS_SUFFIX for p in ("vanilla", *PREEMPT_MODES)),
           versus={p + TLS_SUFFIX: p for p in ("vanilla", *PREEMPT_MODES)}, factor=1.1)
      for m in ("p50", "p99")),
)


def check_goals(rows: Sequence[Row], goals: Sequence[Goal] = GOALS) -> list[GoalCheck]:
    """Every (goal, mode) whose rows were measured; goals without rows are skipped."""
    found = {(r.link, r.page_size, r.mode.name): r for r in rows if r.ok}
    checks = []
    for g in goals:
        for mode in g.modes:
            row = found.get((g.link, g.page_size, mode))
            if row is None:
                continue
            if g.limit_us is not None:
                checks.append(GoalCheck(g, mode, row.median(g.metric), g.limit_us, "goal"))
                continue
            ref = found.get((g.link, g.page_size, g.versus.get(mode, "")))
            if ref is not None:
                checks.append(GoalCheck(g, mode, row.median(g.metric),
                                        g.factor * ref.median(g.metric), ref.mode.name))
    return checks


# --- command line ---------------------------------------------------------------------------
def matrix_options(default_modes: str, precopy_ms: float,
                   precopy_help: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The click options that choose the matrix (mem, page sizes, links, modes, repeat,
    precopy time or bytes, warm-up, preallocated destinations, profiling), shared by
    the benchmarks that run it."""
    options = (
        click.option("--mem", default="1G", show_default=True, help="Guest RAM size."),
        click.option("--page-sizes", default="4K,2M", show_default=True,
                     help="Comma-separated backings: 4K, THP, 2M, 1G."),
        click.option("--links", default="loopback,1gbit", show_default=True,
                     help="Comma-separated: loopback, or a tbf rate such as 1gbit."),
        click.option("--modes", default=default_modes, show_default=True,
                     help="Comma-separated modes (qemu-* are skipped when QEMU is not "
                          "installed)."),
        click.option("--repeat", default=3, show_default=True, type=click.IntRange(1),
                     help="Measured migrations per row (medians are reported)."),
        click.option("--precopy-ms", default=precopy_ms, show_default=True, help=precopy_help),
        click.option("--precopy-bytes", default="0", show_default=True,
                     help="Switch to postcopy once the source has sent this much (e.g. "
                          "600M) instead of after --precopy-ms: every mode and VMM gets the "
                          "same precopy, however fast its precopy runs."),
        click.option("--warmup/--no-warmup", default=True, show_default=True,
                     help="One unmeasured migration per source first."),
        click.option("--prealloc", is_flag=True,
                     help="Destinations (both peers) fault their RAM in at start (livemig "
                          "--mem-prealloc, QEMU prealloc=on).  Postcopy's discards then put "
                          "huge pages back in the hugetlb pool, where the machine's "
                          "hypervisor cannot take them back: placing one costs a copy, not "
                          "a first touch."),
        click.option("--profile", "profile_dir", type=click.Path(file_okay=False),
                     help="py-spy livemig's source and destination into this directory."),
    )

    def apply(f: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            f = option(f)
        return f

    return apply


def precopy_bytes_option(text: str) -> int:
    """``--precopy-bytes``: a size, or 0 (switch after ``--precopy-ms`` instead)."""
    return 0 if text.strip() == "0" else parse_size(text)


def start_cli(modes: str, profile_dir: str | None,
              width: int) -> tuple[Console, tuple[Mode, ...], Path | None]:
    """What every matrix benchmark does first: SIGTERM unwinds like Ctrl-C (VMMs, huge
    pages, namespaces and temp dirs go away); the console; the modes (QEMU's dropped when
    it is not installed); the profile directory, created."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    console = Console() if sys.stdout.isatty() else Console(width=width)
    chosen = parse_modes(modes)
    if any(m.peer == "qemu" for m in chosen) and not qemu_available():
        console.print("[yellow]qemu-system-x86_64 or /dev/kvm missing: livemig only")
        chosen = tuple(m for m in chosen if m.peer != "qemu")
    pdir = Path(profile_dir) if profile_dir else None
    if pdir is not None:
        pdir.mkdir(parents=True, exist_ok=True)
    return console, chosen, pdir


# --- output ---------------------------------------------------------------------------------
def _ms(us: float) -> str:
    return f"{us / 1000:.2f}" if us < 100_000 else f"{us / 1000:.0f}"


def _us(us: float) -> str:
    return f"{us:,.0f}"


def results_table(rows: Sequence[Row], title: str,
                  metrics: Sequence[str] = ("p50", "p90", "p99", "max"),
                  unit: str = "ms") -> Table:
    fmt = _ms if unit == "ms" else _us
    table = Table(title=title)
    for col in ("link", "pages", "mode"):
        table.add_column(col)
    for m in metrics:
        table.add_column(f"{m} {unit}", justify="right")
    for col in ("count", "requests", "pre MB", "total s", "runs", "noise"):
        table.add_column(col, justify="right")
    for r in rows:
        if not r.ok:
            table.add_row(r.link, r.page_size, r.mode.name, *(["-"] * len(metrics)),
                          "-", "-", "-", "-", f"0/{len(r.failures)} ok", "-")
            continue
        reqs = statistics.median(run.requests for run in r.runs)
        pre = statistics.median(run.precopy_bytes for run in r.runs) / 2**20
        runs = f"{len(r.runs)}" + (f" ({len(r.failures)} failed)" if r.failures else "")
        table.add_row(r.link, r.page_size, r.mode.name,
                      *(fmt(r.median(m)) for m in metrics), f"{r.median('count'):.0f}",
                      f"{reqs:.0f}", f"{pre:.0f}", f"{r.total_s:.1f}", runs, f"{r.noise:.2f}")
    return table


def goals_table(checks: Sequence[GoalCheck]) -> Table:
    table = Table(title="goals (medians)")
    for col in ("goal", "mode", "value ms", "limit ms", "against", "met"):
        table.add_column(col, justify="right" if "ms" in col else "left")
    for c in checks:
        table.add_row(c.goal.text, c.mode, _ms(c.value_us), _ms(c.limit_us), c.against,
                      "[green]yes" if c.met else "[red]NO")
    return table


class PanelGrid:
    """A matplotlib figure with one panel per (link, page size) of ``rows``."""

    def __init__(self, rows: Sequence[Row]) -> None:
        import matplotlib

        matplotlib.use("Agg")  # no display: write the file only
        import matplotlib.pyplot as plt

        self.plt = plt
        self.links = list(dict.fromkeys(r.link for r in rows))
        self.sizes = list(dict.fromkeys(r.page_size for r in rows))
        self.fig, self.axes = plt.subplots(
            len(self.links), len(self.sizes), squeeze=False,
            figsize=(6.5 * len(self.sizes), 4.5 * len(self.links)))

    def axis(self, row: Row) -> Any:
        return self.axes[self.links.index(row.link)][self.sizes.index(row.page_size)]

    def panels(self) -> Iterator[tuple[Any, str, str]]:
        for i, link in enumerate(self.links):
            for j, size in enumerate(self.sizes):
                yield self.axes[i][j], link, size

    def save(self, path: Path, title: str) -> None:
        self.fig.suptitle(title, fontsize="medium", wrap=True)
        self.fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fig.savefig(path, dpi=110)
        self.plt.close(self.fig)


def mode_color(mode: Mode) -> str:
    """One colour per mode in every panel of every plot (a mode over TLS: its own)."""
    base = PRIORITY_SUFFIX.sub("", mode.name).removesuffix(TLS_SUFFIX)
    return f"C{[m.name for m in MODES].index(base) % 10}"


def plot_cdfs(rows: Sequence[Row], path: Path, title: str) -> None:
    """One panel per (link, page size), one CDF per mode; log latency axis."""
    grid = PanelGrid(rows)
    for r in rows:
        ax = grid.axis(r)
        points = r.cdf()
        if not points:
            continue
        xs = [x / 1000 for x, _ in points]
        ys = [y for _, y in points]
        color = mode_color(r.mode)
        if r.exact:
            ax.step(xs, ys, where="post", color=color, label=r.mode.name,
                    linestyle=":" if r.mode.tls else "--" if r.mode.urgent_priority == 0 else "-")
        else:
            ax.plot(xs, ys, "o--", color=color, label=f"{r.mode.name} (2^k µs buckets)")
    for ax, link, size in grid.panels():
        ax.set_xscale("log")
        ax.set_title(f"{link}, {size} pages")
        ax.set_xlabel("fault -> placement latency (ms)")
        ax.set_ylabel("fraction of requests")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small", loc="best")
    grid.save(path, title)


def machine_notes() -> dict[str, Any]:
    def cmd(*args: str) -> str:
        try:
            return subprocess.run(args, capture_output=True, text=True,
                                  check=False).stdout.strip()
        except OSError:
            return ""

    root = Path(livemig.__file__ or ".").resolve().parent
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "kernel": platform.release(),
            "cpus": os.cpu_count(), "loadavg": Path("/proc/loadavg").read_text().split()[:3],
            "python": platform.python_version(),
            "qemu": cmd("qemu-system-x86_64", "--version").split("\n")[0],
            "livemig": str(root),
            "livemig_git": cmd("git", "-C", str(root), "describe", "--always", "--dirty")}


def config_json(cfg: Config) -> dict[str, Any]:
    return {"mem": cfg.mem, "page_sizes": list(cfg.page_sizes), "links": list(cfg.links),
            "modes": [m.name for m in cfg.modes], "repeat": cfg.repeat,
            "precopy_ms": cfg.precopy_ms, "precopy_bytes": cfg.precopy_bytes,
            "warmup": cfg.warmup, "prealloc": cfg.prealloc,
            "tbf": {"burst": cfg.burst, "latency": cfg.link_latency}}
