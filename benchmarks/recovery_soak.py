"""Postcopy recovery soak: many postcopy migrations, each cut several times at random
moments by a random fault, and recovered.

    python benchmarks/recovery_soak.py [--migrations 100] [--cuts 3]
        [--link netns|1gbit|loopback]
        [--page-sizes 4K,2M] [--designs vanilla,preempt-migration,preempt-rp,preempt-process]
        [--seed N] [--json PATH]

Theory of operation
-------------------
Each migration is a fresh pair of ``livemig run`` processes (``livemig.recoverylab``): a
64 MiB random guest on the source, a destination with ``--incoming defer``; the
combinations of page size and urgent-sender design take turns.  Once postcopy runs,
the harness waits a random moment (up to ``--max-gap`` seconds), then applies a fault
drawn from those the link can make - ``--link loopback``: ``ss -K`` on the migration's
port and ``migrate-pause``; ``--link netns`` (two network namespaces joined by a veth
pair; ``--link 1gbit``: the same link shaped to 1 Gbit/s each way): also the link taken
down and every packet dropped by nftables, both left in place until both sides have
paused on their dead-link timeout.  A fault that comes as the migration ends may lose
only the destination's final SHUT: the source alone pauses, and the same recovery
completes it (counted in the ``SHUT lost`` column).  The migration is then
recovered on a new port, and cut again, ``--cuts`` times (a migration that completes
before all its cuts is counted with the cuts it got).  At the end both sides must be
``completed`` and the destination's check of every guest page must find 0 bad pages.

Reported per combination and in total: migrations, cuts, recoveries, failed
migrations (with the error of each), bad pages, the time from both sides paused to
both active again (median, max), the time a fault takes to pause both sides, the
destination's page-request latency (every sample of every migration: p50 and p99
overall, and of the samples after the first recovery), and how busy the rest of the
machine was (CPUs kept busy by other processes, ``_cpu.py``).
"""

from __future__ import annotations

import json
import random
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click
import numpy as np
from _cpu import Usage
from _latency import machine_notes
from rich.console import Console
from rich.table import Table

from livemig.netlab import Shaping
from livemig.recoverylab import (
    DESIGNS,
    Link,
    LoopbackLink,
    RecoveryConfig,
    RecoveryRun,
    netns_link,
)

LOG_TAIL = 1500  # characters of each VMM log kept for a failed migration


@dataclass
class MigrationRecord:
    """One migration of the soak: what was cut, how it ended, what it measured."""

    index: int
    page_size: str
    design: str
    faults: list[str] = field(default_factory=list)
    to_paused_s: list[float] = field(default_factory=list)
    to_resumed_s: list[float] = field(default_factory=list)
    recoveries: int = 0
    resume_retries: int = 0
    shut_lost: int = 0
    status: str = "not started"
    bad_pages: int = 0
    latency_us: list[float] = field(default_factory=list)
    after_recovery_us: list[float] = field(default_factory=list)
    seconds: float = 0.0
    other_cpu_s: float = 0.0
    error: str = ""
    exits: dict[str, str] = field(default_factory=dict)
    logs: dict[str, str] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.status != "completed" or self.bad_pages != 0


def soak_one(rec: MigrationRecord, link: Link, workdir: Path, cfg: RecoveryConfig,
             cuts: int, max_gap: float, rng: random.Random) -> None:
    """Run one migration into ``rec``: postcopy, ``cuts`` random cuts, finish, check."""
    start = time.monotonic()
    try:
        run_one(rec, link, workdir, cfg, cuts, max_gap, rng)
    except Exception as e:  # noqa: BLE001 - a soak records every failure and goes on
        rec.status, rec.error = "error", f"{type(e).__name__}: {e}"
    rec.seconds = time.monotonic() - start


def run_one(rec: MigrationRecord, link: Link, workdir: Path, cfg: RecoveryConfig,
            cuts: int, max_gap: float, rng: random.Random) -> None:
    run = RecoveryRun(link, workdir, cfg)
    try:
        soak_run(rec, run, link, cuts, max_gap, rng)
    finally:
        run.close()
        rec.exits = run.exits


