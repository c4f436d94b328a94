"""The micro-VMM on real KVM: guests run, check themselves, dirty pages are tracked,
and CPU/device state survives a save/restore into a fresh VM."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from livemig.errors import ConfigError, VmStateError
from livemig.kernel.mman import Backing
from livemig.units import MIB
from livemig.vmm.boot import boot_guest, guest_range
from livemig.vmm.checks import ab_check, random_check
from livemig.vmm.memory import bitmap_to_bools, host_page_view, new_bitmap
from livemig.vmm.vm import RunState, Vm, VmConfig

pytestmark = pytest.mark.kvm
MEM = 64 * MIB


@pytest.fixture
def ab_vm() -> Iterator[Vm]:
    vm = Vm(VmConfig(MEM))
    boot_guest(vm, "ab")
    vm.start()
    assert vm.serial.wait_for(2, timeout=60), vm.serial.output
    yield vm
    vm.close()


def test_ab_guest_prints_passes_and_never_an_error(ab_vm: Vm) -> None:
    assert ab_vm.serial.wait_for(3, timeout=60)
    assert b"E" not in ab_vm.serial.output
    assert ab_vm.serial.output.count(b"B") >= 5


def test_random_guest_runs_and_keeps_page_numbers() -> None:
    with Vm(VmConfig(MEM)) as vm:
        boot_guest(vm, "random")
        vm.start()
        assert vm.serial.wait_for(2, timeout=60), vm.serial.output
        vm.pause()
        start, end = guest_range(vm)
        assert random_check(vm.main_block.array(), start, end).bad_pages == ()
        assert b"E" not in vm.serial.output


def test_corrupted_page_is_caught_by_the_guest(ab_vm: Vm) -> None:
    ab_vm.pause()
    start, end = guest_range(ab_vm)
    assert ab_check(ab_vm.main_block.array(), start, end).bad_pages == ()
    victim = start + 100 * 4096
    ab_vm.write_guest(victim, bytes([ab_vm.read_guest(victim, 1)[0] ^ 0x55]))
    assert ab_check(ab_vm.main_block.array(), start, end).bad_pages == (victim // 4096,)
    ab_vm.start()
    ab_vm.serial.wait_for(3, timeout=30)
    assert ab_vm.serial.output.endswith(b"E")


def test_dirty_log_after_clear_marks_only_pages_the_guest_writes(ab_vm: Vm) -> None:
    block = ab_vm.main_block
    ab_vm.set_dirty_logging(True)
    bitmap = new_bitmap(block.pages)
    block.sync_dirty(bitmap)  # everything before this clear is forgotten
    bitmap[:] = 0
    ab_vm.serial.wait_for(2, timeout=30)  # a full pass since the clear (>= 50 ms here)
    block.sync_dirty(bitmap)
    dirty = np.flatnonzero(bitmap_to_bools(bitmap, block.pages))
    start, end = guest_range(ab_vm)
    in_range = (dirty >= start // 4096) & (dirty < end // 4096)
    # The only page outside the range a running ab guest writes is its stack page
    # just below the boot sector (0x7000-0x7fff: `call putc` after each pass).
    assert set(dirty[~in_range].tolist()) <= {0x7}
    assert in_range.sum() == (end - start) // 4096  # a full pass touched every page


def test_huge_page_view_is_consistent_with_the_4k_bitmap() -> None:
    pages = 4 * 512
    bools = np.zeros(pages, dtype=np.bool_)
    bools[[3, 512 * 2 + 511]] = True
    view = host_page_view(bools, 2 * MIB)
    assert view.tolist() == [True, False, True, False]
    assert host_page_view(bools, 4096) is bools


def test_clear_stops_reporting_pages_until_written_again(ab_vm: Vm) -> None:
    ab_vm.pause()
    block = ab_vm.main_block
    block.set_dirty_logging(True)
    bitmap = new_bitmap(block.pages)
    block.sync_dirty(bitmap)
    bitmap[:] = 0
    assert block.sync_dirty(bitmap) == 0  # paused: nothing new
    ab_vm.write_guest(0x200000, b"x")  # a VMM write: KVM does not see it, we do
    assert block.sync_dirty(bitmap) == 1
    assert bitmap_to_bools(bitmap, block.pages)[0x200]


@pytest.mark.parametrize("backing", [Backing.ANON_4K, Backing.HUGETLB_2M], ids=["4K", "2M"])
def test_state_round_trip_into_a_fresh_vm(backing: Backing, hugepages_restored: None) -> None:
    with Vm(VmConfig(MEM, backing)) as a:
        boot_guest(a, "ab")
        a.start()
        assert a.serial.wait_for(2, timeout=60)
        a.pause()
        state = a.save_state()
        with Vm(VmConfig(MEM, backing)) as b:
            b.copy_ram_from(a)
            b.restore_state(state)
            before = b.serial.output
            b.start()
            assert b.serial.wait_for(3, timeout=60)
            b.pause()
            assert b.serial.output.count(b"B") - before.count(b"B") >= 3
            assert b"E" not in b.serial.output
            start, end = guest_range(b)
            result = ab_check(b.main_block.array(), start, end)
            assert result.bad_pages == ()
            assert result.pages == (end - start) // 4096


def test_boot_sector_guests_run_and_round_trip_without_the_irqchip() -> None:
    config = VmConfig(MEM, irqchip=False)
    with Vm(config) as a:
        boot_guest(a, "ab")
        a.start()
        assert a.serial.wait_for(2, timeout=60)
        a.pause()
        state = a.save_state()
        assert state.platform is None and all(v.lapic == b"" for v in state.vcpus)
        with Vm(config) as b:
            b.copy_ram_from(a)
            b.restore_state(state)
            b.start()
            assert b.serial.wait_for(2, timeout=60)
            b.pause()
            assert b"E" not in b.serial.output
            start, end = guest_range(b)
            assert ab_check(b.main_block.array(), start, end).ok


def test_run_state_machine_refuses_bad_transitions(ab_vm: Vm) -> None:
    events: list[str] = []
    ab_vm.add_listener(lambda name, data: events.append(name))
    ab_vm.pause()
    assert ab_vm.runstate is RunState.PAUSED
    ab_vm.start()
    assert events == ["STOP", "RESUME"]
    with pytest.raises(VmStateError):
        ab_vm.save_state()  # running
    with pytest.raises(VmStateError):
        ab_vm.set_runstate(RunState.PRELAUNCH)


def test_resume_is_sent_before_the_run_state_says_running(ab_vm: Vm) -> None:
    """QEMU's order: a QMP client that sees ``running`` (query-status answers from
    another thread) has been sent RESUME, so it never misses the event."""
    ab_vm.pause()
    seen: list[tuple[str, RunState]] = []
    ab_vm.add_listener(lambda name, data: seen.append((name, ab_vm.runstate)))
    ab_vm.start()
    assert seen == [("RESUME", RunState.PAUSED)]
    assert ab_vm.runstate is RunState.RUNNING


@pytest.mark.parametrize("mem,backing", [(3 * MIB, Backing.HUGETLB_2M), (5000, Backing.ANON_4K)])
def test_memory_size_must_be_a_multiple_of_the_page_size(mem: int, backing: Backing) -> None:
    with pytest.raises(ConfigError, match="multiple"):
        Vm(VmConfig(mem, backing))
