"""The os guest migrated whole: several vCPUs with LAPIC timers, the IOAPIC-routed serial
interrupt, kvmclock, MSRs and XSAVE cross a migration in every mode.

The guest checks itself (ticks on every vCPU, time continuous and never backwards, its
pages and counters, registers it parked) and prints ``E`` + a reason on any error; the
host-side check (``x-guest-check os``) verifies its regions on the paused destination.
"""

from __future__ import annotations

import contextlib
import re
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from pc_helpers import (
    FINISHED,
    NO_CONVERGENCE,
    Pair,
    capabilities,
    client,
    hugepages_checked,
    start_postcopy_after_first_round,
    wait_migration,
)

from livemig.instance import Instance
from livemig.kernel.mman import Backing
from livemig.runtime import SwitchInterval
from livemig.units import MIB
from livemig.vmm.boot import boot_os
from livemig.vmm.state import VmState
from livemig.vmm.vm import Vm, VmConfig

pytestmark = pytest.mark.kvm

MEM = 64 * MIB
ERROR = re.compile(rb"E[A-Z][0-9a-f]\n")


@contextlib.contextmanager
def os_pair(tmp_path: Path, vcpus: int, backing: Backing, *, postcopy: bool,
            preempt: bool, sender: str = "process") -> Iterator[Pair]:
    switch = SwitchInterval()
    src = Instance(Vm(VmConfig(MEM, backing, vcpus=vcpus)), str(tmp_path / "src.qmp"),
                   switch=switch)
    dst: Instance | None = None
    try:
        boot_os(src.vm)
        src.vm.start()
        # Every vCPU up and ticking before the migration starts.
        assert src.vm.serial.wait_output(lambda out: out.count(b"B") >= 2 * vcpus, 60), \
            src.vm.serial.output[-200:]
        dst = Instance(Vm(VmConfig(MEM, backing, vcpus=vcpus)), str(tmp_path / "dst.qmp"),
                       switch=switch)
        with client(src) as sq, client(dst) as dq:
            caps = capabilities(postcopy=postcopy, preempt=preempt)
            sq.execute("migrate-set-capabilities", capabilities=caps)
            dq.execute("migrate-set-capabilities", capabilities=caps)
            params = {**NO_CONVERGENCE, "x-postcopy-urgent-sender": sender} if postcopy \
                else {"downtime-limit": 300}
            sq.execute("migrate-set-parameters", **params)
            yield Pair(src, dst, sq, dq, f"unix:{tmp_path / 'mig.sock'}", "os")
    finally:
        if dst is not None:
            dst.close()
        src.close()


MODES = [pytest.param(False, False, "migration", id="precopy"),
         pytest.param(True, False, "migration", id="postcopy"),
         pytest.param(True, True, "migration", id="preempt-migration"),
         pytest.param(True, True, "process", id="preempt-process")]


@pytest.mark.parametrize("vcpus", [2, 4])
@pytest.mark.parametrize(("postcopy", "preempt", "sender"), MODES)
def test_the_os_guest_survives_a_migration(
        tmp_path: Path, request: pytest.FixtureRequest, vcpus: int, postcopy: bool,
        preempt: bool, sender: str) -> None:
    backing = Backing.HUGETLB_2M if vcpus == 4 and postcopy else Backing.ANON_4K
    hugepages_checked(request, backing)
    with os_pair(tmp_path, vcpus, backing, postcopy=postcopy, preempt=preempt,
                 sender=sender) as p:
        p.listen()
        p.migrate()
        if postcopy:
            start_postcopy_after_first_round(p.sq)
        src, dst = wait_migration(p.sq, 120), wait_migration(p.dq, 120)
        assert (src["status"], dst["status"]) == ("completed", "completed"), (src, dst)
        serial = p.dst.vm.serial
        before = serial.output.count(b"B")
        # The guest goes on: every vCPU reports passes again, and nothing went wrong.
        assert serial.wait_output(lambda out: out.count(b"B") >= before + 2 * vcpus, 60), \
            serial.output[-300:]
        assert not ERROR.search(serial.output), serial.output[-300:]
        if postcopy:
            # One entry per vCPU; which vCPUs faulted before their pages came is timing.
            assert len(dst["postcopy-vcpu-blocktime"]) == vcpus, dst
            assert len(dst["postcopy-vcpu-latency"]) == vcpus, dst
            assert any(v > 0 for v in dst["postcopy-vcpu-latency"]), dst
        p.dq.execute("stop")
        check = p.dq.execute("x-guest-check", guest="os")
        assert check["bad_pages"] == 0, check
        assert wait_migration(p.sq, 5, until=FINISHED)["status"] == "completed"


XCR0_POWER_ON = 1  # x87 only
_XCR = struct.Struct("<IIQ")  # struct kvm_xcr, after kvm_xcrs' nr_xcrs and flags


def xcr0s(state: VmState) -> list[int]:
    """Each vCPU's XCR0 in a saved state (the kernel's struct kvm_xcrs bytes)."""
    out = []
    for vcpu in state.vcpus:
        (count,) = struct.unpack_from("<I", vcpu.xcrs)
        xcrs = {xcr: value for xcr, _, value in
                (_XCR.unpack_from(vcpu.xcrs, 8 + i * _XCR.size) for i in range(count))}
        out.append(xcrs[0])
    return out


def test_the_xcr0_the_guest_set_survives_a_migration(tmp_path: Path) -> None:
    """The guest enables AVX state in XCR0 and checks, every pass, the XSAVE size KVM
    derives from it (``EW`` when it changed); the destination's vCPUs hold the same XCR0."""
    with os_pair(tmp_path, 2, Backing.ANON_4K, postcopy=False, preempt=False) as p:
        p.src.vm.pause()
        before = xcr0s(p.src.vm.save_state())
        p.src.vm.start()
        assert all(x not in (0, XCR0_POWER_ON) for x in before), before
        p.listen()
        p.migrate()
        assert wait_migration(p.dq, 120)["status"] == "completed"
        serial = p.dst.vm.serial
        assert serial.wait_output(lambda out: out.count(b"B") >= 4 or b"E" in out, 60)
        assert not ERROR.search(serial.output), serial.output[-300:]
        p.dq.execute("stop")
        assert xcr0s(p.dst.vm.save_state()) == before