def soak_run(rec: MigrationRecord, run: RecoveryRun, link: Link, cuts: int, max_gap: float,
             rng: random.Random) -> None:
    before = Usage.take(run.src.pid, run.dst.pid)
    try:
        run.start_postcopy()
        split = None  # latency samples before the first recovery
        for _ in range(cuts):
            time.sleep(rng.uniform(0, max_gap))
            if not run.active():
                break
            got = run.cut(rng.choice(link.faults()))
            if got is None:
                break
            rec.faults.append(got.fault)
            rec.to_paused_s.append(got.to_paused)
            rec.to_resumed_s.append(got.to_resumed)
            rec.shut_lost += got.shut_lost
            if split is None:
                split = len(run.latency_samples())
        outcome = run.finish()
    except Exception:
        rec.logs = {v.name: v.log_text()[-LOG_TAIL:] for v in (run.src, run.dst)}
        raise
    finally:
        rec.recoveries, rec.resume_retries = run.recoveries, run.resume_retries
    rec.status = f"{outcome.src_status}/{outcome.dst_status}"
    if outcome.completed:
        rec.status = "completed"
        rec.bad_pages = outcome.bad_pages
    rec.latency_us = [ns / 1000 for ns in outcome.latency_ns]
    rec.after_recovery_us = rec.latency_us[split or len(rec.latency_us):]
    rec.other_cpu_s = Usage.take(run.src.pid, run.dst.pid).other_since(before)


def percentiles(samples: Sequence[float]) -> tuple[str, str]:
    if not samples:
        return "-", "-"
    p50, p99 = np.percentile(np.asarray(samples), [50, 99])
    return f"{p50:.0f}", f"{p99:.0f}"


def seconds(values: Sequence[float], how: str) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values) if how == 'median' else max(values):.2f}"


COLUMNS = ("pages", "design", "migrations", "cuts", "recoveries", "resume retries",
           "SHUT lost", "failed", "bad pages",
           "paused→resumed s median", "max", "fault→paused s median",
           "latency µs p50", "p99", "after recovery p50", "p99 ", "other CPUs")


def row(label: tuple[str, str], recs: Sequence[MigrationRecord]) -> list[str]:
    lat = [x for r in recs for x in r.latency_us]
    after = [x for r in recs for x in r.after_recovery_us]
    resumed = [x for r in recs for x in r.to_resumed_s]
    wall = sum(r.seconds for r in recs)
    other = sum(r.other_cpu_s for r in recs) / wall if wall else 0.0
    return [*label, str(len(recs)), str(sum(len(r.faults) for r in recs)),
            str(sum(r.recoveries for r in recs)), str(sum(r.resume_retries for r in recs)),
            str(sum(r.shut_lost for r in recs)),
            str(sum(r.failed for r in recs)),
            str(sum(max(r.bad_pages, 0) for r in recs)),
            seconds(resumed, "median"), seconds(resumed, "max"),
            seconds([x for r in recs for x in r.to_paused_s], "median"),
            *percentiles(lat), *percentiles(after), f"{other:.2f}"]


def results_table(recs: Sequence[MigrationRecord], title: str) -> Table:
    table = Table(title=title)
    for col in COLUMNS:
        table.add_column(col, justify="left" if col in ("pages", "design") else "right")
    combos = sorted({(r.page_size, r.design) for r in recs},
                    key=lambda c: (c[0], list(DESIGNS).index(c[1])))
    for combo in combos:
        table.add_row(*row(combo, [r for r in recs if (r.page_size, r.design) == combo]))
    table.add_row(*row(("all", ""), recs), style="bold")
    return table


@contextmanager
def make_link(kind: str) -> Iterator[Link]:
    if kind in ("netns", "1gbit"):
        with netns_link(Shaping() if kind == "1gbit" else None) as link:
            yield link
    else:
        with nullcontext(LoopbackLink()) as link:
            yield link


