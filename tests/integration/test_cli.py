"""The ``livemig`` command line, run as a user runs it: ``python -m livemig ...``.

Errors the user can fix are one ``Error:`` line and a non-zero exit status, never a
traceback; ``run`` really runs a guest; ``migrate`` and ``demo`` really migrate one.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from helpers import guest_check, livemig_process, wait_migration

from livemig.control.client import QmpClient
from livemig.errors import MigrationError
from livemig.migration.channel import image_trailer
from livemig.vmmprocess import VmmProcess

pytestmark = pytest.mark.kvm


PRIVATE_RAM = ("--mem", "32M")
MEMFD_RAM = ("--object", "memory-backend-memfd,id=ram0,size=32M,share=on",
             "--machine", "memory-backend=ram0")


@contextlib.contextmanager
def cli_pair(tmp_path: Path, incoming: str = "defer", ram: tuple[str, ...] = PRIVATE_RAM
             ) -> Iterator[tuple[VmmProcess, VmmProcess]]:
    """Two ``livemig run`` processes: a 32 MiB ``ab`` source and a destination waiting
    on ``incoming``, both with guest RAM given by ``ram``."""
    with livemig_process(tmp_path, "src", ["--guest", "ab", *ram]) as src, \
            livemig_process(tmp_path, "dst", ["--incoming", incoming, *ram]) as dst:
        yield src, dst


def livemig(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "livemig", *args], capture_output=True,
                          text=True, timeout=timeout)


def error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("Error:")]


def test_run_prints_the_guest_passes_to_the_serial_file(tmp_path: Path) -> None:
    serial = tmp_path / "serial.out"
    result = livemig("run", "--guest", "ab", "--mem", "32M", "--duration", "2",
                     "--serial", str(serial))
    assert result.returncode == 0, result.stderr
    out = serial.read_bytes()
    assert out.count(b"B") >= 2
    assert b"E" not in out


@pytest.mark.parametrize("prealloc", [True, False], ids=["mem-prealloc", "default"])
def test_run_mem_prealloc_faults_guest_ram_in_before_it_answers(
        tmp_path: Path, prealloc: bool) -> None:
    """A destination started with --mem-prealloc holds all of its RAM before any page
    arrives; without it, RAM is allocated only as it is written."""
    args = ["--incoming", "defer", "--mem", "64M"] + (["--mem-prealloc"] if prealloc else [])
    with livemig_process(tmp_path, "dst", args) as dst:
        rss = psutil.Process(dst.pid).memory_info().rss
    assert (rss >= 64 << 20) is prealloc, rss


def test_run_with_a_memfd_memory_backend_maps_guest_ram_shared(tmp_path: Path) -> None:
    """QEMU's spelling (--object memory-backend-memfd + --machine memory-backend):
    guest RAM is a memfd of the backend's size, mapped shared, preallocated on demand."""
    backend = "memory-backend-memfd,id=ram0,size=64M,share=on,prealloc=on"
    with livemig_process(tmp_path, "dst", ["--incoming", "defer", "--object", backend,
                                           "--machine", "memory-backend=ram0"]) as dst:
        lines = [line.split() for line in
                 Path(f"/proc/{dst.pid}/maps").read_text().splitlines()
                 if "/memfd:pc.ram" in line]
        rss = psutil.Process(dst.pid).memory_info().rss
    assert len(lines) == 1, lines
    first, last = (int(a, 16) for a in lines[0][0].split("-"))
    assert last - first == 64 << 20
    assert lines[0][1] == "rw-s"  # shared
    assert rss >= 64 << 20  # prealloc=on


def test_failed_incoming_migration_exits_non_zero_and_says_why(tmp_path: Path) -> None:
    stream = tmp_path / "corrupt.mig"
    data = b"QEVM" + b"\x00\x00\x00\x03" + b"\x07garbage"
    stream.write_bytes(data + image_trailer(zlib.crc32(data)))  # a valid checksum
    result = livemig("run", "--incoming", f"file:{stream}", "--mem", "32M")
    assert result.returncode == 1, result.stderr
    assert len(error_lines(result)) == 1, result.stderr
    assert "incoming migration failed" in error_lines(result)[0]
    assert "Machine name length" in error_lines(result)[0]  # the stream's actual fault
    assert "Traceback" not in result.stderr


