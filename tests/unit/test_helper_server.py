"""Helper processes are forked from a helper server (livemig.migration.helper): the
server imports the helpers once, or is a fork of a VMM that has; a helper it forks
runs at once, dies with the server, and the server with its VMM."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from livemig.errors import MigrationError
from livemig.migration.helper import HelperProcess, HelperServer, helper_name
from livemig.vmmprocess import VmmProcess

URGENT = "livemig.migration.urgent"


def comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def comm_becomes(pid: int, name: str, timeout: float = 5.0) -> bool:
    """The forked helper names itself as it starts: after the server has answered."""
    deadline = time.monotonic() + timeout
    while comm(pid) != name:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def ended(pidfd: int, timeout: float) -> bool:
    return bool(select.select([pidfd], [], [], timeout)[0])


def ends(pid: int, action: Callable[[], None], timeout: float = 5.0) -> bool:
    """Does process ``pid`` end within ``timeout`` of ``action``?"""
    pidfd = os.pidfd_open(pid)
    try:
        action()
        return ended(pidfd, timeout)
    finally:
        os.close(pidfd)


@pytest.fixture
def server() -> Iterator[HelperServer]:
    s = HelperServer()
    s.start()
    yield s
    s.close()


def test_a_helper_is_forked_by_the_server_and_named_after_its_module(
        server: HelperServer) -> None:
    helper = HelperProcess(URGENT, server)
    try:
        assert parent_of(helper.pid) == server.pid
        assert helper_name(URGENT) == "urgent"
        assert comm_becomes(helper.pid, "urgent")
        assert comm(server.pid or 0) == "helperserver"
    finally:
        helper.close()


def test_the_server_imports_numpy_without_a_thread_per_cpu(server: HelperServer) -> None:
    server.wait_ready()  # imported, nothing forked yet (a fork ends OpenBLAS's threads)
    assert threads(server.pid or 0) == 1


def test_a_helper_told_to_stop_before_it_started_ends(server: HelperServer) -> None:
    helper = HelperProcess(URGENT, server)
    try:
        assert ends(helper.pid, lambda: helper.send({"msg": "stop"}))
    finally:
        helper.close()


def test_a_helper_that_ended_is_reaped_by_the_server(server: HelperServer) -> None:
    """Reaped, so its CPU time adds to the server's, the VMM's child (what ``time`` and
    the benchmarks count), and no zombie is left."""
    helper = HelperProcess(URGENT, server)
    pid = helper.pid
    helper.close()
    deadline = time.monotonic() + 5
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert not Path(f"/proc/{pid}").exists()


def test_closing_the_server_ends_the_helpers_still_running(server: HelperServer) -> None:
    helper = HelperProcess(URGENT, server)
    try:
        assert ends(helper.pid, server.close)
    finally:
        helper.close()


def test_a_module_the_server_cannot_import_is_a_typed_error(server: HelperServer) -> None:
    with pytest.raises(MigrationError, match="livemig.migration.nope"):
        HelperProcess("livemig.migration.nope", server)
    HelperProcess(URGENT, server).close()  # the server goes on


def test_a_killed_vmm_takes_its_helper_server_and_helpers_with_it(tmp_path: Path) -> None:
    # A "VMM": a process that forks its server (as livemig run does) and a helper.
    code = ("import sys, time; "
            "from livemig.migration.helper import HelperServer, HelperProcess; "
            "s = HelperServer.started_early(); h = HelperProcess(sys.argv[1], s); "
            "print(s.pid, h.pid, flush=True); time.sleep(60)")
    vmm = subprocess.Popen([sys.executable, "-c", code, URGENT], stdout=subprocess.PIPE,
                           text=True, env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
    try:
        assert vmm.stdout is not None
        server_pid, helper_pid = map(int, vmm.stdout.readline().split())
        fds = [os.pidfd_open(server_pid), os.pidfd_open(helper_pid)]
        vmm.send_signal(signal.SIGKILL)
        vmm.wait()
        try:
            assert all(ended(fd, 5) for fd in fds)
        finally:
            for fd in fds:
                os.close(fd)
    finally:
        vmm.kill()
        vmm.wait()


@pytest.mark.kvm
def test_livemig_run_forks_its_helper_server_before_it_starts_the_vm(tmp_path: Path) -> None:
    vmm = VmmProcess(tmp_path, "vm", ["--guest", "ab", "--mem", "16M", "-S"])
    try:
        (server,) = [int(p) for p in Path(f"/proc/{vmm.proc.pid}/task/{vmm.proc.pid}"
                                          "/children").read_text().split()]
        assert comm(server) == "helperserver"
        # A fork, not a new program: the VMM's own command line, nothing imported anew.
        assert Path(f"/proc/{server}/cmdline").read_bytes() == \
            Path(f"/proc/{vmm.proc.pid}/cmdline").read_bytes()
        assert threads(server) == 1
    finally:
        assert vmm.stop() == 0
