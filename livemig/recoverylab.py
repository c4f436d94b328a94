"""Recovery lab: a postcopy between two ``livemig run`` processes, broken by real faults
and recovered over QMP.  Test and benchmark tooling, not part of the migration path.

Theory of operation
-------------------
A :class:`Link` says where the two VMM processes run and how their TCP connections can
be broken: :class:`LoopbackLink` runs both in this network namespace over 127.0.0.1
(faults: ``ss -K`` on the migration's port, ``migrate-pause``); :class:`NetnsLink` runs
them in the two namespaces of a :class:`~livemig.netlab.NetnsPair` (every fault kind:
the veth link taken down, every packet dropped by nftables, ``ss -K``, ``migrate-pause``).

:class:`RecoveryRun` drives one migration the way an operator drives QEMU: capabilities
and parameters on both sides (each side detects a silent peer after its own
``x-dead-link-timeout``), ``migrate-incoming`` and ``migrate`` on ``tcp:HOST:PORT``, and
``migrate-start-postcopy`` once the first precopy round is over (a low ``max-bandwidth``
and a 1 ms ``downtime-limit`` keep precopy from converging; a low
``max-postcopy-bandwidth`` keeps postcopy running for several seconds).  :meth:`cut`
applies a :class:`Fault`, waits until *both* sides report ``postcopy-paused``, lifts the
fault, and recovers on a port never used before (``migrate-recover`` on the destination,
``migrate resume=true`` on the source); it returns the time from both-paused to
both-active again.  :meth:`finish` waits for both sides to complete and runs the random
guest's check of every page on the destination.

Every wait is bounded and ends in :class:`~livemig.errors.MigrationError` naming what
each side reported, so a hang becomes a failure with its cause.
"""

from __future__ import annotations

import contextlib
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from livemig.errors import MigrationError, QmpError
from livemig.migration.state import MigrationStatus
from livemig.netlab import NETNS_PORT, NetnsPair, Shaping, run_command
from livemig.vmmprocess import VmmProcess

WAIT_S = 60.0  # any one status change (a loaded nested VM is slow)
FINISH_S = 180.0
POLL_S = 0.02
RESUME_RETRY_S = 0.2


@dataclass(frozen=True)
class Design:
    """An urgent-sender design: postcopy-preempt or not, and who sends urgent pages."""

    name: str
    preempt: bool
    sender: str


DESIGNS = {d.name: d for d in (
    Design("vanilla", False, "migration"),
    Design("preempt-migration", True, "migration"),
    Design("preempt-rp", True, "return-path"),
    Design("preempt-process", True, "process"),
)}


@dataclass(frozen=True)
class RecoveryConfig:
    """One migration: guest RAM, page size, design and the parameters of both sides."""

    design: Design
    page_size: str = "4K"
    mem: str = "64M"
    dead_link_ms: int = 1500
    precopy_bandwidth: int = 30_000_000  # a first round over 64 MiB takes ~2 s
    postcopy_bandwidth: int = 8_000_000  # postcopy lasts several seconds (~7 s)

    def capabilities(self) -> list[dict[str, Any]]:
        return [{"capability": "events", "state": True},
                {"capability": "postcopy-ram", "state": True},
                {"capability": "postcopy-preempt", "state": self.design.preempt}]

    def parameters(self) -> dict[str, Any]:
        return {"max-bandwidth": self.precopy_bandwidth, "downtime-limit": 1,
                "max-postcopy-bandwidth": self.postcopy_bandwidth,
                "x-postcopy-urgent-sender": self.design.sender,
                "x-dead-link-timeout": self.dead_link_ms}


# --- links --------------------------------------------------------------------------------
class Link(ABC):
    """Where the source and destination VMMs run, and how their connections break."""

    name: str
    host: str  # the destination's address

    @abstractmethod
    def vmm(self, source: bool, workdir: Path, name: str, args: list[str]) -> VmmProcess:
        """Start ``livemig run args`` on the source's side (or the destination's)."""

    @abstractmethod
    def new_port(self) -> int:
        """A port nothing has used on the destination's side."""

    @abstractmethod
    def kill_connections(self, port: int) -> int:
        """Destroy the TCP connections from or to ``port``; how many sockets."""

    @abstractmethod
    def faults(self) -> tuple[Fault, ...]:
        """The fault kinds this link can make."""


