"""The os guest's parameter block, the multiboot loader's placements, per-vCPU CPUID,
and the versioned state records (pure Python: no KVM)."""

from __future__ import annotations

import io
import os
import struct
import time

import pytest

from livemig.errors import ConfigError, RemoteProtocolError
from livemig.guests.os import LOAD_ADDRESS, PARAMS_OFFSET, OsParams, Pattern, load_os_image
from livemig.kernel.mman import MIB
from livemig.vmm import cpuid
from livemig.vmm.console import StdioConsole, open_console
from livemig.vmm.multiboot import BOOT_MAGIC, INFO_ADDR, MultibootImage
from livemig.vmm.serial import Serial, SerialState
from livemig.vmm.state import PlatformState


def test_os_params_patched_into_the_image_read_back_equal() -> None:
    params = OsParams(ncpus=4, private_pages=128, shared_pages=64, pattern=Pattern.SCATTERED,
                      rate=3, hz=250)
    image = params.patch(load_os_image())
    assert OsParams.unpack(image[PARAMS_OFFSET:]) == params
    assert len(image) == len(load_os_image())


@pytest.mark.parametrize("bad", [OsParams(ncpus=0), OsParams(ncpus=17),
                                 OsParams(private_pages=3, pattern=Pattern.SCATTERED),
                                 OsParams(hot_pages=0, pattern=Pattern.HOT),
                                 OsParams(shared_pages=0)])
def test_os_params_the_guest_would_reject_are_refused(bad: OsParams) -> None:
    with pytest.raises(ConfigError):
        bad.patch(load_os_image())


def test_os_params_for_ram_fit_the_ram() -> None:
    params = OsParams.for_ram(64 * MIB, 4)
    params.validate(64 * MIB)
    assert params.work_end <= 64 * MIB
    with pytest.raises(ConfigError, match="beyond"):
        OsParams(private_pages=1 << 16).validate(64 * MIB)


def test_multiboot_loader_places_image_bss_and_info_block() -> None:
    image = MultibootImage.parse(load_os_image())
    placed = dict(image.placements(64 * MIB, b"quiet"))
    assert placed[LOAD_ADDRESS][:4] == struct.pack("<I", 0x1BADB002)
    flags, mem_lower, mem_upper = struct.unpack_from("<3I", placed[INFO_ADDR])
    assert (flags & 5, mem_lower, mem_upper) == (5, 640, 63 * 1024)
    assert placed[INFO_ADDR].endswith(b"quiet\0")
    assert image.entry_regs().rax == BOOT_MAGIC
    assert image.bss_end_addr > LOAD_ADDRESS + len(load_os_image())


@pytest.mark.parametrize("data,match", [(b"\0" * 64, "no multiboot header"),
                                        (struct.pack("<3I", 0x1BADB002, 0,
                                                     (-0x1BADB002) & 0xFFFFFFFF) + bytes(32),
                                         "flag 16")])
def test_multiboot_loader_refuses_images_it_cannot_load(data: bytes, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        MultibootImage.parse(data)


def _supported() -> bytes:
    leaves = [cpuid.CpuidEntry(1, 0, 0, 0, 0x00010800, 1 << 23, 0),
              cpuid.CpuidEntry(0xB, 0, 1, 0, 0, 0, 0)]
    return cpuid.encode(leaves)


def test_each_vcpu_gets_its_own_apic_id_and_hidden_features_are_cleared() -> None:
    table = cpuid.CpuidPolicy(frozenset({"popcnt"})).table_for(_supported(), 3, 4)
    leaf1 = cpuid.lookup(table, 1)
    leaf_b = cpuid.lookup(table, 0xB)
    assert leaf1 is not None and leaf_b is not None
    assert leaf1.ebx >> 24 == 3 and (leaf1.ebx >> 16) & 0xFF == 4
    assert leaf_b.edx == 3
    assert not leaf1.ecx & (1 << 23)


def test_unknown_cpuid_feature_names_are_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown CPUID"):
        cpuid.CpuidPolicy(frozenset({"warp-drive"})).validate()


def test_serial_state_with_pending_input_round_trips() -> None:
    state = SerialState(ier=1, lcr=3, mcr=0xB, thre_pending=True, rx=b"abc")
    assert SerialState.from_bytes(state.to_bytes()) == state
    with pytest.raises(RemoteProtocolError):
        SerialState.from_bytes(state.to_bytes()[:-1])


def test_serial_raises_its_line_while_enabled_input_waits() -> None:
    levels: list[bool] = []
    uart = Serial(irq=levels.append)
    uart.feed(b"x")
    assert levels == []  # IER off: no interrupt
    uart.write(0x3F9, 0x01)  # IER: received data available
    assert levels == [True]
    assert uart.read(0x3FA) == 0x04  # IIR: received data
    assert uart.read(0x3F8) == ord("x")
    assert levels == [True, False]


def test_platform_state_round_trips_and_rejects_truncation() -> None:
    p = PlatformState(bytes(512), bytes([1]) * 512, bytes([2]) * 512, bytes(112), 123456789)
    assert PlatformState.from_bytes(p.to_bytes()) == p
    with pytest.raises(RemoteProtocolError):
        PlatformState.from_bytes(p.to_bytes()[:-1])


def test_stdio_console_feeds_input_to_the_uart_and_prints_its_output() -> None:
    r, w = os.pipe()
    out = io.BytesIO()
    uart = Serial()
    with os.fdopen(r, "rb") as stdin:
        console = StdioConsole(stdin, out)
        console.attach(uart)
        os.write(w, b"hi")
        deadline = time.monotonic() + 5
        while not uart.read(0x3FD) & 0x01:  # LSR: data ready
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert bytes([uart.read(0x3F8), uart.read(0x3F8)]) == b"hi"
        console.write(b"ok")
        assert out.getvalue() == b"ok"
        console.close()
        os.close(w)


def test_console_spec_must_be_stdio_or_a_unix_socket() -> None:
    with pytest.raises(ConfigError, match="stdio or unix"):
        open_console("tcp:1234")
