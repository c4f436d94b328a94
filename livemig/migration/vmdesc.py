"""What the device sections of a stream hold, field by field (the VM description).

Theory of operation
-------------------
Each device section is one :class:`DevicePayload`: its section (name, id, version from
:mod:`~livemig.migration.handshake`), instance id, payload bytes, and the fields that
payload consists of.  The source builds the list once (:func:`device_payloads`), writes
the sections from it and, after EOF, the description of the same list
(:func:`describe`), so what is described is always what was sent.  The destination
compares the description it receives with the sections it loaded
(:func:`check_description`): same devices in the same order, each field list covering
its section exactly.

Field types follow QEMU's vmstate descriptions, so QEMU's ``analyze-migration.py``
shows every register and device field by name.  The section's own ``be32`` length is a
``uint32``.  Inside the payload, livemig's state formats are little-endian (the
kernel's structs); QEMU's description types read integers as big-endian, so
multi-byte little-endian values are described as ``buffer`` fields (shown as their
bytes in memory order) and single bytes as ``uint8``.

The layouts here mirror ``VcpuState.to_bytes`` and ``SerialState.to_bytes``: a change
of either format must change its describer, and :func:`describe` refuses a payload its
fields do not cover exactly (the tests save real state and check this).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from livemig.errors import LocalProtocolError, RemoteProtocolError
from livemig.kernel.layout import VCPU_STATE_LAYOUTS, FieldLayout
from livemig.migration import handshake as hs
from livemig.migration.handshake import Handshake, Section
from livemig.units import PAGE_SIZE
from livemig.vmm.serial import SerialState
from livemig.vmm.state import PlatformState, VcpuState, VmState
from livemig.wire import events as ev
from livemig.wire.vmdesc import (
    DeviceDescription,
    Field,
    VmDescription,
    described_size,
    field,
    struct_field,
)

_LENGTH = field("length", "uint32", 4)  # the FULL section's be32 payload length


@dataclass(frozen=True)
class DevicePayload:
    """One device section as sent: where it goes, its bytes, what they are."""

    section: Section
    instance_id: int
    data: bytes
    fields: tuple[Field, ...]


def capabilities_payload(handshake: Handshake) -> DevicePayload:
    data = handshake.encode()
    return DevicePayload(hs.CAPABILITIES, 0, data,
                         (field("capabilities", "buffer", len(data)),))


def device_payloads(state: VmState, runstate: str) -> list[DevicePayload]:
    """The run state the guest had before migration (QEMU's "globalstate"), each vCPU,
    the serial port, and the VM-wide devices (PIC, IOAPIC, PIT, kvmclock) when the VM has
    an irqchip: the device sections of the end of a stream, in order."""
    run = runstate.encode("ascii")
    out = [DevicePayload(hs.GLOBALSTATE, 0, run, (field("runstate", "buffer", len(run)),))]
    for i, cpu in enumerate(state.vcpus):
        out.append(DevicePayload(hs.cpu_section(i), i, cpu.to_bytes(), _cpu_fields(cpu)))
    out.append(DevicePayload(hs.SERIAL, 0, state.serial.to_bytes(),
                             _serial_fields(state.serial)))
    if state.platform is not None:
        out.append(DevicePayload(hs.PLATFORM, 0, state.platform.to_bytes(),
                                 _platform_fields()))
    return out


def describe(payloads: Sequence[DevicePayload]) -> VmDescription:
    """The description of ``payloads``; refuses one whose fields miss a byte."""
    devices = []
    for p in payloads:
        if described_size(p.fields) != len(p.data):
            raise LocalProtocolError(
                f"the description of {p.section.name} covers {described_size(p.fields)} "
                f"bytes of its {len(p.data)}: its state format changed without it")
        devices.append(DeviceDescription(p.section.name, p.instance_id, p.section.version,
                                         (_LENGTH, *p.fields),
                                         p.section.name.removeprefix("livemig/")))
    return VmDescription(PAGE_SIZE, tuple(devices))


def check_description(desc: VmDescription, loaded: Sequence[ev.DeviceState]) -> None:
    """The description must list exactly the device sections loaded, in stream order,
    each with fields covering its whole section."""
    if desc.page_size != PAGE_SIZE:
        raise RemoteProtocolError(f"the VM description has page size {desc.page_size}, "
                                  f"not {PAGE_SIZE}")
    described = [(d.name, d.instance_id, d.version, d.size) for d in desc.devices]
    sent = [(e.idstr, e.instance_id, e.version_id, 4 + len(e.data)) for e in loaded]
    if described != sent:
        raise RemoteProtocolError(
            "the VM description does not match the stream's device sections: it lists "
            f"{described}, the stream had {sent} (name, instance, version, bytes)")


def _cpu_fields(cpu: VcpuState) -> tuple[Field, ...]:
    """VcpuState.to_bytes: header, each register group with its length, MSRs, MP state."""
    out: list[Field] = [field("magic", "buffer", 4), field("version", "buffer", 2),
                        field("halted", "bool", 1)]
    for name in VcpuState.SIZES:
        blob: bytes = getattr(cpu, name)
        out.append(field(f"{name}_size", "buffer", 4))
        if blob:
            out.append(struct_field(name, f"kvm_{name}", _layout(VCPU_STATE_LAYOUTS[name])))
    out.append(field("nmsrs", "buffer", 4))
    if cpu.msrs:
        msr = (field("index", "buffer", 4), field("value", "buffer", 8))
        out.append(struct_field("msrs", "msr", msr, count=len(cpu.msrs)))
    out.append(field("mp_state", "buffer", 4))
    return tuple(out)


def _layout(layout: Sequence[FieldLayout]) -> list[Field]:
    out: list[Field] = []
    for f in layout:
        if f.fields:
            out.append(struct_field(f.name, f.struct_name, _layout(f.fields), count=f.count))
        elif f.size == 1:
            out.append(field(f.name, "uint8", 1, count=f.count))
        else:
            out.append(field(f.name, "buffer", f.size, count=f.count))
    return out


def _platform_fields() -> tuple[Field, ...]:
    """PlatformState.to_bytes: magic, version (le16), kvmclock (le64 ns), then each VM-wide
    device's kernel state."""
    devices = [field(name, "buffer", size) for name, size in PlatformState.SIZES.items()]
    return (field("magic", "buffer", 4), field("version", "buffer", 2),
            field("clock_ns", "buffer", 8), *devices)


def _serial_fields(serial: SerialState) -> tuple[Field, ...]:
    """SerialState.to_bytes: magic, version (le16), one byte per register, the pending
    THR-empty interrupt, the receive FIFO's length (le16) and bytes."""
    regs = [field(name, "uint8", 1) for name in ("ier", "lcr", "mcr", "scr", "dll", "dlm")]
    out: list[Field] = [field("magic", "buffer", 4), field("version", "buffer", 2), *regs,
                        field("thre_pending", "bool", 1), field("rx_length", "buffer", 2)]
    if serial.rx:
        out.append(field("rx", "buffer", len(serial.rx)))
    return tuple(out)
