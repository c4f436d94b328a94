"""A hostile source against ``livemig run --incoming``: typed errors, a clean exit.

A test peer speaks the stream to a real destination process (``livemig run --incoming
tcp:...``) with one hostile twist each: oversized lengths, a truncated package, endless
empty sections, a page outside RAM.  The destination must fail the migration with a
typed error that says what was wrong and exit with status 1 and that reason (as QEMU
does), however much the peer sends.  (That refused records never reach guest RAM is
checked in-process by test_precopy_faults.py's hostile-peer tests.)
"""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import MEM, free_tcp_port

from livemig.migration import handshake as hs
from livemig.migration.handshake import Handshake
from livemig.wire.blocks import BlockInfo
from livemig.wire.encoder import Encoder

pytestmark = pytest.mark.kvm

TABLE = {"pc.ram": BlockInfo(MEM)}


def head(enc: Encoder) -> bytes:
    out: list[bytes | memoryview] = [enc.preamble()]
    out += enc.device_state(hs.CAPABILITIES.section_id, hs.CAPABILITIES.name,
                            Handshake().encode())
    out += [enc.ram_start(hs.RAM.section_id), enc.mem_size(TABLE), enc.close_ram_section()]
    return b"".join(out)


def _streams() -> dict[str, tuple[bytes, str]]:
    enc = Encoder()
    h = head(enc)
    empty_part = b"\x02" + struct.pack(">I", 0) + struct.pack(">Q", 0x10) + b"\x7e" \
        + struct.pack(">I", 0)
    return {
        "oversized device state": (
            h + b"\x04" + struct.pack(">I", 9) + b"\x0elivemig/serial" + struct.pack(
                ">III", 0, 1, 0xFFFFFFFF), "exceeds"),
        "oversized package": (
            h + struct.pack(">BHHI", 8, 8, 4, 0xFFFFFFF0), "exceeds"),
        "truncated package": (
            h + struct.pack(">BHHI", 8, 8, 4, 1000) + b"\x08\x00", "truncated"),
        "page outside RAM": (
            h + b"\x02" + struct.pack(">I", 0) + struct.pack(">Q", MEM | 0x08) + b"\x06pc.ram"
            + b"\xaa" * 4096, "outside"),
        "endless empty sections": (h + empty_part * 300_000, "closed"),
    }


STREAMS = _streams()


@pytest.mark.parametrize("what", list(STREAMS))
def test_hostile_source_fails_the_incoming_run_with_its_reason(tmp_path: Path,
                                                                what: str) -> None:
    data, says = STREAMS[what]
    port = free_tcp_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "livemig", "run", "--incoming", f"tcp:127.0.0.1:{port}",
         "--mem", f"{MEM >> 20}M", "--qmp", str(tmp_path / "dst.qmp")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        peer = _connect(port)
        with peer:
            t0 = time.monotonic()
            peer.sendall(data)
            sent = time.monotonic() - t0
            peer.shutdown(socket.SHUT_WR)
            _, err = proc.communicate(timeout=60)
        assert sent < 30  # the destination kept reading, however many records came
        assert proc.returncode == 1, err
        lines = [line for line in err.splitlines() if line.startswith("Error:")]
        assert len(lines) == 1 and "incoming migration failed" in lines[0], err
        assert says in lines[0].lower(), err
        assert "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _connect(port: int) -> socket.socket:
    deadline = time.monotonic() + 30
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=30)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
