"""The os guest on livemig's VMM: SMP boot, timer ticks on every vCPU, the serial
interrupt (echo), kvmclock, and the workload's own and the host's memory checks."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest

from livemig.control.client import QmpClient
from livemig.errors import QmpError
from livemig.guests.os import PERCPU_SIZE, PERCPUS_POINTER, OsParams, Pattern, tick_counts
from livemig.instance import Instance
from livemig.kernel.mman import MIB
from livemig.vmm.boot import boot_os
from livemig.vmm.checks import os_check
from livemig.vmm.multiboot import MultibootImage
from livemig.vmm.vm import Vm, VmConfig

pytestmark = pytest.mark.kvm
MEM = 64 * MIB
BOOT_TIMEOUT = 30.0


def without_progress(out: bytes) -> bytes:
    return out.replace(b"B", b"")


def wait_running(vm: Vm, passes: int = 2) -> None:
    """Until the guest has booted and made ``passes`` passes (fails on any 'E')."""
    ok = vm.serial.wait_output(
        lambda o: b"E" in o or (b"ticks\n" in o and o.split(b"ticks\n", 1)[1].count(b"B")
                                >= passes), BOOT_TIMEOUT)
    out = vm.serial.output
    assert ok and b"E" not in out, f"guest did not run cleanly: {out[-200:]!r} ({vm.failure})"


@pytest.mark.parametrize("vcpus", [1, 2, 4])
def test_os_guest_boots_every_vcpu_in_seconds_and_each_takes_timer_ticks(vcpus: int) -> None:
    with Vm(VmConfig(MEM, vcpus=vcpus)) as vm:
        params = boot_os(vm)
        began = time.monotonic()
        vm.start()
        wait_running(vm)
        assert time.monotonic() - began < 15
        # "ticks" is printed once every vCPU took 3 timer interrupts; each vCPU then
        # checks its own ticks keep coming, and vCPU 0 that the others keep running.
        assert vm.serial.output.startswith(f"LMOS boot\ncpus {vcpus}\nticks\n".encode())
        vm.pause()
        result = os_check(vm.main_block.array(), params)
        assert result.ok, result.summary()
        assert result.pages == vcpus * params.private_pages + params.shared_pages


def test_console_input_is_echoed_by_the_serial_interrupt_handler() -> None:
    with Vm(VmConfig(MEM, vcpus=2)) as vm:
        boot_os(vm)
        vm.start()
        wait_running(vm)
        assert vm.serial.feed(b"hello, livemig") == 14
        assert vm.serial.wait_output(lambda o: b"hello, livemig" in without_progress(o), 10)


@pytest.mark.parametrize("pattern,rate", [(Pattern.SCATTERED, 0), (Pattern.HOT, 0),
                                          (Pattern.SEQUENTIAL, 8)],
                         ids=["scattered", "hot", "sequential-rate-limited"])
def test_every_access_pattern_passes_both_checks(pattern: Pattern, rate: int) -> None:
    with Vm(VmConfig(MEM, vcpus=2)) as vm:
        params = boot_os(vm, OsParams(ncpus=2, private_pages=64, shared_pages=64,
                                      pattern=pattern, rate=rate))
        vm.start()
        wait_running(vm)
        vm.pause()
        result = os_check(vm.main_block.array(), params)
        assert result.ok, result.summary()


def test_a_page_that_lost_an_update_is_caught_by_host_and_guest() -> None:
    with Vm(VmConfig(MEM, vcpus=2)) as vm:
        params = boot_os(vm)
        vm.start()
        wait_running(vm)
        vm.pause()
        victim = params.private_base(1) + 5 * 4096
        counter = int.from_bytes(vm.read_guest(victim + 8, 8), "little")
        vm.write_guest(victim + 8, (counter + 7).to_bytes(8, "little"))
        assert os_check(vm.main_block.array(), params).bad_pages == (victim // 4096,)
        vm.start()
        assert vm.serial.wait_output(lambda o: b"EP1\n" in o, 20), vm.serial.output[-80:]


def test_a_pause_is_invisible_to_guest_time() -> None:
    """kvmclock stands still while paused: a pause longer than the allowed clock step
    and the tick timeout raises neither."""
    with Vm(VmConfig(MEM, vcpus=2)) as vm:
        boot_os(vm, OsParams.for_ram(MEM, 2, max_jump_ms=1000, tick_timeout_ms=1000))
        vm.start()
        wait_running(vm)
        vm.pause()
        time.sleep(2.0)
        vm.start()
        wait_running(vm, passes=4)


def reset_kernel() -> bytes:
    """A multiboot kernel that resets the machine through port 0xcf9 at once."""
    magic, flags = 0x1BADB002, 0x00010000
    header = struct.pack("<8I", magic, flags, (-(magic + flags)) & 0xFFFFFFFF,
                         0x100000, 0x100000, 0, 0, 0x100020)
    code = bytes.fromhex("66baf90c" "b006" "ee" "f4")  # mov dx,0xcf9; mov al,6; out; hlt
    return header + code


def test_guest_reset_shuts_the_vm_down() -> None:
    with Vm(VmConfig(MEM)) as vm:
        events: list[tuple[str, dict[str, object]]] = []
        vm.add_listener(lambda name, data: events.append((name, data)))
        vm.load_multiboot(MultibootImage.parse(reset_kernel()))
        vm.start()
        deadline = time.monotonic() + 10
        while ("SHUTDOWN", {"guest": True, "reason": "guest-reset"}) not in events:
            assert time.monotonic() < deadline, events
            time.sleep(0.01)


def test_system_reset_boots_the_guest_again_on_every_vcpu() -> None:
    with Vm(VmConfig(MEM, vcpus=2)) as vm:
        events: list[str] = []
        vm.add_listener(lambda name, data: events.append(name))
        boot_os(vm)
        vm.start()
        wait_running(vm)
        vm.reset()
        assert "RESET" in events and vm.running
        assert vm.serial.wait_output(
            lambda o: b"E" in o or o.count(b"ticks\n") == 2 and
            o.rsplit(b"ticks\n", 1)[1].count(b"B") >= 2, BOOT_TIMEOUT), vm.serial.output[-100:]
        out = vm.serial.output.replace(b"B", b"")
        assert out == b"LMOS boot\ncpus 2\nticks\n" * 2, out


def test_every_vcpus_tick_count_is_readable_over_qmp_pmemsave(tmp_path: Path) -> None:
    """QEMU's pmemsave copies guest RAM to a file: the per-vCPU records the parameter
    block points to hold tick counts that keep growing on every vCPU."""
    vcpus = 2
    with Instance(Vm(VmConfig(MEM, vcpus=vcpus)), str(tmp_path / "vm.qmp")) as inst:
        boot_os(inst.vm)
        inst.vm.start()
        wait_running(inst.vm)
        with QmpClient(str(tmp_path / "vm.qmp")) as qmp:
            def ticks() -> tuple[int, ...]:
                out = tmp_path / "mem"
                qmp.execute("pmemsave", val=PERCPUS_POINTER, size=4, filename=str(out))
                records = int.from_bytes(out.read_bytes(), "little")
                qmp.execute("pmemsave", val=records, size=vcpus * PERCPU_SIZE,
                            filename=str(out))
                return tick_counts(out.read_bytes(), vcpus)
            first = ticks()
            time.sleep(0.5)
            second = ticks()
            assert all(t >= 3 for t in first), first
            assert all(b > a for a, b in zip(first, second, strict=True)), (first, second)
            with pytest.raises(QmpError, match="not in guest RAM"):
                qmp.execute("pmemsave", val=MEM, size=8, filename=str(tmp_path / "x"))
