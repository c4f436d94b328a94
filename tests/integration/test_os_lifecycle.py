"""The os guest's life around a migration, as a QEMU user lives it: saved to a file and
loaded into a new VMM, reset after it arrived somewhere else.

Everything runs as ``livemig run`` processes driven over QMP and the ``livemig migrate``
command line.  The guest's own checks (console: no ``E``; its ticks, read with
``pmemsave``, still coming on every vCPU) and the host check of its RAM decide.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import livemig_process, wait_migration

from livemig.errors import QmpError, VmStateError
from livemig.guests.os import PERCPU_SIZE, PERCPUS_POINTER, tick_counts
from livemig.units import MIB
from livemig.vmm.boot import boot_os
from livemig.vmm.vm import Vm, VmConfig
from livemig.vmmprocess import VmmProcess

pytestmark = pytest.mark.kvm

SMP = 2
OS_ARGS = ["--guest", "os", "--smp", str(SMP), "--mem", "64M"]
ERROR = re.compile(rb"E[A-Z][0-9a-f]\n")
BOOT_LINES = f"LMOS boot\ncpus {SMP}\nticks\n".encode()


def ticks(vmm: VmmProcess, tmp_path: Path) -> tuple[int, ...]:
    out = tmp_path / f"{vmm.name}.percpu"
    vmm.qmp.execute("pmemsave", val=PERCPUS_POINTER, size=4, filename=str(out))
    records = int.from_bytes(out.read_bytes(), "little")
    vmm.qmp.execute("pmemsave", val=records, size=SMP * PERCPU_SIZE, filename=str(out))
    return tick_counts(out.read_bytes(), SMP)


def assert_guest_goes_on(vmm: VmmProcess, tmp_path: Path) -> None:
    """Two more passes, every vCPU still ticking, no error, a clean RAM check."""
    assert vmm.wait_serial(2, 60), vmm.serial()[-200:]
    first = ticks(vmm, tmp_path)
    time.sleep(0.5)
    assert all(b > a for a, b in zip(first, ticks(vmm, tmp_path), strict=True))
    assert not ERROR.search(vmm.serial()), vmm.serial()[-200:]
    vmm.qmp.execute("stop")
    check: dict[str, Any] = vmm.qmp.execute("x-guest-check", guest="os")
    assert check["bad_pages"] == 0, check


def test_an_os_guest_saved_to_a_file_carries_on_in_a_new_vmm(tmp_path: Path) -> None:
    image = tmp_path / "saved.lmig"
    with livemig_process(tmp_path, "src", OS_ARGS) as src:
        assert src.wait_serial(2, 60), src.serial()[-200:]
        saved_ticks = ticks(src, tmp_path)
        result = subprocess.run([sys.executable, "-m", "livemig", "migrate", "--qmp",
                                 src.qmp_path, "--to", f"file:{image}", "--no-watch"],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert wait_migration(src.qmp, 60)["status"] == "completed"
    # The saving VMM is gone; a new one loads the file (as QEMU's -incoming file:).
    with livemig_process(tmp_path, "restored", ["--incoming", f"file:{image}", *OS_ARGS]) \
            as restored:
        assert wait_migration(restored.qmp, 60)["status"] == "completed"
        assert all(b >= a for a, b in zip(saved_ticks, ticks(restored, tmp_path),
                                           strict=True))
        assert_guest_goes_on(restored, tmp_path)


def test_system_reset_boots_an_os_guest_that_arrived_by_postcopy_again(
        tmp_path: Path) -> None:
    uri = f"unix:{tmp_path / 'mig.sock'}"
    caps = [{"capability": "postcopy-ram", "state": True}]
    with livemig_process(tmp_path, "src", OS_ARGS) as src, \
            livemig_process(tmp_path, "dst", ["--incoming", "defer", *OS_ARGS]) as dst:
        assert src.wait_serial(2, 60), src.serial()[-200:]
        for side in (src, dst):
            side.qmp.execute("migrate-set-capabilities", capabilities=caps)
        dst.qmp.execute("migrate-incoming", uri=uri)
        src.qmp.execute("migrate", uri=uri)
        src.qmp.execute("migrate-start-postcopy")
        assert wait_migration(src.qmp, 60)["status"] == "completed"
        assert wait_migration(dst.qmp, 60)["status"] == "completed"
        assert dst.wait_serial(1, 60), dst.serial()[-200:]
        assert BOOT_LINES not in dst.serial()  # it went on; it did not boot here
        dst.qmp.execute("system_reset")
        deadline = time.monotonic() + 60
        while BOOT_LINES not in dst.serial():
            assert time.monotonic() < deadline and not ERROR.search(dst.serial()), \
                dst.serial()[-200:]
            time.sleep(0.05)
        assert_guest_goes_on(dst, tmp_path)


def test_a_destination_keeps_its_boot_image_for_a_reset_without_loading_it() -> None:
    """Loading the image on a destination would shadow pages a postcopy has yet to
    fetch: it is kept, RAM stays untouched until a reset loads it."""
    with Vm(VmConfig(16 * MIB)) as vm:
        boot_os(vm, incoming=True)
        assert not np.any(vm.main_block.array())
        vm.reset()
        assert np.any(vm.main_block.array())
        vm.start()
        assert vm.serial.wait_output(lambda o: o.startswith(b"LMOS boot\ncpus 1\nticks\n"),
                                     30), vm.serial.output


def test_a_destination_without_boot_options_says_how_to_make_it_resettable(
        tmp_path: Path) -> None:
    with Vm(VmConfig(16 * MIB)) as vm, pytest.raises(VmStateError, match="--guest"):
        vm.reset()
    with livemig_process(tmp_path, "dst", ["--incoming", "defer", "--mem", "16M"]) as dst, \
            pytest.raises(QmpError, match="--guest or --image"):
        dst.qmp.execute("system_reset")