@pytest.fixture
def short_image(tmp_path: Path) -> Path:
    path = tmp_path / "short.img"
    path.write_bytes(b"\x90" * 100)
    return path


# Bad values are one-line errors with exit status 1; a missing required choice is a
# usage error (exit status 2, click's convention).
BAD_RUNS = [
    pytest.param(["--guest", "nope", "--mem", "32M"], 1, "nope", id="unknown guest"),
    pytest.param(["--guest", "ab", "--mem", "32M", "--page-size", "3M"], 2, "3M",
                 id="unknown page size"),
    pytest.param(["--guest", "ab", "--object", "memory-backend-memfd,id=m,size=32M,share=off",
                  "--machine", "memory-backend=m"], 1, "share=on", id="memfd share=off"),
    pytest.param(["--guest", "ab", "--object", "memory-backend-memfd,id=m,size=32M,seal=on",
                  "--machine", "memory-backend=m"], 1, "'seal' is unexpected",
                 id="memfd unknown property"),
    pytest.param(["--guest", "ab", "--object", "memory-backend-memfd,id=m,size=32M"], 1,
                 "--machine memory-backend=m", id="memfd backend not used"),
    pytest.param(["--guest", "ab", "--machine", "memory-backend=m"], 1,
                 "Memory backend 'm' not found", id="machine names no backend"),
    pytest.param(["--guest", "ab", "--mem", "64M", *MEMFD_RAM], 2, "does not match",
                 id="mem is not the backend's size"),
    pytest.param(["--guest", "ab", "--mem", "3M", "--page-size", "2M"], 1, "multiple",
                 id="3M of 2M pages"),
    pytest.param(["--guest", "ab", "--mem", "lots"], 1, "lots", id="bad size"),
    pytest.param(["--image", "{short_image}", "--mem", "32M"], 1, "512", id="short image"),
    pytest.param(["--image", "{tmp_path}/missing.img", "--mem", "32M"], 1, "missing.img",
                 id="missing image"),
    pytest.param(["--mem", "32M"], 2, "--guest", id="no guest"),
]


@pytest.mark.parametrize("args,status,hint", BAD_RUNS)
def test_bad_run_input_is_one_error_line_without_traceback(
        tmp_path: Path, short_image: Path, args: list[str], status: int, hint: str) -> None:
    args = [a.format(short_image=short_image, tmp_path=tmp_path) for a in args]
    result = livemig("run", *args, "--duration", "1")
    assert result.returncode == status, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    errors = error_lines(result)
    assert len(errors) == 1, result.stderr
    assert hint in errors[0]
    if status == 1:  # livemig's own errors: nothing but that line
        assert result.stderr.strip() == errors[0]


def test_migrate_command_moves_a_running_guest(tmp_path: Path) -> None:
    uri = f"unix:{tmp_path / 'mig.sock'}"
    with cli_pair(tmp_path, uri) as (src, dst):
        assert src.wait_serial(2)
        wait_migration(dst.qmp, 30, until=("setup",))  # listening
        result = livemig("migrate", "--qmp", src.qmp_path, "--to", uri,
                         "--downtime-limit", "5000", timeout=120)
        assert result.returncode == 0, result.stderr + result.stdout
        assert wait_migration(dst.qmp)["status"] == "completed"
        assert dst.wait_serial(3), dst.serial()[-80:]
        assert dst.qmp.execute("query-status")["status"] == "running"


PROGRESS_LINE = re.compile(r"^ *\d+\.\ds (setup|active|postcopy-active|completed) +"
                           r"\d+\.\d% \d+ MiB sent, \d+ MiB left, \d+ Mbit/s, round \d+$")


