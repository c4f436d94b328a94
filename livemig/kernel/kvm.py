"""KVM bindings: one wrapper type per kind of file descriptor, one method per ioctl.

Theory of operation
-------------------
``/dev/kvm`` gives a *system* fd (:class:`Kvm`); ``KVM_CREATE_VM`` gives a *VM* fd
(:class:`VmFd`) that owns memory slots and the dirty log; ``KVM_CREATE_VCPU`` gives a
*vCPU* fd (:class:`VcpuFd`) whose ``kvm_run`` page is mmapped and shared with the kernel.

Every ioctl number is declared once in :data:`IOCTLS` (grouped by the fd it applies to,
with the capability that gates it in a comment), built with :mod:`livemig.kernel.ioctl`
from the ctypes type of its argument.  Struct layouts are ctypes mirrors of
``<linux/kvm.h>`` for x86_64, and every size livemig uses is ``ctypes.sizeof`` of one of
them (:data:`VCPU_STATE_SIZES` for saved vCPU state); ``tests/unit/test_kernel_structs.py``
holds the kernel's own numbers and asserts sizes, field offsets and request numbers.

Most ioctls are short and go through :func:`fcntl.ioctl` with a mutable ctypes buffer.
``KVM_RUN`` can block for a long time (the guest runs inside it), so it is issued through
``ctypes.CDLL`` which releases the GIL for the duration of the call: other Python threads
(migration, QMP, the fault handler) keep running while the guest runs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import mmap
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

from livemig.errors import KvmError
from livemig.kernel.ioctl import io, ior, iow, iowr

KVMIO: Final = 0xAE  # the ioctl type byte of every KVM request


# ---------------------------------------------------------------------------
# Structs (x86_64 layouts of <linux/kvm.h> / <asm/kvm.h>)
u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64


class KvmUserspaceMemoryRegion(ctypes.Structure):
    _fields_ = [
        ("slot", u32),
        ("flags", u32),
        ("guest_phys_addr", u64),
        ("memory_size", u64),
        ("userspace_addr", u64),
    ]


class KvmDirtyLog(ctypes.Structure):
    _fields_ = [("slot", u32), ("padding1", u32), ("dirty_bitmap", u64)]


class KvmClearDirtyLog(ctypes.Structure):
    _fields_ = [("slot", u32), ("num_pages", u32), ("first_page", u64), ("dirty_bitmap", u64)]


class KvmEnableCap(ctypes.Structure):
    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


class KvmRegs(ctypes.Structure):
    _fields_ = [(name, u64) for name in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11",
        "r12", "r13", "r14", "r15", "rip", "rflags")]


class KvmSegment(ctypes.Structure):
    _fields_ = [
        ("base", u64),
        ("limit", u32),
        ("selector", u16),
        ("type", u8),
        ("present", u8),
        ("dpl", u8),
        ("db", u8),
        ("s", u8),
        ("l", u8),
        ("g", u8),
        ("avl", u8),
        ("unusable", u8),
        ("padding", u8),
    ]


class KvmDtable(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


class KvmSregs(ctypes.Structure):
    _fields_ = [
        *[(seg, KvmSegment) for seg in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")],
        ("gdt", KvmDtable),
        ("idt", KvmDtable),
        *[(cr, u64) for cr in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")],
        ("interrupt_bitmap", u64 * 4),
    ]


class KvmFpu(ctypes.Structure):
    _fields_ = [
        ("fpr", (u8 * 16) * 8),
        ("fcw", u16),
        ("fsw", u16),
        ("ftwx", u8),
        ("pad1", u8),
        ("last_opcode", u16),
        ("last_ip", u64),
        ("last_dp", u64),
        ("xmm", (u8 * 16) * 16),
        ("mxcsr", u32),
        ("pad2", u32),
    ]


class KvmXcr(ctypes.Structure):
    _fields_ = [("xcr", u32), ("reserved", u32), ("value", u64)]


class KvmXcrs(ctypes.Structure):
    _fields_ = [("nr_xcrs", u32), ("flags", u32), ("xcrs", KvmXcr * 16), ("padding", u64 * 16)]


class KvmMsrEntry(ctypes.Structure):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class KvmMsrsHeader(ctypes.Structure):
    _fields_ = [("nmsrs", u32), ("pad", u32)]


class KvmMsrListHeader(ctypes.Structure):
    _fields_ = [("nmsrs", u32)]


class KvmCpuidEntry2(ctypes.Structure):
    _fields_ = [
        ("function", u32),
        ("index", u32),
        ("flags", u32),
        ("eax", u32),
        ("ebx", u32),
        ("ecx", u32),
        ("edx", u32),
        ("padding", u32 * 3),
    ]


class KvmCpuid2Header(ctypes.Structure):
    _fields_ = [("nent", u32), ("padding", u32)]


class KvmMpState(ctypes.Structure):
    _fields_ = [("mp_state", u32)]


class KvmVcpuEvents(ctypes.Structure):
    """Kept as an opaque-but-sized record: we save and restore it whole."""

    _fields_ = [
        ("exception", u8 * 8),
        ("interrupt", u8 * 4),
        ("nmi", u8 * 4),
        ("sipi_vector", u32),
        ("flags", u32),
        ("smi", u8 * 4),
        ("triple_fault", u8),
        ("reserved", u8 * 26),
        ("exception_has_payload", u8),
        ("exception_payload", u64),
    ]


class KvmIrqLevel(ctypes.Structure):
    _fields_ = [("irq", u32), ("level", u32)]


class KvmIrqchip(ctypes.Structure):
    """``struct kvm_irqchip``: one chip (PIC master, PIC slave or IOAPIC) as 512 bytes."""

    _fields_ = [("chip_id", u32), ("pad", u32), ("chip", u8 * 512)]


class KvmPitConfig(ctypes.Structure):
    _fields_ = [("flags", u32), ("pad", u32 * 15)]


class KvmPitState2(ctypes.Structure):
    """``struct kvm_pit_state2``: three channel records, flags, reserved words."""

    _fields_ = [("channels", u8 * 72), ("flags", u32), ("reserved", u32 * 9)]


class KvmLapicState(ctypes.Structure):
    _fields_ = [("regs", u8 * 1024)]


class KvmClockData(ctypes.Structure):
    _fields_ = [("clock", u64), ("flags", u32), ("pad0", u32), ("realtime", u64),
                ("host_tsc", u64), ("pad", u32 * 4)]


class KvmDebugregs(ctypes.Structure):
    _fields_ = [("db", u64 * 4), ("dr6", u64), ("dr7", u64), ("flags", u64),
                ("reserved", u64 * 9)]


class KvmXsave(ctypes.Structure):
    _fields_ = [("region", u32 * 1024)]


class KvmRunMmio(ctypes.Structure):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class KvmRunInternal(ctypes.Structure):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class KvmRunIo(ctypes.Structure):
    _fields_ = [
        ("direction", u8),
        ("size", u8),
        ("port", u16),
        ("count", u32),
        ("data_offset", u64),
    ]


class KvmRunHeader(ctypes.Structure):
    """The fixed head of the mmapped ``struct kvm_run`` plus the io exit union member."""

    _fields_ = [
        ("request_interrupt_window", u8),
        ("immediate_exit", u8),
        ("padding1", u8 * 6),
        ("exit_reason", u32),
        ("ready_for_interrupt_injection", u8),
        ("if_flag", u8),
        ("flags", u16),
        ("cr8", u64),
        ("apic_base", u64),
        ("io", KvmRunIo),  # first member of the exit union at offset 32
    ]


class KvmRunMmioView(ctypes.Structure):
    """The same head with the union read as an MMIO exit."""

    _fields_ = [*KvmRunHeader._fields_[:-1], ("mmio", KvmRunMmio)]


class KvmRunInternalView(ctypes.Structure):
    """The same head with the union read as an internal-error exit."""

    _fields_ = [*KvmRunHeader._fields_[:-1], ("internal", KvmRunInternal)]


# The register groups of a vCPU's saved state, each carried as its kernel struct's bytes.
VCPU_STATE_STRUCTS: Final[dict[str, type[ctypes.Structure]]] = {
    "regs": KvmRegs,
    "sregs": KvmSregs,
    "fpu": KvmFpu,
    "xcrs": KvmXcrs,
    "events": KvmVcpuEvents,
    "xsave": KvmXsave,
    "debugregs": KvmDebugregs,
    "lapic": KvmLapicState,
}
VCPU_STATE_SIZES: Final[dict[str, int]] = {
    name: ctypes.sizeof(struct) for name, struct in VCPU_STATE_STRUCTS.items()}

# ---------------------------------------------------------------------------
# The ioctl table, grouped by the fd it applies to.
# Argument sizes come from the ctypes types (ioctl.ior & co. take sizeof), as the C
# macros take the type; a variable-length argument is encoded by its fixed header.
IOCTLS: Final[dict[str, int]] = {
    # system fd
    "KVM_GET_API_VERSION": io(KVMIO, 0x00),
    "KVM_CREATE_VM": io(KVMIO, 0x01),
    "KVM_GET_MSR_INDEX_LIST": iowr(KVMIO, 0x02, KvmMsrListHeader),
    "KVM_CHECK_EXTENSION": io(KVMIO, 0x03),
    "KVM_GET_VCPU_MMAP_SIZE": io(KVMIO, 0x04),
    "KVM_GET_SUPPORTED_CPUID": iowr(KVMIO, 0x05, KvmCpuid2Header),  # KVM_CAP_EXT_CPUID
    # VM fd
    "KVM_CREATE_VCPU": io(KVMIO, 0x41),
    "KVM_GET_DIRTY_LOG": iow(KVMIO, 0x42, KvmDirtyLog),
    # KVM_CAP_USER_MEMORY
    "KVM_SET_USER_MEMORY_REGION": iow(KVMIO, 0x46, KvmUserspaceMemoryRegion),
    "KVM_SET_TSS_ADDR": io(KVMIO, 0x47),  # KVM_CAP_SET_TSS_ADDR
    "KVM_SET_IDENTITY_MAP_ADDR": iow(KVMIO, 0x48, u64),  # KVM_CAP_SET_IDENTITY_MAP_ADDR
    "KVM_ENABLE_CAP": iow(KVMIO, 0xA3, KvmEnableCap),  # KVM_CAP_ENABLE_CAP_VM
    # KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2
    "KVM_CLEAR_DIRTY_LOG": iowr(KVMIO, 0xC0, KvmClearDirtyLog),
    "KVM_CREATE_IRQCHIP": io(KVMIO, 0x60),  # KVM_CAP_IRQCHIP
    "KVM_IRQ_LINE": iow(KVMIO, 0x61, KvmIrqLevel),
    "KVM_GET_IRQCHIP": iowr(KVMIO, 0x62, KvmIrqchip),
    "KVM_SET_IRQCHIP": ior(KVMIO, 0x63, KvmIrqchip),  # sic: the kernel declares it _IOR
    "KVM_CREATE_PIT2": iow(KVMIO, 0x77, KvmPitConfig),  # KVM_CAP_PIT2
    "KVM_GET_PIT2": ior(KVMIO, 0x9F, KvmPitState2),  # KVM_CAP_PIT_STATE2
    "KVM_SET_PIT2": iow(KVMIO, 0xA0, KvmPitState2),
    "KVM_SET_CLOCK": iow(KVMIO, 0x7B, KvmClockData),  # KVM_CAP_ADJUST_CLOCK
    "KVM_GET_CLOCK": ior(KVMIO, 0x7C, KvmClockData),
    # vCPU fd
    "KVM_RUN": io(KVMIO, 0x80),
    "KVM_GET_REGS": ior(KVMIO, 0x81, KvmRegs),
    "KVM_SET_REGS": iow(KVMIO, 0x82, KvmRegs),
    "KVM_GET_SREGS": ior(KVMIO, 0x83, KvmSregs),
    "KVM_SET_SREGS": iow(KVMIO, 0x84, KvmSregs),
    "KVM_GET_MSRS": iowr(KVMIO, 0x88, KvmMsrsHeader),
    "KVM_SET_MSRS": iow(KVMIO, 0x89, KvmMsrsHeader),
    "KVM_GET_FPU": ior(KVMIO, 0x8C, KvmFpu),
    "KVM_SET_FPU": iow(KVMIO, 0x8D, KvmFpu),
    "KVM_SET_CPUID2": iow(KVMIO, 0x90, KvmCpuid2Header),
    "KVM_GET_MP_STATE": ior(KVMIO, 0x98, KvmMpState),  # KVM_CAP_MP_STATE
    "KVM_SET_MP_STATE": iow(KVMIO, 0x99, KvmMpState),
    "KVM_GET_VCPU_EVENTS": ior(KVMIO, 0x9F, KvmVcpuEvents),  # KVM_CAP_VCPU_EVENTS
    "KVM_SET_VCPU_EVENTS": iow(KVMIO, 0xA0, KvmVcpuEvents),
    "KVM_GET_XCRS": ior(KVMIO, 0xA6, KvmXcrs),  # KVM_CAP_XCRS
    "KVM_SET_XCRS": iow(KVMIO, 0xA7, KvmXcrs),
    "KVM_GET_LAPIC": ior(KVMIO, 0x8E, KvmLapicState),  # KVM_CAP_IRQCHIP
    "KVM_SET_LAPIC": iow(KVMIO, 0x8F, KvmLapicState),
    "KVM_GET_DEBUGREGS": ior(KVMIO, 0xA1, KvmDebugregs),  # KVM_CAP_DEBUGREGS
    "KVM_SET_DEBUGREGS": iow(KVMIO, 0xA2, KvmDebugregs),
    "KVM_GET_XSAVE": ior(KVMIO, 0xA4, KvmXsave),  # KVM_CAP_XSAVE
    "KVM_SET_XSAVE": iow(KVMIO, 0xA5, KvmXsave),
    "KVM_GET_TSC_KHZ": io(KVMIO, 0xA3),  # KVM_CAP_GET_TSC_KHZ
    "KVM_NMI": io(KVMIO, 0x9A),  # KVM_CAP_USER_NMI
}

KVM_API_VERSION: Final = 12
KVM_CAP_USER_MEMORY: Final = 3
KVM_CAP_NR_MEMSLOTS: Final = 10
KVM_CAP_IMMEDIATE_EXIT: Final = 136
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: Final = 168
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE: Final = 1
KVM_CAP_IRQCHIP: Final = 0
KVM_CAP_PIT2: Final = 33
KVM_CAP_XSAVE: Final = 55
KVM_PIT_SPEAKER_DUMMY: Final = 1
# struct kvm_irqchip chip ids
KVM_IRQCHIP_PIC_MASTER: Final = 0
KVM_IRQCHIP_PIC_SLAVE: Final = 1
KVM_IRQCHIP_IOAPIC: Final = 2
# mp_state values
KVM_MP_STATE_RUNNABLE: Final = 0
KVM_MP_STATE_UNINITIALIZED: Final = 1
KVM_MP_STATE_HALTED: Final = 3
KVM_MEM_LOG_DIRTY_PAGES: Final = 1

# exit reasons
KVM_EXIT_IO: Final = 2
KVM_EXIT_HLT: Final = 5
KVM_EXIT_MMIO: Final = 6
KVM_EXIT_SHUTDOWN: Final = 8
KVM_EXIT_FAIL_ENTRY: Final = 9
KVM_EXIT_INTR: Final = 10
KVM_EXIT_INTERNAL_ERROR: Final = 17
KVM_EXIT_IO_IN: Final = 0
KVM_EXIT_IO_OUT: Final = 1



def _libc() -> ctypes.CDLL:
    # CDLL (not PyDLL): calls release the GIL, which KVM_RUN relies on.
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class _Fd:
    """A file descriptor wrapper with checked ioctls."""

    def __init__(self, fd: int, what: str) -> None:
        self._fd = fd
        self._what = what
        self._libc = _libc()

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _ioctl_int(self, name: str, arg: int = 0) -> int:
        # libc's ioctl, because fcntl.ioctl takes only a signed C int argument and
        # some arguments (KVM_SET_TSS_ADDR) are addresses above 2 GiB.
        rc = int(self._libc.ioctl(self._fd, ctypes.c_ulong(IOCTLS[name]), ctypes.c_ulong(arg)))
        if rc < 0:
            raise KvmError(name, ctypes.get_errno())
        return rc

    def _ioctl_buf(self, name: str, buf: Any, request: int | None = None) -> None:
        # buf is a ctypes object or bytearray; fcntl copies results back in place.
        try:
            fcntl.ioctl(self._fd, IOCTLS[name] if request is None else request, buf, True)
        except OSError as e:
            raise KvmError(name, e.errno or errno.EIO) from None


class Kvm(_Fd):
    """The system fd, ``/dev/kvm``."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise KvmError(f"open {path}", e.errno or errno.ENOENT,
                           "is KVM available and are you allowed to use it?") from None
        super().__init__(fd, "kvm")
        version = self._ioctl_int("KVM_GET_API_VERSION")
        if version != KVM_API_VERSION:
            self.close()
            raise KvmError("KVM_GET_API_VERSION", errno.EINVAL, f"unsupported API {version}")

    def check_extension(self, cap: int) -> int:
        return self._ioctl_int("KVM_CHECK_EXTENSION", cap)

    def vcpu_mmap_size(self) -> int:
        return self._ioctl_int("KVM_GET_VCPU_MMAP_SIZE")

    def msr_index_list(self) -> list[int]:
        n = 512
        buf = (u32 * (n + 1))()
        buf[0] = n
        self._ioctl_buf("KVM_GET_MSR_INDEX_LIST", buf)
        return list(buf[1 : 1 + buf[0]])

    def supported_cpuid(self) -> bytes:
        """The raw ``kvm_cpuid2`` (header + entries) the host supports."""
        n = 256
        size = ctypes.sizeof(KvmCpuid2Header) + n * ctypes.sizeof(KvmCpuidEntry2)
        buf = bytearray(size)
        KvmCpuid2Header.from_buffer(buf).nent = n
        self._ioctl_buf("KVM_GET_SUPPORTED_CPUID", buf)
        nent = KvmCpuid2Header.from_buffer(buf).nent
        return bytes(buf[: ctypes.sizeof(KvmCpuid2Header) + nent * ctypes.sizeof(KvmCpuidEntry2)])

    def create_vm(self) -> VmFd:
        fd = self._ioctl_int("KVM_CREATE_VM", 0)
        return VmFd(fd, self)


