"""Postcopy preemption: page-request latency of vanilla postcopy vs preempt, livemig vs QEMU.

    python benchmarks/preempt_latency.py [--mem 1G] [--page-sizes 4K,2M]
        [--links loopback,1gbit]
        [--modes vanilla,preempt,preempt-rp,preempt-proc,qemu-vanilla,qemu-preempt,
                 preempt-proc+tls,...]
        [--repeat 3] [--precopy-ms 0 | --precopy-bytes 300M] [--json PATH]
        [--png results/preempt_latency.png]
        [--profile DIR]

Theory of operation
-------------------
A 1 GiB ``random`` guest runs on the source; each migration switches to postcopy right
after ``migrate`` (``--precopy-ms`` delays the switch; ``--precopy-bytes`` switches once
the source has sent that much, so that designs whose setup takes longer, such as
multifd's connections, get the same amount of precopy), so nearly every page the
guest visits on the destination is requested from the source.  For every (link, page size,
mode) the table shows the medians over ``--repeat`` runs of the fault-to-placement
latency percentiles p50/p90/p99/max, the number of requested pages measured (count),
the source's ``postcopy-requests``, and the migration's total time; the PNG shows the
CDFs.  Modes, links, the QEMU trace pairing and the goals are described in
``_latency.py``.  The ``1gbit`` link is two network namespaces joined by a veth pair,
each end shaped by ``tbf rate 1gbit burst 128kb latency 50ms`` (``--link-burst``,
``--link-latency``): a queue of up to 50 ms, what a switch port or a NIC ring holds;
the harness creates and removes them.

The goals (medians): on the 1 Gbit/s link, 4K pages p50 <= 1 ms and p99 <= 5 ms, 2M pages
p99 <= 25 ms (livemig's preempt modes); on loopback, 4K p50 no worse than QEMU's in the
same family (vanilla vs qemu-vanilla, preempt* vs qemu-preempt); a mode over TLS
(``NAME+tls``: both sides get tls-creds-x509 objects loading certificates made for the
run by ``livemig.tlslab``) costs at most 10% at p50 and p99 on the 1 Gbit/s link, 4K.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import click
from _latency import (
    Config,
    check_goals,
    config_json,
    goals_table,
    machine_notes,
    matrix_options,
    plot_cdfs,
    precopy_bytes_option,
    results_table,
    run_matrix,
    start_cli,
)
from _peers import TlsPlan

from livemig.tlslab import SERVER_NAMES, make_tls_dirs

DEFAULT_MODES = "vanilla,preempt,preempt-rp,preempt-proc,qemu-vanilla,qemu-preempt"


@click.command()
@matrix_options(DEFAULT_MODES, 0.0, "Precopy time before migrate-start-postcopy (0: at once).")
@click.option("--link-burst", default="128kb", show_default=True, help="tbf burst.")
@click.option("--link-latency", default="50ms", show_default=True,
              help="tbf latency (how long a packet may queue).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False),
              help="Write every run (QEMU samples included) as JSON.")
@click.option("--png", "png_path", default="results/preempt_latency.png", show_default=True,
              type=click.Path(dir_okay=False), help="CDF plot ('' for none).")
def main(mem: str, page_sizes: str, links: str, modes: str, repeat: int, precopy_ms: float,
         precopy_bytes: str, warmup: bool, prealloc: bool, link_burst: str, link_latency: str,
         json_path: str | None, png_path: str, profile_dir: str | None) -> None:
    """Page-request latency: vanilla postcopy and livemig's preempt modes, against QEMU 7.2."""
    console, chosen, pdir = start_cli(modes, profile_dir, 140)
    with tempfile.TemporaryDirectory(prefix="lmlat-tls-") as certs:
        tls = None
        if any(m.tls for m in chosen):
            dirs = make_tls_dirs(Path(certs))
            tls = TlsPlan(dirs.server, dirs.client, SERVER_NAMES[-1])
        cfg = Config(mem, _split(page_sizes), _split(links), chosen, repeat, precopy_ms,
                     warmup, link_burst, link_latency, profile_dir=pdir, tls=tls,
                     precopy_bytes=precopy_bytes_option(precopy_bytes),
                     prealloc=prealloc)
        rows = run_matrix(cfg, console)
    after = (f"{precopy_bytes} sent" if cfg.precopy_bytes else f"{precopy_ms:.0f} ms")
    title = (f"postcopy page-request latency, {mem} random guest, postcopy after "
             f"{after} (median of {repeat})")
    console.print(results_table(rows, title))
    checks = check_goals(rows)
    if checks:
        console.print(goals_table(checks))
    if png_path:
        plot_cdfs(rows, Path(png_path), title)
        console.print(f"CDFs: {png_path}")
    if json_path:
        report = {"benchmark": "preempt_latency", "config": config_json(cfg),
                  "machine": machine_notes(), "rows": [r.to_json() for r in rows],
                  "goals": [{"goal": c.goal.text, "mode": c.mode, "value_us": c.value_us,
                             "limit_us": c.limit_us, "against": c.against, "met": c.met}
                            for c in checks]}
        Path(json_path).write_text(json.dumps(report, indent=1) + "\n")


def _split(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


if __name__ == "__main__":
    main()
