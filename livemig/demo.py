"""``livemig demo``: a real local migration between two livemig processes, with a report.

Theory of operation
-------------------
The demo starts two VMM processes on this machine, exactly as a user would: a source
running a guest (``livemig run --guest ab``) and a destination waiting for it
(``livemig run --incoming unix:...``).  It drives both over QMP (QEMU's commands), shows
a progress bar while the migration runs, then pauses the destination and asks it to
check the guest's memory (``x-guest-check``: every page must hold what the guest wrote
last).  The report has QEMU's ``query-migrate`` fields from both sides.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from livemig.control.client import QmpClient
from livemig.errors import MigrationError
from livemig.kernel.mman import Backing
from livemig.migration.state import MigrationStatus
from livemig.units import MIB
from livemig.vmm.membackend import run_memory_args
from livemig.vmm.vm import parse_size
from livemig.vmmprocess import VmmProcess

MODES = ("precopy", "postcopy", "preempt")


@dataclass(frozen=True)
class DemoConfig:
    mode: str = "precopy"
    guest: str = "ab"
    mem: str = "256M"
    page_size: str = "4K"
    smp: int = 1
    warmup_passes: int = 2
    timeout: float = 300.0


def watch_migration(client: QmpClient, console: Console, timeout: float,
                    on_active: Any = None,
                    until: tuple[MigrationStatus, ...] = ()) -> dict[str, Any]:
    """Poll query-migrate until the migration ends (or reaches a status of ``until``),
    showing its progress: a bar in a terminal, plain lines otherwise (a log, a pipe)."""
    deadline = time.monotonic() + timeout
    with _progress_view(console) as view:
        while True:
            info = client.execute("query-migrate")
            status = info.get("status", "none")
            view.update(status, info.get("ram", {}))
            if MigrationStatus(status).finished or MigrationStatus(status) in until:
                return dict(info)
            if on_active is not None and status == "active":
                on_active(info)
            if time.monotonic() > deadline:
                client.execute("migrate_cancel")
                raise MigrationError(f"migration did not finish in {timeout:.0f} s")
            # Rounds of a small guest last tens of ms: poll fast while a hook waits.
            time.sleep(0.1 if on_active is None else 0.01)


def _progress_figures(status: str, ram: dict[str, Any]) -> dict[str, Any]:
    total = max(ram.get("total", 1), 1)
    done = 100.0 if status == "completed" else \
        min(99.0, 100.0 * (1 - ram.get("remaining", total) / total))
    return {"status": status, "done": done,
            "xfer": f"{ram.get('transferred', 0) / 2**20:.0f} MiB",
            "left": f"{ram.get('remaining', 0) / 2**20:.0f} MiB",
            "rate": f"{ram.get('mbps', 0):.0f} Mbit/s",
            "rounds": ram.get("dirty-sync-count", 0)}


class _BarView:
    """A terminal: one progress bar, redrawn in place."""

    def __init__(self, console: Console) -> None:
        columns = (TextColumn("[bold]{task.fields[status]:<16}"), BarColumn(),
                   TextColumn("{task.percentage:>5.1f}%"),
                   TextColumn("{task.fields[xfer]} sent, {task.fields[left]} left, "
                              "{task.fields[rate]}, round {task.fields[rounds]}"),
                   TimeElapsedColumn())
        self._progress = Progress(*columns, console=console, transient=False)
        self._task = self._progress.add_task("migrate", total=100, status="setup",
                                             xfer="0 MiB", left="?", rate="-", rounds=0)

    def __enter__(self) -> _BarView:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def update(self, status: str, ram: dict[str, Any]) -> None:
        f = _progress_figures(status, ram)
        done = f.pop("done")
        self._progress.update(self._task, completed=done, **f)


class _LineView:
    """Not a terminal: a plain line per status change and at most one a second."""

    INTERVAL = 1.0

    def __init__(self, console: Console) -> None:
        self._console = console
        self._t0 = time.monotonic()
        self._last: tuple[str, float] | None = None

    def __enter__(self) -> _LineView:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self, status: str, ram: dict[str, Any]) -> None:
        now = time.monotonic()
        if self._last is not None and self._last[0] == status \
                and now - self._last[1] < self.INTERVAL:
            return
        self._last = (status, now)
        f = _progress_figures(status, ram)
        self._console.print(f"{now - self._t0:7.1f}s {f['status']:<16} {f['done']:5.1f}% "
                            f"{f['xfer']} sent, {f['left']} left, {f['rate']}, "
                            f"round {f['rounds']}", markup=False, highlight=False,
                            soft_wrap=True)


def _progress_view(console: Console) -> _BarView | _LineView:
    return _BarView(console) if console.is_terminal else _LineView(console)


@contextlib.contextmanager
def _processes(cfg: DemoConfig, workdir: Path) -> Iterator[tuple[VmmProcess, VmmProcess]]:
    common = [*run_memory_args(Backing.parse(cfg.page_size), parse_size(cfg.mem) // MIB),
              "--smp", str(cfg.smp)]
    src = VmmProcess(workdir, "source", ["--guest", cfg.guest, *common])
    try:
        dst = VmmProcess(workdir, "destination", ["--incoming", "defer", *common])
        try:
            yield src, dst
        finally:
            dst.stop()
    finally:
        src.stop()


def run_demo(cfg: DemoConfig, console: Console) -> dict[str, Any]:
    """Run one migration between two local livemig processes; return the report."""
    if cfg.mode not in MODES:
        raise MigrationError(f"unknown mode {cfg.mode!r}; choose one of {', '.join(MODES)}")
    with tempfile.TemporaryDirectory(prefix="livemig-demo-") as tmp, \
            _processes(cfg, Path(tmp)) as (src, dst):
        with console.status("warming up the source guest (first touches of RAM are slow)"):
            if not src.wait_serial(cfg.warmup_passes, cfg.timeout):
                raise MigrationError(f"source guest did not run: {src.serial()[-80:]!r} "
                                     f"{src.log_text()}")
        caps = [{"capability": "events", "state": True}]
        if cfg.mode != "precopy":
            caps.append({"capability": "postcopy-ram", "state": True})
        if cfg.mode == "preempt":
            caps.append({"capability": "postcopy-preempt", "state": True})
        for vmm in (src, dst):
            vmm.qmp.execute("migrate-set-capabilities", capabilities=caps)
        if cfg.mode != "precopy":
            # Keep precopy from converging on its own, so the switch to postcopy after
            # the first round (the point of these modes) always happens.
            src.qmp.execute("migrate-set-parameters", **{"downtime-limit": 1})
        uri = f"unix:{Path(tmp) / 'migration.sock'}"
        dst.qmp.execute("migrate-incoming", uri=uri)
        src.qmp.execute("migrate", uri=uri)
        source_info = watch_migration(src.qmp, console, cfg.timeout,
                                      _postcopy_after_one_round(src.qmp, cfg.mode))
        if source_info["status"] != "completed":
            raise MigrationError(f"migration {source_info['status']}: "
                                 f"{source_info.get('error-desc', '')} {dst.log_text()}")
        dest_info = _wait_destination(dst, cfg.timeout)
        ran_on = dst.wait_serial(2, 60)
        dst.qmp.execute("stop")
        check = dst.qmp.execute("x-guest-check", guest=cfg.guest)
        return {"mode": cfg.mode, "guest": cfg.guest, "mem": cfg.mem,
                "page_size": cfg.page_size, "smp": cfg.smp, "source": source_info,
                "destination": dest_info,
                "check": {"pages": check["pages"], "bad_pages": check["bad_pages"],
                          "guest_ran_on": ran_on,
                          "guest_error": b"E" in dst.serial()}}


def _postcopy_after_one_round(qmp: QmpClient, mode: str) -> Any:
    """A watch hook that switches to postcopy once the first round is done."""
    if mode == "precopy":
        return None
    switched = False

    def hook(info: dict[str, Any]) -> None:
        nonlocal switched
        if not switched and info.get("ram", {}).get("dirty-sync-count", 0) >= 2:
            qmp.execute("migrate-start-postcopy")
            switched = True

    return hook


class PostcopySwitch:
    """A watch hook for ``livemig migrate --postcopy``: switch to postcopy after
    ``after`` seconds, or, without it, once precopy stops converging (a completed round
    left at least as much to send as the round before)."""

    def __init__(self, qmp: QmpClient, after: float | None) -> None:
        self._qmp = qmp
        self._after = after
        self._t0 = time.monotonic()
        self._rounds: dict[int, int] = {}  # dirty-sync-count -> remaining bytes then
        self.switched = False

    def __call__(self, info: dict[str, Any]) -> None:
        if self.switched:
            return
        if self._after is not None:
            due = time.monotonic() - self._t0 >= self._after
        else:
            ram = info.get("ram", {})
            r = ram.get("dirty-sync-count", 0)
            self._rounds.setdefault(r, ram.get("remaining", 0))
            before = self._rounds.get(r - 1)
            due = r >= 3 and before is not None and self._rounds[r] >= before
        if due:
            self._qmp.execute("migrate-start-postcopy")
            self.switched = True


def _wait_destination(dst: VmmProcess, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info: dict[str, Any] = dst.qmp.execute("query-migrate")
        status = info.get("status", "none")
        if MigrationStatus(status).finished:
            if status != "completed":
                raise MigrationError(f"destination {status}: {info.get('error-desc', '')}")
            return info
        time.sleep(0.05)
    raise MigrationError("destination did not complete")


def report_table(report: dict[str, Any]) -> Table:
    src, dst, check = report["source"], report["destination"], report["check"]
    ram = src.get("ram", {})
    secs = max(src.get("total-time", 0), 1) / 1000
    ok = check["bad_pages"] == 0 and not check["guest_error"] and check["guest_ran_on"]
    table = Table(title=f"livemig demo: {report['mode']}, {report['guest']} guest, "
                        f"{report['mem']}, {report['page_size']} pages")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("mode", report["mode"]),
        ("status (source / destination)", f"{src['status']} / {dst['status']}"),
        ("total time", f"{src.get('total-time', 0)} ms"),
        ("downtime", f"{src.get('downtime', 0)} ms"),
        ("throughput", f"{ram.get('transferred', 0) / secs / 1e9:.2f} GB/s"),
        ("rounds (dirty syncs)", str(ram.get("dirty-sync-count", 0))),
        ("bytes transferred", f"{ram.get('transferred', 0):,}"),
        ("pages sent / zero pages", f"{ram.get('normal', 0):,} / {ram.get('duplicate', 0):,}"),
        *_postcopy_rows(src, dst),
        ("guest check", f"{'PASS' if ok else 'FAIL'}: {check['bad_pages']} bad of "
                        f"{check['pages']:,} pages"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


def _postcopy_rows(src: dict[str, Any], dst: dict[str, Any]) -> list[tuple[str, str]]:
    pct = dst.get("x-postcopy-latency-percentiles")
    if not pct:
        return []
    ram = src.get("ram", {})
    return [
        ("postcopy requests (source)", f"{ram.get('postcopy-requests', 0):,}"),
        ("postcopy bytes", f"{ram.get('postcopy-bytes', 0):,}"),
        ("page request latency p50 / p90 / p99",
         f"{pct['p50']:.0f} / {pct['p90']:.0f} / {pct['p99']:.0f} us"),
        ("latency max / count", f"{pct['max']:.0f} us / {pct['count']:,}"),
        ("vCPU blocktime", f"{dst.get('postcopy-blocktime', 0)} ms"),
    ]


def write_json(report: dict[str, Any], path: str) -> None:
    Path(path).write_text(json.dumps(report, indent=2) + "\n")
