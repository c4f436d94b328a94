"""The CPU and device state of a VM as a versioned, typed object.

Theory of operation
-------------------
:class:`VcpuState` holds everything KVM needs to resume a vCPU where it stopped: general
and special registers, FPU, XCRs, vCPU events, MP state and the MSRs a guest uses.  The
register groups are kept as the kernel's own struct bytes (their layout is the x86_64
KVM ABI, checked by size on restore), MSRs as (index, value) pairs.  ``halted`` records
that the vCPU executed HLT with no interrupt source (livemig has no irqchip), so a halted
guest stays halted on the destination.

:class:`VmState` combines the vCPUs and the serial port; the migration stream carries
each as an opaque FULL section payload (``to_bytes``).  Decoding validates magic,
version and every length, and raises :class:`RemoteProtocolError` on anything else.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from livemig.errors import RemoteProtocolError
from livemig.kernel.kvm import VCPU_STATE_SIZES
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

    MAGIC = b"LMCP"
    VERSION = 1
    # The register groups in stream order, each the size of its kernel struct.
    SIZES = {name: VCPU_STATE_SIZES[name] for name in ("regs", "sregs", "fpu", "xcrs", "events")}

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
            if n != size and not (name == "xcrs" and n == 0):
                raise RemoteProtocolError(f"cpu state field {name} is {n} bytes, not {size}")
            blobs[name] = r.take(n)
        (nmsrs,) = r.unpack(_COUNT)
        if nmsrs > MAX_MSRS:
            raise RemoteProtocolError(f"cpu state has {nmsrs} MSRs (limit {MAX_MSRS})")
        msrs = tuple(r.unpack(_MSR) for _ in range(nmsrs))
        (mp_state,) = r.unpack(_COUNT)
        r.finish()
        return cls(msrs=msrs, mp_state=mp_state, halted=bool(halted), **blobs)


@dataclass(frozen=True)
class VmState:
    """Everything but RAM: what the stop-and-copy phase sends after the last pages."""

    vcpus: tuple[VcpuState, ...]
    serial: SerialState


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
