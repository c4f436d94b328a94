"""Precopy completion: how long a running guest is paused at the end of a precopy migration.

    python benchmarks/precopy_downtime.py [--mem 256M] [--guest ab] [--page-sizes 4K]
        [--downtime-limit 300] [--transport unix] [--repeat 3] [--json PATH]

Theory of operation
-------------------
One source per peer (livemig, QEMU 7.2) boots the guest (``ab``: it writes every page
of ``[1 MiB, mem)`` pass after pass, as fast as it runs; ``random``: it visits pages in
a scattered order) and lets it fill its RAM twice.  The guest keeps running through
every migration: a precopy migration with unlimited bandwidth and ``downtime-limit``
(QEMU's default, 300 ms), to a fresh destination each time, after which the source gets
``cont`` (it runs on from ``postmigrate``) and a second of running before the next one.
One unmeasured warm-up migration per source, then ``--repeat`` rounds, the two peers
interleaved round by round.

Per migration, from the source's final ``query-migrate`` and both sides' QMP events
(wall-clock stamped by both VMMs, which run on this machine):

* **STOP->RESUME ms**: the source's ``STOP`` event to the destination's ``RESUME`` event,
  the pause the guest sees;
* **downtime ms**: the source's own ``downtime`` figure (what ``livemig demo`` and
  ``info migrate`` report);
* **total ms**, **rounds** (``dirty-sync-count``), **GB sent**, and **final MB**: what the
  stop-and-copy sent (``ram.downtime-bytes``), i.e. what the guest had dirtied when
  the source decided to stop;
* **dirty MB/s**: the source's last ``dirty-pages-rate`` (how fast the guest wrote; QEMU
  measures it over whole seconds, so a migration shorter than one shows none: ``-``);
* **noise**: CPUs other processes kept busy meanwhile.

Every figure is the median over a row's runs.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from _latency import machine_notes
from _peers import (
    UNLIMITED_BANDWIDTH,
    MigrationPlan,
    MigrationResult,
    Peer,
    VmSpec,
    first_event_times,
    migrate,
    migration_uri,
    peer_class,
    start_peer_cli,
)
from rich.console import Console
from rich.table import Table

GUEST_PASSES = 2  # the guest has filled its RAM this many times before the first migration
BOOT_TIMEOUT_S = 600.0
RUN_BETWEEN_S = 1.0  # the guest runs this long on the source between two migrations
NAN = float("nan")


@dataclass(frozen=True)
class Completion:
    """One precopy migration of a running guest."""

    result: MigrationResult

    @property
    def info(self) -> dict[str, Any]:
        return dict(self.result.source_info)

    @property
    def ram(self) -> dict[str, Any]:
        return dict(self.info.get("ram", {}))

    @property
    def stop_resume_ms(self) -> float:
        stop = first_event_times(self.result.source_events).get("STOP")
        resume = first_event_times(self.result.destination_events).get("RESUME")
        return NAN if stop is None or resume is None else (resume - stop) * 1e3

    @property
    def final_mb(self) -> float:
        return float(self.ram.get("downtime-bytes", NAN)) / 1e6

    @property
    def dirty_mbs(self) -> float:
        return float(self.ram.get("dirty-pages-rate", NAN)) * float(
            self.ram.get("page-size", 4096)) / 1e6

    def to_json(self) -> dict[str, Any]:
        return {**self.result.to_json(), "stop_resume_ms": self.stop_resume_ms}


@dataclass(frozen=True)
class Row:
    peer: str
    page_size: str
    warmup: Completion
    runs: tuple[Completion, ...]

    def median(self, value: Any) -> float:
        return statistics.median(value(r) for r in self.runs)

    def to_json(self) -> dict[str, Any]:
        return {"peer": self.peer, "page_size": self.page_size,
                "warmup": self.warmup.to_json(), "runs": [r.to_json() for r in self.runs]}


class Source:
    """One peer's running source and the migrations made from it."""

    def __init__(self, kind: str, spec: VmSpec, transport: str, limit_ms: int,
                 console: Console, stack: contextlib.ExitStack) -> None:
        self.kind, self.spec, self.transport, self.console = kind, spec, transport, console
        self.limit_ms = limit_ms
        self.cls = peer_class(kind)
        self.workdir = Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix=f"lmdown-{kind}-")))
        self.src: Peer = stack.enter_context(self.cls.source(self.workdir, "source", spec))
        self.count = 0

    @property
    def label(self) -> str:
        return f"{self.kind} {self.spec.page_size} {self.spec.guest}"

    def boot(self) -> None:
        with self.console.status(f"{self.label}: guest filling its RAM"):
            self.src.wait_serial(GUEST_PASSES, BOOT_TIMEOUT_S)

    def migrate(self, what: str) -> Completion:
        if self.src.runstate() != "running":
            self.src.execute("cont")  # postmigrate: the guest runs on here
            time.sleep(RUN_BETWEEN_S)
        self.count += 1
        uri = migration_uri(self.transport, self.workdir, f"migration{self.count}")
        plan = MigrationPlan(uri, parameters={"max-bandwidth": UNLIMITED_BANDWIDTH,
                                              "downtime-limit": self.limit_ms})
        with self.console.status(f"{self.label}: {what}"), \
                self.cls.destination(self.workdir, f"destination{self.count}",
                                     self.spec) as dst:
            c = Completion(migrate(self.src, dst, plan))
        self.console.print(
            f"{self.label} {what}: STOP->RESUME {c.stop_resume_ms:.0f} ms, downtime "
            f"{c.result.downtime_ms} ms, total {c.result.total_time_ms} ms, "
            f"{c.ram.get('dirty-sync-count')} rounds, final {c.final_mb:.0f} MB, dirty "
            f"{c.dirty_mbs:.0f} MB/s, noise {c.result.noise:.2f} CPUs", soft_wrap=True)
        return c