class LoopbackLink(Link):
    """Both VMMs in this namespace, TCP over 127.0.0.1."""

    name = "loopback"
    host = "127.0.0.1"

    def vmm(self, source: bool, workdir: Path, name: str, args: list[str]) -> VmmProcess:
        return VmmProcess(workdir, name, args)

    def new_port(self) -> int:
        # Free now; the VMM binds it a moment later (the kernel picks ports at random).
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((self.host, 0))
            port: int = s.getsockname()[1]
            return port

    def kill_connections(self, port: int) -> int:
        out = run_command(["ss", "-K", "-t", "-n", "-H", "state", "established",
                           "(", "sport", "=", f":{port}", "or", "dport", "=", f":{port}", ")"])
        return len(out.splitlines())

    def faults(self) -> tuple[Fault, ...]:
        return (KILL_CONNECTIONS, MIGRATE_PAUSE)


class NetnsLink(Link):
    """The source in one namespace of ``pair``, the destination in the other."""

    name = "netns"

    def __init__(self, pair: NetnsPair) -> None:
        self.pair = pair
        self.host = pair.dest.addr
        self._next = NETNS_PORT  # the namespaces hold nothing else: every port is free

    def vmm(self, source: bool, workdir: Path, name: str, args: list[str]) -> VmmProcess:
        return self.pair.vmm(self.pair.source if source else self.pair.dest, workdir, name,
                             args)

    def new_port(self) -> int:
        self._next += 1
        return self._next

    def kill_connections(self, port: int) -> int:
        return self.pair.kill_connections(port)

    def faults(self) -> tuple[Fault, ...]:
        return (LINK_DOWN, DROP_ALL, KILL_CONNECTIONS, MIGRATE_PAUSE)


# --- faults -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fault:
    """A way to break a running postcopy: ``apply`` breaks it, ``lift`` (called once both
    sides are paused) undoes what must be undone before a recovery can connect."""

    name: str
    apply: Callable[[RecoveryRun], None]
    lift: Callable[[RecoveryRun], None] = lambda _run: None


def _netns(run: RecoveryRun) -> NetnsPair:
    if not isinstance(run.link, NetnsLink):
        raise MigrationError(f"this fault needs the netns link, not {run.link.name}")
    return run.link.pair


def _kill(run: RecoveryRun) -> None:
    run.link.kill_connections(run.port)


def _pause(run: RecoveryRun) -> None:
    run.src.qmp.execute("migrate-pause")


LINK_DOWN = Fault("link-down", lambda r: _netns(r).link_down(), lambda r: _netns(r).link_up())
DROP_ALL = Fault("drop-all", lambda r: _netns(r).drop_all(),
                 lambda r: _netns(r).restore_traffic())
KILL_CONNECTIONS = Fault("ss-kill", _kill)
MIGRATE_PAUSE = Fault("migrate-pause", _pause)
FAULTS = {f.name: f for f in (LINK_DOWN, DROP_ALL, KILL_CONNECTIONS, MIGRATE_PAUSE)}


# --- one migration ------------------------------------------------------------------------
def status(vmm: VmmProcess) -> str:
    info: dict[str, Any] = vmm.qmp.execute("query-migrate")
    return str(info.get("status", "none"))


def _finished(s: str) -> bool:
    return MigrationStatus(s).finished


@dataclass
class Outcome:
    """How one migration ended: both statuses and the destination's guest check."""

    src_status: str
    dst_status: str
    bad_pages: int
    pages: int
    latency_ns: list[int] = field(default_factory=list)

    @property
    def completed(self) -> bool:
        return (self.src_status, self.dst_status) == ("completed", "completed")


@dataclass(frozen=True)
class Cut:
    """One fault and its recovery: seconds from the fault to both sides paused, from
    both paused to both active (or completed) again, the error-desc of each side
    while paused (source, destination), and whether the destination had completed
    (the fault lost only its final SHUT; the recovery completed the source)."""

    fault: str
    to_paused: float
    to_resumed: float
    errors: tuple[str, ...]
    shut_lost: bool = False