def test_migrate_command_does_postcopy_with_preemption_on_both_sides(tmp_path: Path) -> None:
    uri = f"unix:{tmp_path / 'mig.sock'}"
    with cli_pair(tmp_path) as (src, dst):
        assert src.wait_serial(2)
        result = livemig("migrate", "--qmp", src.qmp_path, "--dest-qmp", dst.qmp_path,
                         "--to", uri, "--preempt", "--postcopy-after", "0",
                         "--urgent-sender", "return-path", "--max-bandwidth", str(64 << 20),
                         timeout=120)
        assert result.returncode == 0, result.stderr + result.stdout
        info = src.qmp.execute("query-migrate")
        assert info["status"] == "completed"
        assert info["x-postcopy-urgent-sender"] == "return-path"
        assert info["ram"]["postcopy-bytes"] > 0  # it did switch to postcopy
        caps = {c["capability"]: c["state"]
                for c in dst.qmp.execute("query-migrate-capabilities")}
        assert caps["postcopy-ram"] and caps["postcopy-preempt"]
        assert wait_migration(dst.qmp)["status"] == "completed"
        assert dst.wait_serial(3), dst.serial()[-80:]
    # Not a terminal: plain progress lines, never a cut-off bar.
    lines = result.stdout.splitlines()
    assert lines and all(PROGRESS_LINE.match(line) for line in lines), result.stdout
    assert any(" postcopy-active " in line for line in lines), result.stdout
    assert "completed" in lines[-1]


@pytest.mark.parametrize("ram", [PRIVATE_RAM, MEMFD_RAM], ids=["4K", "4K-memfd"])
def test_migrate_command_sets_multifd_on_both_sides(tmp_path: Path,
                                                    ram: tuple[str, ...]) -> None:
    uri = f"unix:{tmp_path / 'mig.sock'}"
    with cli_pair(tmp_path, ram=ram) as (src, dst):
        assert src.wait_serial(2)
        result = livemig("migrate", "--qmp", src.qmp_path, "--dest-qmp", dst.qmp_path,
                         "--to", uri, "--multifd-channels", "3", "--downtime-limit", "5000",
                         timeout=120)
        assert result.returncode == 0, result.stderr + result.stdout
        info = src.qmp.execute("query-migrate")
        assert info["status"] == "completed"
        assert info["x-multifd"]["channels"] == 3
        assert wait_migration(dst.qmp)["status"] == "completed"
        assert dst.wait_serial(3), dst.serial()[-80:]


def test_migrate_command_refuses_sides_that_disagree(tmp_path: Path) -> None:
    with cli_pair(tmp_path) as (src, dst):
        dst.qmp.execute("migrate-set-capabilities",
                        capabilities=[{"capability": "postcopy-ram", "state": True}])
        result = livemig("migrate", "--qmp", src.qmp_path, "--dest-qmp", dst.qmp_path,
                         "--to", f"unix:{tmp_path / 'mig.sock'}")
        assert result.returncode == 1
        assert error_lines(result) == [
            "Error: source and destination disagree on postcopy-ram (source off, "
            "destination on): set the same on both sides"], result.stderr
        assert src.qmp.execute("query-migrate") == {}  # nothing was started


def test_migrate_command_postcopy_needs_a_deferred_destination(tmp_path: Path) -> None:
    uri = f"unix:{tmp_path / 'mig.sock'}"
    with cli_pair(tmp_path, uri) as (src, dst):
        wait_migration(dst.qmp, 30, until=("setup",))
        result = livemig("migrate", "--qmp", src.qmp_path, "--dest-qmp", dst.qmp_path,
                         "--to", uri, "--postcopy")
        assert result.returncode == 1
        assert "--incoming defer" in error_lines(result)[0], result.stderr


