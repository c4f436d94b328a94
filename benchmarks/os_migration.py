"""The os guest migrated in postcopy: livemig and QEMU 7.2 side by side, 1 to 4 vCPUs.

    python benchmarks/os_migration.py --quick            # a couple of minutes
    python benchmarks/os_migration.py [--mem 256M] [--vcpus 1,2,4] [--page-sizes 4K,2M]
        [--links loopback,1gbit] [--modes vanilla,preempt,qemu-vanilla,qemu-preempt]
        [--repeat 1] [--json PATH] [--markdown]

Theory of operation
-------------------
Each cell of the matrix (link x page size x vCPUs x mode) boots a fresh source running
the ``os`` guest (``docs/GUESTS.md``) -- livemig with ``--guest os --smp N``, QEMU 7.2
with ``-smp N -kernel`` on the same image bytes (:class:`OsQemuPeer`; its destination
is started with the same ``-kernel``, as QEMU users do) -- waits for the guest's first
pass (every page of its regions written), and migrates it to a fresh destination with
``migrate-start-postcopy`` right after ``migrate``: every vCPU then faults on pages
still at the source, at the same time.  Modes, links and QEMU's trace-paired latency
come from ``_latency.py`` (the page-request latency benchmarks); ``postcopy-blocktime``
is set on both sides, so both VMMs report ``postcopy-vcpu-blocktime`` (ms per vCPU).

Reported per migration:

* page-request latency p50 / p99 (µs; livemig from its destination's samples, QEMU from
  its trace) and, livemig only, each vCPU's mean wait (``postcopy-vcpu-latency``);
* per-vCPU blocktime (ms) from the destination's ``query-migrate``;
* total time (the source's ``total-time``) and STOP→RESUME: the ``timestamp`` of the
  source's ``STOP`` event to the destination's ``RESUME`` event (both VMMs stamp QMP
  events with the wall clock of this one machine);
* the guest's verdict, the same checks on both VMMs: no ``E`` on the destination's
  console (the guest checks its pages, that its ticks keep coming and that kvmclock
  never steps back or by more than ``max_jump_ms``), two more passes after the
  migration, every vCPU's timer ticks (QMP ``pmemsave`` of its per-vCPU records, see
  ``livemig.guests.os.tick_counts``) carried over and still coming (ticks/s on the
  destination: ``hz`` on an idle machine, fewer when the vCPU threads wait for a CPU;
  none is a failure), and the host-side check of the whole RAM (``pmemsave`` of
  all of it into ``os_check``).

The machine's load average and the CPU other processes used during each migration are
recorded next to the figures: on a shared machine they are noisy, which is why both
VMMs always run in the same invocation.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np
from _harness import HarnessError
from _latency import (
    Endpoints,
    Latency,
    Mode,
    TracedQemuPeer,
    _check_postcopy,
    livemig_raw_samples,
    machine_notes,
    open_link,
    parse_modes,
    wait_destination_done,
)
from _peers import (
    LivemigPeer,
    MigrationPlan,
    MigrationResult,
    Peer,
    VmSpec,
    first_event_times,
    migrate,
    qemu_available,
)
from rich.console import Console
from rich.table import Table

from livemig.errors import LivemigError
from livemig.guests.os import (
    OS_GUEST,
    PERCPU_SIZE,
    PERCPUS_POINTER,
    OsParams,
    load_os_image,
    tick_counts,
)
from livemig.vmm.checks import os_check
from livemig.vmm.vm import parse_size

BOOT_TIMEOUT_S = 300.0
AFTER_PASSES = 2  # passes the guest must make on the destination
TICK_WINDOW_S = 1.0  # ticks counted over this long on the destination


@dataclass(frozen=True)
class OsSpec(VmSpec):
    """The VM both peers run: the os guest with ``smp`` vCPUs."""

    smp: int = 1

    @property
    def params(self) -> OsParams:
        return OsParams.for_ram(self.mem, self.smp)


def _spec(peer: Peer) -> OsSpec:
    assert isinstance(peer.spec, OsSpec)
    return peer.spec


class OsLivemigPeer(LivemigPeer):
    """``livemig run --guest os --smp N`` (a destination: ``--incoming defer --smp N``)."""

    def command(self) -> list[str]:
        return [*super().command(), "--smp", str(_spec(self).smp)]


class OsQemuPeer(TracedQemuPeer):
    """QEMU 7.2 booting the same os image with ``-kernel`` (source and destination)."""

    def boot_args(self) -> list[str]:
        spec = _spec(self)
        kernel = self.workdir / f"{self.name}.kernel"
        kernel.write_bytes(spec.params.patch(load_os_image()))
        return ["-smp", str(spec.smp), "-kernel", str(kernel)]


def peer_class(mode: Mode) -> type[Peer]:
    return OsLivemigPeer if mode.peer == "livemig" else OsQemuPeer


# --- the guest seen from the host -----------------------------------------------------------
def read_ticks(peer: Peer, smp: int) -> tuple[int, ...]:
    """Every vCPU's timer ticks, read over QMP (``pmemsave``) from guest RAM."""
    out = peer.workdir / f"{peer.name}.percpu"
    peer.execute("pmemsave", val=PERCPUS_POINTER, size=4, filename=str(out))
    records = int.from_bytes(out.read_bytes(), "little")
    peer.execute("pmemsave", val=records, size=smp * PERCPU_SIZE, filename=str(out))
    return tick_counts(out.read_bytes(), smp)


