"""Loading a saved vCPU state with out-of-range values gives a typed error naming the
field (:class:`~livemig.errors.CpuStateError`), never a KVM ``EINVAL`` or a guest run
from an impossible state.

The states are real: saved from a KVM vCPU (at power-on, and in the flat 32-bit mode
the boot code leaves), then one field is pushed out of its range.  Decoding
(``VcpuState.from_bytes``) checks what needs no host; ``Vm.restore_state`` what depends
on the VM (its MSRs, the host's CR4 bits, XCR0 components and physical address width)
before any vCPU is touched.  A property test flips random bits of the saved structs:
whatever the decoder and the restore let through, KVM must take (every single bit of
the register structs, and random multi-bit flips).
"""

from __future__ import annotations

import ctypes
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from helpers import HALT_IMAGE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from livemig.errors import CpuStateError, KvmError
from livemig.kernel import kvm as K
from livemig.units import MIB
from livemig.vmm.boot import boot_image
from livemig.vmm.cpucheck import CR4_KNOWN
from livemig.vmm.state import VcpuState, VmState
from livemig.vmm.vm import Vm, VmConfig

pytestmark = pytest.mark.kvm


@pytest.fixture(scope="module")
def vm() -> Iterator[Vm]:
    with Vm(VmConfig(2 * MIB)) as v:
        yield v


@pytest.fixture(scope="module", params=["power-on", "protected"])
def saved(request: pytest.FixtureRequest, vm: Vm) -> VmState:
    if request.param == "protected":
        boot_image(vm, HALT_IMAGE)
    return vm.save_state()


Edit = Callable[[Any], None]


def edited(st: VcpuState, part: str, edit: Edit) -> VcpuState:
    """``st`` with the kernel struct ``part`` changed by ``edit``."""
    struct_type = K.VCPU_STATE_STRUCTS[part]
    s = struct_type.from_buffer_copy(getattr(st, part))
    edit(s)
    return dataclasses.replace(st, **{part: bytes(s)})


def apic_reg(offset: int, value: int) -> Edit:
    def edit(s: Any) -> None:
        ctypes.memmove(ctypes.addressof(s) + offset, value.to_bytes(4, "little"), 4)
    return edit


def xcr0(value: int) -> Edit:
    def edit(s: Any) -> None:
        s.xcrs[0].xcr, s.xcrs[0].value = 0, value
        s.nr_xcrs = max(s.nr_xcrs, 1)
    return edit


def exception(nr: int) -> Edit:
    def edit(s: Any) -> None:
        s.exception[0], s.exception[1] = 1, nr
    return edit


