"""The ctypes mirrors of <linux/kvm.h> must match the kernel ABI byte for byte.

The numbers here are the kernel's (sizeof, offsetof and the ioctl macros, evaluated by
the C compiler against <linux/kvm.h> for x86_64): the reference the bindings, which
derive every size from their ctypes structures, are checked against.
"""

from __future__ import annotations

import ctypes

import pytest

from livemig.kernel import ioctl
from livemig.kernel import kvm as K

# sizeof(struct ...) from <linux/kvm.h> / <asm/kvm.h> (x86_64).
SIZES = {
    K.KvmUserspaceMemoryRegion: 32,
    K.KvmDirtyLog: 16,
    K.KvmClearDirtyLog: 24,
    K.KvmEnableCap: 104,
    K.KvmRegs: 144,
    K.KvmSegment: 24,
    K.KvmDtable: 16,
    K.KvmSregs: 312,
    K.KvmFpu: 416,
    K.KvmXcr: 16,
    K.KvmXcrs: 392,
    K.KvmMsrEntry: 16,
    K.KvmMsrsHeader: 8,
    K.KvmMsrListHeader: 4,
    K.KvmCpuidEntry2: 40,
    K.KvmCpuid2Header: 8,
    K.KvmMpState: 4,
    K.KvmVcpuEvents: 64,
    K.KvmIrqLevel: 8,
    K.KvmIrqchip: 520,
    K.KvmPitConfig: 64,
    K.KvmPitState2: 112,
    K.KvmLapicState: 1024,
    K.KvmClockData: 48,
    K.KvmDebugregs: 128,
    K.KvmXsave: 4096,
}


@pytest.mark.parametrize("struct,size", list(SIZES.items()),
                         ids=lambda v: getattr(v, "__name__", str(v)))
def test_struct_size_matches_kernel(struct: type[ctypes.Structure], size: int) -> None:
    assert ctypes.sizeof(struct) == size


def test_saved_vcpu_state_sizes_are_the_kernel_struct_sizes() -> None:
    assert K.VCPU_STATE_SIZES == {"regs": 144, "sregs": 312, "fpu": 416, "xcrs": 392,
                                  "events": 64, "xsave": 4096, "debugregs": 128,
                                  "lapic": 1024}


# Field offsets from <linux/kvm.h> / <asm/kvm.h> (x86_64).
OFFSETS = {
    K.KvmUserspaceMemoryRegion: {"slot": 0, "flags": 4, "guest_phys_addr": 8,
                                 "memory_size": 16, "userspace_addr": 24},
    K.KvmDirtyLog: {"slot": 0, "dirty_bitmap": 8},
    K.KvmClearDirtyLog: {"slot": 0, "num_pages": 4, "first_page": 8, "dirty_bitmap": 16},
    K.KvmEnableCap: {"cap": 0, "flags": 4, "args": 8, "pad": 40},
    K.KvmRegs: {"rax": 0, "rsp": 48, "r8": 64, "r15": 120, "rip": 128, "rflags": 136},
    K.KvmSegment: {"base": 0, "limit": 8, "selector": 12, "type": 14, "present": 15,
                   "dpl": 16, "db": 17, "s": 18, "l": 19, "g": 20, "avl": 21,
                   "unusable": 22, "padding": 23},
    K.KvmDtable: {"base": 0, "limit": 8},
    K.KvmSregs: {"cs": 0, "ds": 24, "tr": 144, "ldt": 168, "gdt": 192, "idt": 208,
                 "cr0": 224, "cr2": 232, "cr3": 240, "cr4": 248, "cr8": 256, "efer": 264,
                 "apic_base": 272, "interrupt_bitmap": 280},
    K.KvmFpu: {"fpr": 0, "fcw": 128, "fsw": 130, "ftwx": 132, "last_opcode": 134,
               "last_ip": 136, "last_dp": 144, "xmm": 152, "mxcsr": 408},
    K.KvmXcr: {"xcr": 0, "value": 8},
    K.KvmXcrs: {"nr_xcrs": 0, "flags": 4, "xcrs": 8, "padding": 264},
    K.KvmMsrEntry: {"index": 0, "reserved": 4, "data": 8},
    K.KvmCpuidEntry2: {"function": 0, "index": 4, "flags": 8, "eax": 12, "edx": 24,
                       "padding": 28},
    K.KvmVcpuEvents: {"exception": 0, "interrupt": 8, "nmi": 12, "sipi_vector": 16,
                      "flags": 20, "smi": 24, "triple_fault": 28, "reserved": 29,
                      "exception_has_payload": 55, "exception_payload": 56},
    K.KvmRunHeader: {"immediate_exit": 1, "exit_reason": 8, "cr8": 16, "apic_base": 24,
                     "io": 32},
    K.KvmRunIo: {"direction": 0, "size": 1, "port": 2, "count": 4, "data_offset": 8},
}


