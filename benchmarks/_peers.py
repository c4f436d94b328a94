"""VMM peers: the same migration driven over QMP with livemig and with QEMU 7.2.

Theory of operation
-------------------
A :class:`Peer` is one VMM *process* (a source running the guest, or a destination
started with ``-incoming defer`` / ``--incoming defer``) plus its QMP session; the
process itself is a :class:`livemig.vmmprocess.VmmProcess`, the wrapper the demo and
the tests use too.  The two implementations differ only in the command line they spawn:

* :class:`LivemigPeer` runs ``python -m livemig run``;
* :class:`QemuPeer` runs ``qemu-system-x86_64 -accel kvm`` booting the same boot-sector
  guest (``livemig.guests`` image patched for the VM size) from a raw IDE disk, with
  its RAM in a memory backend chosen to match livemig's backing (see
  :func:`qemu_memory_args`).

Everything after the spawn is identical, because livemig speaks QEMU's QMP commands:
:func:`migrate` sets capabilities on both sides and parameters on the source (with
:class:`TlsPlan`, ``object-add`` of tls-creds-x509 objects from the same certificate
directories and the tls-* parameters on both sides), runs
``migrate-incoming`` then ``migrate``, optionally calls ``migrate-start-postcopy`` after a
delay, waits for the source's ``query-migrate`` to finish and for the destination to
leave ``inmigrate``, and returns a frozen :class:`MigrationResult` with the CPU both
processes and the rest of the machine used meanwhile (``_cpu.py``).

Cleanup is structural: peers (with the huge pages a QEMU peer reserves), profilers
(``_profile.py``) and shaped links (:class:`livemig.netlab.NetnsPair`) are context
managers, so a failure or Ctrl-C unwinds them in reverse order; every child also dies
with the harness (``_harness.py``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from _cpu import CpuTime, PhaseCpu, PhaseMark, Usage
from _harness import HarnessError, child_setup
from rich.console import Console

from livemig.errors import LivemigError, MigrationError
from livemig.guests import load_image, patch_range
from livemig.kernel.mman import Backing, HugepageReservation
from livemig.migration.state import MigrationStatus
from livemig.netlab import NETNS_PORT, netns_prefix
from livemig.units import MIB
from livemig.vmm.membackend import MemoryBackend, run_memory_args
from livemig.vmm.vm import parse_size
from livemig.vmmprocess import VmmFiles, VmmProcess, livemig_command, livemig_environment

GUEST_RANGE_START = 1 << 20  # keep clear of the BIOS / VGA hole under QEMU
# QEMU's default max-bandwidth is 32 MiB/s; "unlimited" means a cap nothing reaches.
UNLIMITED_BANDWIDTH = 1 << 40
SPAWN_ATTEMPTS = 3
POLL_S = 0.01  # query-migrate / query-status interval while waiting for a migration


# --- VM description -------------------------------------------------------------------------
@dataclass(frozen=True)
class VmSpec:
    """The VM both peers run: RAM size, RAM backing and the built-in guest; with
    ``prealloc`` a destination faults all of its RAM in at start (livemig's
    ``--mem-prealloc``, QEMU's ``prealloc=on``)."""

    mem: int
    page_size: str = "4K"
    guest: str = "ab"
    prealloc: bool = False

    @classmethod
    def parse(cls, mem: str, page_size: str, guest: str = "ab", *,
              prealloc: bool = False) -> VmSpec:
        return cls(parse_size(mem), Backing.parse(page_size).value, guest, prealloc)

    @property
    def backing(self) -> Backing:
        return Backing.parse(self.page_size)

    @property
    def mem_mib(self) -> int:
        return self.mem >> 20


def guest_image(spec: VmSpec) -> bytes:
    """The guest boot sector, patched to test ``[1 MiB, mem)`` (what livemig does too)."""
    return patch_range(load_image(spec.guest), GUEST_RANGE_START, spec.mem)


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
        self.files = VmmFiles(workdir, name)
        self._closed = False
        self._pool: HugepageReservation | None = None
        cmd = netns_prefix(netns) + self.command()
        for attempt in range(1, SPAWN_ATTEMPTS + 1):
            self._pool = self.hugepages()
            try:
                if self._pool is not None:
                    self._pool.acquire()
                self.vmm = VmmProcess(workdir, name, command=cmd, env=self.environment(),
                                      new_session=True,
                                      preexec_fn=child_setup(self.disable_thp()))
                # The VMM answers QMP only after it has mapped its RAM: from now on the
                # pages are its own, so other processes may reserve again.
                if self._pool is not None:
                    self._pool.mapped()
                return
            except LivemigError as e:
                self._release_pool()
                # A process that does not take the pool lock (livemig.kernel.mman) may
                # have taken the pages we reserved before our VMM mapped them: retry.
                if "Cannot allocate memory" not in str(e) or attempt == SPAWN_ATTEMPTS:
                    raise
                time.sleep(0.5)
            except BaseException:
                self._release_pool()
                raise

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

    @property
    def preallocates(self) -> bool:
        """Only a destination preallocates: a source's guest fills its RAM itself."""
        return self.incoming and self.spec.prealloc

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
        return self.vmm.pid

    # --- QMP and serial ------------------------------------------------------------------
    def execute(self, command: str, **args: Any) -> Any:
        return self.vmm.qmp.execute(command, **args)

    def runstate(self) -> str:
        return str(self.execute("query-status")["status"])

    def events(self) -> list[dict[str, Any]]:
        """The QMP events received since the last call."""
        return self.vmm.qmp.events()

    def serial(self) -> bytes:
        return self.vmm.serial()

    def wait_serial(self, count: int, timeout: float, byte: bytes = b"B") -> None:
        """Wait until the guest printed ``count`` more ``byte``s; raise otherwise."""
        if self.vmm.wait_serial(count, timeout, byte):
            return
        out = self.serial()
        if b"E" in out:
            raise HarnessError(f"{self.label}: the guest reported an error: {out[-80:]!r}")
        if not self.vmm.running():
            raise HarnessError(f"{self.label} exited: {self.log_text()}")
        raise HarnessError(f"{self.label}: fewer than {count} {byte!r} after {timeout:.0f} s")

    def log_text(self) -> str:
        return self.vmm.log_text()

    # --- lifecycle -----------------------------------------------------------------------
    def abandon(self) -> None:
        """Kill a VMM left in an unknown state (it may no longer answer even ``quit``);
        close() then only reaps it."""
        self.vmm.kill()

    def close(self) -> None:
        """Ask the VMM to quit; stop it if it does not; give back its huge pages."""
        if self._closed:
            return
        self._closed = True
        self.vmm.stop()
        self._release_pool()

    def _release_pool(self) -> None:
        # Only once the process has exited: its hugetlb mapping holds the pages until then.
        if self._pool is not None:
            self._pool.release()
            self._pool = None

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LivemigPeer(Peer):
    """``python -m livemig run`` (livemig reserves its own huge pages)."""

    kind = "livemig"

    def environment(self) -> dict[str, str]:
        return livemig_environment()

    def command(self) -> list[str]:
        args = run_memory_args(self.spec.backing, self.spec.mem_mib, self.preallocates)
        args += ["--incoming", "defer"] if self.incoming else ["--guest", self.spec.guest]
        return livemig_command(self.files, args)


def qemu_memory_args(backing: Backing, mem_mib: int, prealloc: bool = False) -> list[str]:
    """A memory backend matching livemig's backing of the same name.

    4K and THP are private anonymous memory (memory-backend-ram; 4K also disables THP
    for the process, see :func:`_harness.child_setup`).  4K-memfd, 2M and 1G are memfds
    mapped shared, the same memory-backend-memfd object livemig is given;
    :meth:`QemuPeer.hugepages` reserves huge pages.  ``prealloc`` is livemig's
    ``--mem-prealloc``.
    """
    if backing.is_memfd:
        return MemoryBackend("ram0", mem_mib * MIB, backing, prealloc).command_args("-")
    size = f"size={mem_mib}M" + (",prealloc=on" if prealloc else "")
    return ["-object", f"memory-backend-ram,id=ram0,{size}", "-machine", "memory-backend=ram0"]


class QemuPeer(Peer):
    """``qemu-system-x86_64`` booting the livemig guest from a raw IDE disk."""

    kind = "qemu"
    binary: ClassVar[str] = "qemu-system-x86_64"

    def command(self) -> list[str]:
        args = [self.binary, "-accel", "kvm", "-m", f"{self.spec.mem_mib}M",
                "-display", "none", "-nodefaults", "-no-reboot",
                "-serial", f"file:{self.files.serial}",
                "-qmp", f"unix:{self.files.qmp},server=on,wait=off",
                *self.boot_args(),
                *qemu_memory_args(self.spec.backing, self.spec.mem_mib, self.preallocates)]
        return args + (["-incoming", "defer"] if self.incoming else [])

    def boot_args(self) -> list[str]:
        """What QEMU boots (a destination too, as QEMU users start it): the guest's disk."""
        # Each peer has its own copy of the disk, so QEMU's image locking never
        # conflicts between a source and a destination that are alive together.
        image = self.workdir / f"{self.name}.img"
        image.write_bytes(guest_image(self.spec))
        return ["-drive", f"file={image},format=raw,if=ide"]

    def disable_thp(self) -> bool:
        return self.spec.backing is Backing.ANON_4K

    def hugepages(self) -> HugepageReservation | None:
        # Reserved per process, holding the pool lock until QEMU has mapped its RAM (its
        # mmap then holds the pages), like livemig does for itself.
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


def start_peer_cli(peers: str, width: int) -> tuple[Console, list[str]]:
    """What a benchmark choosing ``--peers`` does first: SIGTERM unwinds like Ctrl-C (so
    VMMs, huge pages and temp dirs go away, and Ctrl-C works even in the background,
    where SIGINT is ignored); a console that keeps tables whole in logs and pipes; the
    peers, without QEMU when it is not installed."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    console = Console() if sys.stdout.isatty() else Console(width=width)
    kinds = [k.strip() for k in peers.split(",") if k.strip()]
    if "qemu" in kinds and not qemu_available():
        console.print("[yellow]qemu-system-x86_64 or /dev/kvm missing: livemig only")
        kinds.remove("qemu")
    return console, kinds


# --- one migration --------------------------------------------------------------------------
@dataclass(frozen=True)
class TlsPlan:
    """TLS for a migration: tls-creds-x509 directories (``livemig.tlslab``) for the
    destination (server) and the source (client), and the name the server's certificate
    carries (tls-hostname: unix sockets have no host name)."""

    server_dir: str
    client_dir: str
    hostname: str

    def apply(self, src: Peer, dst: Peer, uri: str) -> None:
        """Credentials (object ids unique per migration URI: a source migrates again)
        and the tls-* parameters on both sides."""
        oid = "tls" + hashlib.sha1(uri.encode()).hexdigest()[:10]
        for peer, endpoint, d in ((dst, "server", self.server_dir),
                                  (src, "client", self.client_dir)):
            peer.execute("object-add", **{"qom-type": "tls-creds-x509", "id": oid,
                                          "dir": d, "endpoint": endpoint,
                                          "verify-peer": True})
        dst.execute("migrate-set-parameters", **{"tls-creds": oid})
        src.execute("migrate-set-parameters", **{"tls-creds": oid,
                                                 "tls-hostname": self.hostname})


@dataclass(frozen=True)
class Progress:
    """One ``query-migrate`` of the source: seconds since ``migrate``, bytes sent, status."""

    t: float
    transferred: int
    status: str


def event_time(event: Mapping[str, Any]) -> float:
    """A QMP event's wall-clock timestamp, in seconds."""
    ts = event["timestamp"]
    return float(ts["seconds"]) + float(ts["microseconds"]) / 1e6


def first_event_times(events: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The first time of each event name (and of each MIGRATION status)."""
    out: dict[str, float] = {}
    for e in events:
        name = str(e.get("event"))
        if name == "MIGRATION":
            name = str(e.get("data", {}).get("status"))
        out.setdefault(name, event_time(e))
    return out


@dataclass(frozen=True)
class MigrationPlan:
    """What :func:`migrate` does: URI, capabilities (on both sides), source parameters."""

    uri: str
    capabilities: tuple[str, ...] = ("events",)
    parameters: Mapping[str, int] = field(
        default_factory=lambda: {"max-bandwidth": UNLIMITED_BANDWIDTH})
    postcopy_after_ms: float | None = None  # migrate-start-postcopy this long after migrate
    # ... or once the source has transferred this many bytes (whichever comes first):
    # equal precopy for designs whose setup takes longer.
    postcopy_after_bytes: int | None = None
    timeout: float = 600.0
    # Parameters both sides need (QEMU's destination opens as many multifd channels as
    # its own multifd-channels says).
    both_parameters: Mapping[str, int] = field(default_factory=dict)
    tls: TlsPlan | None = None


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
    # Every query-migrate of the source while it ran (every POLL_S), and the QMP events
    # both sides sent during the migration (wall-clock stamped by the VMM).
    progress: tuple[Progress, ...] = ()
    source_events: tuple[Mapping[str, Any], ...] = ()
    destination_events: tuple[Mapping[str, Any], ...] = ()
    # CPU of the postcopy phase: from the first query-migrate that saw postcopy-active
    # to the destination's end (None without postcopy).
    postcopy_cpu: PhaseCpu | None = None

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
                "source_info": dict(self.source_info),
                "progress": [[round(p.t, 4), p.transferred, p.status] for p in self.progress],
                "source_events": [dict(e) for e in self.source_events],
                "destination_events": [dict(e) for e in self.destination_events],
                "postcopy_cpu": asdict(self.postcopy_cpu) if self.postcopy_cpu else None}


def migrate(src: Peer, dst: Peer, plan: MigrationPlan) -> MigrationResult:
    """Run one migration from ``src`` to ``dst`` as ``plan`` says; raise if it fails."""
    caps = [{"capability": c, "state": True} for c in plan.capabilities]
    for peer in (src, dst):
        peer.execute("migrate-set-capabilities", capabilities=caps)
    if plan.both_parameters:
        dst.execute("migrate-set-parameters", **dict(plan.both_parameters))
    if plan.parameters or plan.both_parameters:
        src.execute("migrate-set-parameters", **dict(plan.parameters),
                    **dict(plan.both_parameters))
    if plan.tls is not None:
        plan.tls.apply(src, dst, plan.uri)
    else:  # a source that migrated over TLS before keeps its tls-creds: unset them
        src.execute("migrate-set-parameters", **{"tls-creds": ""})
    dst.execute("migrate-incoming", uri=plan.uri)
    for peer in (src, dst):
        peer.events()  # what came before this migration is not about it
    vcpus = [int(c["thread-id"]) for c in dst.execute("query-cpus-fast")]
    before = Usage.take(src.pid, dst.pid)
    src.execute("migrate", uri=plan.uri)
    progress: list[Progress] = []
    marks: list[PhaseMark] = []  # at the first sight of postcopy-active

    def mark_postcopy(status: str) -> None:
        if status == "postcopy-active" and not marks:
            marks.append(PhaseMark.take(src.pid, dst.pid, vcpus))

    info = _wait_source(src, plan, before.at, progress, mark_postcopy)
    if info.get("status") != "completed":
        raise MigrationError(f"{src.kind} migration {info.get('status')}: "
                             f"{info.get('error-desc', '')} {dst.log_text()}")
    runstate = _wait_destination(dst, before.at + plan.timeout)
    end = PhaseMark.take(src.pid, dst.pid, vcpus)
    after = end.usage
    info = _final_source_info(src, before.at + plan.timeout)
    ram = info.get("ram", {})
    return MigrationResult(src.kind, str(info["status"]), int(info.get("total-time", 0)),
                           int(info.get("setup-time", 0)), int(info.get("downtime", 0)),
                           int(ram.get("transferred", 0)), after.at - before.at, info,
                           runstate, after.src - before.src, after.dst - before.dst,
                           after.other_since(before), tuple(progress),
                           tuple(src.events()), tuple(dst.events()),
                           end.since(marks[0]) if marks else None)


def _wait_source(src: Peer, plan: MigrationPlan, t0: float, progress: list[Progress],
                 on_status: Callable[[str], None]) -> dict[str, Any]:
    """Wait for the source's migration to finish, switching to postcopy when planned;
    every ``query-migrate`` goes to ``progress``, and its status to ``on_status``."""
    deadline = t0 + plan.timeout
    switch_at = None if plan.postcopy_after_ms is None else t0 + plan.postcopy_after_ms / 1e3
    switch_bytes = plan.postcopy_after_bytes
    sent = 0
    while True:
        now = time.monotonic()
        if ((switch_at is not None and now >= switch_at)
                or (switch_bytes is not None and sent >= switch_bytes)):
            src.execute("migrate-start-postcopy")
            switch_at = switch_bytes = None
        info: dict[str, Any] = src.execute("query-migrate")
        sent = int(info.get("ram", {}).get("transferred", 0))
        progress.append(Progress(time.monotonic() - t0, sent, str(info.get("status", ""))))
        on_status(str(info.get("status", "")))
        if finished(info):
            return info
        if now > deadline:
            with contextlib.suppress(LivemigError):
                src.execute("migrate_cancel")
            raise MigrationError(f"{src.kind} migration did not finish in {plan.timeout:.0f} s")
        # Plain polling (not qemu.qmp's event wait, whose asyncio loop turns Ctrl-C into
        # a TimeoutError); a query every few ms costs the source nothing measurable.
        time.sleep(POLL_S if switch_at is None or switch_bytes is not None
                   else min(POLL_S, max(switch_at - now, 0)))


def finished(info: Mapping[str, Any]) -> bool:
    """Whether a ``query-migrate`` reply says the migration is over.

    QEMU has statuses livemig does not (``postcopy-paused``, ``pre-switchover``...): none
    of them is an end, but a benchmark cannot go on from them either, so they raise.
    """
    status = str(info.get("status", "none"))
    try:
        return MigrationStatus(status).finished
    except ValueError:
        raise MigrationError(f"migration in status {status}, which this harness does not "
                             f"handle: {info.get('error-desc', '')}") from None


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

    Both VMMs could migrate again straight from ``postmigrate``; ``cont`` + ``stop``
    puts every migration's source in the run state the first one starts from (paused
    after the guest ran).  The guest runs for a moment, which changes nothing for an
    idle-guest benchmark: every page is dirty again for a new migration.
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

    On loopback a free port is picked; elsewhere (a :class:`~livemig.netlab.NetnsPair`
    namespace, which
    is private) :data:`NETNS_PORT` is free unless ``port`` says otherwise.
    """
    if transport == "unix":
        return f"unix:{workdir / (name + '.sock')}"
    if transport == "tcp":
        if port is None:
            port = free_tcp_port(host) if host == "127.0.0.1" else NETNS_PORT
        return f"tcp:{host}:{port}"
    raise HarnessError(f"unknown transport {transport!r}; choose unix or tcp")