# (field named, part, edit): one out-of-range value each, caught when decoding.
DECODE_CASES: dict[str, tuple[str, str, Edit]] = {
    "cr0 reserved bit": ("sregs.cr0", "sregs", lambda s: setattr(s, "cr0", s.cr0 | 1 << 40)),
    "cr0 paging without protection": (
        "sregs.cr0", "sregs", lambda s: setattr(s, "cr0", (s.cr0 | 1 << 31) & ~1)),
    "cr4 reserved bit": ("sregs.cr4", "sregs", lambda s: setattr(s, "cr4", s.cr4 | 1 << 15)),
    "efer reserved bit": ("sregs.efer", "sregs", lambda s: setattr(s, "efer", 1 << 1)),
    "efer LMA without LME": ("sregs.efer", "sregs", lambda s: setattr(s, "efer", 1 << 10)),
    "cs 64-bit outside long mode": ("sregs.cs.l", "sregs", lambda s: setattr(s.cs, "l", 1)),
    "segment flag not a bit": ("sregs.ss.present", "sregs",
                               lambda s: setattr(s.ss, "present", 7)),
    "segment dpl": ("sregs.ds.dpl", "sregs", lambda s: setattr(s.ds, "dpl", 4)),
    "segment type": ("sregs.es.type", "sregs", lambda s: setattr(s.es, "type", 16)),
    "segment limit vs granularity": (
        "sregs.cs.limit", "sregs",
        lambda s: (setattr(s.cs, "g", 1), setattr(s.cs, "limit", 0x12345))),
    "segment limit beyond 20 bits": (
        "sregs.cs.limit", "sregs",
        lambda s: (setattr(s.cs, "g", 0), setattr(s.cs, "limit", 0x100000))),
    "cr8": ("sregs.cr8", "sregs", lambda s: setattr(s, "cr8", 16)),
    "apic base reserved bit": (
        "sregs.apic_base", "sregs", lambda s: setattr(s, "apic_base", s.apic_base | 1 << 9)),
    "x2apic with the apic off": (
        "sregs.apic_base", "sregs",
        lambda s: setattr(s, "apic_base", (s.apic_base | 1 << 10) & ~(1 << 11))),
    "rflags bit 1 clear": ("regs.rflags", "regs", lambda s: setattr(s, "rflags", 0)),
    "rflags reserved bit": ("regs.rflags", "regs",
                            lambda s: setattr(s, "rflags", s.rflags | 1 << 22)),
    "exception vector 32": ("events.exception.nr", "events", exception(32)),
    "exception vector NMI": ("events.exception.nr", "events", exception(2)),
    "event flags": ("events.flags", "events", lambda s: setattr(s, "flags", 0x40)),
    "exception payload flag": ("events.flags", "events",
                               lambda s: setattr(s, "flags", s.flags | 0x10)),
    "system management mode": ("events.smi.smm", "events", lambda s: s.smi.__setitem__(0, 1)),
    "nmi pending not a bit": ("events.nmi.pending", "events",
                              lambda s: s.nmi.__setitem__(1, 2)),
    "sipi vector": ("events.sipi_vector", "events", lambda s: setattr(s, "sipi_vector", 256)),
    "xcr0 without x87": ("xcrs.xcr0", "xcrs", xcr0(0b10)),
    "xcr0 AVX without SSE": ("xcrs.xcr0", "xcrs", xcr0(0b101)),
    "xcr0 part of AVX-512": ("xcrs.xcr0", "xcrs", xcr0(0b111 | 1 << 5)),
    "too many xcrs": ("xcrs.nr_xcrs", "xcrs", lambda s: setattr(s, "nr_xcrs", 17)),
    "lapic svr reserved bit": ("lapic.svr", "lapic", apic_reg(0xF0, 0x1FF | 1 << 13)),
    "lapic timer mode 3": ("lapic.lvt timer", "lapic", apic_reg(0x320, 0x3 << 17 | 0xEF)),
    "lapic divide config": ("lapic.tdcr", "lapic", apic_reg(0x3E0, 0b100)),
}


@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_an_out_of_range_field_fails_decoding_naming_the_field(
        saved: VmState, case: str) -> None:
    field, part, edit = DECODE_CASES[case]
    bad = edited(saved.vcpus[0], part, edit)
    with pytest.raises(CpuStateError) as info:
        VcpuState.from_bytes(bad.to_bytes())
    assert info.value.field == field, info.value


@pytest.mark.parametrize(("field", "mp_state"), [("mp_state", 9)])
def test_an_unknown_mp_state_fails_decoding(saved: VmState, field: str, mp_state: int) -> None:
    bad = dataclasses.replace(saved.vcpus[0], mp_state=mp_state)
    with pytest.raises(CpuStateError, match="mp_state"):
        VcpuState.from_bytes(bad.to_bytes())


def test_a_non_canonical_syscall_entry_fails_decoding(saved: VmState) -> None:
    st = saved.vcpus[0]
    msrs = (*st.msrs, (0xC0000082, 0x0000_8000_0000_0000))
    with pytest.raises(CpuStateError) as info:
        VcpuState.from_bytes(dataclasses.replace(st, msrs=msrs).to_bytes())
    assert info.value.field == "msr 0xc0000082"


def test_real_saved_states_pass_the_checks_and_restore(vm: Vm, saved: VmState) -> None:
    again = VcpuState.from_bytes(saved.vcpus[0].to_bytes())
    assert again == saved.vcpus[0]
    vm.restore_state(dataclasses.replace(saved, vcpus=(again,)))


def _unsupported_cr4_bit(vm: Vm) -> int:
    missing = CR4_KNOWN & ~vm.host_cpu.cr4
    if not missing:
        pytest.skip("this host supports every CR4 bit")
    return missing & -missing


