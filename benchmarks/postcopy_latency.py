"""Vanilla postcopy page-request latency on loopback: livemig against QEMU 7.2.

    python benchmarks/postcopy_latency.py [--mem 1G] [--page-sizes 4K,2M]
        [--peers livemig,qemu] [--repeat 3] [--precopy-ms 0] [--json PATH]

Theory of operation
-------------------
The vanilla half of ``preempt_latency.py`` (same engine, ``_latency.py``): a 1 GiB
``random`` guest, TCP over loopback, ``migrate`` then ``migrate-start-postcopy`` at once,
postcopy-ram only (one channel: a requested page waits behind whatever background pages
are already queued in that channel).  For each page size it reports the medians over
``--repeat`` runs of the fault-to-placement latency p50 and p99 in µs: livemig's from
its destination's ``query-migrate``, QEMU 7.2's (when installed) by pairing its trace
events; then livemig / QEMU ratios (below 1: livemig is faster).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import click
from _latency import Config, Row, config_json, machine_notes, parse_modes, results_table, run_matrix
from _peers import start_peer_cli
from rich.table import Table

MODE_OF_PEER = {"livemig": "vanilla", "qemu": "qemu-vanilla"}


@click.command()
@click.option("--mem", default="1G", show_default=True, help="Guest RAM size.")
@click.option("--page-sizes", default="4K,2M", show_default=True,
              help="Comma-separated backings: 4K, THP, 2M, 1G.")
@click.option("--peers", default="livemig,qemu", show_default=True,
              help="Comma-separated peers (qemu is skipped when not installed).")
@click.option("--repeat", default=3, show_default=True, type=click.IntRange(1),
              help="Measured migrations per row (medians are reported).")
@click.option("--precopy-ms", default=0.0, show_default=True,
              help="Precopy time before migrate-start-postcopy (0: at once).")
@click.option("--warmup/--no-warmup", default=True, show_default=True,
              help="One unmeasured migration per source first.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False),
              help="Write every run (QEMU samples included) as JSON.")
def main(mem: str, page_sizes: str, peers: str, repeat: int, precopy_ms: float, warmup: bool,
         json_path: str | None) -> None:
    """Vanilla postcopy page-request latency p50/p99: livemig and QEMU 7.2, loopback."""
    console, kinds = start_peer_cli(peers, 140)
    modes = parse_modes(",".join(MODE_OF_PEER.get(k, k) for k in kinds))
    sizes = tuple(p.strip() for p in page_sizes.split(",") if p.strip())
    cfg = Config(mem, sizes, ("loopback",), modes, repeat, precopy_ms, warmup)
    rows = run_matrix(cfg, console)
    console.print(results_table(
        rows, f"vanilla postcopy page-request latency, {mem} random guest, loopback, "
              f"postcopy after {precopy_ms:.0f} ms (median of {repeat})",
        metrics=("p50", "p99"), unit="µs"))
    ratios = ratio_table(rows)
    if ratios.row_count:
        console.print(ratios)
    if json_path:
        report = {"benchmark": "postcopy_latency", "config": config_json(cfg),
                  "machine": machine_notes(), "rows": [r.to_json() for r in rows]}
        Path(json_path).write_text(json.dumps(report, indent=1) + "\n")


def ratio_table(rows: Sequence[Row]) -> Table:
    table = Table(title="livemig ÷ QEMU 7.2", caption="below 1: livemig is faster")
    for col in ("pages", "p50", "p99"):
        table.add_column(col, justify="left" if col == "pages" else "right")
    ours = {r.page_size: r for r in rows if r.mode.peer == "livemig" and r.ok}
    for r in rows:
        mine = ours.get(r.page_size)
        if r.mode.peer == "qemu" and r.ok and mine is not None:
            table.add_row(r.page_size, *(f"{mine.median(m) / max(r.median(m), 1e-9):.2f}"
                                         for m in ("p50", "p99")))
    return table


if __name__ == "__main__":
    main()
