"""A destination that goes silent: the source must not wait for it forever.

The peer is a real TCP socket that is alive (its kernel acknowledges, keepalive probes
are answered) but whose program neither reads nor answers: once the socket buffers
are full the source's ``send`` sees a zero window, and nothing but its dead-link
timeout (``x-dead-link-timeout``: ``TCP_USER_TIMEOUT`` and keepalive) ends the wait.

* In precopy the peer accepts and never reads a byte: the migration fails within about
  the dead-link timeout (once the buffers are full; with postcopy-ram set, when the
  PONG that must answer ADVISE has not come within it), and the source guest runs on,
  unharmed (QEMU's rule for a failed precopy).
* In postcopy the guest already runs on the destination, so the source cannot fail the
  migration: a proxy between the two forwards both directions faithfully until the
  migration is in postcopy-active, then stops reading and forwarding while keeping
  every connection open.  The source must go to ``postcopy-paused`` (waiting for a
  recovery), not hang in postcopy-active.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import ab_instance, client, free_tcp_port, guest_check, qmp_path, status
from pc_helpers import (
    NO_CONVERGENCE,
    PairConfig,
    caps_of,
    migration_pair,
    start_postcopy_after_first_round,
    wait_migration,
)

from livemig.tcpproxy import TcpProxy

pytestmark = pytest.mark.kvm

DEAD_LINK_MS = 2000
# Buffers fill in well under a second here; then the timeout runs, plus at most one
# keepalive interval; the rest is slack for a loaded machine.
LIMIT_S = 4 * DEAD_LINK_MS / 1000 + 10


@contextlib.contextmanager
def silent_peer() -> Iterator[tuple[str, list[socket.socket]]]:
    """A TCP server that accepts every connection and never reads or writes; yields its
    URI and the connections it accepted."""
    accepted: list[socket.socket] = []
    server = socket.create_server(("127.0.0.1", 0))

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                accepted.append(server.accept()[0])

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        yield f"tcp:127.0.0.1:{server.getsockname()[1]}", accepted
    finally:
        server.close()
        t.join(10)
        for conn in accepted:
            conn.close()


@pytest.mark.parametrize("postcopy_ram", [False, True], ids=["plain", "postcopy-ram"])
def test_a_destination_that_never_reads_fails_precopy_after_the_dead_link_timeout(
        tmp_path: Path, postcopy_ram: bool) -> None:
    """With postcopy-ram set the source also waits on a return path that never says
    anything: the timeout must end that wait too."""
    with silent_peer() as (uri, accepted), ab_instance(tmp_path) as src, \
            client(qmp_path(src)) as s:
        s.execute("migrate-set-capabilities", capabilities=[
            {"capability": "postcopy-ram", "state": postcopy_ram}])
        s.execute("migrate-set-parameters", **{"x-dead-link-timeout": DEAD_LINK_MS})
        t0 = time.monotonic()
        s.execute("migrate", uri=uri)
        info = wait_migration(s, 60)
        elapsed = time.monotonic() - t0
        assert accepted, "the source never connected"
        assert info["status"] == "failed", info
        # Plain: the full socket times out; postcopy-ram: the PONG after ADVISE is due.
        assert re.search("timed out|did not send PONG", info.get("error-desc", "")), info
        assert DEAD_LINK_MS / 1000 <= elapsed <= LIMIT_S, elapsed
        # The source guest runs on, unharmed.
        assert status(s) == "running"
        passes = src.vm.serial.output.count(b"2")
        assert src.vm.serial.wait_for(passes + 1, timeout=60), src.vm.serial.output[-80:]
        assert b"E" not in src.vm.serial.output
        check = guest_check(s)
        assert check["bad_pages"] == 0, check


def test_a_destination_that_goes_silent_in_postcopy_pauses_the_source(
        tmp_path: Path) -> None:
    # Postcopy slow enough (about ten seconds for what is left of the guest's RAM) that
    # the source still has pages to send when the peer goes silent, however late a
    # loaded machine sees postcopy-active, and fast enough that they fill the silent
    # peer's buffers within a second or two: only the dead-link timeout can end the
    # wait then.
    params = {**NO_CONVERGENCE, "max-postcopy-bandwidth": 3_000_000,
              "x-dead-link-timeout": DEAD_LINK_MS}
    cfg = PairConfig("random", src_caps=caps_of(postcopy=True), params=params)
    with migration_pair(tmp_path, cfg) as p:
        port = free_tcp_port()
        p.dq.execute("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
        proxy = TcpProxy(port)
        try:
            p.sq.execute("migrate", uri=proxy.uri)
            start_postcopy_after_first_round(p.sq)
            info = wait_migration(p.sq, 60, until=("postcopy-active", "completed", "failed"))
            assert info["status"] == "postcopy-active", info
            proxy.go_silent()
            t0 = time.monotonic()
            info = wait_migration(p.sq, LIMIT_S + 10,
                                  until=("postcopy-paused", "completed", "failed"))
            elapsed = time.monotonic() - t0
            assert info["status"] == "postcopy-paused", info
            # Nothing was closed: only the dead-link timeout can have noticed.  (Which
            # error the source saw first, ETIMEDOUT or the EPIPE of the next send, is
            # timing.)
            assert DEAD_LINK_MS / 2000 <= elapsed <= LIMIT_S, (elapsed, info)
            assert info.get("error-desc"), info
        finally:
            proxy.close()
