"""Precopy throughput: an idle guest full of non-zero data, over loopback, unlimited.

    python benchmarks/precopy_throughput.py [--mem 1G] [--page-sizes 4K,2M]
        [--peers livemig,qemu] [--multifd-channels 0,2,4] [--repeat 3]
        [--transport unix|tcp] [--tls] [--json PATH] [--profile DIR]

Theory of operation
-------------------
For each page size, each multifd channel count (``0``: multifd off, one main channel;
``N``: capability ``multifd`` with ``multifd-channels=N`` on both sides) and each peer
(livemig, and QEMU 7.2 when it is installed) one *case* runs in its own temporary
directory:

1. a source boots the ``ab`` guest and runs until it has printed two ``B``: after two
   passes every page of ``[1 MiB, mem)`` holds non-zero data; then ``stop`` makes the
   guest idle, so each migration moves the whole RAM exactly once (plus a final sync
   that finds nothing dirty);
2. a *warm-up* migration goes to a first destination, which then quits;
3. ``--repeat`` *measured* migrations follow from the same source (re-armed with
   ``cont`` + ``stop``), each to a fresh destination process.

Why a warm-up, and ``--prealloc``: on this kind of machine (a VM with nested KVM) the
first touch of memory the outer hypervisor does not back costs a fault there too, and
the kernel's zeroing of each new page (``clear_page_erms``) then runs about 20 times
slower: 1 GiB of 2 MiB pages takes 0.1 s of system time to fault in when the memory
was freed a moment ago, 2 to 2.6 s once it has sat free for a second or more (the VM's
free page reporting hands free memory back to the hypervisor).  A destination process
started right after another one exited may get the pages that process just freed,
still backed, or may not: the figure then depends on how long the destination took to
start, not on the migration.  ``--prealloc`` has every destination (both peers) fault
its RAM in at start, before the migration is timed, so the figures measure the
migration path alone; without it the destination's CPU includes that first touch.
The warm-up (cold) figures are reported too.

Throughput is ``ram.transferred / total-time`` of the source's final ``query-migrate``
(QEMU's own definition of its counters), in GB/s (10^9 bytes).  The table shows the
median of the measured runs and, per page size, the ratio livemig / QEMU.  With
``--profile DIR`` the livemig source and destination are sampled by ``py-spy`` during
every measured migration (collapsed stacks in DIR) and their top functions are printed;
profiling perturbs the timing a little, so take figures from an unprofiled run.

CPU is reported per stage as CPU seconds per GiB moved: the source VMM (with its
multifd sender threads and any helper process) and the destination VMM (with its
receiver threads).  Those two figures say how the throughput would scale with more cores: a
stage that needs ``c`` CPU seconds per GiB spread over ``N`` channels can move at most
``N / c`` GiB/s once it has ``N`` cores of its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import click
from _cpu import CpuTime
from _peers import (
    LivemigPeer,
    MigrationPlan,
    MigrationResult,
    TlsPlan,
    VmSpec,
    migrate,
    migration_uri,
    peer_class,
    rearm_source,
    start_peer_cli,
)
from _profile import ProfileSummary, PySpy, summarize_profile
from rich.console import Console
from rich.table import Table

import livemig
from livemig.tlslab import SERVER_NAMES, make_tls_dirs

GUEST_PASSES = 2  # after two passes of the ab guest no page in its range is zero
BOOT_TIMEOUT_S = 900.0
# The livemig threads that move the pages (the others mostly sleep).
WORKER_THREADS = {"source": "migration", "destination": "incoming"}


@dataclass(frozen=True)
class CaseResult:
    """All migrations of one (peer, page size) case."""

    peer: str
    page_size: str
    channels: int  # multifd channels; 0 = multifd off
    warmup: MigrationResult
    runs: tuple[MigrationResult, ...]
    tls: bool = False

    @property
    def gbs(self) -> float:
        return statistics.median(r.throughput_gbs for r in self.runs)

    @property
    def total_ms(self) -> float:
        return statistics.median(r.total_time_ms for r in self.runs)

    @property
    def wall_s(self) -> float:
        return statistics.median(r.wall_s for r in self.runs)

    def cpu_per_gib(self, stage: str) -> float:
        """Median CPU seconds per GiB moved of one stage ("source" or "destination")."""
        return statistics.median(
            (r.source_cpu if stage == "source" else r.destination_cpu).total
            / max(r.transferred / 2**30, 1e-9) for r in self.runs)

    def to_json(self) -> dict[str, Any]:
        return {"peer": self.peer, "page_size": self.page_size,
                "multifd_channels": self.channels, "tls": self.tls,
                "source_cpu_s_per_gib": self.cpu_per_gib("source"),
                "destination_cpu_s_per_gib": self.cpu_per_gib("destination"),
                "median_gbs": self.gbs, "median_total_ms": self.total_ms,
                "median_wall_s": self.wall_s, "warmup": self.warmup.to_json(),
                "runs": [r.to_json() for r in self.runs]}


@dataclass(frozen=True)
class Options:
    mem: str
    transport: str
    repeat: int
    profile_dir: Path | None
    max_noise: float  # other processes' CPU, in CPUs, above which a run is repeated
    retries: int = 3
    tls: TlsPlan | None = None  # this case migrates over TLS
    prealloc: bool = False  # destinations fault their RAM in at start (both peers)


class Case:
    """One (peer, page size): a paused source and the migrations made from it."""

    def __init__(self, kind: str, page_size: str, channels: int, opts: Options,
                 console: Console, stack: contextlib.ExitStack) -> None:
        self.kind, self.page_size, self.opts, self.console = kind, page_size, opts, console
        self.channels = channels
        self.spec = VmSpec.parse(opts.mem, page_size, prealloc=opts.prealloc)
        self.cls = peer_class(kind)
        self.workdir = Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix=f"lmbench-{kind}-")))
        self.src = stack.enter_context(self.cls.source(self.workdir, "source", self.spec))
        self.count = 0  # migrations made (names each destination and socket)

    def boot(self) -> None:
        with self.console.status(f"{self.label}: guest filling {self.opts.mem} of RAM"):
            self.src.wait_serial(GUEST_PASSES, BOOT_TIMEOUT_S)
        self.src.execute("stop")

    @property
    def label(self) -> str:
        return (f"{self.kind} {self.page_size} multifd {self.channels or 'off'}"
                f"{' TLS' if self.opts.tls else ''}")

    def migrate_once(self, what: str, profile: bool) -> MigrationResult:
        with self.console.status(f"{self.label}: {what}"):
            if self.count:
                rearm_source(self.src)
            self.count += 1
            r = _one_migration(self, profile)
        self.console.print(f"{self.label} {what}: {r.total_time_ms} ms, "
                           f"{r.throughput_gbs:.2f} GB/s, wall {r.wall_s:.2f} s; CPU s "
                           f"source {_cpu(r.source_cpu)}, destination {_cpu(r.destination_cpu)}, "
                           f"other processes {r.other_cpu_s:.2f} ({r.noise:.2f} CPUs)",
                           soft_wrap=True)
        return r

    def measure(self, n: int) -> MigrationResult:
        """A measured migration, repeated while other processes disturbed it too much."""
        what = f"migration {n}/{self.opts.repeat}"
        profile = self.opts.profile_dir is not None and self.cls is LivemigPeer
        tries = [self.migrate_once(what, profile)]
        # py-spy's own CPU counts as noise: profiled runs are not for figures anyway.
        while (not profile and tries[-1].noise > self.opts.max_noise
               and len(tries) <= self.opts.retries):
            tries.append(self.migrate_once(f"{what} again (noisy)", profile))
        return min(tries, key=lambda r: r.noise)


def run_case(kind: str, page_size: str, channels: int, opts: Options,
             console: Console) -> CaseResult:
    """Boot a source, warm up, then ``repeat`` measured migrations to fresh destinations."""
    with contextlib.ExitStack() as stack:
        case = Case(kind, page_size, channels, opts, console, stack)
        case.boot()
        warmup = case.migrate_once("warm-up migration", profile=False)
        runs = tuple(case.measure(n) for n in range(1, opts.repeat + 1))
        return CaseResult(kind, page_size, channels, warmup, runs, tls=opts.tls is not None)


def _cpu(c: CpuTime) -> str:
    return f"{c.user:.2f}u+{c.system:.2f}s {c.minor_faults / 1000:.0f}k faults"


def _one_migration(case: Case, profile: bool) -> MigrationResult:
    i = case.count
    uri = migration_uri(case.opts.transport, case.workdir, f"migration{i}")
    plan = MigrationPlan(uri, tls=case.opts.tls)
    if case.channels:
        plan = MigrationPlan(uri, capabilities=("events", "multifd"),
                             both_parameters={"multifd-channels": case.channels},
                             tls=case.opts.tls)
    with case.cls.destination(case.workdir, f"destination{i}", case.spec) as dst:
        if not profile or case.opts.profile_dir is None:
            return migrate(case.src, dst, plan)
        base = case.opts.profile_dir / f"{case.page_size}-migration{i}"
        with PySpy(case.src.pid, base.with_name(base.name + "-source.txt")), \
                PySpy(dst.pid, base.with_name(base.name + "-destination.txt")):
            return migrate(case.src, dst, plan)


# --- report ---------------------------------------------------------------------------------
def results_table(cases: Sequence[CaseResult], mem: str, transport: str) -> Table:
    table = Table(title=f"precopy throughput: idle {mem} ab guest, {transport} loopback, "
                        f"unlimited bandwidth (median of measured runs)")
    for col in ("peer", "pages", "multifd", "TLS", "cold ms", "total ms", "GB/s", "wall s",
                "CPU s src/dst", "CPU s/GiB src/dst", "noise", "÷ QEMU", "÷ plain"):
        table.add_column(col, justify="left" if col in ("peer", "pages", "TLS") else "right")
    qemu = {(c.page_size, c.channels, c.tls): c.gbs for c in cases if c.peer == "qemu"}
    plain = {(c.peer, c.page_size, c.channels): c.gbs for c in cases if not c.tls}
    for c in cases:
        ratio = vs_plain = ""
        if c.peer == "livemig" and (c.page_size, c.channels, c.tls) in qemu:
            ratio = f"{c.gbs / qemu[c.page_size, c.channels, c.tls]:.2f}"
        if c.tls and (c.peer, c.page_size, c.channels) in plain:
            vs_plain = f"{c.gbs / plain[c.peer, c.page_size, c.channels]:.2f}"
        src_cpu = statistics.median(r.source_cpu.total for r in c.runs)
        dst_cpu = statistics.median(r.destination_cpu.total for r in c.runs)
        table.add_row(c.peer, c.page_size, str(c.channels or "off"), "yes" if c.tls else "no",
                      str(c.warmup.total_time_ms), f"{c.total_ms:.0f}",
                      f"{c.gbs:.2f}", f"{c.wall_s:.2f}", f"{src_cpu:.2f}/{dst_cpu:.2f}",
                      f"{c.cpu_per_gib('source'):.2f}/{c.cpu_per_gib('destination'):.2f}",
                      f"{max(r.noise for r in c.runs):.2f}", ratio, vs_plain)
    return table


def profile_tables(profile_dir: Path) -> Iterator[Table]:
    for path in sorted(profile_dir.glob("*.txt")):
        if path.stat().st_size:
            thread = WORKER_THREADS["source" if path.stem.endswith("source") else "destination"]
            yield _profile_table(path.stem, summarize_profile(path, thread))


def _profile_table(name: str, s: ProfileSummary) -> Table:
    table = Table(title=f"py-spy {name}: thread {s.thread!r}, {s.samples} samples "
                        f"(waits included)")
    table.add_column("self %", justify="right")
    table.add_column("line (self)", overflow="fold")
    table.add_column("incl %", justify="right")
    table.add_column("function (inclusive)", overflow="fold")
    for (fs, ss), (fi, si) in zip(s.top_self, s.top_inclusive, strict=False):
        table.add_row(f"{100 * ss:.1f}", _short(fs), f"{100 * si:.1f}", _short(fi))
    return table


def _short(frame: str) -> str:
    return frame.replace("livemig/", "").replace("(/root/.pyenv/versions/3.11.7/lib/", "(")


def machine_notes() -> dict[str, Any]:
    def cmd(*args: str) -> str:
        try:
            return subprocess.run(args, capture_output=True, text=True,
                                  check=False).stdout.strip()
        except OSError:
            return ""

    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "kernel": platform.release(),
            "cpu": cpu, "cpus": os.cpu_count(),
            "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                                   / 2**30, 1),
            "python": platform.python_version(),
            "loadavg": Path("/proc/loadavg").read_text().split()[:3],
            "qemu": cmd("qemu-system-x86_64", "--version").split("\n")[0],
            # The livemig under test (a checkout, or a snapshot given with PYTHONPATH).
            "livemig": str(Path(livemig.__file__).resolve().parent),
            "livemig_git": cmd("git", "-C", str(Path(livemig.__file__).resolve().parent),
                               "describe", "--always", "--dirty")}


# --- CLI ------------------------------------------------------------------------------------
@click.command()
@click.option("--mem", default="1G", show_default=True, help="Guest RAM size.")
@click.option("--page-sizes", default="4K,2M", show_default=True,
              help="Comma-separated backings: 4K, THP, 4K-memfd, 2M, 1G.")
@click.option("--peers", default="livemig,qemu", show_default=True,
              help="Comma-separated peers (qemu is skipped when not installed).")
@click.option("--multifd-channels", "multifd_channels", default="0", show_default=True,
              help="Comma-separated multifd channel counts; 0 = multifd off.")
@click.option("--repeat", default=3, show_default=True, type=click.IntRange(1),
              help="Measured migrations per case (after one warm-up migration).")
@click.option("--transport", default="unix", show_default=True,
              type=click.Choice(["unix", "tcp"]))
@click.option("--json", "json_path", type=click.Path(dir_okay=False),
              help="Also write every result as JSON.")
@click.option("--profile", "profile_dir", type=click.Path(file_okay=False),
              help="py-spy the livemig source and destination into this directory.")
@click.option("--max-noise", default=0.25, show_default=True,
              help="Repeat a measured migration (keeping the quietest try) when other "
                   "processes kept more than this many CPUs busy meanwhile.")
@click.option("--retries", default=3, show_default=True, type=click.IntRange(0),
              help="At most this many repeats of a noisy measured migration.")
@click.option("--tls", is_flag=True,
              help="Run every case twice: plain, then over TLS (tls-creds-x509, the same "
                   "certificates for both peers).")
@click.option("--prealloc", is_flag=True,
              help="Destinations preallocate their RAM at start (livemig --mem-prealloc, "
                   "QEMU prealloc=on): a migration is not charged the first touch of "
                   "memory the machine's hypervisor may have reclaimed.")
def main(mem: str, page_sizes: str, peers: str, multifd_channels: str, repeat: int,
         transport: str,
         json_path: str | None, profile_dir: str | None, max_noise: float,
         retries: int, tls: bool, prealloc: bool) -> None:
    """Migration throughput of an idle guest: livemig against QEMU 7.2."""
    console, kinds = start_peer_cli(peers, 120)
    pdir = None if profile_dir is None else Path(profile_dir)
    if pdir is not None:
        pdir.mkdir(parents=True, exist_ok=True)
    opts = Options(mem, transport, repeat, pdir, max_noise, retries, prealloc=prealloc)
    counts = [int(n) for n in multifd_channels.split(",") if n.strip()]
    variants = [opts]
    with tempfile.TemporaryDirectory(prefix="lmbench-tls-") as certs:
        if tls:
            dirs = make_tls_dirs(Path(certs))
            variants.append(replace(opts, tls=TlsPlan(dirs.server, dirs.client,
                                                      SERVER_NAMES[-1])))
        cases = [run_case(kind, ps.strip(), n, v, console)
                 for ps in page_sizes.split(",") for n in counts for v in variants
                 for kind in kinds]
    console.print(results_table(cases, mem, transport))
    if pdir is not None:
        for table in profile_tables(pdir):
            console.print(table)
    if json_path:
        report = {"benchmark": "precopy_throughput", "mem": mem, "transport": transport,
                  "multifd_channels": counts, "tls": tls, "prealloc": prealloc,
                  "repeat": repeat, "max_noise": max_noise, "retries": retries,
                  "machine": machine_notes(),
                  "cases": [c.to_json() for c in cases]}
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