def run_page_size(kinds: Sequence[str], spec: VmSpec, transport: str, limit_ms: int,
                  repeat: int, console: Console) -> list[Row]:
    """Both peers' sources at once; a warm-up each, then rounds interleaving the peers."""
    with contextlib.ExitStack() as stack:
        sources = [Source(k, spec, transport, limit_ms, console, stack) for k in kinds]
        for s in sources:
            s.boot()
        warmups = [s.migrate("warm-up") for s in sources]
        runs: list[list[Completion]] = [[] for _ in sources]
        for n in range(1, repeat + 1):
            for s, out in zip(sources, runs, strict=True):
                out.append(s.migrate(f"{n}/{repeat}"))
    return [Row(k, spec.page_size, w, tuple(r))
            for k, w, r in zip(kinds, warmups, runs, strict=True)]


def results_table(rows: Sequence[Row], title: str) -> Table:
    table = Table(title=title)
    for col in ("peer", "pages", "STOP→RESUME ms", "downtime ms", "total ms", "rounds",
                "GB sent", "final MB", "dirty MB/s", "noise"):
        table.add_column(col, justify="left" if col in ("peer", "pages") else "right")
    for r in rows:
        table.add_row(
            r.peer, r.page_size, f"{r.median(lambda c: c.stop_resume_ms):.0f}",
            f"{r.median(lambda c: c.result.downtime_ms):.0f}",
            f"{r.median(lambda c: c.result.total_time_ms):.0f}",
            f"{r.median(lambda c: c.ram.get('dirty-sync-count', 0)):.0f}",
            f"{r.median(lambda c: c.result.transferred) / 1e9:.2f}",
            f"{r.median(lambda c: c.final_mb):.0f}",
            _rate(r.median(lambda c: c.dirty_mbs)),
            f"{max(c.result.noise for c in r.runs):.2f}")
    return table


def _rate(mbs: float) -> str:
    return f"{mbs:.0f}" if mbs > 0 else "-"


@click.command()
@click.option("--mem", default="256M", show_default=True, help="Guest RAM size.")
@click.option("--guest", default="ab", show_default=True, type=click.Choice(["ab", "random"]))
@click.option("--page-sizes", default="4K", show_default=True,
              help="Comma-separated backings: 4K, THP, 4K-memfd, 2M, 1G.")
@click.option("--peers", default="livemig,qemu", show_default=True,
              help="Comma-separated peers (qemu is skipped when not installed).")
@click.option("--downtime-limit", "limit_ms", default=300, show_default=True,
              type=click.IntRange(1), help="downtime-limit (ms) on both sources.")
@click.option("--transport", default="unix", show_default=True,
              type=click.Choice(["unix", "tcp"]))
@click.option("--repeat", default=3, show_default=True, type=click.IntRange(1),
              help="Measured migrations per row (after one warm-up).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False),
              help="Also write every migration as JSON.")
def main(mem: str, guest: str, page_sizes: str, peers: str, limit_ms: int, transport: str,
         repeat: int, json_path: str | None) -> None:
    """The pause at the end of a precopy migration of a running guest, livemig and QEMU."""
    console, kinds = start_peer_cli(peers, 130)
    before = machine_notes()
    rows: list[Row] = []
    for ps in (p.strip() for p in page_sizes.split(",") if p.strip()):
        rows += run_page_size(kinds, VmSpec.parse(mem, ps, guest), transport, limit_ms,
                              repeat, console)
    after = machine_notes()
    console.print(results_table(rows, f"precopy completion: {mem} {guest} guest running, "
                                      f"{transport} socket, downtime-limit {limit_ms} ms "
                                      f"(median of {repeat})"))
    console.print(f"load average before {' '.join(before['loadavg'])}, "
                  f"after {' '.join(after['loadavg'])}")
    if json_path:
        report = {"benchmark": "precopy_downtime", "mem": mem, "guest": guest,
                  "downtime_limit_ms": limit_ms, "transport": transport, "repeat": repeat,
                  "machine": before, "loadavg_after": after["loadavg"],
                  "rows": [r.to_json() for r in rows]}
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