def start_slow_postcopy(src: VmmProcess, dst: VmmProcess, uri: str) -> None:
    """A postcopy that lasts several seconds, set up over QMP; both sides active."""
    for vmm in (src, dst):
        vmm.qmp.execute("migrate-set-capabilities",
                        capabilities=[{"capability": "postcopy-ram", "state": True}])
    src.qmp.execute("migrate-set-parameters", **{
        "max-bandwidth": 30_000_000, "downtime-limit": 1, "max-postcopy-bandwidth": 2_000_000})
    dst.qmp.execute("migrate-incoming", uri=uri)
    src.qmp.execute("migrate", uri=uri)
    wait_migration(src.qmp, 60, until=("active",))
    deadline = time.monotonic() + 60
    while src.qmp.execute("query-migrate")["ram"]["dirty-sync-count"] < 2:
        assert time.monotonic() < deadline, "the first precopy round did not end"
        time.sleep(0.02)
    src.qmp.execute("migrate-start-postcopy")
    for vmm in (src, dst):
        assert wait_migration(vmm.qmp, 60, until=("postcopy-active", "completed"))[
            "status"] == "postcopy-active"


def pause_both(src: VmmProcess, dst: VmmProcess) -> None:
    src.qmp.execute("migrate-pause")
    for vmm in (src, dst):
        assert wait_migration(vmm.qmp, 60, until=("postcopy-paused", "completed", "failed"))[
            "status"] == "postcopy-paused"


def test_recover_and_migrate_resume_commands_finish_a_paused_postcopy(tmp_path: Path) -> None:
    """``livemig recover`` (destination) and ``livemig migrate --resume`` (source) go
    on with a paused postcopy; with --dest-qmp one ``migrate --resume`` does both and
    watches the migration to its end.  Resuming what is not paused is one error line."""
    with cli_pair(tmp_path) as (src, dst):
        assert src.wait_serial(2)
        nothing = livemig("migrate", "--qmp", src.qmp_path, "--to", "unix:/nowhere",
                          "--resume")
        assert (nothing.returncode, error_lines(nothing)) == (
            1, ["Error: migrate: Cannot resume if there is no paused migration"]), nothing.stderr
        start_slow_postcopy(src, dst, f"unix:{tmp_path / 'mig.sock'}")
        pause_both(src, dst)
        first = f"unix:{tmp_path / 'recover1.sock'}"
        result = livemig("recover", "--qmp", dst.qmp_path, "--listen", first)
        assert result.returncode == 0, result.stderr
        result = livemig("migrate", "--qmp", src.qmp_path, "--to", first, "--resume",
                         "--no-watch")
        assert result.returncode == 0, result.stderr
        for vmm in (src, dst):
            assert wait_migration(vmm.qmp, 60, until=("postcopy-active", "completed"))[
                "status"] in ("postcopy-active", "completed")
        pause_both(src, dst)
        result = livemig("migrate", "--qmp", src.qmp_path, "--dest-qmp", dst.qmp_path,
                         "--to", f"unix:{tmp_path / 'recover2.sock'}", "--resume",
                         timeout=120)
        assert result.returncode == 0, result.stderr + result.stdout
        assert "completed" in result.stdout.splitlines()[-1], result.stdout
        assert wait_migration(dst.qmp)["status"] == "completed"
        assert dst.wait_serial(3), dst.serial()[-80:]
        assert guest_check(dst.qmp)["bad_pages"] == 0


