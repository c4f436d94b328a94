"""Whole-VM state of the os guest: save, restore into a fresh VM, the guest goes on.

Each state component is also left out once (the fresh VM's own value is restored in
its place) and the guest, or its console, must show the damage:

=============  ===================================================================
component      what the guest then reports
=============  ===================================================================
lapic          ``ET``: its timer never ticks again
kvmclock       ``EC``: time went backwards
msrs           ``EM``: MSR_KERNEL_GS_BASE lost (or ``EC``/``EJ``: the kvmclock MSR and
               the TSC lost; on a host whose guest TSC is the host's, kvmclock keeps
               reading the stale record correctly)
xsave/fpu      ``EF``: xmm1 no longer holds the pass number
xcrs           ``EW``: XCR0 is back at its power-on value (x87 only), so the XSAVE area
               size KVM reports in CPUID leaf 0xD is no longer the one the guest set
debugregs      ``ED``: DR0 lost
mp_state       ``EV`` from vCPU 0: vCPU 1 waits for a SIPI and never runs
pic            ``EI``: the PIC masks the guest set are gone
pit            ``ER``: the PIT channel 0 mode the guest set is gone
events         an NMI pending at the save is never taken (no ``N``); an interrupt being
               injected at the save is lost as well (then ``ET``: the APIC has it in
               service and never gets its EOI)
ioapic         input typed after the restore is never echoed (the pin is masked)
serial         input typed before the save is never echoed (FIFO and IER lost)
=============  ===================================================================
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace

import pytest

from livemig.errors import ConfigError, CpuStateError
from livemig.guests.os import OsParams
from livemig.kernel.mman import MIB, Backing
from livemig.vmm.boot import boot_os
from livemig.vmm.checks import os_check
from livemig.vmm.state import VmState
from livemig.vmm.vm import Vm, VmConfig

pytestmark = pytest.mark.kvm
MEM = 64 * MIB
VCPUS = 2
CONFIG = VmConfig(MEM, vcpus=VCPUS)
ERROR_LINE = re.compile(rb"E([A-Z])([0-9a-f])\n")
TYPED_BEFORE = b"typed while paused"
TYPED_AFTER = b"typed after restore"


def _vcpus(*fields: str) -> Callable[[VmState, VmState], VmState]:
    def take(state: VmState, fresh: VmState) -> VmState:
        return replace(state, vcpus=tuple(
            replace(s, **{f: getattr(f0, f) for f in fields})
            for s, f0 in zip(state.vcpus, fresh.vcpus, strict=True)))
    return take


def _platform(field: str) -> Callable[[VmState, VmState], VmState]:
    def take(state: VmState, fresh: VmState) -> VmState:
        assert state.platform is not None and fresh.platform is not None
        return replace(state, platform=replace(
            state.platform, **{field: getattr(fresh.platform, field)}))
    return take


def _serial(state: VmState, fresh: VmState) -> VmState:
    return replace(state, serial=fresh.serial)


def _nothing(state: VmState, fresh: VmState) -> VmState:
    return state


def run_restored(leave_out: Callable[[VmState, VmState], VmState],
                 check: Callable[[Vm], None], config: VmConfig = CONFIG) -> None:
    """Run the guest, type into it and queue an NMI while paused, save, restore into a
    fresh VM with one component left out, run it, type again, and hand it to ``check``."""
    with Vm(config) as a:
        boot_os(a, OsParams.for_ram(MEM, config.vcpus))
        a.start()
        assert a.serial.wait_output(lambda o: o.count(b"B") >= 3 or b"E" in o, 30)
        a.pause()
        assert b"E" not in a.serial.output, a.serial.output
        a.serial.feed(TYPED_BEFORE)
        a.inject_nmi()  # pending in each vCPU's events until it runs again
        state = a.save_state()
        with Vm(config) as b:
            fresh = b.save_state()
            b.copy_ram_from(a)
            b.restore_state(leave_out(state, fresh))
            b.start()
            b.serial.wait_for(2, timeout=10)
            b.serial.feed(TYPED_AFTER)
            check(b)


@pytest.mark.parametrize("vcpus,backing", [(2, Backing.ANON_4K), (4, Backing.ANON_4K),
                                          (2, Backing.HUGETLB_2M)],
                         ids=["2-4K", "4-4K", "2-2M"])
def test_whole_state_round_trips_into_a_fresh_vm_with_a_pending_interrupt(
        vcpus: int, backing: Backing, request: pytest.FixtureRequest) -> None:
    if backing.is_hugetlb:
        request.getfixturevalue("hugepages_restored")
    config = VmConfig(MEM, backing, vcpus=vcpus)

    def check(b: Vm) -> None:
        assert b.serial.wait_output(
            lambda o: TYPED_AFTER in o.replace(b"B", b"") or b"E" in o, 15)
        b.pause()
        out = b.serial.output.replace(b"B", b"")
        assert b"E" not in out, out
        assert out.replace(b"N", b"").startswith(TYPED_BEFORE)  # pending at the save
        assert TYPED_AFTER in out
        assert out.count(b"N") == vcpus  # each vCPU took the NMI pending at the save
        result = os_check(b.main_block.array(), OsParams.for_ram(MEM, vcpus))
        assert result.ok, result.summary()
    run_restored(_nothing, check, config)


def test_state_the_destination_kvm_refuses_is_a_typed_error() -> None:
    with Vm(CONFIG) as a, Vm(CONFIG) as b:
        state = a.save_state()
        bad_msr = replace(state.vcpus[0], msrs=(*state.vcpus[0].msrs, (0xDEAD0000, 1)))
        # Checked before KVM sees it (livemig.vmm.cpucheck): the error names the field.
        with pytest.raises(CpuStateError, match="msr 0xdead0000"):
            b.restore_state(replace(state, vcpus=(bad_msr, *state.vcpus[1:])))
        with pytest.raises(ConfigError, match="vCPUs"):
            b.restore_state(replace(state, vcpus=state.vcpus[:1]))


@pytest.mark.parametrize("leave_out,reasons,cpu", [
    (_vcpus("lapic"), b"T", None),
    (_platform("clock_ns"), b"C", None),
    (_vcpus("msrs"), b"MCJ", None),
    (_vcpus("xsave", "fpu"), b"F", None),
    (_vcpus("xcrs"), b"W", None),
    (_vcpus("debugregs"), b"D", None),
    (_vcpus("mp_state"), b"V", b"0"),
    (_platform("pic_master"), b"I", b"0"),
    (_platform("pit"), b"R", b"0"),
], ids=["lapic", "kvmclock", "msrs", "xsave", "xcr0", "debugregs", "mp_state", "pic",
        "pit"])
def test_a_component_left_out_is_reported_by_the_guest(
        leave_out: Callable[[VmState, VmState], VmState], reasons: bytes,
        cpu: bytes | None) -> None:
    def check(b: Vm) -> None:
        # NMI handlers print 'N' without the guest's console lock: it may interleave
        assert b.serial.wait_output(
            lambda o: ERROR_LINE.search(o.replace(b"N", b"")) is not None, 20), \
            b.serial.output[-100:]
        m = ERROR_LINE.search(b.serial.output.replace(b"N", b""))
        assert m is not None and m.group(1) in reasons, b.serial.output[-100:]
        assert cpu is None or m.group(2) == cpu
    run_restored(leave_out, check)


@pytest.mark.parametrize("leave_out,lost,may_report", [
    (_platform("ioapic"), TYPED_AFTER, b""),
    (_serial, TYPED_BEFORE, b""),
    # Without the events, an interrupt KVM was injecting at the save is dropped too,
    # while the local APIC already counts it in service: then no timer interrupt is
    # ever taken again, and the guest rightly reports missing ticks.
    (_vcpus("events"), b"N", b"TV")], ids=["ioapic", "serial", "events"])
def test_a_device_left_out_loses_an_interrupt(
        leave_out: Callable[[VmState, VmState], VmState], lost: bytes,
        may_report: bytes) -> None:
    def check(b: Vm) -> None:
        b.serial.wait_for(20, timeout=10)  # plenty of passes to take the interrupt
        b.serial.wait_output(lambda o: ERROR_LINE.search(o) is not None, 0.5)
        out = b.serial.output.replace(b"B", b"")
        error = ERROR_LINE.search(out)
        assert error is None or error.group(1) in may_report, out
        assert lost not in out
    run_restored(leave_out, check)