def host_check(peer: Peer) -> int:
    """Stop the guest and check its whole RAM (``pmemsave``): the number of bad pages."""
    spec = _spec(peer)
    peer.execute("stop")
    dump = peer.workdir / f"{peer.name}.ram"
    peer.execute("pmemsave", val=0, size=spec.mem, filename=str(dump))
    try:
        ram = np.fromfile(dump, dtype=np.uint8)
        return len(os_check(ram, spec.params).bad_pages)
    finally:
        dump.unlink()


@dataclass(frozen=True)
class Verdict:
    """What the guest says about the migration (see the module docstring)."""

    errors: str  # E lines on the destination's console ("" if none)
    ticks_source: tuple[int, ...]  # at the last read on the source, before migrating
    ticks_after: tuple[int, ...]  # on the destination after the migration
    ticks_per_s: tuple[float, ...]  # on the destination, over TICK_WINDOW_S
    bad_pages: int

    @property
    def problems(self) -> list[str]:
        out = []
        if self.errors:
            out.append(f"guest reported {self.errors}")
        if any(a < b for a, b in zip(self.ticks_after, self.ticks_source, strict=True)):
            out.append("tick counts went back")
        if not all(self.ticks_per_s):
            out.append("a vCPU's ticks stopped")
        if self.bad_pages:
            out.append(f"{self.bad_pages} bad pages")
        return out

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "problems": self.problems, "errors": self.errors,
                "ticks_source": list(self.ticks_source), "ticks_after": list(self.ticks_after),
                "ticks_per_s": list(self.ticks_per_s), "bad_pages": self.bad_pages}


# --- one migration --------------------------------------------------------------------------
@dataclass(frozen=True)
class Cell:
    link: str
    page_size: str
    smp: int
    mode: Mode

    @property
    def label(self) -> str:
        return f"{self.link} {self.page_size} {self.smp} vCPU {self.mode.name}"


@dataclass(frozen=True)
class OsRun:
    cell: Cell
    latency: Latency
    migration: MigrationResult
    dest_info: Mapping[str, Any]
    stop_resume_ms: float
    verdict: Verdict

    @property
    def blocktime_ms(self) -> list[int]:
        return [int(x) for x in self.dest_info.get("postcopy-vcpu-blocktime", [])]

    @property
    def vcpu_latency_us(self) -> list[float] | None:
        lat = self.dest_info.get("postcopy-vcpu-latency")
        return None if lat is None else [x / 1000 for x in lat]

    def to_json(self) -> dict[str, Any]:
        lat = self.latency
        return {"link": self.cell.link, "page_size": self.cell.page_size,
                "vcpus": self.cell.smp, "mode": self.cell.mode.name,
                "p50_us": lat.p50, "p99_us": lat.p99, "max_us": lat.max, "faults": lat.count,
                "vcpu_blocktime_ms": self.blocktime_ms,
                "vcpu_latency_us": self.vcpu_latency_us,
                "total_time_ms": self.migration.total_time_ms,
                "stop_resume_ms": self.stop_resume_ms, "verdict": self.verdict.to_json(),
                "noise_cpus": self.migration.noise, "migration": self.migration.to_json(),
                "destination_info": dict(self.dest_info)}


