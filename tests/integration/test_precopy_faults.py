"""Precopy under faults: the destination dies, the user cancels, the stream is corrupt,
truncated or hostile, nobody listens, QMP input is wrong.

The rules checked are QEMU's: a precopy that fails or is cancelled leaves the source VM
exactly as it was (running, dirty logging off, memory intact) so it can migrate again;
a destination that receives a bad stream reports ``failed`` with an ``error-desc``,
never starts the guest, and writes nothing into guest RAM from records it refuses.
"""

from __future__ import annotations

import asyncio
import logging
import logging.handlers
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    EVENTS_ON,
    FAST_CONVERGENCE,
    MEM,
    ab_instance,
    canary_pages,
    client,
    collect_events,
    dirty_logging_off,
    empty_instance,
    fill_with_canary,
    free_tcp_port,
    guest_check,
    halt_instance,
    livemig_process,
    migration_statuses,
    nonzero_bytes,
    qmp_path,
    status,
    wait_migration,
    wait_until,
)
from qemu.qmp import ExecuteError, QMPClient

from livemig.control.client import QmpClient
from livemig.errors import QmpError
from livemig.instance import Instance
from livemig.migration.channel import IMAGE_TRAILER, image_trailer
from livemig.units import MIB, PAGE_SIZE
from livemig.vmm.vm import RunState, Vm, VmConfig

pytestmark = pytest.mark.kvm


def assert_source_intact(inst: Instance, qmp: QmpClient) -> None:
    """QEMU's promise after a failed or cancelled precopy: the guest runs on, unharmed."""
    assert status(qmp) == "running"
    assert dirty_logging_off(inst.vm)
    assert inst.vm.serial.wait_for(2, timeout=60), inst.vm.serial.output
    assert b"E" not in inst.vm.serial.output
    check = guest_check(qmp)
    assert check["bad_pages"] == 0, check
    qmp.execute("cont")


# --- (a) the destination process is killed mid-stream ----------------------------------

def test_source_survives_a_killed_destination_and_migrates_again(tmp_path: Path) -> None:
    port = free_tcp_port()
    uri = f"tcp:127.0.0.1:{port}"
    with ab_instance(tmp_path, mem=64 * MIB) as src, client(qmp_path(src)) as s:
        s.execute("migrate-set-capabilities", capabilities=EVENTS_ON)
        with livemig_process(tmp_path, "dst1",
                             ["--incoming", uri, "--mem", "64M"]) as dst:
            wait_migration(dst.qmp, 30, until=("setup",))  # listening
            # 64 MiB at 16 MiB/s: the first round alone lasts about 4 s.
            s.execute("migrate-set-parameters", **{"max-bandwidth": 16 * MIB})
            s.execute("migrate", uri=uri)
            wait_migration(dst.qmp, 30, until=("active",))  # connected, receiving
            time.sleep(0.5)
            assert s.execute("query-migrate")["status"] == "active"
            dst.kill()
        info = wait_migration(s, 30)
        assert info["status"] == "failed", info
        assert info.get("error-desc")
        events = collect_events(s, lambda ev: "failed" in migration_statuses(ev))
        assert migration_statuses(events) == ["setup", "active", "failed"]
        assert_source_intact(src, s)

        # The same source migrates to a new destination.
        uri = f"tcp:127.0.0.1:{free_tcp_port()}"
        with livemig_process(tmp_path, "dst2", ["--incoming", uri, "--mem", "64M"]) as dst:
            wait_migration(dst.qmp, 30, until=("setup",))
            s.execute("migrate-set-parameters", **{"max-bandwidth": 0, **FAST_CONVERGENCE})
            s.execute("migrate", uri=uri)
            assert wait_migration(s)["status"] == "completed"
            assert wait_migration(dst.qmp)["status"] == "completed"
            assert dst.wait_serial(3), dst.serial()[-80:]
            assert guest_check(dst.qmp)["bad_pages"] == 0


# --- (b) migrate_cancel ---------------------------------------------------------------------