class VmFd(_Fd):
    """A VM fd: memory slots, dirty log, vCPU creation."""

    def __init__(self, fd: int, kvm: Kvm) -> None:
        super().__init__(fd, "vm")
        self.kvm = kvm

    def set_tss_addr(self, addr: int) -> None:
        self._ioctl_int("KVM_SET_TSS_ADDR", addr)

    def set_identity_map_addr(self, addr: int) -> None:
        self._ioctl_buf("KVM_SET_IDENTITY_MAP_ADDR", u64(addr))

    def enable_cap(self, cap: int, *args: int) -> None:
        ec = KvmEnableCap(cap=cap)
        for i, a in enumerate(args):
            ec.args[i] = a
        self._ioctl_buf("KVM_ENABLE_CAP", ec)

    def set_user_memory_region(
        self, slot: int, guest_phys_addr: int, size: int, host_addr: int, flags: int = 0
    ) -> None:
        """Map ``size`` bytes of host memory at ``host_addr`` into the guest.

        The caller (vmm.memory) keeps the mapping alive for as long as the slot exists;
        KVM holds no reference on it.
        """
        region = KvmUserspaceMemoryRegion(slot, flags, guest_phys_addr, size, host_addr)
        self._ioctl_buf("KVM_SET_USER_MEMORY_REGION", region)

    def get_dirty_log(self, slot: int, bitmap_addr: int) -> None:
        """Fill the bitmap at ``bitmap_addr`` (a NumPy array the caller owns) for ``slot``."""
        self._ioctl_buf("KVM_GET_DIRTY_LOG", KvmDirtyLog(slot, 0, bitmap_addr))

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int, bitmap_addr: int) -> None:
        """Re-protect the pages whose bits are set in the caller-owned bitmap."""
        self._ioctl_buf("KVM_CLEAR_DIRTY_LOG",
                        KvmClearDirtyLog(slot, num_pages, first_page, bitmap_addr))

    def create_irqchip(self) -> None:
        """PIC, IOAPIC and a local APIC per vCPU in the kernel (before any vCPU exists)."""
        self._ioctl_int("KVM_CREATE_IRQCHIP")

    def create_pit2(self) -> None:
        self._ioctl_buf("KVM_CREATE_PIT2", KvmPitConfig(flags=KVM_PIT_SPEAKER_DUMMY))

    def irq_line(self, irq: int, level: bool) -> None:
        """Drive a GSI (an ISA IRQ reaches both the PIC and the IOAPIC pin of that number)."""
        self._ioctl_buf("KVM_IRQ_LINE", KvmIrqLevel(irq, int(level)))

    def get_irqchip(self, chip_id: int) -> bytes:
        chip = KvmIrqchip(chip_id=chip_id)
        self._ioctl_buf("KVM_GET_IRQCHIP", chip)
        return bytes(chip.chip)

    def set_irqchip(self, chip_id: int, data: bytes) -> None:
        chip = KvmIrqchip(chip_id=chip_id)
        ctypes.memmove(chip.chip, data, len(chip.chip))
        self._ioctl_buf("KVM_SET_IRQCHIP", chip)

    def get_pit2(self) -> bytes:
        p = KvmPitState2()
        self._ioctl_buf("KVM_GET_PIT2", p)
        return bytes(p)

    def set_pit2(self, data: bytes) -> None:
        self._ioctl_buf("KVM_SET_PIT2", KvmPitState2.from_buffer_copy(data))

    def get_clock(self) -> KvmClockData:
        c = KvmClockData()
        self._ioctl_buf("KVM_GET_CLOCK", c)
        return c

    def set_clock(self, clock_ns: int) -> None:
        """Set kvmclock to ``clock_ns`` (what ``KVM_GET_CLOCK`` said at the save)."""
        self._ioctl_buf("KVM_SET_CLOCK", KvmClockData(clock=clock_ns))

    def create_vcpu(self, index: int) -> VcpuFd:
        fd = self._ioctl_int("KVM_CREATE_VCPU", index)
        return VcpuFd(fd, index, self.kvm.vcpu_mmap_size())