class RecoveryRun:
    """A source running the random guest and a destination waiting for it (see the
    module docstring).  A context manager: both VMMs are stopped on exit."""

    def __init__(self, link: Link, workdir: Path, cfg: RecoveryConfig) -> None:
        self.link, self.cfg = link, cfg
        size = ["--mem", cfg.mem, "--page-size", cfg.page_size]
        self.src = link.vmm(True, workdir, "src", [*size, "--guest", "random"])
        try:
            self.dst = link.vmm(False, workdir, "dst", [*size, "--incoming", "defer"])
        except BaseException:
            self.src.stop()
            raise
        self.port = link.new_port()
        self.recoveries = 0
        self.resume_retries = 0
        self.exits: dict[str, str] = {}

    def __enter__(self) -> RecoveryRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the destination first (a source streaming to it then ends), then the
        source; both even if the first stop fails.  Whether each had already exited,
        and its exit status, are kept in :attr:`exits` (a crash shows there)."""
        self.exits["dst"] = f"{'running' if self.dst.running() else 'exited'}, "
        try:
            self.exits["dst"] += f"status {self.dst.stop()}"
        finally:
            self.exits["src"] = f"{'running' if self.src.running() else 'exited'}, " \
                f"status {self.src.stop()}"

    @property
    def uri(self) -> str:
        return f"tcp:{self.link.host}:{self.port}"

    def statuses(self) -> tuple[str, str]:
        return status(self.src), status(self.dst)

    def wait(self, want: str, timeout: float = WAIT_S) -> tuple[str, str]:
        """Until each side reports ``want`` or has completed (or one has failed, or
        ``timeout``): the two statuses then; a MigrationError if the wait timed out."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.statuses()
            if (all(s in (want, "completed") for s in got)
                    or any(_finished(s) and s != "completed" for s in got)):
                return got
            if time.monotonic() > deadline:
                raise MigrationError(f"not both {want} after {timeout:.0f} s: "
                                     f"source {got[0]}, destination {got[1]}")
            time.sleep(POLL_S)

    def start_postcopy(self) -> None:
        """Set both sides up, migrate, switch to postcopy after the first round, and
        wait until both sides are in postcopy-active."""
        for vmm in (self.src, self.dst):
            vmm.qmp.execute("migrate-set-capabilities", capabilities=self.cfg.capabilities())
            vmm.qmp.execute("migrate-set-parameters", **self.cfg.parameters())
        self.dst.qmp.execute("migrate-incoming", uri=self.uri)
        self.src.qmp.execute("migrate", uri=self.uri)
        deadline = time.monotonic() + WAIT_S
        while True:
            info: dict[str, Any] = self.src.qmp.execute("query-migrate")
            if info.get("status") not in ("setup", "active"):
                raise MigrationError(f"no postcopy switch: {info}")
            if info["status"] == "active" and info["ram"]["dirty-sync-count"] >= 2:
                break
            if time.monotonic() > deadline:
                raise MigrationError(f"first round not over: {info}")
            time.sleep(POLL_S)
        self.src.qmp.execute("migrate-start-postcopy")
        # A short postcopy may be over before the first poll: then there is nothing to cut.
        self._reached("postcopy-active", "no postcopy")

    def _reached(self, want: str, failure: str) -> tuple[str, str]:
        """Wait until both sides report ``want`` or both completed; else a
        MigrationError starting with ``failure``."""
        got = self.wait(want)
        if got not in ((want, want), ("completed", "completed")):
            raise MigrationError(f"{failure}: source {got[0]}, destination {got[1]}")
        return got

    def active(self) -> bool:
        return self.statuses() == ("postcopy-active", "postcopy-active")

    def cut(self, fault: Fault) -> Cut | None:
        """Break the postcopy with ``fault``, wait for both sides to pause, lift it and
        recover on a new port (see :class:`Cut`); None if the migration completed before
        the fault took (nothing to recover).

        A fault that comes as the migration ends may find the destination completed
        and lose only its final SHUT: the source pauses alone, and the same recovery
        completes it (the destination answers the resume with SHUT)."""
        start = time.monotonic()
        try:
            fault.apply(self)
        except QmpError:
            if any(_finished(s) for s in self.statuses()):
                return None  # migrate-pause came too late
            raise
        try:
            got = self.wait("postcopy-paused")
            paused = time.monotonic()
            errors = tuple(str(v.qmp.execute("query-migrate").get("error-desc", ""))
                           for v in (self.src, self.dst))
        finally:
            fault.lift(self)
        if got == ("completed", "completed"):
            return None
        if got not in (("postcopy-paused", "postcopy-paused"),
                       ("postcopy-paused", "completed")):
            raise MigrationError(f"a cut with {fault.name} did not pause both sides: "
                                 f"source {got[0]}, destination {got[1]}")
        self.recover()
        return Cut(fault.name, paused - start, time.monotonic() - paused, errors,
                   shut_lost=got[1] == "completed")

    def recover(self) -> None:
        """migrate-recover on a new port (destination), migrate resume=true (source),
        until both sides are active (or completed) again.

        Right after a link comes back up the source's first connect may fail (``No
        route to host`` while its neighbour entry for the destination is still marked
        failed); the source then goes back to postcopy-paused, as QEMU's does, and -
        as an operator would - the resume is sent again to the same address, on which
        the destination still listens (counted in :attr:`resume_retries`)."""
        self.port = self.link.new_port()
        self.dst.qmp.execute("migrate-recover", uri=self.uri)
        self.src.qmp.execute("migrate", uri=self.uri, resume=True)
        deadline = time.monotonic() + WAIT_S
        while (got := self.statuses()) not in (("postcopy-active", "postcopy-active"),
                                               ("completed", "completed")):
            if got[0] == "postcopy-paused":
                why = str(self.src.qmp.execute("query-migrate").get("error-desc", ""))
                if "cannot connect" not in why:
                    raise MigrationError(f"the resume failed: {why}")
                time.sleep(RESUME_RETRY_S)
                self.src.qmp.execute("migrate", uri=self.uri, resume=True)
                self.resume_retries += 1
            elif time.monotonic() > deadline:
                raise MigrationError(f"no resume after {WAIT_S:.0f} s: source {got[0]}, "
                                     f"destination {got[1]}")
            time.sleep(POLL_S)
        self.recoveries += 1

    def latency_samples(self) -> list[int]:
        """Every page-request latency (ns) the destination has measured so far."""
        got: dict[str, Any] = self.dst.qmp.execute("x-query-postcopy-latency-samples")
        return list(got["samples-ns"])

    def finish(self) -> Outcome:
        """Wait for both sides to finish; check the guest's memory on the destination."""
        deadline = time.monotonic() + FINISH_S
        while True:
            got = self.statuses()
            if all(_finished(s) for s in got):
                break
            if time.monotonic() > deadline:
                raise MigrationError(f"not finished after {FINISH_S:.0f} s: "
                                     f"source {got[0]}, destination {got[1]}")
            time.sleep(POLL_S)
        if got != ("completed", "completed"):
            return Outcome(*got, bad_pages=-1, pages=0)
        samples = self.latency_samples()
        if self.dst.qmp.execute("query-status")["running"]:
            self.dst.qmp.execute("stop")
        check: dict[str, Any] = self.dst.qmp.execute("x-guest-check", guest="random")
        return Outcome(*got, bad_pages=int(check["bad_pages"]), pages=int(check["pages"]),
                       latency_ns=samples)


@contextlib.contextmanager
def netns_link(shaping: Shaping | None = None) -> Iterator[NetnsLink]:
    """A :class:`NetnsLink` over a new namespace pair (its link shaped by ``shaping``),
    removed on exit."""
    with NetnsPair(shaping) as pair:
        yield NetnsLink(pair)


def hugepages_2m() -> int:
    """The size of the machine's 2 MiB huge page pool."""
    return int(Path("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages").read_text())
