"""A hostile destination against a live source: the source guest keeps running and the
migration fails with a clear reason (or, for a flood of valid requests, completes).

The fake destination is a test peer on a real TCP socket: it decodes the source's main
channel with livemig's own decoder (so it knows when the stream ends) and writes a
scripted return path: unknown messages, page requests outside RAM, a flood of requests,
a SHUT that reports failure.  The source is a real livemig instance running the ab
guest with postcopy-ram set, so the return path is open from the start.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import MEM, ab_instance, client, qmp_path, wait_migration

from livemig.control.client import QmpClient
from livemig.errors import LivemigError
from livemig.instance import Instance
from livemig.wire import events as ev
from livemig.wire.blocks import BlockInfo
from livemig.wire.decoder import Decoder
from livemig.wire.returnpath import ReturnPathEncoder

pytestmark = pytest.mark.kvm

Script = Callable[[socket.socket, threading.Event], None]


def pong(conn: socket.socket) -> None:
    conn.sendall(ReturnPathEncoder().pong(1))


def unknown_message(conn: socket.socket, _end: threading.Event) -> None:
    conn.sendall(struct.pack(">HH", 99, 0))


def request_outside_ram(conn: socket.socket, _end: threading.Event) -> None:
    pong(conn)
    conn.sendall(ReturnPathEncoder().req_pages("pc.ram", MEM, 4096))


def request_unknown_block(conn: socket.socket, _end: threading.Event) -> None:
    pong(conn)
    conn.sendall(ReturnPathEncoder().req_pages("xx.ram", 0, 4096))


def flood_then_shut(conn: socket.socket, end: threading.Event) -> None:
    pong(conn)
    enc = ReturnPathEncoder()
    burst = b"".join(enc.req_pages("pc.ram", (i % (MEM // 4096)) * 4096, 4096)
                     for i in range(20_000))
    for _ in range(10):  # 200,000 requests while precopy runs
        conn.sendall(burst)
    end.wait(60)
    conn.sendall(enc.shut(0))


def shut_failure(conn: socket.socket, end: threading.Event) -> None:
    pong(conn)
    end.wait(60)
    conn.sendall(ReturnPathEncoder().shut(1))


class FakeDestination:
    """Accepts one connection, decodes what the source sends, runs ``script``."""

    def __init__(self, script: Script) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.uri = f"tcp:127.0.0.1:{self.server.getsockname()[1]}"
        self.script = script
        self.stream_ended = threading.Event()
        self.decode_error: Exception | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        conn, _ = self.server.accept()
        with conn:
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()
            self.script(conn, self.stream_ended)
            self.stream_ended.wait(60)

    def _read(self, conn: socket.socket) -> None:
        dec = Decoder({"pc.ram": BlockInfo(MEM)}, postcopy=True)
        try:
            while True:
                e = dec.next_event()
                if e is ev.NEED_DATA:
                    dec.receive_data(conn.recv(1 << 20))
                elif isinstance(e, ev.PageHeader):
                    slot = bytearray(4096)
                    n = dec.take_payload(slot)
                    while dec.payload_remaining:
                        dec.receive_data(conn.recv(dec.payload_remaining))
                        n += dec.take_payload(memoryview(slot)[n:])
                elif isinstance(e, ev.StreamEnd):
                    self.stream_ended.set()
                    return
        except (LivemigError, OSError) as e:
            self.decode_error = e

    def close(self) -> None:
        self.stream_ended.set()
        self.server.close()
        self._thread.join(10)


CASES = {
    "unknown return path message": (unknown_message, "Unknown return path message type 99"),
    "request outside RAM": (request_outside_ram, "outside block 'pc.ram'"),
    "request of an unknown block": (request_unknown_block, "unknown RAM block 'xx.ram'"),
    "SHUT reporting failure": (shut_failure, "failed to load the stream (SHUT status 1)"),
}


@contextlib.contextmanager
def migration_to(tmp_path: Path, fake: FakeDestination
                 ) -> Iterator[tuple[Instance, QmpClient, dict[str, Any]]]:
    """A running ab guest migrated (postcopy-ram on) to ``fake``: the source, its QMP
    client and its final query-migrate."""
    try:
        with ab_instance(tmp_path) as src, client(qmp_path(src)) as s:
            s.execute("migrate-set-capabilities",
                      capabilities=[{"capability": "postcopy-ram", "state": True}])
            s.execute("migrate-set-parameters", **{"downtime-limit": 5000})
            s.execute("migrate", uri=fake.uri)
            yield src, s, wait_migration(s, 90)
    finally:
        fake.close()


@pytest.mark.parametrize("what", list(CASES))
def test_hostile_destination_fails_the_migration_and_the_guest_runs_on(
        tmp_path: Path, what: str) -> None:
    script, reason = CASES[what]
    with migration_to(tmp_path, FakeDestination(script)) as (src, s, info):
        assert info["status"] == "failed", info
        assert reason in info.get("error-desc", ""), info
        assert s.execute("query-status")["status"] == "running"
        assert src.vm.serial.wait_for(2, timeout=60), src.vm.serial.output[-80:]
        assert b"E" not in src.vm.serial.output


def test_a_flood_of_page_requests_in_precopy_does_not_break_the_source(
        tmp_path: Path) -> None:
    fake = FakeDestination(flood_then_shut)
    with migration_to(tmp_path, fake) as (_src, _s, info):
        assert info["status"] == "completed", info
        assert fake.decode_error is None, fake.decode_error