@dataclass(frozen=True)
class IoExit:
    """A port I/O exit: for ``out`` the data is in ``data``; for ``in`` the VMM fills it."""

    port: int
    size: int
    count: int
    is_out: bool
    data_offset: int


class VcpuFd(_Fd):
    """A vCPU fd and its mmapped ``kvm_run`` page."""

    def __init__(self, fd: int, index: int, mmap_size: int) -> None:
        super().__init__(fd, f"vcpu{index}")
        self.index = index
        # The kvm_run page lives as long as this mmap object, which lives as long as self.
        self.run_map = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED,
                                 mmap.PROT_READ | mmap.PROT_WRITE)
        self.run = KvmRunHeader.from_buffer(self.run_map)
        self._run_req = IOCTLS["KVM_RUN"]

    def close(self) -> None:
        del self.run
        self.run_map.close()
        super().close()

    def run_once(self) -> int:
        """Enter the guest until the next exit; returns the exit reason.

        Runs without the GIL.  EINTR (a kick signal, or ``immediate_exit``) is reported as
        ``KVM_EXIT_INTR`` rather than as an error, because it is how pause works.
        """
        rc = self._libc.ioctl(self._fd, ctypes.c_ulong(self._run_req), ctypes.c_ulong(0))
        if rc < 0:
            err = ctypes.get_errno()
            if err in (errno.EINTR, errno.EAGAIN):
                return KVM_EXIT_INTR
            raise KvmError("KVM_RUN", err)
        return int(self.run.exit_reason)

    def io_exit(self) -> IoExit:
        io = self.run.io
        return IoExit(int(io.port), int(io.size), int(io.count),
                      io.direction == KVM_EXIT_IO_OUT, int(io.data_offset))

    def mmio_exit(self) -> KvmRunMmio:
        """The MMIO exit record (valid after ``KVM_EXIT_MMIO``); the VMM fills ``data``
        for a read."""
        view: KvmRunMmio = KvmRunMmioView.from_buffer(self.run_map).mmio
        return view

    def internal_error(self) -> tuple[int, tuple[int, ...]]:
        """``(suberror, data words)`` of a ``KVM_EXIT_INTERNAL_ERROR``."""
        ie = KvmRunInternalView.from_buffer(self.run_map).internal
        return int(ie.suberror), tuple(int(w) for w in ie.data[: min(int(ie.ndata), 16)])

    def set_immediate_exit(self, value: bool) -> None:
        self.run.immediate_exit = 1 if value else 0

    # --- register state: each method one ioctl -------------------------------------
    def get_regs(self) -> KvmRegs:
        r = KvmRegs()
        self._ioctl_buf("KVM_GET_REGS", r)
        return r

    def set_regs(self, regs: KvmRegs) -> None:
        self._ioctl_buf("KVM_SET_REGS", regs)

    def get_sregs(self) -> KvmSregs:
        s = KvmSregs()
        self._ioctl_buf("KVM_GET_SREGS", s)
        return s

    def set_sregs(self, sregs: KvmSregs) -> None:
        self._ioctl_buf("KVM_SET_SREGS", sregs)

    def get_fpu(self) -> KvmFpu:
        f = KvmFpu()
        self._ioctl_buf("KVM_GET_FPU", f)
        return f

    def set_fpu(self, fpu: KvmFpu) -> None:
        self._ioctl_buf("KVM_SET_FPU", fpu)

    def get_xcrs(self) -> KvmXcrs:
        x = KvmXcrs()
        self._ioctl_buf("KVM_GET_XCRS", x)
        return x

    def set_xcrs(self, xcrs: KvmXcrs) -> None:
        self._ioctl_buf("KVM_SET_XCRS", xcrs)

    def get_vcpu_events(self) -> KvmVcpuEvents:
        e = KvmVcpuEvents()
        self._ioctl_buf("KVM_GET_VCPU_EVENTS", e)
        return e

    def set_vcpu_events(self, events: KvmVcpuEvents) -> None:
        self._ioctl_buf("KVM_SET_VCPU_EVENTS", events)

    def get_mp_state(self) -> int:
        m = KvmMpState()
        self._ioctl_buf("KVM_GET_MP_STATE", m)
        return int(m.mp_state)

    def set_mp_state(self, state: int) -> None:
        self._ioctl_buf("KVM_SET_MP_STATE", KvmMpState(state))

    def get_lapic(self) -> bytes:
        lapic = KvmLapicState()
        self._ioctl_buf("KVM_GET_LAPIC", lapic)
        return bytes(lapic)

    def set_lapic(self, data: bytes) -> None:
        self._ioctl_buf("KVM_SET_LAPIC", KvmLapicState.from_buffer_copy(data))

    def get_debugregs(self) -> bytes:
        d = KvmDebugregs()
        self._ioctl_buf("KVM_GET_DEBUGREGS", d)
        return bytes(d)

    def set_debugregs(self, data: bytes) -> None:
        self._ioctl_buf("KVM_SET_DEBUGREGS", KvmDebugregs.from_buffer_copy(data))

    def get_xsave(self) -> bytes:
        x = KvmXsave()
        self._ioctl_buf("KVM_GET_XSAVE", x)
        return bytes(x)

    def set_xsave(self, data: bytes) -> None:
        self._ioctl_buf("KVM_SET_XSAVE", KvmXsave.from_buffer_copy(data))

    def nmi(self) -> None:
        """Queue an NMI for this vCPU (taken when it next runs)."""
        self._ioctl_int("KVM_NMI")

    def tsc_khz(self) -> int:
        return self._ioctl_int("KVM_GET_TSC_KHZ")

    def set_cpuid2(self, raw_cpuid2: bytes) -> None:
        self._ioctl_buf("KVM_SET_CPUID2", bytearray(raw_cpuid2))

    def get_msrs(self, indices: Iterable[int]) -> list[tuple[int, int]]:
        idx = list(indices)
        buf = _msr_buffer([(i, 0) for i in idx])
        n = self._msr_ioctl("KVM_GET_MSRS", buf)
        entries = (KvmMsrEntry * len(idx)).from_buffer(buf, ctypes.sizeof(KvmMsrsHeader))
        return [(int(e.index), int(e.data)) for e in entries[:n]]

    def set_msrs(self, msrs: Iterable[tuple[int, int]]) -> int:
        return self._msr_ioctl("KVM_SET_MSRS", _msr_buffer(list(msrs)))

    def _msr_ioctl(self, name: str, buf: bytearray) -> int:
        # KVM_{GET,SET}_MSRS return the number of MSRs processed.
        try:
            return int(fcntl.ioctl(self._fd, IOCTLS[name], buf, True))
        except OSError as e:
            raise KvmError(name, e.errno or errno.EIO) from None


def _msr_buffer(entries: list[tuple[int, int]]) -> bytearray:
    buf = bytearray(ctypes.sizeof(KvmMsrsHeader) + len(entries) * ctypes.sizeof(KvmMsrEntry))
    KvmMsrsHeader.from_buffer(buf).nmsrs = len(entries)
    arr = (KvmMsrEntry * len(entries)).from_buffer(buf, ctypes.sizeof(KvmMsrsHeader))
    for slot, (index, data) in zip(arr, entries, strict=True):
        slot.index, slot.data = index, data
    return buf