@pytest.mark.parametrize("struct", list(OFFSETS), ids=lambda s: s.__name__)
def test_struct_field_offsets_match_kernel(struct: type[ctypes.Structure]) -> None:
    for field, offset in OFFSETS[struct].items():
        assert getattr(struct, field).offset == offset, f"{struct.__name__}.{field}"


# Every request number, as the C preprocessor computes it from <linux/kvm.h>.
KERNEL_IOCTLS = {
    "KVM_GET_API_VERSION": 0xAE00,
    "KVM_CREATE_VM": 0xAE01,
    "KVM_GET_MSR_INDEX_LIST": 0xC004AE02,
    "KVM_CHECK_EXTENSION": 0xAE03,
    "KVM_GET_VCPU_MMAP_SIZE": 0xAE04,
    "KVM_GET_SUPPORTED_CPUID": 0xC008AE05,
    "KVM_CREATE_VCPU": 0xAE41,
    "KVM_GET_DIRTY_LOG": 0x4010AE42,
    "KVM_SET_USER_MEMORY_REGION": 0x4020AE46,
    "KVM_SET_TSS_ADDR": 0xAE47,
    "KVM_SET_IDENTITY_MAP_ADDR": 0x4008AE48,
    "KVM_ENABLE_CAP": 0x4068AEA3,
    "KVM_CLEAR_DIRTY_LOG": 0xC018AEC0,
    "KVM_RUN": 0xAE80,
    "KVM_GET_REGS": 0x8090AE81,
    "KVM_SET_REGS": 0x4090AE82,
    "KVM_GET_SREGS": 0x8138AE83,
    "KVM_SET_SREGS": 0x4138AE84,
    "KVM_GET_MSRS": 0xC008AE88,
    "KVM_SET_MSRS": 0x4008AE89,
    "KVM_GET_FPU": 0x81A0AE8C,
    "KVM_SET_FPU": 0x41A0AE8D,
    "KVM_SET_CPUID2": 0x4008AE90,
    "KVM_GET_MP_STATE": 0x8004AE98,
    "KVM_SET_MP_STATE": 0x4004AE99,
    "KVM_GET_VCPU_EVENTS": 0x8040AE9F,
    "KVM_SET_VCPU_EVENTS": 0x4040AEA0,
    "KVM_GET_XCRS": 0x8188AEA6,
    "KVM_SET_XCRS": 0x4188AEA7,
    "KVM_CREATE_IRQCHIP": 0xAE60,
    "KVM_IRQ_LINE": 0x4008AE61,
    "KVM_GET_IRQCHIP": 0xC208AE62,
    "KVM_SET_IRQCHIP": 0x8208AE63,
    "KVM_CREATE_PIT2": 0x4040AE77,
    "KVM_GET_PIT2": 0x8070AE9F,
    "KVM_SET_PIT2": 0x4070AEA0,
    "KVM_SET_CLOCK": 0x4030AE7B,
    "KVM_GET_CLOCK": 0x8030AE7C,
    "KVM_GET_LAPIC": 0x8400AE8E,
    "KVM_SET_LAPIC": 0x4400AE8F,
    "KVM_GET_DEBUGREGS": 0x8080AEA1,
    "KVM_SET_DEBUGREGS": 0x4080AEA2,
    "KVM_GET_XSAVE": 0x9000AEA4,
    "KVM_SET_XSAVE": 0x5000AEA5,
    "KVM_GET_TSC_KHZ": 0xAEA3,
    "KVM_NMI": 0xAE9A,
}


def test_every_ioctl_number_matches_kernel_headers() -> None:
    assert K.IOCTLS == KERNEL_IOCTLS


def test_ioctl_encoding_packs_direction_size_type_and_number() -> None:
    # _IOWR(0xAE, 0xC0, 24 bytes): read|write in bits 30-31, size 16-29, type 8-15, nr 0-7.
    assert ioctl.iowr(0xAE, 0xC0, ctypes.c_uint8 * 24) == 0xC018AEC0
    assert ioctl.ior(0xAA, 0x01, ctypes.c_uint64 * 2) == 0x8010AA01
    assert ioctl.iow(0xAE, 0x48, ctypes.c_uint64) == 0x4008AE48
    assert ioctl.io(0xAE, 0x80) == 0xAE80


@pytest.mark.parametrize("args", [(4, 0xAE, 0, 0), (0, 0x100, 0, 0), (0, 0xAE, 0x100, 0),
                                  (0, 0xAE, 0, 1 << 14), (0, 0xAE, -1, 0)])
def test_ioctl_encoding_refuses_parts_that_do_not_fit(args: tuple[int, int, int, int]) -> None:
    with pytest.raises(ValueError, match="does not fit"):
        ioctl.ioc(*args)
