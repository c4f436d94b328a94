"""Run livemig's fuzz targets for a budget and report inputs, coverage and findings.

    python fuzz/run.py [--target NAME ...] [--runs N] [--seconds T] [--corpus DIR]
                       [--findings DIR] [--json PATH]

Theory of operation
-------------------
Each target of fuzz/targets.py runs in its own process under atheris (libFuzzer): it
starts from its committed seeds (fuzz/seeds/TARGET, recorded from real migrations by
fuzz/record_seeds.py) plus a working corpus (``--corpus DIR/TARGET``, a temporary one by
default), and stops after ``--runs`` inputs or ``--seconds`` seconds, whichever comes
first.  Every input must return within ``--timeout`` seconds and the process stay under
``--rss-mb``: libFuzzer reports a hang or memory blow-up as a finding, like an
exception other than livemig's typed errors.  A finding's input is saved in
``--findings`` (one file per finding, named by target); turn each into a regression
test.  The report gives, per target, the inputs executed, the time, the coverage
libFuzzer measured (``cov``: instrumented edges of livemig's code; ``ft``: features)
and the findings, the peak memory and the slowest input.  A run stopped with SIGINT
(to the target's process) still reports what it did.  Exit status 1 if any target
found something.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve().parent
TARGETS = ("stream", "postcopy", "returnpath", "recovery", "multifd", "qmp", "helper",
           "devstate")
_STATS = re.compile(r"^#(\d+)\s+(?:DONE|pulse|NEW|REDUCE|INITED)\s+cov: (\d+) ft: (\d+)"
                    r"(?: corp: (\d+)/)?", re.M)
_DONE = re.compile(r"^Done (\d+) runs in (\d+) second", re.M)
_FINAL = re.compile(r"^stat::(\w+):\s+(\d+)", re.M)  # -print_final_stats=1
# Longest input: a 64 KiB stream reaches every record type; the recovery handshake is
# over in the first few KiB (the RAM that follows is the stream target's).
MAX_LEN = {"recovery": 16385}
INTERRUPTED = 72  # libFuzzer's exit status after SIGINT (-interrupted_exit_code)


@dataclass
class Outcome:
    target: str
    inputs: int
    seconds: float
    coverage: int
    features: int
    corpus: int
    findings: list[str]
    exit_status: int
    peak_rss_mb: int = 0
    slowest_s: int = 0  # the slowest input's time, whole seconds as libFuzzer counts

    @property
    def ok(self) -> bool:
        """Nothing found; a run stopped early with SIGINT is not a finding."""
        return self.exit_status in (0, INTERRUPTED) and not self.findings


def run_target(target: str, *, runs: int, seconds: int, corpus: Path, findings: Path,
               timeout: int, rss_mb: int, log: Path | None = None) -> Outcome:
    corpus.mkdir(parents=True, exist_ok=True)
    findings.mkdir(parents=True, exist_ok=True)
    before = set(findings.iterdir())
    seeds = HERE / "seeds" / target
    cmd = [sys.executable, str(HERE / "targets.py"), target, f"-runs={runs}",
           f"-max_total_time={seconds}", f"-timeout={timeout}", f"-rss_limit_mb={rss_mb}",
           f"-max_len={MAX_LEN.get(target, 65537)}", f"-artifact_prefix={findings}/{target}-",
           "-print_final_stats=1", str(corpus)]
    if seeds.is_dir():
        cmd.append(str(seeds))
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          timeout=seconds + 120 if seconds else None)
    elapsed = time.monotonic() - t0
    if log is not None:
        log.write_text(proc.stderr)
    stats = _STATS.findall(proc.stderr)
    done = _DONE.findall(proc.stderr)
    final = dict(_FINAL.findall(proc.stderr))
    inputs = int(final.get("number_of_executed_units", 0)) or (
        int(done[-1][0]) if done else (int(stats[-1][0]) if stats else 0))
    cov, ft, corp = (int(stats[-1][1]), int(stats[-1][2]), int(stats[-1][3] or 0)) \
        if stats else (0, 0, 0)
    new = sorted(str(p) for p in set(findings.iterdir()) - before)
    return Outcome(target, inputs, round(elapsed, 1), cov, ft, corp, new, proc.returncode,
                   int(final.get("peak_rss_mb", 0)), int(final.get("slowest_unit_time_sec", 0)))


def report(outcomes: list[Outcome]) -> Table:
    table = Table(title="livemig fuzzing")
    for col in ("target", "inputs", "seconds", "inputs/s", "cov", "ft", "corpus",
                "peak MB", "slowest s", "findings"):
        table.add_column(col, justify="left" if col in ("target", "findings") else "right")
    for o in outcomes:
        rate = o.inputs / o.seconds if o.seconds else 0
        found = ", ".join(Path(f).name for f in o.findings) or (
            "none" if o.exit_status == 0 else "none (stopped)"
            if o.exit_status == INTERRUPTED else f"exit {o.exit_status}")
        table.add_row(o.target, f"{o.inputs:,}", f"{o.seconds:.0f}", f"{rate:,.0f}",
                      str(o.coverage), str(o.features), str(o.corpus), str(o.peak_rss_mb),
                      str(o.slowest_s), found)
    return table


@click.command()
@click.option("--target", "targets", multiple=True, type=click.Choice(TARGETS),
              help="Run only these targets (default: all).")
@click.option("--runs", default=-1, show_default=True, help="Inputs per target (-1: no cap).")
@click.option("--seconds", default=60, show_default=True, help="Time per target (0: no cap).")
@click.option("--corpus", type=click.Path(file_okay=False, path_type=Path),
              help="Keep the working corpora here (default: a temporary directory).")
@click.option("--findings", type=click.Path(file_okay=False, path_type=Path),
              default=Path("fuzz-findings"), show_default=True,
              help="Where inputs that broke a target are saved.")
@click.option("--timeout", default=10, show_default=True, help="Seconds one input may take.")
@click.option("--rss-mb", default=2048, show_default=True, help="Memory limit per target.")
@click.option("--logs", type=click.Path(file_okay=False, path_type=Path),
              help="Save each target's libFuzzer output here.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the outcomes as JSON.")
def main(targets: tuple[str, ...], runs: int, seconds: int, corpus: Path | None,
         findings: Path, timeout: int, rss_mb: int, logs: Path | None,
         json_path: Path | None) -> None:
    """Run the fuzz targets and report inputs, coverage and findings."""
    console = Console()
    outcomes = []
    with tempfile.TemporaryDirectory() as tmp:
        base = corpus or Path(tmp)
        if logs is not None:
            logs.mkdir(parents=True, exist_ok=True)
        for target in targets or TARGETS:
            console.print(f"fuzzing {target} ({runs if runs >= 0 else 'any'} inputs, "
                          f"{seconds or 'no'} s cap)")
            outcomes.append(run_target(
                target, runs=runs, seconds=seconds, corpus=base / target,
                findings=findings, timeout=timeout, rss_mb=rss_mb,
                log=logs / f"{target}.log" if logs else None))
    console.print(report(outcomes))
    if json_path is not None:
        json_path.write_text(json.dumps([asdict(o) for o in outcomes], indent=1))
    if not all(o.ok for o in outcomes):
        sys.exit(1)


if __name__ == "__main__":
    main()
