"""The built-in guests boot in real QEMU/KVM and make progress without errors; the os
guest prints the same console lines under QEMU and under livemig.

Each guest is patched for a 64 MiB VM, booted headless with its serial port going to
a file, and the file is polled until two passes ('B') have been reported; an 'E'
(a failed self-check) or no progress within the bound fails the test.  This machine
may itself be a VM with nested KVM, where first touches of guest memory are slow,
hence the generous bound.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from livemig.guests import GUEST_NAMES, load_image, patch_range
from livemig.guests.os import OsParams, load_os_image
from livemig.vmm.multiboot import MultibootImage
from livemig.vmm.vm import Vm, VmConfig

QEMU = shutil.which("qemu-system-x86_64")
RAM = 64 << 20
WANTED_PASSES = 2
TIMEOUT_S = 60.0

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed"),
    pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="/dev/kvm is missing"),
]


def boot_until_passes(boot: list[str], serial: Path) -> tuple[str, float]:
    """Boot with the ``boot`` arguments; return serial output once WANTED_PASSES 'B's
    (or an 'E') appear."""
    assert QEMU is not None
    cmd = [QEMU, "-accel", "kvm", "-m", f"{RAM >> 20}M", *boot, "-display", "none",
           "-nodefaults", "-no-reboot", "-serial", f"file:{serial}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    began = time.monotonic()
    out = ""
    try:
        while time.monotonic() - began < TIMEOUT_S and proc.poll() is None:
            out = serial.read_text() if serial.exists() else ""
            if "E" in out or out.count("B") >= WANTED_PASSES:
                break
            time.sleep(0.05)
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=10)
    if proc.returncode not in (0, -9):
        pytest.fail(f"QEMU exited with {proc.returncode}: {err.decode(errors='replace')}")
    return serial.read_text() if serial.exists() else out, time.monotonic() - began


@pytest.mark.parametrize("name", GUEST_NAMES)
def test_guest_boots_in_qemu_and_passes_its_self_check(name: str, tmp_path: Path) -> None:
    image = tmp_path / f"{name}.img"
    image.write_bytes(patch_range(load_image(name), 1 << 20, RAM))
    out, elapsed = boot_until_passes(["-drive", f"file={image},format=raw"],
                                     tmp_path / "serial.out")
    assert "E" not in out, f"{name} reported a failed self-check: {out!r}"
    assert out.count("B") >= WANTED_PASSES, f"{name}: only {out!r} after {elapsed:.1f} s"


@pytest.mark.kvm
@pytest.mark.parametrize("vcpus", [1, 2, 4])
def test_os_guest_prints_the_same_console_in_qemu_and_livemig(vcpus: int,
                                                             tmp_path: Path) -> None:
    """The same multiboot image: QEMU's -kernel and livemig's loader, same boot lines."""
    image = OsParams.for_ram(RAM, vcpus).patch(load_os_image())
    kernel = tmp_path / "os.img"
    kernel.write_bytes(image)
    qemu_out, elapsed = boot_until_passes(["-smp", str(vcpus), "-kernel", str(kernel)],
                                          tmp_path / "serial.out")
    with Vm(VmConfig(RAM, vcpus=vcpus)) as vm:
        vm.load_multiboot(MultibootImage.parse(image))
        vm.start()
        vm.serial.wait_for(WANTED_PASSES, timeout=TIMEOUT_S)
        ours = vm.serial.output.decode()
    boot_lines = f"LMOS boot\ncpus {vcpus}\nticks\n"
    assert "E" not in qemu_out and "E" not in ours, (qemu_out, ours)
    assert qemu_out.startswith(boot_lines), f"QEMU after {elapsed:.1f} s: {qemu_out!r}"
    assert ours.startswith(boot_lines), ours
    assert qemu_out[len(boot_lines):].strip("B") == ours[len(boot_lines):].strip("B") == ""
