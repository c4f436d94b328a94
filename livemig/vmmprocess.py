"""A VMM child process driven over QMP: the wrapper the demo, the tests and the benchmarks share.

Theory of operation
-------------------
A :class:`VmmProcess` is one VMM started as a child process, with the three files that
name it in its working directory (:class:`VmmFiles`): its QMP socket, its serial port
(a file the guest's output goes to) and its log (stdout and stderr).  By default the
VMM is ``python -m livemig run`` with the livemig this process imported
(:func:`livemig_command`, :func:`livemig_environment`); any other VMM that speaks QMP on
a unix socket and writes its serial port to a file (QEMU) is started by passing its
whole command line.

Starting waits for the QMP session, but not longer than the child lives: a VMM that
exits at once (a bad argument) is reported at once, with the end of its log.  Stopping
is orderly and bounded: ``quit`` over QMP, then SIGTERM (livemig gives its huge pages
back on it), then SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from qemu.qmp import QMPError

import livemig
from livemig.control.client import QmpClient
from livemig.errors import LivemigError, MigrationError

START_TIMEOUT_S = 60.0
QUIT_TIMEOUT_S = 20.0
_CONNECT_TRY_S = 0.5  # one connection attempt; the child is checked between attempts


@dataclass(frozen=True)
class VmmFiles:
    """The files of the VMM called ``name`` in ``workdir``."""

    workdir: Path
    name: str

    @property
    def qmp(self) -> Path:
        return self.workdir / f"{self.name}.qmp"

    @property
    def serial(self) -> Path:
        return self.workdir / f"{self.name}.serial"

    @property
    def log(self) -> Path:
        return self.workdir / f"{self.name}.log"


def livemig_command(files: VmmFiles, args: Sequence[str]) -> list[str]:
    """``python -P -m livemig run`` with the QMP socket and serial file of ``files``
    (``-P``: not the working directory first on the path, which would put a checkout
    found there before the livemig :func:`livemig_environment` chose)."""
    return [sys.executable, "-P", "-m", "livemig", "run", "--qmp", str(files.qmp),
            "--serial", str(files.serial), *args]


def livemig_environment() -> dict[str, str]:
    """This environment, with the livemig this process imported first on the path: the
    child runs the same livemig (a checkout under test, or a snapshot given with
    PYTHONPATH), not whatever its working directory holds."""
    env = dict(os.environ)
    root = str(Path(livemig.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


class VmmProcess:
    """A VMM child process with its QMP client, serial file and log.

    ``args`` are ``livemig run`` options; ``command`` replaces the whole command line
    (then ``args`` is ignored) for another VMM or a prefix such as ``ip netns exec``.
    ``new_session`` keeps a terminal's Ctrl-C from reaching the child (the parent then
    stops it in order); ``preexec_fn`` runs in the child before it execs.
    """

    def __init__(self, workdir: Path, name: str, args: Sequence[str] = (), *,
                 command: Sequence[str] | None = None, env: Mapping[str, str] | None = None,
                 new_session: bool = False, preexec_fn: Callable[[], None] | None = None,
                 start_timeout: float = START_TIMEOUT_S) -> None:
        self.name = name
        self.files = VmmFiles(workdir, name)
        self.qmp_path = str(self.files.qmp)
        self.serial_path = self.files.serial
        self.log_path = self.files.log
        if command is None:
            command = livemig_command(self.files, args)
            env = livemig_environment() if env is None else env
        # A socket left by an earlier process of this name would connect to nobody.
        self.files.qmp.unlink(missing_ok=True)
        with open(self.log_path, "wb") as logf:
            self.proc = subprocess.Popen(list(command), stdout=logf, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL,
                                         env=None if env is None else dict(env),
                                         start_new_session=new_session, preexec_fn=preexec_fn)
        try:
            self.qmp = self._connect(time.monotonic() + start_timeout)
        except BaseException:
            self.kill()
            raise

    def _connect(self, deadline: float) -> QmpClient:
        """The QMP session, once the VMM listens; at once an error if it exits first."""
        while True:
            try:
                return QmpClient(self.qmp_path, timeout=_CONNECT_TRY_S)
            except (LivemigError, QMPError, OSError) as e:
                if self.proc.poll() is not None:
                    why = f"it exited with status {self.proc.returncode}"
                elif time.monotonic() > deadline:
                    why = f"no QMP session: {e}"
                else:
                    time.sleep(0.05)  # e.g. refused: bound, not yet listening
                    continue
                raise MigrationError(f"{self.name} VMM did not start ({why}): "
                                     f"{self.log_text()}") from None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace").strip()[-3000:]
        except OSError:
            return ""

    def serial(self) -> bytes:
        try:
            return self.serial_path.read_bytes()
        except OSError:
            return b""

    def wait_serial(self, count: int, timeout: float = 30.0, byte: bytes = b"B") -> bool:
        """``count`` more ``byte``s than now; False at once on an E or an exit."""
        start = self.serial().count(byte)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.serial()
            if out.count(byte) - start >= count or b"E" in out:
                return out.count(byte) - start >= count and b"E" not in out
            if not self.running():
                return False
            time.sleep(0.05)
        return False

    def kill(self) -> None:
        """SIGKILL now (a VMM left in an unknown state), reap it, close QMP."""
        if self.running():
            self.proc.kill()
        self.proc.wait(QUIT_TIMEOUT_S)
        self._close_qmp()

    def stop(self) -> int:
        """Quit over QMP, then SIGTERM, then SIGKILL, each given time to work; returns
        the exit status."""
        if self.running():
            # The reply may be lost as the VMM closes the socket: the wait below decides.
            with contextlib.suppress(LivemigError, QMPError, OSError, EOFError):
                self.qmp.execute("quit")
            try:
                self.proc.wait(QUIT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(QUIT_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(QUIT_TIMEOUT_S)
        self._close_qmp()
        return int(self.proc.returncode)

    def _close_qmp(self) -> None:
        qmp = getattr(self, "qmp", None)  # absent if the process never started
        if qmp is not None:
            qmp.close()  # a VMM already gone counts as closed (QmpClient.close)
