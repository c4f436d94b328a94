"""Postcopy speed: throughput, total time, switchover pause and request latency, livemig vs QEMU.

    python benchmarks/postcopy_speed.py [--mem 1G] [--page-sizes 4K,2M]
        [--links loopback,1gbit] [--modes vanilla,qemu-vanilla,preempt-proc,qemu-preempt]
        [--repeat 3] [--precopy-ms 1000] [--quick] [--json PATH]
        [--png results/postcopy_speed.png] [--profile DIR]

Theory of operation
-------------------
The same matrix as ``preempt_latency.py`` (``_latency.py``: links x page sizes x modes,
one source per (link, page size, implementation), a warm-up migration, then
``--repeat`` interleaved rounds each to a fresh destination), but the guest gets
``--precopy-ms`` (1 s) of precopy before ``migrate-start-postcopy``, and the figures are
about the whole postcopy migration rather than one request:

* **postcopy MB/s**: the source's ``ram.postcopy-bytes`` over the postcopy phase, from
  the source's ``MIGRATION`` event ``postcopy-active`` to its ``completed`` event (both
  VMMs stamp events with the wall clock, and both run on this machine);
* **total s**: the source's ``total-time``;
* **STOP->RESUME ms**: from the source's ``STOP`` event to the destination's ``RESUME``
  event, the pause a guest sees at the switchover;
* **requests** (the source's ``postcopy-requests``) and the destination's page-request
  latency p50/p99/max (``_latency.Latency``: livemig's own samples, QEMU's trace);
* **src / dst CPU s/GB**: CPU seconds each VMM process used in the postcopy phase per GB
  of its pages (``_cpu.PhaseCpu``: from the first ``query-migrate`` that says
  ``postcopy-active`` to the destination's end), the destination's without its vCPU
  threads; **guest CPU s**: what those vCPU threads used meanwhile, i.e. how much the
  guest ran (on this machine guest code runs in KVM's emulator and costs host CPU, so a
  guest that waits less for pages leaves less CPU to the migration).

Every figure is the median over the row's runs.  The PNG draws the throughput over time
(``ram.transferred`` of the source, sampled every 10 ms, in 100 ms windows) of the
median run of every row, one panel per (link, page size), with a dot where postcopy
started.  ``noise`` is the average number of CPUs other processes kept busy during a
row's noisiest run; the load average before and after the matrix is printed and saved.
``--quick`` is one migration per row on loopback only.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
from _latency import (
    Config,
    PanelGrid,
    Row,
    Run,
    config_json,
    machine_notes,
    matrix_options,
    mode_color,
    precopy_bytes_option,
    run_matrix,
    start_cli,
)
from _peers import MigrationResult, first_event_times
from rich.table import Table

DEFAULT_MODES = "vanilla,qemu-vanilla,preempt-proc,qemu-preempt"
WINDOW_S = 0.1  # throughput-over-time resolution of the plot


@dataclass(frozen=True)
class Speed:
    """The speed figures of one migration (NaN when an event is missing)."""

    postcopy_mbs: float
    postcopy_s: float
    total_s: float
    stop_resume_ms: float
    # CPU seconds per GB of the postcopy phase's pages: the source, the destination
    # apart from running the guest; and the seconds the destination's vCPUs ran.
    src_cpu_gb: float = float("nan")
    dst_cpu_gb: float = float("nan")
    guest_cpu_s: float = float("nan")

    @classmethod
    def of(cls, m: MigrationResult) -> Speed:
        src = first_event_times(m.source_events)
        dst = first_event_times(m.destination_events)
        start, end = src.get("postcopy-active"), src.get("completed")
        pc_bytes = float(m.source_info.get("ram", {}).get("postcopy-bytes", 0))
        pc_s = end - start if start is not None and end is not None else float("nan")
        stop, resume = src.get("STOP"), dst.get("RESUME")
        pause = (resume - stop) * 1e3 if stop is not None and resume is not None else float("nan")
        cpu, gb = m.postcopy_cpu, pc_bytes / 1e9
        per_gb = (lambda s: s / gb) if cpu is not None and gb > 0 else (lambda _s: float("nan"))
        return cls(pc_bytes / 1e6 / pc_s if pc_s > 0 else float("nan"), pc_s,
                   m.total_time_ms / 1e3, pause,
                   per_gb(cpu.src) if cpu else float("nan"),
                   per_gb(cpu.dst_migration) if cpu else float("nan"),
                   cpu.dst_vcpus if cpu else float("nan"))


def _median(values: Sequence[float]) -> float:
    ok = [v for v in values if v == v]  # drop NaN
    return float(statistics.median(ok)) if ok else float("nan")


def row_speed(row: Row) -> dict[str, float]:
    speeds = [Speed.of(r.migration) for r in row.runs]
    return {"postcopy_mbs": _median([s.postcopy_mbs for s in speeds]),
            "postcopy_s": _median([s.postcopy_s for s in speeds]),
            "total_s": _median([s.total_s for s in speeds]),
            "stop_resume_ms": _median([s.stop_resume_ms for s in speeds]),
            "src_cpu_gb": _median([s.src_cpu_gb for s in speeds]),
            "dst_cpu_gb": _median([s.dst_cpu_gb for s in speeds]),
            "guest_cpu_s": _median([s.guest_cpu_s for s in speeds]),
            "requests": _median([float(r.requests) for r in row.runs]),
            "faults": row.median("count"), "p50_ms": row.median("p50") / 1e3,
            "p99_ms": row.median("p99") / 1e3, "max_ms": row.median("max") / 1e3}


def speed_table(rows: Sequence[Row], title: str) -> Table:
    table = Table(title=title)
    for col in ("link", "pages", "mode"):
        table.add_column(col)
    cols = ("postcopy MB/s", "postcopy s", "total s", "STOP->RESUME ms", "requests",
            "p50 ms", "p99 ms", "max ms", "src CPU s/GB", "dst CPU s/GB", "guest CPU s",
            "runs", "noise")
    for col in cols:
        table.add_column(col, justify="right")
    for r in rows:
        if not r.ok:
            table.add_row(r.link, r.page_size, r.mode.name, *(["-"] * (len(cols) - 2)),
                          f"0/{len(r.failures)} ok", "-")
            continue
        s = row_speed(r)
        runs = f"{len(r.runs)}" + (f" ({len(r.failures)} failed)" if r.failures else "")
        table.add_row(r.link, r.page_size, r.mode.name, f"{s['postcopy_mbs']:.0f}",
                      f"{s['postcopy_s']:.2f}", f"{s['total_s']:.2f}",
                      f"{s['stop_resume_ms']:.0f}", f"{s['requests']:.0f}",
                      f"{s['p50_ms']:.2f}", f"{s['p99_ms']:.2f}", f"{s['max_ms']:.1f}",
                      f"{s['src_cpu_gb']:.2f}", f"{s['dst_cpu_gb']:.2f}",
                      f"{s['guest_cpu_s']:.2f}", runs, f"{r.noise:.2f}")
    return table


def _median_run(row: Row) -> Run:
    runs = sorted(row.runs, key=lambda r: r.migration.total_time_ms)
    return runs[len(runs) // 2]


def rate_curve(m: MigrationResult) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """(window end s, MB/s) of ``ram.transferred`` in WINDOW_S windows."""
    t = np.array([p.t for p in m.progress])
    sent = np.array([p.transferred for p in m.progress], dtype=np.float64)
    if len(t) < 2:
        return np.zeros(0), np.zeros(0)
    grid = np.arange(0.0, t[-1] + WINDOW_S, WINDOW_S)
    at = np.interp(grid, t, sent)
    return grid[1:], np.diff(at) / WINDOW_S / 1e6


def plot_throughput(rows: Sequence[Row], path: Path, title: str) -> None:
    """One panel per (link, page size): MB/s over time of each row's median run."""
    grid = PanelGrid(rows)
    for r in rows:
        if not r.ok:
            continue
        ax = grid.axis(r)
        m = _median_run(r).migration
        xs, ys = rate_curve(m)
        color = mode_color(r.mode)
        ax.plot(xs, ys, color=color, label=r.mode.name,
                linestyle="--" if r.mode.peer == "qemu" else "-")
        switch = next((p.t for p in m.progress if p.status.startswith("postcopy")), None)
        if switch is not None and len(xs):
            ax.plot([switch], [float(np.interp(switch, xs, ys))], "o", color=color)
    for ax, link, size in grid.panels():
        ax.set_title(f"{link}, {size} pages (dot: postcopy starts)")
        ax.set_xlabel("seconds since migrate")
        ax.set_ylabel("MB/s sent by the source")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small", loc="best")
    grid.save(path, title)


