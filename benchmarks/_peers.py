"""Benchmark harness: the same migration driven over QMP with livemig and with QEMU 7.2.

Theory of operation
-------------------
A :class:`Peer` is one VMM *process* (a source running the guest, or a destination
started with ``-incoming defer`` / ``--incoming defer``) plus its QMP session.  The two
implementations differ only in the command line they spawn:

* :class:`LivemigPeer` runs ``python -m livemig run``;
* :class:`QemuPeer` runs ``qemu-system-x86_64 -accel kvm`` booting the same boot-sector
  guest (``livemig.guests`` image patched for the VM size) from a raw IDE disk, with
  its RAM in a memory backend chosen to match livemig's backing (see
  :func:`qemu_memory_args`).

Everything after the spawn is identical, because livemig speaks QEMU's QMP commands:
:func:`migrate` sets capabilities on both sides and parameters on the source, runs
``migrate-incoming`` then ``migrate``, optionally calls ``migrate-start-postcopy`` after a
delay, waits for the source's ``query-migrate`` to finish and for the destination to
leave ``inmigrate``, and returns a frozen :class:`MigrationResult`.

Cleanup is structural: peers (with the huge pages a QEMU peer reserves), profilers
(:class:`PySpy`) and shaped links (:class:`ShapedLink`) are context managers, so a
failure or Ctrl-C unwinds them in reverse order.  As a second line of defence every
child gets ``PR_SET_PDEATHSIG`` (SIGTERM: both VMMs quit cleanly on it, livemig giving
back its huge pages) so children never outlive a killed harness, and runs in its own
session so a terminal Ctrl-C reaches only the harness, which then shuts them down in
order.

:class:`ShapedLink` builds two network namespaces joined by a veth pair, each end
shaped with a ``tbf`` qdisc, for benchmarks over a slower link.  Addresses are private
10.x addresses that exist only inside those namespaces; nothing is routed elsewhere.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import livemig
from livemig.control.client import QmpClient
from livemig.errors import LivemigError, MigrationError
from livemig.guests import load_image, patch_range
from livemig.kernel.mman import Backing, HugepageReservation
from livemig.vmm.vm import parse_size

GUEST_RANGE_START = 1 << 20  # keep clear of the BIOS / VGA hole under QEMU
FINISHED = frozenset({"completed", "failed", "cancelled"})
# QEMU's default max-bandwidth is 32 MiB/s; "unlimited" means a cap nothing reaches.
UNLIMITED_BANDWIDTH = 1 << 40
QUIT_TIMEOUT_S = 20.0
START_TIMEOUT_S = 60.0
SPAWN_ATTEMPTS = 3
POLL_S = 0.01  # query-migrate / query-status interval while waiting for a migration
NETNS_PORT = 4444  # migration port inside a ShapedLink's private namespace

_PR_SET_PDEATHSIG = 1
_PR_SET_THP_DISABLE = 41


class HarnessError(LivemigError):
    """The benchmark environment could not be set up (a command or a peer failed)."""


# --- VM description -------------------------------------------------------------------------
@dataclass(frozen=True)
class VmSpec:
    """The VM both peers run: RAM size, RAM backing and the built-in guest."""

    mem: int
    page_size: str = "4K"
    guest: str = "ab"

    @classmethod
    def parse(cls, mem: str, page_size: str, guest: str = "ab") -> VmSpec:
        return cls(parse_size(mem), Backing.parse(page_size).value, guest)

    @property
    def backing(self) -> Backing:
        return Backing.parse(self.page_size)

    @property
    def mem_mib(self) -> int:
        return self.mem >> 20


def guest_image(spec: VmSpec) -> bytes:
    """The guest boot sector, patched to test ``[1 MiB, mem)`` (what livemig does too)."""
    return patch_range(load_image(spec.guest), GUEST_RANGE_START, spec.mem)


# --- child processes --------------------------------------------------------------------------
def _child_setup(disable_thp: bool) -> Callable[[], None]:
    """preexec_fn: die with the harness; optionally opt the process out of THP."""

    libc = ctypes.CDLL(None, use_errno=True)  # loaded before fork, not in the child

    def setup() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        # QEMU madvises all guest RAM MADV_HUGEPAGE; PR_SET_THP_DISABLE (inherited across
        # exec) is the only per-process way to get the plain 4 KiB pages livemig's "4K" has.
        if disable_thp and libc.prctl(_PR_SET_THP_DISABLE, 1, 0, 0, 0) != 0:
            os._exit(127)

    return setup


def netns_prefix(netns: str | None) -> list[str]:
    return [] if netns is None else ["ip", "netns", "exec", netns]


class Peer(ABC):
    """One VMM process (source or destination) and its QMP session."""

    kind: ClassVar[str]

    def __init__(self, workdir: Path, name: str, spec: VmSpec, *, incoming: bool,
                 netns: str | None = None) -> None:
        self.name = name
        self.spec = spec
        self.incoming = incoming
        self.netns = netns
        self.workdir = workdir
        self.qmp_path = workdir / f"{name}.qmp"
        self.serial_path = workdir / f"{name}.serial"
        self.log_path = workdir / f"{name}.log"
        self._closed = False
        self._pool: HugepageReservation | None = None
        cmd = netns_prefix(netns) + self.command()
        for attempt in range(1, SPAWN_ATTEMPTS + 1):
            self._pool = self.hugepages()
            try:
                if self._pool is not None:
                    self._pool.acquire()
                self._spawn(cmd)
                return
            except HarnessError as e:
                self._release_pool()
                # Another process on this machine may have taken the free huge pages we
                # reserved before our VMM could map them: reserve again and retry.
                if "Cannot allocate memory" not in str(e) or attempt == SPAWN_ATTEMPTS:
                    raise
                time.sleep(0.5)
            except BaseException:
                self._release_pool()
                raise

    def _spawn(self, cmd: list[str]) -> None:
        # A socket left by a failed attempt would make the client connect to nobody.
        self.qmp_path.unlink(missing_ok=True)
        with open(self.log_path, "wb") as logf:
            # ``ip netns exec`` execs the command, so the pid is the VMM's own.
            self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         cwd=self.workdir, env=self.environment(),
                                         preexec_fn=_child_setup(self.disable_thp()))
        try:
            self.qmp = self._connect_qmp(time.monotonic() + START_TIMEOUT_S)
        except BaseException:
            self._stop_process()
            raise

    def _connect_qmp(self, deadline: float) -> QmpClient:
        """Connect once the VMM listens.  The socket file appears at bind(), a moment
        before listen(): a connection refused in between is retried, not fatal."""
        while True:
            try:
                return QmpClient(str(self.qmp_path), timeout=max(deadline - time.monotonic(), 0))
            except Exception as e:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise HarnessError(f"{self.label} did not start ({type(e).__name__}: {e}): "
                                       f"{self.log_text()}") from None
                time.sleep(0.05)

    @classmethod
    def source(cls, workdir: Path, name: str, spec: VmSpec, netns: str | None = None) -> Peer:
        return cls(workdir, name, spec, incoming=False, netns=netns)

    @classmethod
    def destination(cls, workdir: Path, name: str, spec: VmSpec,
                    netns: str | None = None) -> Peer:
        return cls(workdir, name, spec, incoming=True, netns=netns)

    @abstractmethod
    def command(self) -> list[str]:
        """The VMM's command line (without any netns prefix)."""

    def disable_thp(self) -> bool:
        return False

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    def hugepages(self) -> HugepageReservation | None:
        """Huge pages to reserve for this process's lifetime (None: it does its own)."""
        return None

    @property
    def label(self) -> str:
        return f"{self.kind} {self.name}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    # --- QMP and serial ------------------------------------------------------------------
    def execute(self, command: str, **args: Any) -> Any:
        return self.qmp.execute(command, **args)

    def runstate(self) -> str:
        return str(self.execute("query-status")["status"])

    def serial(self) -> bytes:
        try:
            return self.serial_path.read_bytes()
        except OSError:
            return b""

    def wait_serial(self, count: int, timeout: float, byte: bytes = b"B") -> None:
        """Wait until the guest printed ``count`` ``byte``s in total; raise otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.serial()
            if b"E" in out:
                raise HarnessError(f"{self.label}: the guest reported an error: {out[-80:]!r}")
            if out.count(byte) >= count:
                return
            if self.proc.poll() is not None:
                raise HarnessError(f"{self.label} exited: {self.log_text()}")
            time.sleep(0.05)
        raise HarnessError(f"{self.label}: only {self.serial().count(byte)} of {count} "
                           f"{byte!r} after {timeout:.0f} s")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace").strip()[-2000:]
        except OSError:
            return ""

    # --- lifecycle -----------------------------------------------------------------------
    def close(self) -> None:
        """Ask the VMM to quit; kill it if it does not."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self.qmp.execute("quit")
        with contextlib.suppress(Exception):
            self.qmp.close()
        self._reap()
        self._release_pool()

    def _release_pool(self) -> None:
        # Only once the process has exited: its hugetlb mapping holds the pages until then.
        if self._pool is not None:
            self._pool.release()
            self._pool = None

    def _reap(self) -> None:
        """Wait for a VMM that was asked to quit; stop it if it does not."""
        try:
            self.proc.wait(QUIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._stop_process()

    def _stop_process(self) -> None:
        # SIGTERM first: livemig gives its huge pages back on a clean exit.
        self.proc.terminate()
        try:
            self.proc.wait(QUIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LivemigPeer(Peer):
    """``python -m livemig run`` (livemig reserves its own huge pages)."""

    kind = "livemig"

    def environment(self) -> dict[str, str]:
        # The child imports the livemig this harness imported (a checkout under test, or
        # a snapshot given with PYTHONPATH), not whatever the working directory holds.
        env = dict(os.environ)
        root = str(Path(livemig.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        return env

    def command(self) -> list[str]:
        args = [sys.executable, "-m", "livemig", "run", "--qmp", str(self.qmp_path),
                "--serial", str(self.serial_path), "--mem", f"{self.spec.mem_mib}M",
                "--page-size", self.spec.page_size]
        return args + (["--incoming", "defer"] if self.incoming else ["--guest", self.spec.guest])


def qemu_memory_args(backing: Backing, mem_mib: int) -> list[str]:
    """A memory backend matching livemig's backing of the same name.

    4K and THP are private anonymous memory (memory-backend-ram; 4K also disables THP
    for the process, see :func:`_child_setup`).  2M and 1G are hugetlb memfds mapped
    shared, as livemig maps them; :meth:`QemuPeer.hugepages` reserves the pages.
    """
    size = f"size={mem_mib}M"
    if backing.is_hugetlb:
        obj = f"memory-backend-memfd,id=ram0,{size},hugetlb=on,hugetlbsize={backing.value},share=on"
    else:
        obj = f"memory-backend-ram,id=ram0,{size}"
    return ["-object", obj, "-machine", "memory-backend=ram0"]


class QemuPeer(Peer):
    """``qemu-system-x86_64`` booting the livemig guest from a raw IDE disk."""

    kind = "qemu"
    binary: ClassVar[str] = "qemu-system-x86_64"

    def command(self) -> list[str]:
        # Each peer has its own copy of the disk, so QEMU's image locking never
        # conflicts between a source and a destination that are alive together.
        image = self.workdir / f"{self.name}.img"
        image.write_bytes(guest_image(self.spec))
        args = [self.binary, "-accel", "kvm", "-m", f"{self.spec.mem_mib}M",
                "-display", "none", "-nodefaults", "-no-reboot",
                "-serial", f"file:{self.serial_path}",
                "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
                "-drive", f"file={image},format=raw,if=ide",
                *qemu_memory_args(self.spec.backing, self.spec.mem_mib)]
        return args + (["-incoming", "defer"] if self.incoming else [])

    def disable_thp(self) -> bool:
        return self.spec.backing is Backing.ANON_4K

    def hugepages(self) -> HugepageReservation | None:
        # Reserved per process, right before it maps its RAM (QEMU's mmap then holds the
        # pages), like livemig does for itself: a pool shared by several processes
        # could be borrowed by anyone else reserving on this machine meanwhile.
        backing = self.spec.backing
        if not backing.is_hugetlb:
            return None
        return HugepageReservation(backing.host_page_size,
                                   -(-self.spec.mem // backing.host_page_size))


def peer_class(kind: str) -> type[Peer]:
    for cls in (LivemigPeer, QemuPeer):
        if cls.kind == kind:
            return cls
    raise HarnessError(f"unknown peer {kind!r}; choose livemig or qemu")


def qemu_available() -> bool:
    return shutil.which(QemuPeer.binary) is not None and os.access("/dev/kvm", os.W_OK)


# --- one migration --------------------------------------------------------------------------
@dataclass(frozen=True)
class MigrationPlan:
    """What :func:`migrate` does: URI, capabilities (on both sides), source parameters."""

    uri: str
    capabilities: tuple[str, ...] = ("events",)
    parameters: Mapping[str, int] = field(
        default_factory=lambda: {"max-bandwidth": UNLIMITED_BANDWIDTH})
    postcopy_after_ms: float | None = None  # migrate-start-postcopy this long after migrate
    timeout: float = 600.0


@dataclass(frozen=True)
class CpuTime:
    """CPU seconds (user, system) and minor page faults of a process, all its threads."""

    user: float = 0.0
    system: float = 0.0
    minor_faults: int = 0

    @property
    def total(self) -> float:
        return self.user + self.system

    def __sub__(self, other: CpuTime) -> CpuTime:
        return CpuTime(self.user - other.user, self.system - other.system,
                       self.minor_faults - other.minor_faults)

    @classmethod
    def of(cls, pid: int) -> CpuTime:
        """The process, its children that have exited (and were waited for), and those
        still running: livemig's urgent helpers are part of the VMM's cost."""
        total = cls._one(pid, with_reaped=True)
        for child in _children(pid):
            # A child that exits meanwhile: its time is in the parent's reaped figures.
            with contextlib.suppress(OSError):
                total = total + cls._one(child, with_reaped=True)
        return total

    def __add__(self, other: CpuTime) -> CpuTime:
        return CpuTime(self.user + other.user, self.system + other.system,
                       self.minor_faults + other.minor_faults)

    @classmethod
    def _one(cls, pid: int, *, with_reaped: bool) -> CpuTime:
        # /proc/PID/stat, not the per-thread files: the migration threads have exited by
        # the time the migration is over, and only the process totals keep their time.
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()  # the name may hold spaces
        hz = os.sysconf("SC_CLK_TCK")
        user, system, faults = int(fields[11]), int(fields[12]), int(fields[7])
        if with_reaped:
            user, system, faults = (user + int(fields[13]), system + int(fields[14]),
                                    faults + int(fields[8]))
        return cls(user / hz, system / hz, faults)


def _children(pid: int) -> list[int]:
    """Live child processes of ``pid`` (started by any of its threads)."""
    out: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return out
    for task in tasks:
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs of this machine have spent busy since boot (/proc/stat)."""
    first = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(x) for x in first]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class MigrationResult:
    """The outcome of one migration, from the source's final ``query-migrate``."""

    peer: str
    status: str
    total_time_ms: int
    setup_time_ms: int
    downtime_ms: int
    transferred: int
    wall_s: float  # migrate command -> destination out of inmigrate, seen by the harness
    source_info: Mapping[str, Any]
    destination_runstate: str
    # CPU each process used during the migration (migrate -> destination loaded).
    source_cpu: CpuTime = CpuTime()
    destination_cpu: CpuTime = CpuTime()
    # CPU the rest of the machine used meanwhile: noise from other work on a shared box.
    other_cpu_s: float = 0.0

    @property
    def noise(self) -> float:
        """How many CPUs other processes kept busy on average while this ran."""
        return self.other_cpu_s / max(self.wall_s, 1e-9)

    @property
    def throughput_gbs(self) -> float:
        """Bytes on the wire per second of the source's total time, in GB/s (1e9)."""
        return self.transferred / max(self.total_time_ms, 1) * 1e3 / 1e9

    def to_json(self) -> dict[str, Any]:
        return {"peer": self.peer, "status": self.status, "total_time_ms": self.total_time_ms,
                "setup_time_ms": self.setup_time_ms, "downtime_ms": self.downtime_ms,
                "transferred": self.transferred, "wall_s": self.wall_s,
                "throughput_gbs": self.throughput_gbs,
                "destination_runstate": self.destination_runstate,
                "source_cpu": asdict(self.source_cpu),
                "destination_cpu": asdict(self.destination_cpu),
                "other_cpu_s": self.other_cpu_s, "noise_cpus": self.noise,
                "source_info": dict(self.source_info)}


@dataclass(frozen=True)
class _Usage:
    """What both processes and the whole machine had used at one instant."""

    at: float
    src: CpuTime
    dst: CpuTime
    busy: float

    @classmethod
    def take(cls, src: Peer, dst: Peer) -> _Usage:
        return cls(time.monotonic(), CpuTime.of(src.pid), CpuTime.of(dst.pid),
                   machine_busy_seconds())


def migrate(src: Peer, dst: Peer, plan: MigrationPlan) -> MigrationResult:
    """Run one migration from ``src`` to ``dst`` as ``plan`` says; raise if it fails."""
    caps = [{"capability": c, "state": True} for c in plan.capabilities]
    for peer in (src, dst):
        peer.execute("migrate-set-capabilities", capabilities=caps)
    if plan.parameters:
        src.execute("migrate-set-parameters", **dict(plan.parameters))
    dst.execute("migrate-incoming", uri=plan.uri)
    before = _Usage.take(src, dst)
    src.execute("migrate", uri=plan.uri)
    info = _wait_source(src, plan, before.at)
    if info.get("status") != "completed":
        raise MigrationError(f"{src.kind} migration {info.get('status')}: "
                             f"{info.get('error-desc', '')} {dst.log_text()}")
    runstate = _wait_destination(dst, before.at + plan.timeout)
    after = _Usage.take(src, dst)
    info = _final_source_info(src, before.at + plan.timeout)
    return _result(src.kind, info, runstate, before, after)


def _result(kind: str, info: dict[str, Any], runstate: str, before: _Usage,
            after: _Usage) -> MigrationResult:
    src_cpu, dst_cpu = after.src - before.src, after.dst - before.dst
    other = after.busy - before.busy - src_cpu.total - dst_cpu.total
    ram = info.get("ram", {})
    return MigrationResult(kind, str(info["status"]), int(info.get("total-time", 0)),
                           int(info.get("setup-time", 0)), int(info.get("downtime", 0)),
                           int(ram.get("transferred", 0)), after.at - before.at, info,
                           runstate, src_cpu, dst_cpu, max(other, 0.0))


def _wait_source(src: Peer, plan: MigrationPlan, t0: float) -> dict[str, Any]:
    """Wait for the source's migration to finish, switching to postcopy when planned."""
    deadline = t0 + plan.timeout
    switch_at = None if plan.postcopy_after_ms is None else t0 + plan.postcopy_after_ms / 1e3
    while True:
        now = time.monotonic()
        if switch_at is not None and now >= switch_at:
            src.execute("migrate-start-postcopy")
            switch_at = None
        info: dict[str, Any] = src.execute("query-migrate")
        if info.get("status") in FINISHED:
            return info
        if now > deadline:
            with contextlib.suppress(LivemigError):
                src.execute("migrate_cancel")
            raise MigrationError(f"{src.kind} migration did not finish in {plan.timeout:.0f} s")
        # Plain polling (not qemu.qmp's event wait, whose asyncio loop turns Ctrl-C into
        # a TimeoutError); a query every few ms costs the source nothing measurable.
        time.sleep(POLL_S if switch_at is None else min(POLL_S, max(switch_at - now, 0)))


def _final_source_info(src: Peer, deadline: float) -> dict[str, Any]:
    """``query-migrate`` once the source has fully wrapped up (runstate postmigrate).

    QEMU 7.2 sets ``completed`` (and emits the event) *before* it computes total-time,
    downtime and mbps, then enters postmigrate; a query in between reads total-time 0.
    """
    while src.runstate() != "postmigrate" and time.monotonic() < deadline:
        time.sleep(POLL_S / 2)
    info: dict[str, Any] = src.execute("query-migrate")
    return info


def _wait_destination(dst: Peer, deadline: float) -> str:
    """Wait until the destination leaves inmigrate (the migration is loaded)."""
    while time.monotonic() < deadline:
        try:
            state = dst.runstate()
        except Exception as e:
            raise MigrationError(f"{dst.label} failed: {e}: {dst.log_text()}") from None
        if state not in ("inmigrate", "prelaunch"):
            return state
        time.sleep(POLL_S / 2)
    raise MigrationError(f"{dst.label} did not finish loading the migration")


def rearm_source(src: Peer) -> None:
    """Make a source that completed a migration ready (and paused) for another one.

    QEMU can migrate again straight from ``postmigrate``; livemig cannot (yet), so both
    go through ``cont`` + ``stop``: the guest runs for a moment, which changes nothing
    for an idle-guest benchmark (every page is still dirty for the new migration).
    """
    if src.runstate() == "postmigrate":
        src.execute("cont")
    src.execute("stop")


def free_tcp_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def migration_uri(transport: str, workdir: Path, name: str, host: str = "127.0.0.1",
                  port: int | None = None) -> str:
    """A fresh migration URI: a unix socket in ``workdir`` or a TCP port on ``host``.

    On loopback a free port is picked; elsewhere (a :class:`ShapedLink` namespace, which
    is private) :data:`NETNS_PORT` is free unless ``port`` says otherwise.
    """
    if transport == "unix":
        return f"unix:{workdir / (name + '.sock')}"
    if transport == "tcp":
        if port is None:
            port = free_tcp_port(host) if host == "127.0.0.1" else NETNS_PORT
        return f"tcp:{host}:{port}"
    raise HarnessError(f"unknown transport {transport!r}; choose unix or tcp")


# --- profiling ------------------------------------------------------------------------------
class PySpy:
    """``py-spy record`` of one process into collapsed stacks, while the context is open."""

    def __init__(self, pid: int, out: Path, rate: int = 250, native: bool = False) -> None:
        exe = shutil.which("py-spy")
        if exe is None:
            raise HarnessError("py-spy is not installed (pip install py-spy)")
        self.out = out
        cmd = [exe, "record", "--pid", str(pid), "--output", str(out), "--format", "raw",
               "--rate", str(rate), "--threads", "--idle", "--nonblocking"]
        if native:
            cmd.append("--native")
        self._log = open(out.with_suffix(".log"), "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=_child_setup(False))
        time.sleep(0.5)  # let it attach before the interesting part starts

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def __enter__(self) -> PySpy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(frozen=True)
class ProfileSummary:
    """Where one thread's samples went: self time by source line, inclusive by function.

    Shares are fractions of the thread's samples; with ``--idle`` sampling (what
    :class:`PySpy` does) they are fractions of its wall time, waits included.
    """

    thread: str
    samples: int
    threads: Mapping[str, int]  # samples of every thread in the profile
    top_self: Sequence[tuple[str, float]]
    top_inclusive: Sequence[tuple[str, float]]


_LINE_SUFFIX = re.compile(r":\d+\)$")


def _thread_name(frame: str) -> str:
    # "thread (1234): migration" -> "migration"
    return frame.split(": ", 1)[1] if ": " in frame else frame


def read_collapsed(path: Path) -> list[tuple[str, list[str], int]]:
    """``py-spy --format raw --threads`` lines as (thread, frames, samples)."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        thread = _thread_name(frames[0]) if frames[0].startswith("thread") else "?"
        out.append((thread, [f for f in frames if not f.startswith(("thread", "process"))],
                    int(count)))
    return out


def summarize_profile(path: Path, thread: str | None = None, top: int = 12) -> ProfileSummary:
    """Summarise ``thread`` (default: the thread with the most samples)."""
    stacks = read_collapsed(path)
    threads: dict[str, int] = {}
    for name, _, n in stacks:
        threads[name] = threads.get(name, 0) + n
    if thread is None or thread not in threads:
        thread = max(threads, key=lambda t: threads[t], default="?")
    self_t: dict[str, int] = {}
    incl: dict[str, int] = {}
    for name, frames, n in stacks:
        if name != thread or not frames:
            continue
        self_t[frames[-1]] = self_t.get(frames[-1], 0) + n
        # threading.py frames are in every thread's stack: they say nothing.
        for func in {_LINE_SUFFIX.sub(")", f) for f in frames if "threading.py" not in f}:
            incl[func] = incl.get(func, 0) + n
    total = threads.get(thread, 0)

    def shares(d: dict[str, int]) -> list[tuple[str, float]]:
        items = sorted(d.items(), key=lambda kv: -kv[1])[:top]
        return [(k, v / max(total, 1)) for k, v in items]

    return ProfileSummary(thread, total, threads, shares(self_t), shares(incl))


# --- shaped link between two network namespaces -----------------------------------------------
@dataclass(frozen=True)
class LinkSpec:
    """A veth link shaped with tbf on both ends (each direction gets ``rate``)."""

    rate: str = "1gbit"
    burst: str = "1mb"
    latency: str = "10ms"
    subnet: str = "10.213.57"  # /24, exists only inside the two namespaces


def _run(cmd: Sequence[str]) -> str:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise HarnessError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
    return proc.stdout


class ShapedLink:
    """Two network namespaces joined by a tbf-shaped veth pair; removed on exit.

    The source side is ``source_ns`` / ``source_addr``, the destination side
    ``dest_ns`` / ``dest_addr``.  Run a peer inside with ``netns=link.source_ns``.
    """

    def __init__(self, spec: LinkSpec | None = None, tag: str | None = None) -> None:
        self.spec = spec or LinkSpec()
        tag = tag or str(os.getpid() % 100_000)
        self.source_ns, self.dest_ns = f"lmbench-{tag}-src", f"lmbench-{tag}-dst"
        # Interface names are at most 15 bytes.
        self._veth = (f"lmb{tag}s", f"lmb{tag}d")
        self.source_addr, self.dest_addr = f"{self.spec.subnet}.1", f"{self.spec.subnet}.2"
        self._undo: list[list[str]] = []  # commands that remove what was made, in order

    def __enter__(self) -> ShapedLink:
        if not self.spec.subnet.startswith("10."):
            raise HarnessError("ShapedLink only uses 10.x addresses")
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def _create(self) -> None:
        for ns in (self.source_ns, self.dest_ns):
            _run(["ip", "netns", "add", ns])
            self._undo.append(["ip", "netns", "del", ns])
        vs, vd = self._veth
        _run(["ip", "link", "add", vs, "type", "veth", "peer", "name", vd])
        # Until both ends are inside the namespaces the pair lives in ours: remove it
        # explicitly if setup stops half-way (harmless if it has already gone).
        self._undo.append(["ip", "link", "del", vs])
        for ns, dev, addr in ((self.source_ns, vs, self.source_addr),
                              (self.dest_ns, vd, self.dest_addr)):
            _run(["ip", "link", "set", dev, "netns", ns])
            _run(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev])
            _run(["ip", "-n", ns, "link", "set", dev, "up"])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            _run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                  "rate", self.spec.rate, "burst", self.spec.burst,
                  "latency", self.spec.latency])

    def close(self) -> None:
        # Deleting a namespace destroys the veth end inside it, and so the pair.
        while self._undo:
            cmd = self._undo.pop()
            with contextlib.suppress(HarnessError):
                _run(cmd)

    def __exit__(self, *exc: object) -> None:
        self.close()

    def exec_prefix(self, ns: str) -> list[str]:
        return netns_prefix(ns)
