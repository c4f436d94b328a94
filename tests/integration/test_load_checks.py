"""The destination checks what a stream restores: every page, each device section once
with its own section id, instance id and version, a valid run state, the VM description.

A test peer writes streams with livemig's own encoder (so everything else in them is
valid: the control case completes) into a real destination's socket, with one defect
each.  Each must fail the incoming migration with a message that names the defect,
without starting the guest.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from helpers import MEM, client, empty_instance, free_tcp_port, qmp_path, status, wait_migration

from livemig.migration import handshake as hs
from livemig.migration.handshake import Handshake, Section
from livemig.migration.source import device_sections
from livemig.migration.vmdesc import DevicePayload, capabilities_payload, describe, device_payloads
from livemig.units import PAGE_SIZE
from livemig.vmm.state import VmState
from livemig.wire.blocks import BlockInfo
from livemig.wire.encoder import Encoder
from livemig.wire.vmdesc import VmDescription

pytestmark = pytest.mark.kvm

TABLE = {"pc.ram": BlockInfo(MEM, PAGE_SIZE)}
ALL_PAGES = np.arange(MEM // PAGE_SIZE, dtype=np.uint64) * PAGE_SIZE
Devices = Callable[[list[DevicePayload]], list[DevicePayload]]


def stream(state: VmState, *, devices: Devices = lambda d: d,
           pages: np.ndarray = ALL_PAGES, vmdesc: bool = True,
           description: Callable[[VmDescription], VmDescription] | None = None) -> bytes:
    """A precopy stream of ``state`` (every page zero unless ``pages`` says otherwise)."""
    enc = Encoder()
    caps = capabilities_payload(Handshake(vmdesc=vmdesc))
    devs = devices(device_payloads(state, "paused"))
    out: list[bytes | memoryview] = [enc.preamble(), *device_sections(enc, [caps])]
    out += [enc.ram_start(hs.RAM.section_id), enc.mem_size(TABLE), enc.close_ram_section()]
    out += [enc.ram_end(hs.RAM.section_id), enc.zero_pages("pc.ram", pages),
            enc.close_ram_section()]
    out += device_sections(enc, devs)
    out.append(enc.eof())
    if vmdesc:
        desc = describe([caps, *devs])
        out.append(enc.vm_description(description(desc) if description else desc))
    return b"".join(out)


def with_section(name: str, change: Callable[[DevicePayload], DevicePayload]) -> Devices:
    return lambda devs: [change(d) if d.section.name == name else d for d in devs]


def retargeted(d: DevicePayload, **changes: int) -> DevicePayload:
    return replace(d, section=Section(d.section.name, changes.get("section_id",
                                      d.section.section_id), changes.get("version",
                                      d.section.version)),
                   instance_id=changes.get("instance_id", d.instance_id))


def run_state(text: bytes) -> Devices:
    return with_section(hs.GLOBALSTATE.name, lambda d: replace(d, data=text))


CASES: dict[str, tuple[dict[str, object], str]] = {
    "cpu section of another version": (
        {"devices": with_section(hs.CPU_NAME, lambda d: retargeted(d, version=2))},
        "version 2; expected section id 1 version 1"),
    "serial section of another version": (
        {"devices": with_section(hs.SERIAL.name, lambda d: retargeted(d, version=7))},
        "version 7"),
    "cpu of a vCPU this VM lacks": (
        {"devices": with_section(hs.CPU_NAME, lambda d: retargeted(
            d, instance_id=3, section_id=hs.cpu_section(3).section_id))},
        "instance id 3"),
    "cpu under another section id": (
        {"devices": with_section(hs.CPU_NAME, lambda d: retargeted(d, section_id=9))},
        "section id 9"),
    "serial section twice": (
        {"devices": lambda devs: [*devs, devs[-1]]},
        "arrives twice"),
    "unknown run state": ({"devices": run_state(b"flying")}, "unknown run state"),
    "run state not ASCII": ({"devices": run_state(b"paus\xe9d")}, "unknown run state"),
    "pages missing": ({"pages": ALL_PAGES[: len(ALL_PAGES) // 2]},
                      f"without {MEM // PAGE_SIZE // 2} pages of RAM block 'pc.ram' "
                      f"(the first at offset {MEM // 2:#x})"),
    "one page missing in the middle": (
        {"pages": np.delete(ALL_PAGES, 100)}, "without 1 pages of RAM block 'pc.ram' "
                                              "(the first at offset 0x64000)"),
    "VM description announced but absent": (
        {"vmdesc_bytes": False},
        "without the VM description it announced"),
    "VM description of other sections": (
        {"description": lambda d: replace(d, devices=d.devices[:-1])}, "does not match"),
    "VM description with another page size": (
        {"description": lambda d: replace(d, page_size=8192)}, "page size 8192"),
}


def feed(tmp_path: Path, make: Callable[[VmState], bytes]) -> tuple[dict[str, object], str]:
    port = free_tcp_port()
    with empty_instance(tmp_path) as dst, client(qmp_path(dst)) as d:
        data = make(dst.vm.save_state())
        d.execute("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as peer:
            peer.sendall(data)
            peer.shutdown(socket.SHUT_WR)  # a stream that stops short ends here
            info = wait_migration(d, 20)
        return info, status(d)


def test_a_complete_stream_loads(tmp_path: Path) -> None:
    """The control: the same peer without a defect completes."""
    info, _ = feed(tmp_path, stream)
    assert info["status"] == "completed", info


@pytest.mark.parametrize("what", list(CASES))
def test_a_defective_stream_fails_the_load_and_says_why(tmp_path: Path, what: str) -> None:
    opts, says = CASES[what]

    def make(state: VmState) -> bytes:
        kw = {k: v for k, v in opts.items() if k != "vmdesc_bytes"}
        data = stream(state, **kw)  # type: ignore[arg-type]
        if opts.get("vmdesc_bytes") is False:  # announced, then not sent
            return _strip_description(data)
        return data

    info, run = feed(tmp_path, make)
    assert info["status"] == "failed", info
    assert says in str(info.get("error-desc")), info
    assert run != "running"


def _strip_description(data: bytes) -> bytes:
    start = data.index(b'{"page_size"') - 5
    assert data[start] == 0x06
    return data[:start]
