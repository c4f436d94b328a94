"""Profiles: ``py-spy`` samples of a livemig process during a migration, and a summary.

Theory of operation
-------------------
:class:`PySpy` records one process into collapsed stacks (``--format raw --threads
--idle``) while its context is open; py-spy writes the file when it gets SIGINT on
exit.  :func:`summarize_profile` reads such a file back and says where one thread's
samples went: self time by source line, inclusive time by function.  With ``--idle``
sampling the shares are fractions of the thread's wall time, waits included.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from _harness import HarnessError, child_setup


class PySpy:
    """``py-spy record`` of one process into collapsed stacks, while the context is open."""

    def __init__(self, pid: int, out: Path, rate: int = 250, native: bool = False) -> None:
        exe = shutil.which("py-spy")
        if exe is None:
            raise HarnessError("py-spy is not installed (pip install py-spy)")
        self.out = out
        cmd = [exe, "record", "--pid", str(pid), "--output", str(out), "--format", "raw",
               "--rate", str(rate), "--threads", "--idle", "--nonblocking"]
        if native:
            cmd.append("--native")
        self._log = open(out.with_suffix(".log"), "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=child_setup(False))
        time.sleep(0.5)  # let it attach before the interesting part starts

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def __enter__(self) -> PySpy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(frozen=True)
class ProfileSummary:
    """Where one thread's samples went: self time by source line, inclusive by function.

    Shares are fractions of the thread's samples; with ``--idle`` sampling (what
    :class:`PySpy` does) they are fractions of its wall time, waits included.
    """

    thread: str
    samples: int
    threads: Mapping[str, int]  # samples of every thread in the profile
    top_self: Sequence[tuple[str, float]]
    top_inclusive: Sequence[tuple[str, float]]


_LINE_SUFFIX = re.compile(r":\d+\)$")


def _thread_name(frame: str) -> str:
    # "thread (1234): migration" -> "migration"
    return frame.split(": ", 1)[1] if ": " in frame else frame


def read_collapsed(path: Path) -> list[tuple[str, list[str], int]]:
    """``py-spy --format raw --threads`` lines as (thread, frames, samples)."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        thread = _thread_name(frames[0]) if frames[0].startswith("thread") else "?"
        out.append((thread, [f for f in frames if not f.startswith(("thread", "process"))],
                    int(count)))
    return out


def summarize_profile(path: Path, thread: str | None = None, top: int = 12) -> ProfileSummary:
    """Summarise ``thread`` (default: the thread with the most samples)."""
    stacks = read_collapsed(path)
    threads: dict[str, int] = {}
    for name, _, n in stacks:
        threads[name] = threads.get(name, 0) + n
    if thread is None or thread not in threads:
        thread = max(threads, key=lambda t: threads[t], default="?")
    self_t: dict[str, int] = {}
    incl: dict[str, int] = {}
    for name, frames, n in stacks:
        if name != thread or not frames:
            continue
        self_t[frames[-1]] = self_t.get(frames[-1], 0) + n
        # threading.py frames are in every thread's stack: they say nothing.
        for func in {_LINE_SUFFIX.sub(")", f) for f in frames if "threading.py" not in f}:
            incl[func] = incl.get(func, 0) + n
    total = threads.get(thread, 0)

    def shares(d: dict[str, int]) -> list[tuple[str, float]]:
        items = sorted(d.items(), key=lambda kv: -kv[1])[:top]
        return [(k, v / max(total, 1)) for k, v in items]

    return ProfileSummary(thread, total, threads, shares(self_t), shares(incl))
