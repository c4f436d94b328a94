"""The CPU and device state of a VM as a versioned, typed object.

Theory of operation
-------------------
:class:`VcpuState` holds everything KVM needs to resume a vCPU where it stopped: general
and special registers, FPU and the XSAVE area with the XCRs, debug registers, the local
APIC, the MSRs, the pending events (exception, interrupt, NMI, SIPI) and the MP state
(running, halted, waiting for SIPI).  The register groups are kept as the kernel's own
struct bytes (their layout is the x86_64 KVM ABI, checked by size on decode), MSRs as
(index, value) pairs in the order the VM chose them (see ``Vm.msr_indices``).
``halted`` records that a vCPU without the in-kernel irqchip executed HLT: nothing can
wake it, so it stays halted on the destination.  Fields a VM does not have (no XCRs, no
local APIC without the irqchip) are empty.

:class:`PlatformState` is the VM-wide part of KVM: the two PICs and the IOAPIC as
``KVM_GET_IRQCHIP`` returns them, the PIT (``KVM_GET_PIT2``) and kvmclock
(``KVM_GET_CLOCK``: the guest's clock in ns when the VM stopped).

:class:`VmState` combines the vCPUs, the serial port and the platform.  The migration
stream carries each part as an opaque FULL section payload (``to_bytes``).  Decoding
validates magic, version and every length, and raises :class:`RemoteProtocolError` on
anything else; a vCPU's fields are range-checked too (``livemig.vmm.cpucheck``: a
:class:`~livemig.errors.CpuStateError` names the field out of range).

The restore order (``Vm.restore_state``) follows Firecracker and QEMU: CPUID was set when
the vCPU was created; then the irqchips and the PIT; per vCPU sregs (the mode) before
regs, XSAVE and XCRs, debug registers, the local APIC before the MSRs (the TSC deadline
MSR needs the APIC's timer mode) and before the events, MP state, the events last; then
the serial port, which re-drives its interrupt line into the restored IOAPIC; kvmclock
last, right before the vCPUs run.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, ClassVar

from livemig.errors import RemoteProtocolError
from livemig.kernel.kvm import VCPU_STATE_SIZES
from livemig.vmm.cpucheck import check_vcpu_state
from livemig.vmm.serial import SerialState

_HEADER = struct.Struct("<4sHB")  # magic, version, halted
_MSR = struct.Struct("<IQ")
_COUNT = struct.Struct("<I")
MAX_MSRS = 1024


@dataclass(frozen=True)
class VcpuState:
    """One vCPU's architectural state (kernel struct bytes + MSRs)."""

    regs: bytes
    sregs: bytes
    fpu: bytes
    xcrs: bytes  # empty when the host has no XCRs
    events: bytes
    msrs: tuple[tuple[int, int], ...]
    mp_state: int
    halted: bool = False
    xsave: bytes = b""  # empty when the host has no XSAVE
    debugregs: bytes = b""
    lapic: bytes = b""  # empty without the in-kernel irqchip

    MAGIC: ClassVar[bytes] = b"LMCP"
    VERSION: ClassVar[int] = 2
    # field -> size in bytes (each a kernel struct's); the ones in OPTIONAL may be empty
    SIZES: ClassVar[dict[str, int]] = {
        name: VCPU_STATE_SIZES[name]
        for name in ("regs", "sregs", "fpu", "xcrs", "events", "xsave", "debugregs", "lapic")}
    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"xcrs", "xsave", "debugregs", "lapic"})

    def to_bytes(self) -> bytes:
        parts = [_HEADER.pack(self.MAGIC, self.VERSION, int(self.halted))]
        for name in self.SIZES:
            blob: bytes = getattr(self, name)
            parts += [_COUNT.pack(len(blob)), blob]
        parts.append(_COUNT.pack(len(self.msrs)))
        parts += [_MSR.pack(i, v) for i, v in self.msrs]
        parts.append(_COUNT.pack(self.mp_state))
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes) -> VcpuState:
        r = _Reader(data, "cpu state")
        magic, version, halted = r.unpack(_HEADER)
        if magic != cls.MAGIC or version != cls.VERSION:
            raise RemoteProtocolError(f"unknown cpu state {magic!r} version {version}")
        blobs: dict[str, bytes] = {}
        for name, size in cls.SIZES.items():
            (n,) = r.unpack(_COUNT)
            if n != size and not (name in cls.OPTIONAL and n == 0):
                raise RemoteProtocolError(f"cpu state field {name} is {n} bytes, not {size}")
            blobs[name] = r.take(n)
        (nmsrs,) = r.unpack(_COUNT)
        if nmsrs > MAX_MSRS:
            raise RemoteProtocolError(f"cpu state has {nmsrs} MSRs (limit {MAX_MSRS})")
        msrs = tuple(r.unpack(_MSR) for _ in range(nmsrs))
        (mp_state,) = r.unpack(_COUNT)
        r.finish()
        state = cls(msrs=msrs, mp_state=mp_state, halted=bool(halted), **blobs)
        check_vcpu_state(state)
        return state


@dataclass(frozen=True)
class PlatformState:
    """The VM-wide KVM devices: PIC master and slave, IOAPIC, PIT, kvmclock."""

    pic_master: bytes
    pic_slave: bytes
    ioapic: bytes
    pit: bytes
    clock_ns: int

    MAGIC: ClassVar[bytes] = b"LMPL"
    VERSION: ClassVar[int] = 1
    SIZES: ClassVar[dict[str, int]] = {"pic_master": 512, "pic_slave": 512, "ioapic": 512,
                                       "pit": 112}
    _HEAD: ClassVar[struct.Struct] = struct.Struct("<4sHQ")

    def to_bytes(self) -> bytes:
        return self._HEAD.pack(self.MAGIC, self.VERSION, self.clock_ns) + b"".join(
            getattr(self, name) for name in self.SIZES)

    @classmethod
    def from_bytes(cls, data: bytes) -> PlatformState:
        r = _Reader(data, "platform state")
        magic, version, clock_ns = r.unpack(cls._HEAD)
        if magic != cls.MAGIC or version != cls.VERSION:
            raise RemoteProtocolError(f"unknown platform state {magic!r} version {version}")
        blobs = {name: r.take(size) for name, size in cls.SIZES.items()}
        r.finish()
        return cls(clock_ns=clock_ns, **blobs)


@dataclass(frozen=True)
class VmState:
    """Everything but RAM: what the stop-and-copy phase sends after the last pages.

    ``platform`` is None for a VM without the in-kernel irqchip.
    """

    vcpus: tuple[VcpuState, ...]
    serial: SerialState
    platform: PlatformState | None = None


class _Reader:
    def __init__(self, data: bytes, what: str) -> None:
        self.data, self.pos, self.what = data, 0, what

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise RemoteProtocolError(f"{self.what} truncated at byte {self.pos}")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, s: struct.Struct) -> tuple[Any, ...]:
        return tuple(s.unpack(self.take(s.size)))

    def finish(self) -> None:
        if self.pos != len(self.data):
            raise RemoteProtocolError(f"{self.what} has {len(self.data) - self.pos} "
                                      "trailing bytes")