def test_cancel_during_precopy_keeps_the_source_running(tmp_path: Path) -> None:
    with ab_instance(tmp_path) as src, empty_instance(tmp_path) as dst, \
            client(qmp_path(src)) as s, client(qmp_path(dst)) as d:
        s.execute("migrate-set-capabilities", capabilities=EVENTS_ON)
        s.execute("migrate-set-parameters", **{"max-bandwidth": 8 * MIB})
        uri = f"unix:{tmp_path / 'mig.sock'}"
        d.execute("migrate-incoming", uri=uri)
        s.execute("migrate", uri=uri)
        wait_migration(s, until=("active",))
        time.sleep(0.3)
        with pytest.raises(QmpError, match="in progress"):
            s.execute("migrate", uri=uri)  # one migration at a time; the session goes on
        s.execute("migrate_cancel")
        info = wait_migration(s, 10)
        assert info["status"] == "cancelled", info
        events = collect_events(s, lambda ev: "cancelled" in migration_statuses(ev))
        assert migration_statuses(events) == ["setup", "active", "cancelling", "cancelled"]
        s.execute("migrate_cancel")  # nothing to cancel: not an error (QEMU)
        assert_source_intact(src, s)
        # The destination sees the stream end early: it fails and does not start.
        assert wait_migration(d, 10)["status"] == "failed"
        assert status(d) != "running"


def test_quitting_a_source_in_precopy_stops_its_migration_and_releases_its_vm(
        tmp_path: Path) -> None:
    with ab_instance(tmp_path) as src, empty_instance(tmp_path) as dst, \
            client(qmp_path(dst)) as d:
        uri = f"unix:{tmp_path / 'mig.sock'}"
        d.execute("migrate-incoming", uri=uri)
        with client(qmp_path(src)) as s:
            s.execute("migrate-set-parameters", **{"max-bandwidth": 8 * MIB})
            s.execute("migrate", uri=uri)
            wait_migration(s, until=("active",))
        src.close()  # what `quit` (or SIGTERM) does in `livemig run`: must unmap guest RAM
        assert src.vm.runstate is RunState.SHUTDOWN
        assert src.outgoing is not None and src.outgoing.status.status.finished
        assert wait_migration(d, 10)["status"] == "failed"


def test_cancel_while_the_destination_does_not_read(tmp_path: Path) -> None:
    # A peer that accepts and never reads: the source blocks in sendmsg once the socket
    # buffers are full, and cancel must still get it out at once.
    with socket.create_server(("127.0.0.1", 0)) as server, \
            ab_instance(tmp_path) as src, client(qmp_path(src)) as s:
        uri = f"tcp:127.0.0.1:{server.getsockname()[1]}"
        server.settimeout(10)
        s.execute("migrate", uri=uri)
        conn, _ = server.accept()
        with conn:
            wait_migration(s, until=("active",))
            time.sleep(0.5)
            assert s.execute("query-migrate")["status"] == "active"
            s.execute("migrate_cancel")
            assert wait_migration(s, 10)["status"] == "cancelled"
        assert_source_intact(src, s)


# --- (c) corrupted and truncated streams from a file -----------------------------------