@click.command()
@click.option("--migrations", default=100, show_default=True, type=click.IntRange(1))
@click.option("--cuts", default=3, show_default=True, type=click.IntRange(0),
              help="Random cuts per migration.")
@click.option("--link", "link_kind", type=click.Choice(["loopback", "netns", "1gbit"]),
              default="netns", show_default=True)
@click.option("--page-sizes", default="4K,2M", show_default=True)
@click.option("--designs", default=",".join(DESIGNS), show_default=True,
              help="Urgent-sender designs, comma-separated.")
@click.option("--mem", default="64M", show_default=True, help="Guest RAM size.")
@click.option("--dead-link-ms", default=1500, show_default=True,
              help="x-dead-link-timeout on both sides.")
@click.option("--postcopy-bandwidth", default=8_000_000, show_default=True,
              help="max-postcopy-bandwidth (bytes/s): how long postcopy lasts.")
@click.option("--max-gap", default=1.0, show_default=True,
              help="Longest random wait (s) before each cut.")
@click.option("--seed", type=int, default=None, help="Random seed (default: random).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False),
              help="Write every migration (samples included) as JSON.")
def main(migrations: int, cuts: int, link_kind: str, page_sizes: str, designs: str,
         mem: str, dead_link_ms: int, postcopy_bandwidth: int, max_gap: float,
         seed: int | None, json_path: str | None) -> None:
    """Postcopy migrations cut at random moments by random faults, and recovered."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    console = Console() if sys.stdout.isatty() else Console(width=200)
    seed = random.randrange(1 << 32) if seed is None else seed
    rng = random.Random(seed)
    sizes = [p.strip() for p in page_sizes.split(",") if p.strip()]
    names = [d.strip() for d in designs.split(",") if d.strip()]
    unknown = set(names) - set(DESIGNS)
    if unknown:
        raise click.BadParameter(f"unknown designs {sorted(unknown)}; choose from "
                                 f"{list(DESIGNS)}")
    combos = [(p, d) for p in sizes for d in names]
    recs: list[MigrationRecord] = []
    started = time.monotonic()
    with make_link(link_kind) as link, tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        for i in range(migrations):
            page, design = combos[i % len(combos)]
            cfg = RecoveryConfig(DESIGNS[design], page, mem, dead_link_ms,
                                 postcopy_bandwidth=postcopy_bandwidth)
            workdir = Path(tmp) / str(i)
            workdir.mkdir()
            rec = MigrationRecord(i, page, design)
            recs.append(rec)
            soak_one(rec, link, workdir, cfg, cuts, max_gap, rng)
            mark = "[red]FAILED" if rec.failed else "ok"
            console.print(f"{i + 1}/{migrations} {page} {design}: {mark} "
                          f"cuts={','.join(rec.faults) or '-'} status={rec.status} "
                          f"bad={rec.bad_pages} {rec.seconds:.1f}s {rec.error}")
    elapsed = time.monotonic() - started
    title = (f"postcopy recovery soak, {mem} random guest, {link_kind}, up to {cuts} "
             f"random cuts per migration, seed {seed}, {elapsed / 60:.1f} min")
    console.print(results_table(recs, title))
    for r in recs:
        if r.failed:
            console.print(f"[red]migration {r.index} ({r.page_size} {r.design}, cuts "
                          f"{r.faults}): {r.status} {r.error}")
    if json_path:
        report = {"benchmark": "recovery_soak", "seed": seed, "link": link_kind,
                  "cuts": cuts, "mem": mem, "dead_link_ms": dead_link_ms,
                  "postcopy_bandwidth": postcopy_bandwidth, "max_gap": max_gap,
                  "machine": machine_notes(), "migrations": [asdict(r) for r in recs]}
        Path(json_path).write_text(json.dumps(report, indent=1) + "\n")
    sys.exit(1 if any(r.failed for r in recs) else 0)


if __name__ == "__main__":
    main()
