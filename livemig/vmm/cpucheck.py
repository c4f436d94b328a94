"""Range checks of a saved vCPU's state, before any of it reaches KVM.

Theory of operation
-------------------
A saved vCPU (:class:`~livemig.vmm.state.VcpuState`) is the kernel's own structs as
bytes, and it comes from the network.  Handed to KVM as they are, out-of-range values
end in an ``EINVAL`` that names no field, in a VM entry that fails later, or in a guest
that runs from a state no CPU could be in.  So every field with a valid range is
checked first, and a value outside it raises :class:`CpuStateError` naming the field
(``sregs.cr0``, ``events.exception.nr``, ``msr 0xc0000082``, ...).  The checks are the
architectural rules KVM itself applies on ``KVM_SET_SREGS`` / ``KVM_SET_VCPU_EVENTS`` /
``KVM_SET_MP_STATE`` / ``KVM_SET_XCRS`` (``kvm_is_valid_sregs``, ``kvm_is_valid_cr0``,
the reserved bits of CR4, EFER, RFLAGS, XCR0) and the VM-entry checks of the segment
registers, so a state that passes them is one KVM takes.

Two steps:

* :func:`check_vcpu_state` needs nothing but the bytes: reserved bits, booleans stored
  as bytes, the consistency of CR0/CR4/EFER and CS, segment limits against their
  granularity, the event fields, the MP state, the XCR0 rules, the LAPIC registers
  with reserved bits.  It runs when a saved state is decoded.
* :func:`check_restorable` needs the VM that takes the state: every MSR must be one the
  destination can restore (``Vm.msr_indices``); CR4 may only set bits, XCR0 only
  enable state components, CR3 and the APIC base only use physical address bits this
  host's KVM supports (:class:`~livemig.vmm.cpuid.HostCpu`); the MP state must be
  one its vCPUs can have, and an x2APIC's id must be its vCPU's.  It runs in
  ``Vm.restore_state`` for every vCPU before the first one is touched.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from livemig.errors import CpuStateError
from livemig.kernel import kvm as K

if TYPE_CHECKING:
    from collections.abc import Collection

    from livemig.vmm.cpuid import HostCpu
    from livemig.vmm.state import VcpuState

SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
_FLAG_BYTES = ("present", "db", "s", "l", "g", "avl", "unusable")

# CR0: PE MP EM TS ET NE (0-5), WP (16), AM (18), NW CD PG (29-31).
CR0_PE, CR0_WP, CR0_NW, CR0_CD, CR0_PG = 1 << 0, 1 << 16, 1 << 29, 1 << 30, 1 << 31
CR0_KNOWN = 0x3F | CR0_WP | 1 << 18 | CR0_NW | CR0_CD | CR0_PG
# CR4: 0-14, FSGSBASE PCIDE OSXSAVE KL SMEP SMAP PKE CET PKS UINTR (16-25), LAM_SUP (28).
CR4_PAE, CR4_PCIDE = 1 << 5, 1 << 17
CR4_KNOWN = 0x7FFF | 0x3FF << 16 | 1 << 28
# EFER: SCE (0), LME (8), LMA (10), NXE SVME LMSLE FFXSR TCE (11-15), AUTOIBRS (21).
EFER_LME, EFER_LMA = 1 << 8, 1 << 10
EFER_KNOWN = 1 | EFER_LME | EFER_LMA | 0x1F << 11 | 1 << 21
# RFLAGS: bit 1 always set; 3, 5, 15 and 22-63 reserved.
RFLAGS_FIXED1 = 1 << 1
RFLAGS_RESERVED = 1 << 3 | 1 << 5 | 1 << 15 | ~((1 << 22) - 1) & (1 << 64) - 1
# IA32_APIC_BASE: BSP (8), x2APIC enable (10), enable (11), base from bit 12.
APIC_BASE_EXTD, APIC_BASE_EN = 1 << 10, 1 << 11
APIC_BASE_RESERVED = 0xFF | 1 << 9
MAX_PHYS_BITS = 52  # the architectural limit; a host may have fewer
# KVM_VCPUEVENT_VALID_NMI_PENDING, _SIPI_VECTOR, _SHADOW, _SMM.  (_PAYLOAD and
# _TRIPLE_FAULT need VM capabilities livemig does not enable: KVM refuses them.)
EVENT_FLAGS_KNOWN = 0x0F
# KVM_MP_STATE_RUNNABLE, UNINITIALIZED, INIT_RECEIVED, HALTED, SIPI_RECEIVED: x86's.
MP_STATES = range(5)
# XCR0 components: x87 (0) SSE (1) AVX (2) BNDREGS BNDCSR (3, 4) opmask ZMM_Hi256
# Hi16_ZMM (5-7) PKRU (9) XTILECFG XTILEDATA (17, 18).
XCR0_X87, XCR0_SSE, XCR0_AVX = 1, 2, 4
XCR0_MPX = 0b11 << 3
XCR0_AVX512 = 0b111 << 5
XCR0_AMX = 0b11 << 17
MAX_XCRS = 16
# Local APIC registers (offsets in the 1 KiB page) and their reserved bits.
APIC_ID, APIC_SVR, APIC_LVTT, APIC_TDCR = 0x20, 0xF0, 0x320, 0x3E0
APIC_LVT = {"lvt timer": 0x320, "lvt thermal": 0x330, "lvt pmc": 0x340, "lvt lint0": 0x350,
            "lvt lint1": 0x360, "lvt error": 0x370}
# Vector, delivery mode, status, polarity, remote IRR, trigger, mask, timer mode.
APIC_LVT_KNOWN = 0xFF | 0x7 << 8 | 1 << 12 | 1 << 13 | 1 << 14 | 1 << 15 | 1 << 16 | 0x3 << 17
APIC_LVT_TIMER_MODE_RESERVED = 0x3 << 17
APIC_SVR_KNOWN = 0xFF | 1 << 8 | 1 << 9 | 1 << 12
APIC_TDCR_KNOWN = 0b1011
CANONICAL_MSRS = {0xC0000100: "FS_BASE", 0xC0000101: "GS_BASE",
                  0xC0000102: "KERNEL_GS_BASE", 0xC0000082: "LSTAR", 0xC0000083: "CSTAR",
                  0x175: "SYSENTER_ESP", 0x176: "SYSENTER_EIP"}
MSR_EFER = 0xC0000080
NMI_VECTOR = 2


def _bad(field: str, why: str) -> CpuStateError:
    return CpuStateError(field, why)


def _reserved(field: str, value: int, known: int) -> None:
    extra = value & ~known
    if extra:
        raise _bad(field, f"has reserved bits {extra:#x} set (value {value:#x})")


def _canonical(value: int) -> bool:
    top = value >> 47
    return top in (0, (1 << 17) - 1)


def check_vcpu_state(st: VcpuState) -> None:
    """The host-independent checks; raises :class:`CpuStateError` naming the field."""
    regs = K.KvmRegs.from_buffer_copy(st.regs)
    if not regs.rflags & RFLAGS_FIXED1:
        raise _bad("regs.rflags", f"lacks bit 1, which is always set ({regs.rflags:#x})")
    _reserved("regs.rflags", regs.rflags, ~RFLAGS_RESERVED & (1 << 64) - 1)
    _check_sregs(K.KvmSregs.from_buffer_copy(st.sregs))
    _check_events(K.KvmVcpuEvents.from_buffer_copy(st.events))
    if st.mp_state not in MP_STATES:
        raise _bad("mp_state", f"is {st.mp_state}, not an x86 MP state (0-4)")
    if st.xcrs:
        _check_xcrs(K.KvmXcrs.from_buffer_copy(st.xcrs))
    if st.lapic:
        _check_lapic(st.lapic)
    for index, value in st.msrs:
        name = CANONICAL_MSRS.get(index)
        if name is not None and not _canonical(value):
            raise _bad(f"msr {index:#x}", f"({name}) holds {value:#x}, not a canonical "
                       "address")
    efer = dict(st.msrs).get(MSR_EFER)
    if efer is not None:
        _reserved(f"msr {MSR_EFER:#x}", efer, EFER_KNOWN)


def _check_sregs(s: K.KvmSregs) -> None:
    for name in SEGMENTS:
        _check_segment(name, getattr(s, name))
    cr0, cr4, efer = s.cr0, s.cr4, s.efer
    _reserved("sregs.cr0", cr0, CR0_KNOWN)
    if cr0 & CR0_PG and not cr0 & CR0_PE:
        raise _bad("sregs.cr0", f"has paging without protection ({cr0:#x})")
    if cr0 & CR0_NW and not cr0 & CR0_CD:
        raise _bad("sregs.cr0", f"has not-write-through without cache-disable ({cr0:#x})")
    _reserved("sregs.cr4", cr4, CR4_KNOWN)
    _reserved("sregs.efer", efer, EFER_KNOWN)
    if efer & EFER_LME and cr0 & CR0_PG:
        if not cr4 & CR4_PAE:
            raise _bad("sregs.cr4", "lacks PAE while long mode is active")
        if not efer & EFER_LMA:
            raise _bad("sregs.efer", "lacks LMA while LME and paging are on")
    else:
        if efer & EFER_LMA:
            raise _bad("sregs.efer", "has LMA (long mode active) without LME and paging")
        if s.cs.l:
            raise _bad("sregs.cs.l", "is set outside long mode")
        if cr4 & CR4_PCIDE:
            raise _bad("sregs.cr4", "has PCIDE outside long mode")
    if s.cs.l and s.cs.db:
        raise _bad("sregs.cs", "has both L (64-bit) and D/B set")
    if s.cr3 >> MAX_PHYS_BITS:
        raise _bad("sregs.cr3", f"{s.cr3:#x} is beyond {MAX_PHYS_BITS} address bits")
    if s.cr8 > 15:
        raise _bad("sregs.cr8", f"is {s.cr8}, the task priority is 4 bits (0-15)")
    base = s.apic_base
    _reserved("sregs.apic_base", base, ~APIC_BASE_RESERVED & ((1 << MAX_PHYS_BITS) - 1))
    if base & APIC_BASE_EXTD and not base & APIC_BASE_EN:
        raise _bad("sregs.apic_base", f"enables x2APIC with the APIC disabled ({base:#x})")
    for name in ("gdt", "idt"):
        table = getattr(s, name)
        if not _canonical(table.base):
            raise _bad(f"sregs.{name}.base", f"{table.base:#x} is not canonical")


def _check_segment(name: str, seg: K.KvmSegment) -> None:
    for flag in _FLAG_BYTES:
        if getattr(seg, flag) > 1:
            raise _bad(f"sregs.{name}.{flag}", f"is {getattr(seg, flag)}, a bit (0 or 1)")
    if seg.type > 15:
        raise _bad(f"sregs.{name}.type", f"is {seg.type}, a 4-bit type (0-15)")
    if seg.dpl > 3:
        raise _bad(f"sregs.{name}.dpl", f"is {seg.dpl}, a privilege level (0-3)")
    if seg.unusable or not seg.present:
        return
    # VM entry: with G set the low 12 bits of the limit are ones, without G it is 20 bits.
    if seg.g and seg.limit & 0xFFF != 0xFFF:
        raise _bad(f"sregs.{name}.limit", f"{seg.limit:#x} with page granularity does not "
                   "end in 0xfff")
    if not seg.g and seg.limit > 0xFFFFF:
        raise _bad(f"sregs.{name}.limit", f"{seg.limit:#x} exceeds 20 bits without page "
                   "granularity")
    if name in ("fs", "gs", "tr", "ldt") and not _canonical(seg.base):
        raise _bad(f"sregs.{name}.base", f"{seg.base:#x} is not canonical")


def _check_events(e: K.KvmVcpuEvents) -> None:
    injected, nr, has_error_code, pending = e.exception[0], e.exception[1], \
        e.exception[2], e.exception[3]
    for name, value in (("exception.injected", injected), ("exception.pending", pending),
                        ("exception.has_error_code", has_error_code),
                        ("interrupt.injected", e.interrupt[0]),
                        ("interrupt.soft", e.interrupt[2]),
                        ("nmi.injected", e.nmi[0]), ("nmi.pending", e.nmi[1]),
                        ("nmi.masked", e.nmi[2]), ("triple_fault", e.triple_fault),
                        ("exception_has_payload", e.exception_has_payload)):
        if value > 1:
            raise _bad(f"events.{name}", f"is {value}, a bit (0 or 1)")
    for name, value in (("smi.smm", e.smi[0]), ("smi.pending", e.smi[1]),
                        ("smi.smm_inside_nmi", e.smi[2])):
        if value:
            raise _bad(f"events.{name}", f"is {value}: a livemig vCPU has no system "
                       "management mode")
    if (injected or pending) and (nr > 31 or nr == NMI_VECTOR):
        raise _bad("events.exception.nr", f"is {nr}, not an exception vector (0-31 but "
                   "the NMI's 2)")
    if e.sipi_vector > 0xFF:
        raise _bad("events.sipi_vector", f"is {e.sipi_vector:#x}, a vector is 8 bits")
    _reserved("events.flags", e.flags, EVENT_FLAGS_KNOWN)


def _check_xcrs(x: K.KvmXcrs) -> None:
    if x.nr_xcrs > MAX_XCRS:
        raise _bad("xcrs.nr_xcrs", f"is {x.nr_xcrs} (at most {MAX_XCRS})")
    if x.flags:
        raise _bad("xcrs.flags", f"is {x.flags:#x}, not 0")
    for i in range(x.nr_xcrs):
        if x.xcrs[i].xcr == 0:
            check_xcr0(x.xcrs[i].value)


def check_xcr0(xcr0: int, supported: int | None = None) -> None:
    """XCR0's rules (the SDM's XSETBV checks): x87 always; AVX needs SSE; MPX's two and
    AVX-512's three components together; AVX-512 needs AVX; AMX's two together; and,
    given ``supported``, nothing this host cannot save."""
    if not xcr0 & XCR0_X87:
        raise _bad("xcrs.xcr0", f"{xcr0:#x} lacks x87 state (bit 0), which is always on")
    if xcr0 & XCR0_AVX and not xcr0 & XCR0_SSE:
        raise _bad("xcrs.xcr0", f"{xcr0:#x} enables AVX without SSE")
    for group, what in ((XCR0_MPX, "MPX"), (XCR0_AVX512, "AVX-512"), (XCR0_AMX, "AMX")):
        if xcr0 & group and xcr0 & group != group:
            raise _bad("xcrs.xcr0", f"{xcr0:#x} enables only part of {what}'s state")
    if xcr0 & XCR0_AVX512 and not xcr0 & XCR0_AVX:
        raise _bad("xcrs.xcr0", f"{xcr0:#x} enables AVX-512 without AVX")
    if supported is not None and xcr0 & ~supported:
        raise _bad("xcrs.xcr0", f"{xcr0:#x} enables state components "
                   f"{xcr0 & ~supported:#x} this host does not support ({supported:#x})")


def _apic_reg(lapic: bytes, offset: int) -> int:
    value: int = struct.unpack_from("<I", lapic, offset)[0]
    return value


def _check_lapic(lapic: bytes) -> None:
    _reserved("lapic.svr", _apic_reg(lapic, APIC_SVR), APIC_SVR_KNOWN)
    for name, offset in APIC_LVT.items():
        _reserved(f"lapic.{name}", _apic_reg(lapic, offset), APIC_LVT_KNOWN)
    if _apic_reg(lapic, APIC_LVTT) & APIC_LVT_TIMER_MODE_RESERVED == \
            APIC_LVT_TIMER_MODE_RESERVED:
        raise _bad("lapic.lvt timer", "has the reserved timer mode 3")
    _reserved("lapic.tdcr", _apic_reg(lapic, APIC_TDCR), APIC_TDCR_KNOWN)


def check_restorable(st: VcpuState, vcpu: int, msr_indices: Collection[int],
                     host: HostCpu, irqchip: bool) -> None:
    """What depends on the VM taking the state: CR4 bits, physical addresses (CR3, the
    APIC base) and XCR0 components this host supports, MSRs it can restore, an MP state
    its vCPUs can have (without the in-kernel irqchip only "runnable"), an x2APIC id
    that is the vCPU's (either of KVM's two formats)."""
    sregs = K.KvmSregs.from_buffer_copy(st.sregs)
    _reserved("sregs.cr4", sregs.cr4, host.cr4)
    for name in ("cr3", "apic_base"):
        value = getattr(sregs, name)
        if value >> host.phys_bits:
            raise _bad(f"sregs.{name}", f"{value:#x} is beyond this host's "
                       f"{host.phys_bits} physical address bits")
    if st.xcrs:
        x = K.KvmXcrs.from_buffer_copy(st.xcrs)
        for i in range(min(x.nr_xcrs, MAX_XCRS)):
            if x.xcrs[i].xcr == 0:
                check_xcr0(x.xcrs[i].value, host.xcr0)
    if not irqchip and st.mp_state != 0:
        raise _bad("mp_state", f"is {st.mp_state}; without the in-kernel irqchip a vCPU "
                   "is always runnable (0)")
    if st.lapic and not irqchip:
        raise _bad("lapic", "is present, but this VM has no in-kernel irqchip")
    known = set(msr_indices)
    for index, _ in st.msrs:
        if index not in known:
            raise _bad(f"msr {index:#x}", "is not an MSR this VM can restore")
    if st.lapic and sregs.apic_base & APIC_BASE_EXTD:
        apic_id = _apic_reg(st.lapic, APIC_ID)
        if apic_id not in (vcpu, vcpu << 24):
            raise _bad("lapic.id", f"is {apic_id:#x} in x2APIC mode; vCPU {vcpu}'s is "
                       f"{vcpu}")