@pytest.fixture(scope="module")
def good_stream(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A complete stream of a paused 32 MiB VM: preamble, ram START (MEM_SIZE), PART and
    END sections with ZERO and PAGE records, CPU and serial FULL sections, EOF."""
    tmp = tmp_path_factory.mktemp("stream")
    with halt_instance(tmp) as src, client(qmp_path(src)) as s:
        s.execute("stop")
        s.execute("migrate", uri=f"file:{tmp / 'good.stream'}")
        assert wait_migration(s)["status"] == "completed"
    image = (tmp / "good.stream").read_bytes()
    assert image[:-IMAGE_TRAILER] + image_trailer(zlib.crc32(image[:-IMAGE_TRAILER])) == image
    return image[:-IMAGE_TRAILER]  # the stream; load_stream seals what it loads


def sealed(stream: bytes) -> bytes:
    """``stream`` as a file: image with a valid checksum: the decoder must find what is
    wrong with it (the checksum alone would refuse any change)."""
    return stream + image_trailer(zlib.crc32(stream))


def _landmarks(stream: bytes) -> dict[str, int]:
    """Offsets of bytes whose change the destination must detect (see docs/STREAM.md):
    framing and names, never page payloads or opaque device state, which have no
    checksum (in QEMU neither)."""
    block = stream.index(b"\x06pc.ram")  # first: in MEM_SIZE
    first_record = stream.index(b"\x06pc.ram", block + 1) - 1  # flags of the first page
    cpu = stream.index(b"livemig/cpu")
    serial = stream.index(b"livemig/serial")
    caps = stream.index(b"livemig/capabilities")
    ram_start = stream.index(b"\x03ram") - 5
    assert stream[:4] == b"QEVM" and stream[20] == 0x04 and stream[ram_start] == 0x01
    desc = stream.index(b'{"page_size"')  # the VM description's JSON, after EOF
    eof = desc - 6
    assert stream[eof : eof + 2] == b"\x00\x06"
    return {
        "magic": 0, "version": 7, "configuration": 8, "machine name": 13,
        "capabilities FULL": 20, "capabilities idstr": caps + 2,
        "ram START": ram_start, "ram idstr": ram_start + 6,
        "MEM_SIZE total": block - 4, "block name": block + 1,
        "record flags": first_record, "cpu idstr": cpu + 2,
        "cpu state length": cpu + len("livemig/cpu") + 8, "serial idstr": serial + 9,
        "FULL byte": cpu - 6, "EOF": eof, "VM description marker": eof + 1,
        "VM description length": eof + 5, "VM description": desc,
        "VM description device name": stream.index(b'"livemig/serial"', desc) + 9,
    }


def _corrupted(stream: bytes) -> Iterator[tuple[str, bytes]]:
    for name, pos in _landmarks(stream).items():
        flipped = bytearray(stream)
        flipped[pos] ^= 0x40 if name == "record flags" else 0xFF
        yield f"flip {name}", bytes(flipped)
    n = len(stream)
    for cut in (0, 3, 19, 40, 74, 90, n // 2, n - 30, n - 6, n - 1):
        yield f"cut at {cut}", stream[:cut]


def load_stream(tmp_path: Path, data: bytes) -> tuple[dict[str, Any], Instance, list[str]]:
    """Feed ``data`` to a fresh destination over QMP; returns its query-migrate,
    the instance (still open: the caller checks it) and the VM events it emitted."""
    path = tmp_path / "replay.stream"
    path.write_bytes(sealed(data))
    inst = Instance(_fresh_vm(), str(tmp_path / "dst.qmp"))
    vm_events: list[str] = []
    inst.vm.add_listener(lambda event, _data: vm_events.append(event))
    with client(qmp_path(inst)) as d:
        d.execute("migrate-incoming", uri=f"file:{path}")
        return wait_migration(d, 30), inst, vm_events


def _fresh_vm() -> Vm:
    return Vm(VmConfig(MEM))


def test_intact_stream_loads(tmp_path: Path, good_stream: bytes) -> None:
    """The control: the same replay with the stream untouched completes; the VM was
    paused when it was saved, so it stays paused (QEMU's globalstate rule)."""
    info, inst, vm_events = load_stream(tmp_path, good_stream)
    try:
        assert info["status"] == "completed", info
        assert "RESUME" not in vm_events
        assert inst.vm.runstate.value == "paused"
    finally:
        inst.close()


def test_corrupt_or_truncated_stream_fails_without_starting_the_guest(
        tmp_path: Path, good_stream: bytes) -> None:
    for what, data in _corrupted(good_stream):
        info, inst, vm_events = load_stream(tmp_path, data)
        try:
            assert info["status"] == "failed", (what, info)
            assert info.get("error-desc"), (what, info)
            assert "RESUME" not in vm_events, what
            assert inst.vm.runstate is not RunState.RUNNING, what
            with client(qmp_path(inst)) as d:  # the monitor still serves
                assert status(d) != "running", what
        finally:
            inst.close()


def load_image(tmp_path: Path, image: bytes) -> dict[str, Any]:
    path = tmp_path / "image.mig"
    path.write_bytes(image)
    with empty_instance(tmp_path) as dst, client(qmp_path(dst)) as d:
        d.execute("migrate-incoming", uri=f"file:{path}")
        info = wait_migration(d, 30)
        assert status(d) != "running"
        assert nonzero_bytes(dst.vm) == 0  # refused before anything was loaded
    return info


@pytest.mark.parametrize("where", [0.0, 0.5, 0.99])
def test_a_flipped_byte_anywhere_in_an_image_fails_its_checksum(
        tmp_path: Path, good_stream: bytes, where: float) -> None:
    image = bytearray(sealed(good_stream))
    image[int(len(good_stream) * where)] ^= 0x01  # page data too, which nothing else checks
    info = load_image(tmp_path, bytes(image))
    assert info["status"] == "failed"
    assert "checksum" in info["error-desc"], info


@pytest.mark.parametrize("cut", [5, 13, 4096])
def test_a_truncated_image_is_refused_before_loading(
        tmp_path: Path, good_stream: bytes, cut: int) -> None:
    info = load_image(tmp_path, sealed(good_stream)[:-cut])
    assert info["status"] == "failed"
    assert "checksum" in info["error-desc"], info


def test_bytes_after_eof_are_refused(tmp_path: Path, good_stream: bytes) -> None:
    info, inst, vm_events = load_stream(tmp_path, good_stream + b"\x00")
    try:
        assert info["status"] == "failed", info
        assert "RESUME" not in vm_events
    finally:
        inst.close()


# --- (d) a hostile peer on the destination's socket ------------------------------------

def _be32(v: int) -> bytes:
    return struct.pack(">I", v)


def _be64(v: int) -> bytes:
    return struct.pack(">Q", v)


PREAMBLE = b"QEVM" + _be32(3) + b"\x07" + _be32(7) + b"livemig"
RAM_START = (b"\x01" + _be32(0) + b"\x03ram" + _be32(0) + _be32(4)
             + _be64(MEM | 0x04) + b"\x06pc.ram" + _be64(MEM)  # MEM_SIZE, one block
             + _be64(0x10) + b"\x7e" + _be32(0))  # EOS, footer
RAM_PART = b"\x02" + _be32(0)
PAGE = b"\xaa" * 4096
HOSTILE = {
    "page beyond the block": (PREAMBLE + RAM_START + RAM_PART
                              + _be64(MEM | 0x08) + b"\x06pc.ram" + PAGE, "outside"),
    "page far beyond the block": (PREAMBLE + RAM_START + RAM_PART
                                  + _be64((1 << 50) | 0x08) + b"\x06pc.ram" + PAGE,
                                  "outside"),
    "zero page beyond the block": (PREAMBLE + RAM_START + RAM_PART
                                   + _be64(MEM | 0x02) + b"\x06pc.ram" + b"\x00", "outside"),
    "unknown block": (PREAMBLE + RAM_START + RAM_PART
                      + _be64(0x200000 | 0x08) + b"\x06xx.ram" + PAGE, "xx.ram"),
    "block of another size": (PREAMBLE + b"\x01" + _be32(0) + b"\x03ram" + _be32(0)
                              + _be32(4) + _be64(2 * MEM | 0x04) + b"\x06pc.ram"
                              + _be64(2 * MEM), "pc.ram"),
    "garbage instead of a stream": (bytes(range(256)) * 16, "magic"),
    "garbage after the setup": (PREAMBLE + RAM_START + bytes(range(0x42, 256)) * 16,
                                "section"),
}


@pytest.mark.parametrize("what", list(HOSTILE))
def test_hostile_peer_is_refused_and_guest_ram_untouched(tmp_path: Path, what: str) -> None:
    data, hint = HOSTILE[what]
    port = free_tcp_port()
    with empty_instance(tmp_path) as dst, client(qmp_path(dst)) as d:
        fill_with_canary(dst.vm)  # shows a zero written as well as data
        d.execute("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as peer:
            peer.sendall(data)
            # The peer keeps the connection open: the refusal must not wait for EOF.
            info = wait_migration(d, 10)
        assert info["status"] == "failed", info
        assert hint.lower() in info.get("error-desc", "").lower(), info
        assert_guest_cannot_start(d)
        assert dst.vm.serial.total_bytes == 0
        # Nothing of the refused records was written, not even a zero.
        assert canary_pages(dst.vm) == MEM // PAGE_SIZE


def assert_guest_cannot_start(d: QmpClient) -> None:
    """After a failed incoming migration the guest is not running and ``cont`` is
    refused: RAM and state are partly loaded, never to be run as if received."""
    assert status(d) != "running"
    with pytest.raises(QmpError):
        d.execute("cont")
    assert status(d) != "running"


def test_a_stream_cut_inside_a_page_leaves_later_pages_unwritten_and_the_guest_stopped(
        tmp_path: Path) -> None:
    """Good pages, then a page cut off inside its payload: the pages before the cut are
    in RAM, nothing after it is, and the half-received page does not make the guest
    runnable."""
    good = b"".join(_be64((i * PAGE_SIZE) | (0x08 if i == 0 else 0x28))  # then CONTINUE
                    + (b"\x06pc.ram" if i == 0 else b"")
                    + bytes([0x11 + i]) * PAGE_SIZE for i in range(4))
    port = free_tcp_port()
    with empty_instance(tmp_path) as dst, client(qmp_path(dst)) as d:
        fill_with_canary(dst.vm)
        d.execute("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as peer:
            peer.sendall(PREAMBLE + RAM_START + RAM_PART + good
                         + _be64((8 * PAGE_SIZE) | 0x08 | 0x20) + PAGE[:100])
        info = wait_migration(d, 10)
        assert info["status"] == "failed", info
        assert "closed the connection" in info.get("error-desc", ""), info
        assert_guest_cannot_start(d)
        ram = dst.vm.main_block.array().reshape(-1, PAGE_SIZE)
        assert [int(ram[i, 0]) for i in range(4)] == [0x11, 0x12, 0x13, 0x14]
        del ram
        assert canary_pages(dst.vm) == MEM // PAGE_SIZE - 5  # 4 pages, the cut one


def test_vm_closes_after_a_stream_cut_mid_page_while_logs_are_kept(tmp_path: Path) -> None:
    kept = logging.handlers.BufferingHandler(capacity=1000)
    logging.getLogger("livemig").addHandler(kept)
    try:
        with empty_instance(tmp_path) as dst, client(qmp_path(dst)) as d:
            port = free_tcp_port()
            d.execute("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
            with socket.create_connection(("127.0.0.1", port), timeout=10) as peer:
                # A page header and the first 100 bytes of its payload, then EOF.
                peer.sendall(PREAMBLE + RAM_START + RAM_PART + _be64(0x200000 | 0x08)
                             + b"\x06pc.ram" + PAGE[:100])
            assert wait_migration(d, 10)["status"] == "failed"
            assert kept.buffer  # the error record is kept
            dst.close()  # while the record is kept: must still unmap guest RAM
    finally:
        logging.getLogger("livemig").removeHandler(kept)


# --- (e) nobody listens ------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_migrate_to_nobody_fails_fast_and_source_runs_on(tmp_path: Path, kind: str) -> None:
    uri = (f"tcp:127.0.0.1:{free_tcp_port()}" if kind == "tcp"
           else f"unix:{tmp_path / 'nobody.sock'}")
    with ab_instance(tmp_path) as src, client(qmp_path(src)) as s:
        t0 = time.monotonic()
        s.execute("migrate", uri=uri)
        info = wait_migration(s, 10)
        assert time.monotonic() - t0 < 5
        assert info["status"] == "failed"
        assert info.get("error-desc")
        assert_source_intact(src, s)


# --- (f) bad QMP input ---------------------------------------------------------------------

BAD_URIS = ["tcp:127.0.0.1", "tcp:127.0.0.1:notaport", "tcp::4444", "tcp:127.0.0.1:70000",
            "unix:", "file:", "bogus:whatever", "127.0.0.1:4444", ""]


async def _bad_input_session(path: str) -> list[object]:
    qmp = QMPClient("test")
    await qmp.connect(path)
    seen: list[object] = []
    try:
        for uri in BAD_URIS:
            with pytest.raises(ExecuteError) as err:
                await qmp.execute("migrate", {"uri": uri})
            seen.append((uri, err.value.error_class))
        with pytest.raises(ExecuteError):
            await qmp.execute("migrate", {})  # no uri at all
        seen.append(await qmp.execute("query-migrate"))
        seen.append((await qmp.execute("query-status"))["status"])  # type: ignore[index]
        with pytest.raises(ExecuteError) as err:
            await qmp.execute("migrate-set-capabilities", {"capabilities": [
                {"capability": "postcopy-preempt", "state": True}]})
        seen.append(err.value.error_class)
        caps = await qmp.execute("query-migrate-capabilities")
        seen.append(sorted(c["capability"] for c in caps if c["state"]))  # type: ignore
    finally:
        await qmp.disconnect()
    return seen


def test_bad_qmp_input_gets_an_error_reply_and_the_session_goes_on(tmp_path: Path) -> None:
    with ab_instance(tmp_path) as src:
        seen = asyncio.run(_bad_input_session(qmp_path(src)))
        assert seen == [*((uri, "GenericError") for uri in BAD_URIS),
                        {}, "running", "GenericError", []]
        assert src.vm.serial.wait_for(1, timeout=30)


# --- closing a destination that waits for its migration -----------------------------------

def test_closing_a_destination_that_waits_for_a_connection_is_clean(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Closing (``quit``) and the woken load thread both close the listener: whichever
    comes second must find nothing left to do, not a half-closed socket."""
    thread_errors: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook",
                        lambda args: thread_errors.append(args.exc_value))
    with Instance(_fresh_vm()) as inst:
        inst.migrate_incoming("tcp:127.0.0.1:0")
        mig = inst.incoming
        assert mig is not None
        assert wait_until(lambda: mig.status.status.value == "setup", 10)
        # Make the interleaving deterministic: the first shutdown of the listening
        # socket (close's) wakes the load thread, then waits until it has finished.
        shutdown, port = socket.socket.shutdown, mig.port
        first = threading.Event()

        def shutdown_then_let_the_load_thread_finish(sock: socket.socket, how: int) -> None:
            shutdown(sock, how)
            if (sock.family == socket.AF_INET and sock.getsockname()[1] == port
                    and not first.is_set()):
                first.set()
                mig.join(5)

        monkeypatch.setattr(socket.socket, "shutdown",
                            shutdown_then_let_the_load_thread_finish)
        inst.close()
        assert first.is_set()
    assert mig.status.status.value == "failed"
    assert thread_errors == []
