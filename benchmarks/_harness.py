"""What every part of the benchmark harness shares: its error and how it starts children.

Every child the harness starts (VMMs, ``py-spy``) runs in its own session, so a
terminal's Ctrl-C reaches only the harness, which then shuts the children down in order;
and it gets ``PR_SET_PDEATHSIG`` (SIGTERM: both VMMs quit cleanly on it, livemig giving
back its huge pages), so no child outlives a killed harness.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
from collections.abc import Callable, Sequence

from livemig.errors import LivemigError

_PR_SET_PDEATHSIG = 1
_PR_SET_THP_DISABLE = 41


class HarnessError(LivemigError):
    """The benchmark environment could not be set up (a command or a peer failed)."""


def child_setup(disable_thp: bool) -> Callable[[], None]:
    """preexec_fn: die with the harness; optionally opt the process out of THP."""

    libc = ctypes.CDLL(None, use_errno=True)  # loaded before fork, not in the child

    def setup() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        # QEMU madvises all guest RAM MADV_HUGEPAGE; PR_SET_THP_DISABLE (inherited across
        # exec) is the only per-process way to get the plain 4 KiB pages livemig's "4K" has.
        if disable_thp and libc.prctl(_PR_SET_THP_DISABLE, 1, 0, 0, 0) != 0:
            os._exit(127)

    return setup


def run(cmd: Sequence[str]) -> str:
    """Run a setup command; its stdout, or a HarnessError with its stderr."""
    proc = subprocess.run(list(cmd), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise HarnessError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
    return proc.stdout