def test_qemu_qmp_shell_drives_a_livemig_vm(tmp_path: Path) -> None:
    """QEMU's interactive qmp-shell (from qemu.qmp) against a livemig QMP socket."""
    with livemig_process(tmp_path, "vm", ["--guest", "ab", "--mem", "32M"]) as vm:
        commands = ("query-status\nmigrate-set-parameters max-bandwidth=1048576\n"
                    "query-migrate-parameters\nstop\nquery-status\n")
        result = subprocess.run([sys.executable, "-m", "qemu.qmp.qmp_shell", vm.qmp_path],
                                input=commands, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        out = result.stdout
        assert '"status": "running"' in out, out
        assert '"max-bandwidth": 1048576' in out, out
        assert '"status": "paused"' in out, out
        assert vm.qmp.execute("query-status")["status"] == "paused"


def test_migrate_command_to_nobody_is_one_error_line(tmp_path: Path) -> None:
    with livemig_process(tmp_path, "src", ["--guest", "ab", "--mem", "32M"]) as src:
        result = livemig("migrate", "--qmp", src.qmp_path,
                         "--to", f"unix:{tmp_path / 'nobody.sock'}", timeout=60)
        assert result.returncode == 1
        assert "Traceback" not in result.stderr
        errors = error_lines(result)
        assert len(errors) == 1 and "failed" in errors[0], result.stderr
        assert src.wait_serial(2)  # the source runs on


def test_demo_migrates_a_two_vcpu_vm(tmp_path: Path) -> None:
    """--smp reaches both VMMs: the destination takes the state of both vCPUs (it
    refuses a stream with another number of them) and the guest goes on."""
    out = tmp_path / "demo.json"
    result = livemig("demo", "--mem", "64M", "--smp", "2", "--json", str(out), timeout=240)
    assert result.returncode == 0, result.stderr + result.stdout[-2000:]
    report = json.loads(out.read_text())
    assert report["smp"] == 2 and report["destination"]["status"] == "completed"
    assert report["check"]["guest_ran_on"] and report["check"]["bad_pages"] == 0


def test_demo_migrates_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "demo.json"
    result = livemig("demo", "--mem", "64M", "--json", str(out), timeout=240)
    assert result.returncode == 0, result.stderr + result.stdout[-2000:]
    report = json.loads(out.read_text())
    assert set(report) >= {"mode", "guest", "mem", "page_size", "source", "destination",
                           "check"}
    assert (report["mode"], report["guest"], report["mem"]) == ("precopy", "ab", "64M")
    assert report["source"]["status"] == "completed"
    assert report["destination"]["status"] == "completed"
    assert report["check"]["bad_pages"] == 0
    assert report["check"]["pages"] == (64 - 1) * 256
    assert report["check"]["guest_ran_on"] and not report["check"]["guest_error"]


def test_a_vmm_that_cannot_start_is_reported_at_once_with_its_error(tmp_path: Path) -> None:
    """The VMM process wrapper does not wait out its timeout for a VMM that exited."""
    start = time.monotonic()
    with pytest.raises(MigrationError, match="did not start") as info:
        VmmProcess(tmp_path, "bad", ["--mem", "3M", "--page-size", "2M"])
    assert time.monotonic() - start < 20
    assert "Error:" in str(info.value)


def test_run_os_guest_with_a_socket_console_echoes_what_the_user_types(
        tmp_path: Path) -> None:
    console_path = tmp_path / "console.sock"
    qmp_path = tmp_path / "qmp.sock"
    proc = subprocess.Popen([sys.executable, "-m", "livemig", "run", "--guest", "os",
                             "--smp", "2", "--mem", "64M", "--console", f"unix:{console_path}",
                             "--qmp", str(qmp_path)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not console_path.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
            time.sleep(0.02)
        with socket.socket(socket.AF_UNIX) as con:
            con.connect(str(console_path))
            con.settimeout(1)
            out = b""
            typed = False
            while b"hello console" not in out.replace(b"B", b""):
                assert time.monotonic() < deadline and b"E" not in out, out[-100:]
                if not typed and out.count(b"B") >= 2:
                    con.sendall(b"hello console")
                    typed = True
                with contextlib.suppress(TimeoutError):
                    out += con.recv(4096)
        assert out.startswith(b"LMOS boot\ncpus 2\nticks\n")
        with QmpClient(str(qmp_path)) as qmp:
            qmp.execute("stop")
            check = qmp.execute("x-guest-check", guest="os")
            assert check["pages"] > 0 and check["bad_pages"] == 0, check
            qmp.execute("quit")
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        assert proc.stderr is not None
        proc.stderr.close()


def test_a_vmm_started_from_another_checkout_runs_this_livemig(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A benchmark or test started inside another checkout (a snapshot under test given
    with PYTHONPATH, say) runs the livemig it imported, in the VMM and in its helpers,
    not the one in its working directory."""
    other = tmp_path / "checkout"
    (other / "livemig").mkdir(parents=True)
    (other / "livemig" / "__init__.py").write_text("raise ImportError('the wrong livemig')\n")
    monkeypatch.chdir(other)
    with livemig_process(tmp_path, "vm", ["--mem", "16M", "--guest", "ab"]) as vm:
        assert vm.qmp.execute("query-status")["status"] == "running"