@click.command()
@matrix_options(DEFAULT_MODES, 1000.0, "Precopy time before migrate-start-postcopy.")
@click.option("--quick", is_flag=True, help="One migration per row, loopback only.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False),
              help="Write every run (progress samples and events included) as JSON.")
@click.option("--png", "png_path", default="results/postcopy_speed.png", show_default=True,
              type=click.Path(dir_okay=False), help="Throughput-over-time plot ('' for none).")
def main(mem: str, page_sizes: str, links: str, modes: str, repeat: int, precopy_ms: float,
         precopy_bytes: str, quick: bool, warmup: bool, prealloc: bool,
         json_path: str | None, png_path: str, profile_dir: str | None) -> None:
    """Postcopy throughput, total time, STOP->RESUME and request latency vs QEMU 7.2."""
    console, chosen, pdir = start_cli(modes, profile_dir, 160)
    if quick:
        repeat, links = 1, "loopback"
    cfg = Config(mem, _split(page_sizes), _split(links), chosen, repeat, precopy_ms, warmup,
                 profile_dir=pdir, prealloc=prealloc,
                 precopy_bytes=precopy_bytes_option(precopy_bytes))
    load_before = os.getloadavg()
    rows = run_matrix(cfg, console)
    load_after = os.getloadavg()
    after = f"{precopy_bytes} sent" if cfg.precopy_bytes else f"{precopy_ms:.0f} ms"
    title = f"postcopy speed, {mem} random guest, postcopy after {after} (median of {repeat})"
    console.print(speed_table(rows, title))
    console.print(f"load average before {_load(load_before)}, after {_load(load_after)} "
                  f"({os.cpu_count()} CPUs)")
    if png_path:
        plot_throughput(rows, Path(png_path), title)
        console.print(f"throughput over time: {png_path}")
    if json_path:
        report = {"benchmark": "postcopy_speed", "config": config_json(cfg),
                  "machine": machine_notes(),
                  "load": {"before": list(load_before), "after": list(load_after)},
                  "rows": [{**r.to_json(with_samples=False),
                            "speed": row_speed(r) if r.ok else None} for r in rows]}
        Path(json_path).write_text(json.dumps(report, indent=1) + "\n")


def _load(avg: tuple[float, float, float]) -> str:
    return " / ".join(f"{x:.2f}" for x in avg)


def _split(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


if __name__ == "__main__":
    main()