def migrate_os(cell: Cell, spec: OsSpec, ends: Endpoints, workdir: Path, index: int,
               timeout: float) -> OsRun:
    """Boot a source, migrate it in postcopy to a fresh destination, ask the guest."""
    cls, mode = peer_class(cell.mode), cell.mode
    with contextlib.ExitStack() as stack:
        src = stack.enter_context(cls.source(workdir, f"source{index}", spec,
                                             netns=ends.source_ns))
        src.wait_serial(1, BOOT_TIMEOUT_S)  # the first pass wrote every page
        dst = stack.enter_context(cls.destination(workdir, f"destination{index}", spec,
                                                  netns=ends.dest_ns))
        ticks_source = read_ticks(src, spec.smp)
        src.vmm.qmp.events()  # only the migration's events from here on
        plan = MigrationPlan(ends.uri(index), (*mode.capabilities, "postcopy-blocktime"),
                             mode.parameters, postcopy_after_ms=0.0, timeout=timeout)
        try:
            result = migrate(src, dst, plan)
            info = wait_destination_done(dst)
        except LivemigError:
            if isinstance(dst, TracedQemuPeer):
                dst.abandon()  # it may no longer answer quit
            raise
        _check_postcopy(result)
        # migrate() collected both sides' events up to the end of the migration.
        stopped = first_event_times(result.source_events).get("STOP")
        resumed = first_event_times(result.destination_events).get("RESUME")
        if stopped is None or resumed is None:
            raise HarnessError(f"{cell.label}: no STOP ({stopped}) or RESUME ({resumed})")
        samples = livemig_raw_samples(dst) if mode.peer == "livemig" else None
        errors = ""
        try:
            dst.wait_serial(AFTER_PASSES, BOOT_TIMEOUT_S)
        except HarnessError as e:
            errors = str(e)
        console = dst.serial()
        errors = " ".join(line.decode(errors="replace") for line in console.split(b"\n")
                          if line.startswith(b"E")) or errors
        after = read_ticks(dst, spec.smp)
        time.sleep(TICK_WINDOW_S)
        later = read_ticks(dst, spec.smp)
        verdict = Verdict(errors, ticks_source, after,
                          tuple((b - a) / TICK_WINDOW_S for a, b in zip(after, later,
                                                                        strict=True)),
                          host_check(dst))
    # QEMU's trace is complete once the process has quit (the stack closed it).
    latency = dst.latency()[0] if isinstance(dst, TracedQemuPeer) \
        else Latency.from_livemig(info, None if samples is None else samples.latency_ns)
    return OsRun(cell, latency, result, info, (resumed - stopped) * 1e3, verdict)


# --- the matrix and its report --------------------------------------------------------------
@dataclass
class Report:
    runs: list[OsRun] = field(default_factory=list)
    failures: list[tuple[Cell, str]] = field(default_factory=list)
    load: list[tuple[float, float, float]] = field(default_factory=list)


def run_matrix(mem: str, links: Sequence[str], sizes: Sequence[str], vcpus: Sequence[int],
               modes: Sequence[Mode], repeat: int, timeout: float, console: Console,
               budget_s: float | None) -> Report:
    report = Report()
    began = time.monotonic()
    index = 0
    with tempfile.TemporaryDirectory(prefix="lmos-") as tmp:
        for link in links:
            with open_link(link, "128kb", "50ms") as ends:
                for ps in sizes:
                    for smp in vcpus:
                        spec = OsSpec(parse_size(mem), ps, OS_GUEST, smp=smp)
                        for _ in range(repeat):
                            for mode in modes:  # interleaved: a slow phase hits all
                                if budget_s is not None and time.monotonic() - began > budget_s:
                                    console.print("[yellow]time budget spent: stopping")
                                    return report
                                index += 1
                                cell = Cell(link, ps, smp, mode)
                                report.load.append(os.getloadavg())
                                with console.status(cell.label):
                                    try:
                                        run = migrate_os(cell, spec, ends, Path(tmp), index,
                                                         timeout)
                                    except LivemigError as e:
                                        console.print(f"[red]{cell.label}: {e}",
                                                      soft_wrap=True)
                                        report.failures.append((cell, str(e)[:500]))
                                        continue
                                report.runs.append(run)
                                console.print(summary_line(run), soft_wrap=True)
    return report


def _list(values: Sequence[float] | None, fmt: str = "{:.0f}") -> str:
    return "-" if values is None else "/".join(fmt.format(v) for v in values)


def summary_line(run: OsRun) -> str:
    v = run.verdict
    return (f"{run.cell.label}: {run.latency.count} faults, p50 {run.latency.p50:.0f} "
            f"p99 {run.latency.p99:.0f} µs, "
            f"blocktime {_list(run.blocktime_ms)} ms, total {run.migration.total_time_ms} ms, "
            f"STOP→RESUME {run.stop_resume_ms:.0f} ms, ticks/s {_list(v.ticks_per_s)}, "
            f"{'ok' if v.ok else '; '.join(v.problems)}")