def restore_cases(vm: Vm) -> dict[str, tuple[str, Callable[[VcpuState], VcpuState]]]:
    return {
        "unknown msr": ("msr 0x12345678", lambda st: dataclasses.replace(
            st, msrs=(*st.msrs, (0x12345678, 1)))),
        "xcr0 beyond the host": ("xcrs.xcr0", lambda st: edited(
            st, "xcrs", xcr0(0b111 | 1 << 62))),
        "cr3 beyond the host's physical bits": ("sregs.cr3", lambda st: edited(
            st, "sregs", lambda s: setattr(s, "cr3", 1 << vm.host_cpu.phys_bits))),
        "apic base beyond the host's physical bits": ("sregs.apic_base", lambda st: edited(
            st, "sregs", lambda s: setattr(s, "apic_base", s.apic_base
                                           | 1 << vm.host_cpu.phys_bits))),
        "cr4 bit the host lacks": ("sregs.cr4", lambda st: edited(
            st, "sregs", lambda s: setattr(s, "cr4", s.cr4 | _unsupported_cr4_bit(vm)))),
    }


@pytest.mark.parametrize("case", ["unknown msr", "xcr0 beyond the host",
                                  "cr3 beyond the host's physical bits",
                                  "apic base beyond the host's physical bits",
                                  "cr4 bit the host lacks"])
def test_what_the_host_cannot_take_fails_the_restore_before_kvm_sees_it(
        vm: Vm, saved: VmState, case: str) -> None:
    field, change = restore_cases(vm)[case]
    vm.restore_state(saved)
    bad = dataclasses.replace(change(saved.vcpus[0]), regs=_marked(saved.vcpus[0].regs))
    with pytest.raises(CpuStateError) as info:
        vm.restore_state(dataclasses.replace(saved, vcpus=(bad,)))
    assert info.value.field == field, info.value
    assert vm.save_state().vcpus[0].regs == saved.vcpus[0].regs  # nothing was restored


def _marked(regs: bytes) -> bytes:
    r = K.KvmRegs.from_buffer_copy(regs)
    r.rax ^= 0x5A5A
    return bytes(r)


def test_without_the_irqchip_a_halted_mp_state_is_refused() -> None:
    with Vm(VmConfig(2 * MIB, irqchip=False)) as plain:
        st = plain.save_state()
        bad = dataclasses.replace(st.vcpus[0], mp_state=3)
        with pytest.raises(CpuStateError, match="mp_state"):
            plain.restore_state(dataclasses.replace(st, vcpus=(bad,)))


PARTS = ("regs", "sregs", "events", "xcrs", "lapic")


def refused_or_taken(vm: Vm, saved: VmState, part: str, blob: bytes) -> str | None:
    """Load ``saved`` with its vCPU's ``part`` replaced by ``blob``: None if the checks
    refused it naming a field of that part (or KVM took it), else what went wrong."""
    bad = dataclasses.replace(saved.vcpus[0], **{part: blob})
    try:
        loaded = VcpuState.from_bytes(bad.to_bytes())
        vm.restore_state(dataclasses.replace(saved, vcpus=(loaded,)))
    except CpuStateError as e:
        if e.field.split(".")[0].split(" ")[0] not in (part, "msr", "mp_state"):
            return f"{part}: refused naming another field: {e}"
    except KvmError as e:  # the promise: KVM never sees what it refuses
        return f"{part}: KVM refused a state the checks let through: {e}"
    finally:
        vm.restore_state(saved)
    return None


@pytest.mark.parametrize("part", ["regs", "sregs", "events", "xcrs"])
def test_every_single_bit_flip_is_refused_with_a_field_or_taken_by_kvm(
        vm: Vm, saved: VmState, part: str) -> None:
    blob = getattr(saved.vcpus[0], part)
    problems = []
    for bit in range(len(blob) * 8):
        flipped = bytearray(blob)
        flipped[bit // 8] ^= 1 << bit % 8
        if (problem := refused_or_taken(vm, saved, part, bytes(flipped))) is not None:
            problems.append(f"byte {bit // 8} bit {bit % 8}: {problem}")
    assert not problems, problems[:5]


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(part=hs.sampled_from(PARTS), data=hs.data())
def test_random_bit_flips_are_refused_with_a_field_or_taken_by_kvm(
        vm: Vm, saved: VmState, part: str, data: hs.DataObject) -> None:
    blob = bytearray(getattr(saved.vcpus[0], part))
    size = len(blob) if part != "lapic" else 0x400
    for _ in range(data.draw(hs.integers(2, 4))):
        bit = data.draw(hs.integers(0, size * 8 - 1))
        blob[bit // 8] ^= 1 << bit % 8
    problem = refused_or_taken(vm, saved, part, bytes(blob))
    assert problem is None, problem
