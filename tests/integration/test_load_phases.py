"""The destination's load is a state machine: postcopy commands out of order are refused.

A hostile source speaks to a real destination (real VM, userfaultfd, socket) and sends
postcopy commands in an order that :data:`~livemig.migration.load.LOAD_TRANSITIONS`
does not allow.  Each must fail the incoming migration with a protocol error that
names the phase, without starting the guest and without writing into guest RAM.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from helpers import (
    MEM,
    client,
    empty_instance,
    free_tcp_port,
    nonzero_bytes,
    qmp_path,
    status,
    wait_migration,
)

from livemig.migration import handshake as hs
from livemig.migration.handshake import Handshake
from livemig.migration.load import LOAD_TRANSITIONS, LoadPhase
from livemig.wire.blocks import BlockInfo, host_page_summary
from livemig.wire.encoder import Encoder

pytestmark = pytest.mark.kvm

TABLE = {"pc.ram": BlockInfo(MEM, 4096)}


def head(enc: Encoder, *, advise: bool = True) -> bytes:
    """What a postcopy source sends first: preamble, capabilities, return path, ADVISE
    (unless not), the ram section's START."""
    out: list[bytes | memoryview] = [enc.preamble()]
    out += enc.device_state(hs.CAPABILITIES.section_id, hs.CAPABILITIES.name,
                            Handshake(postcopy_ram=True).encode())
    out.append(enc.open_return_path())
    if advise:
        out.append(enc.postcopy_advise(host_page_summary(TABLE)))
    out += [enc.ram_start(hs.RAM.section_id), enc.mem_size(TABLE), enc.close_ram_section()]
    return b"".join(out)


def packaged(enc: Encoder, *commands: bytes) -> bytes:
    return b"".join(enc.packaged(b"".join(commands)))


def _streams() -> dict[str, tuple[bytes, str]]:
    def fresh(advise: bool = True) -> tuple[Encoder, bytes]:
        enc = Encoder(postcopy=True)
        return enc, head(enc, advise=advise)

    out = {}
    enc, h = fresh(advise=False)
    out["LISTEN before ADVISE"] = (h + packaged(enc, enc.package().postcopy_listen()),
                                   "POSTCOPY_LISTEN in the precopy phase")
    enc, h = fresh()
    out["RUN before LISTEN"] = (h + packaged(enc, enc.package().postcopy_run()),
                                "POSTCOPY_RUN in the advised phase")
    enc, h = fresh()
    out["ADVISE twice"] = (h + enc.postcopy_advise(host_page_summary(TABLE)),
                           "POSTCOPY_ADVISE in the advised phase")
    enc, h = fresh()
    out["DISCARD after LISTEN"] = (h + packaged(enc, enc.package().postcopy_listen())
                                   + enc.postcopy_ram_discard("pc.ram", [(0, 4096)]),
                                   "POSTCOPY_RAM_DISCARD in the listening phase")
    enc, h = fresh()
    out["EOF before RUN"] = (h + packaged(enc, enc.package().postcopy_listen()) + enc.eof(),
                             "EOF in the listening phase")
    return out


STREAMS = _streams()


@pytest.mark.parametrize("what", list(STREAMS))
def test_postcopy_commands_out_of_order_fail_the_load(tmp_path: Path, what: str) -> None:
    data, hint = STREAMS[what]
    port = free_tcp_port()
    with empty_instance(tmp_path) as dst, client(qmp_path(dst)) as d:
        d.execute("migrate-set-capabilities",
                  capabilities=[{"capability": "postcopy-ram", "state": True}])
        d.execute("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as peer:
            peer.sendall(data)
            info = wait_migration(d, 20)  # the peer keeps the connection open
        assert info["status"] == "failed", info
        assert hint in info.get("error-desc", ""), info
        assert status(d) != "running"
        assert nonzero_bytes(dst.vm) == 0


def test_every_phase_leads_to_the_end_and_the_end_to_nothing() -> None:
    """The table itself: each phase can reach ENDED, and ENDED is final."""
    for phase in LoadPhase:
        seen, todo = {phase}, [phase]
        while todo:
            for nxt in LOAD_TRANSITIONS[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        assert LoadPhase.ENDED in seen, phase
    assert LOAD_TRANSITIONS[LoadPhase.ENDED] == frozenset()