COLUMNS = ("link", "pages", "vCPUs", "mode", "faults", "p50 µs", "p99 µs",
           "vCPU mean wait µs",
           "vCPU blocktime ms", "total ms", "STOP→RESUME ms", "ticks/s per vCPU", "guest")


def row_cells(run: OsRun) -> list[str]:
    c, v = run.cell, run.verdict
    lat = run.latency
    return [c.link, c.page_size, str(c.smp), c.mode.name, str(lat.count),
            f"{lat.p50:.0f}" if lat.count else "-", f"{lat.p99:.0f}" if lat.count else "-",
            _list(run.vcpu_latency_us), _list(run.blocktime_ms),
            str(run.migration.total_time_ms), f"{run.stop_resume_ms:.0f}",
            _list(v.ticks_per_s), "ok" if v.ok else "; ".join(v.problems)]


def rich_table(report: Report, title: str) -> Table:
    table = Table(title=title)
    for col in COLUMNS:
        table.add_column(col, justify="left" if col in ("link", "mode", "guest") else "right")
    for run in report.runs:
        table.add_row(*row_cells(run))
    return table


def markdown_table(report: Report) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row_cells(r)) + " |" for r in report.runs]
    return "\n".join(lines)


def load_summary(report: Report) -> str:
    if not report.load:
        return "no load recorded"
    one = [x[0] for x in report.load]
    noise = [r.migration.noise for r in report.runs]
    return (f"load average (1 min) {min(one):.1f}-{max(one):.1f}, median "
            f"{statistics.median(one):.1f}, on {os.cpu_count()} CPUs; other processes kept "
            f"{statistics.median(noise) if noise else 0:.2f} CPUs busy (median) meanwhile")


@click.command()
@click.option("--quick", is_flag=True,
              help="Loopback, 4K, 1 and 2 vCPUs, 128M: a couple of minutes.")
@click.option("--mem", default="256M", show_default=True, help="Guest RAM size.")
@click.option("--vcpus", default="1,2,4", show_default=True, help="vCPU counts.")
@click.option("--page-sizes", default="4K,2M", show_default=True, help="Backings: 4K, 2M.")
@click.option("--links", default="loopback,1gbit", show_default=True,
              help="loopback and/or a tbf-shaped veth rate such as 1gbit (needs root).")
@click.option("--modes", default="vanilla,preempt,qemu-vanilla,qemu-preempt",
              show_default=True, help="From benchmarks/_latency.py (qemu-* skipped when "
                                      "QEMU is missing).")
@click.option("--repeat", default=1, show_default=True, type=click.IntRange(1))
@click.option("--timeout", default=180.0, show_default=True, help="Per migration (s).")
@click.option("--budget", type=float, help="Stop starting migrations after this many s.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False))
@click.option("--markdown", is_flag=True, help="Also print the table as Markdown.")
def main(quick: bool, mem: str, vcpus: str, page_sizes: str, links: str, modes: str,
         repeat: int, timeout: float, budget: float | None, json_path: str | None,
         markdown: bool) -> None:
    """The os guest in postcopy at 1-4 vCPUs: livemig and QEMU 7.2 on the same image."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    console = Console() if sys.stdout.isatty() else Console(width=200)
    if quick:
        mem, vcpus, page_sizes, links = "128M", "1,2", "4K", "loopback"
    chosen = parse_modes(modes)
    if not qemu_available():
        console.print("[yellow]qemu-system-x86_64 or /dev/kvm missing: livemig only")
        chosen = tuple(m for m in chosen if m.peer != "qemu")
    machine = machine_notes()
    report = run_matrix(mem, [x.strip() for x in links.split(",") if x.strip()],
                        [x.strip() for x in page_sizes.split(",") if x.strip()],
                        [int(x) for x in vcpus.split(",") if x.strip()], chosen, repeat,
                        timeout, console, budget)
    title = (f"os guest {mem}, postcopy at once; {machine['date']}, livemig "
             f"{machine['livemig_git']}, {machine['qemu']}; {load_summary(report)}")
    console.print(rich_table(report, title))
    for cell, why in report.failures:
        console.print(f"[red]failed: {cell.label}: {why}", soft_wrap=True)
    if markdown:
        console.print(title, soft_wrap=True)
        console.print(markdown_table(report), soft_wrap=True, markup=False)
    if json_path:
        out = {"benchmark": "os_migration", "machine": machine, "load": report.load,
               "load_summary": load_summary(report), "runs": [r.to_json() for r in report.runs],
               "failures": [{"cell": c.label, "error": e} for c, e in report.failures]}
        Path(json_path).write_text(json.dumps(out, indent=1) + "\n")
    bad = [r for r in report.runs if not r.verdict.ok]
    if bad or report.failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
