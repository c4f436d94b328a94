"""The ctypes mirrors of <linux/kvm.h> must match the kernel ABI byte for byte."""

from __future__ import annotations

import ctypes

import pytest

from livemig.kernel import kvm as K


@pytest.mark.parametrize("struct,size", list(K.STRUCT_SIZES.items()),
                         ids=lambda v: getattr(v, "__name__", str(v)))
def test_struct_size_matches_kernel(struct: type[ctypes.Structure], size: int) -> None:
    assert ctypes.sizeof(struct) == size


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


def test_ioctl_numbers_match_kernel_headers() -> None:
    # A few values computed by the C preprocessor from <linux/kvm.h>.
    assert K.IOCTLS["KVM_RUN"] == 0xAE80
    assert K.IOCTLS["KVM_CREATE_VM"] == 0xAE01
    assert K.IOCTLS["KVM_SET_USER_MEMORY_REGION"] == 0x4020AE46
    assert K.IOCTLS["KVM_GET_DIRTY_LOG"] == 0x4010AE42
    assert K.IOCTLS["KVM_CLEAR_DIRTY_LOG"] == 0xC018AEC0
    assert K.IOCTLS["KVM_GET_REGS"] == 0x8090AE81
    assert K.IOCTLS["KVM_GET_SREGS"] == 0x8138AE83
    assert K.IOCTLS["KVM_ENABLE_CAP"] == 0x4068AEA3
