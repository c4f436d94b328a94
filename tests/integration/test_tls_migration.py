"""Migrations over TLS on real KVM, driven over QMP as a QEMU user would: object-add of
tls-creds-x509 (and authz-simple) on both sides, the tls-* parameters, then migrate.

Every connection is TLS: the main channel and its return path, the postcopy channel
(in every urgent-sender design, including the helper processes that open their own
sessions) and the connections of a recovery.  A refused peer fails both sides before
the guest leaves the source.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import free_tcp_port, livemig_process
from pc_helpers import (
    GUEST_PAGES,
    NO_CONVERGENCE,
    Pair,
    PairConfig,
    Relay,
    caps_of,
    ends_migration,
    events,
    guest_check,
    migration_pair,
    migration_statuses,
    runs_on,
    start_postcopy_after_first_round,
    wait_migration,
)

from livemig.control.client import QmpClient
from livemig.errors import ChannelClosedError, QmpError, TlsError
from livemig.kernel.mman import Backing
from livemig.migration.channel import MigrationUri, connect
from livemig.migration.tls import TlsCredsX509, TlsEndpoint
from livemig.tlslab import CLIENT_DN, TlsDirs, make_tls_dirs
from livemig.vmm.vm import RunState
from livemig.wire.encoder import Encoder

pytestmark = pytest.mark.kvm

HOSTNAME = "dest.example"  # the pair migrates over unix sockets: name the server
DESIGNS = [
    pytest.param(caps_of(postcopy=True), "migration", id="postcopy"),
    pytest.param(caps_of(postcopy=True, preempt=True), "migration", id="preempt-migration"),
    pytest.param(caps_of(postcopy=True, preempt=True), "return-path", id="preempt-rp"),
    pytest.param(caps_of(postcopy=True, preempt=True), "process", id="preempt-process"),
]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> TlsDirs:
    return make_tls_dirs(tmp_path_factory.mktemp("tls"))


def add_creds(qmp: QmpClient, directory: str, endpoint: str) -> None:
    qmp.execute("object-add", **{"qom-type": "tls-creds-x509", "id": "tls0",
                                 "dir": directory, "endpoint": endpoint,
                                 "verify-peer": True})


Authz = str | dict[str, Any] | None  # an authz-simple identity, authz-list props, none


def secure(p: Pair, server: str | None, client: str | None, *, authz: Authz = CLIENT_DN
           ) -> None:
    """TLS on both sides (``server`` / ``client`` None: that side stays plain); ``authz``
    a string: an authz-simple with that identity, a dict: an authz-list."""
    if server is not None:
        add_creds(p.dq, server, "server")
        params: dict[str, Any] = {"tls-creds": "tls0"}
        if authz is not None:
            kind, props = (("authz-simple", {"identity": authz}) if isinstance(authz, str)
                           else ("authz-list", authz))
            p.dq.execute("object-add", **{"qom-type": kind, "id": "auth0", **props})
            params["tls-authz"] = "auth0"
        p.dq.execute("migrate-set-parameters", **params)
    if client is not None:
        add_creds(p.sq, client, "client")
        p.sq.execute("migrate-set-parameters", **{"tls-creds": "tls0",
                                                  "tls-hostname": HOSTNAME})


def check_guest_moved(p: Pair, guest: str) -> None:
    assert runs_on(p.dst.vm), p.dst.vm.serial.output[-80:]
    check = guest_check(p.dq, guest)
    assert (check["bad_pages"], check["pages"]) == (0, GUEST_PAGES), check


def test_precopy_over_tls_moves_a_running_guest(tmp_path: Path, dirs: TlsDirs) -> None:
    cfg = PairConfig("random", src_caps=caps_of(postcopy=False),
                     params={"downtime-limit": 5000, "x-max-iterations": 2})
    with migration_pair(tmp_path, cfg) as p:
        secure(p, dirs.server, dirs.client)
        shown = p.sq.execute("query-migrate-parameters")
        assert (shown["tls-creds"], shown["tls-hostname"]) == ("tls0", HOSTNAME), shown
        p.listen()
        p.migrate()
        src, dst = wait_migration(p.sq), wait_migration(p.dq)
        assert (src["status"], dst["status"]) == ("completed", "completed"), (src, dst)
        check_guest_moved(p, "random")


def tls_records_cover(data: bytes | bytearray) -> bool:
    """Is ``data`` nothing but whole TLS 1.2 records (type, 03 03, be16 length, body)?"""
    pos = 0
    while pos < len(data):
        head = data[pos: pos + 5]
        record = len(head) == 5 and head[0] in (20, 21, 22, 23) and head[1:3] == b"\x03\x03"
        # A handshake's first record may say TLS 1.0 (03 01), as ClientHellos do.
        if not record and not (pos == 0 and head[:3] == b"\x16\x03\x01"):
            return False
        pos += 5 + int.from_bytes(head[3:5], "big")
    return pos == len(data)


def assert_all_encrypted(relay: Relay, preempt: bool, multifd: int = 0) -> None:
    """Every byte each way was inside TLS records, but the postcopy channel's clear
    preamble (docs/STREAM.md)."""
    assert relay.captured is not None
    assert len(relay.captured) == (2 if preempt else 1) + multifd, len(relay.captured)
    for forward, back in relay.captured:
        clear = 8 if forward.startswith(b"LMPC") else 0
        assert forward[clear: clear + 2] == b"\x16\x03", forward[:16]
        assert tls_records_cover(forward[clear:]), "clear bytes source -> destination"
        assert tls_records_cover(back), "clear bytes destination -> source"


def postcopy_through_a_recording_relay(p: Pair, tmp_path: Path, dirs: TlsDirs
                                       ) -> tuple[Relay, dict[str, Any], dict[str, Any]]:
    """TLS on both sides, then a postcopy migration through a relay that records every
    byte; both sides completed and the guest moved whole."""
    secure(p, dirs.server, dirs.client)
    relay = Relay(str(tmp_path / "relay.sock"), p.uri.removeprefix("unix:"), record=True)
    p.listen()
    p.sq.execute("migrate", uri=relay.uri)
    start_postcopy_after_first_round(p.sq)
    src, dst = wait_migration(p.sq), wait_migration(p.dq)
    relay.cut()
    assert (src["status"], dst["status"]) == ("completed", "completed"), (src, dst)
    check_guest_moved(p, "random")
    return relay, src, dst


@pytest.mark.parametrize(("caps", "sender"), DESIGNS)
def test_postcopy_over_tls_moves_a_running_guest_in_every_design(
        tmp_path: Path, dirs: TlsDirs, caps: tuple[tuple[str, bool], ...], sender: str
) -> None:
    cfg = PairConfig("random", Backing.ANON_4K, src_caps=caps,
                     params={**NO_CONVERGENCE, "x-postcopy-urgent-sender": sender})
    with migration_pair(tmp_path, cfg) as p:
        relay, src, dst = postcopy_through_a_recording_relay(p, tmp_path, dirs)
        assert_all_encrypted(relay, preempt=dict(caps).get("preempt", False))
        assert dst["x-postcopy-latency-percentiles"]["count"] > 0
        if dict(caps).get("preempt"):
            # Requested pages came back over the (TLS) postcopy channel.
            assert src["ram"]["x-postcopy-urgent-bytes"] > 0, src["ram"]


def test_multifd_precopy_then_preempt_over_tls_encrypts_every_channel(
        tmp_path: Path, dirs: TlsDirs) -> None:
    cfg = PairConfig("random", Backing.ANON_4K,
                     src_caps=caps_of(postcopy=True, preempt=True, multifd=True),
                     params={**NO_CONVERGENCE, "multifd-channels": 2})
    with migration_pair(tmp_path, cfg) as p:
        relay, src, dst = postcopy_through_a_recording_relay(p, tmp_path, dirs)
        # The multifd channels carried the precopy pages, inside their own sessions.
        assert sum(src["x-multifd"]["bytes"]) > 0, src["x-multifd"]
        assert_all_encrypted(relay, preempt=True, multifd=2)


def pause_a_postcopy_over_tls(p: Pair, dirs: TlsDirs) -> None:
    """TLS on both sides, a postcopy started, then migrate-pause: both sides paused."""
    secure(p, dirs.server, dirs.client)
    p.listen()
    p.migrate()
    start_postcopy_after_first_round(p.sq)
    for q in (p.sq, p.dq):
        assert wait_migration(q, 60, until=("postcopy-active", "failed"))["status"] == \
            "postcopy-active"
    p.sq.execute("migrate-pause")
    for q in (p.sq, p.dq):
        assert wait_migration(q, 60, until=("postcopy-paused", "failed"))["status"] == \
            "postcopy-paused"


def resume_and_complete(p: Pair, uri: str) -> None:
    p.sq.execute("migrate", uri=uri, resume=True)
    src, dst = wait_migration(p.sq, 120), wait_migration(p.dq, 120)
    assert (src["status"], dst["status"]) == ("completed", "completed"), (src, dst)
    assert "postcopy-recover" in migration_statuses(events(p.dq, ends_migration))
    check_guest_moved(p, "random")


RECOVERY_CFG = dict(guest="random", backing=Backing.ANON_4K,
                    src_caps=caps_of(postcopy=True, preempt=True))


@pytest.mark.parametrize("sender", ["migration", "process"])
def test_a_postcopy_over_tls_recovers_over_new_tls_connections(
        tmp_path: Path, dirs: TlsDirs, sender: str) -> None:
    cfg = PairConfig(**RECOVERY_CFG, params={**NO_CONVERGENCE, "x-postcopy-urgent-sender": sender,
                                             "max-postcopy-bandwidth": 4_000_000})
    with migration_pair(tmp_path, cfg) as p:
        pause_a_postcopy_over_tls(p, dirs)
        uri = f"unix:{tmp_path / 'recover.sock'}"
        p.dq.execute("migrate-recover", uri=uri)
        resume_and_complete(p, uri)


def intrude(uri: str, creds: str | None) -> Exception | None:
    """Connect to ``uri`` as a source would (TLS with ``creds``, or plain) and send a
    main channel's preamble; what the connection ended with (None: the peer closed)."""
    tls = None if creds is None else TlsEndpoint(
        TlsCredsX509.create("intruder", creds, "client"), hostname=HOSTNAME)
    try:
        ch = connect(MigrationUri.parse(uri), tls=tls)
        ch.send([Encoder().preamble()])
        answer = ch.recv(1)
        ch.close()
    except (TlsError, ChannelClosedError) as e:
        return e
    assert answer == b"", "the recovery listener answered a refused peer"
    return None


@pytest.mark.parametrize(("intruder", "intruder_says", "dst_says"), [
    pytest.param(None, "", "without TLS", id="plain-peer"),
    pytest.param("no_cert_client", "refused the handshake", "sent no certificate",
                 id="no-client-cert"),
    pytest.param("other_ca_client", "does not trust", "unable to get local issuer",
                 id="wrong-ca-client"),
    pytest.param("expired_client", "expired", "expired", id="expired-client"),
])
def test_a_refused_peer_on_the_recovery_listener_leaves_the_postcopy_paused(
        tmp_path: Path, dirs: TlsDirs, intruder: str | None, intruder_says: str,
        dst_says: str) -> None:
    """A connection to migrate-recover's listener that TLS refuses ends there: the
    destination says why and stays postcopy-paused (a new migrate-recover is needed),
    the source is untouched, and the real source then resumes over TLS."""
    cfg = PairConfig(**RECOVERY_CFG, params={**NO_CONVERGENCE,
                                             "max-postcopy-bandwidth": 4_000_000})
    with migration_pair(tmp_path, cfg) as p:
        pause_a_postcopy_over_tls(p, dirs)
        uri = f"unix:{tmp_path / 'recover.sock'}"
        p.dq.execute("migrate-recover", uri=uri)
        said = intrude(uri, getattr(dirs, intruder) if intruder else None)
        if intruder is not None:
            assert isinstance(said, TlsError) and intruder_says in str(said), said
        deadline = time.monotonic() + 30
        while dst_says not in (dst := p.dq.execute("query-migrate")).get("error-desc", ""):
            assert time.monotonic() < deadline, dst
            time.sleep(0.05)
        assert dst["status"] == "postcopy-paused", dst
        assert p.sq.execute("query-migrate")["status"] == "postcopy-paused"
        while True:  # the refused listener is closed once the destination has paused
            try:
                p.dq.execute("migrate-recover", uri=uri)
                break
            except QmpError as e:
                assert "triggered already" in str(e) and time.monotonic() < deadline, e
                time.sleep(0.05)
        resume_and_complete(p, uri)


DENY_SOURCES = {"policy": "allow", "rules": [
    {"match": "CN=source.*", "policy": "deny", "format": "glob"}]}
REFUSALS = [
    pytest.param("server", "no_cert_client", CLIENT_DN, "refused the handshake",
                 "sent no certificate", id="no-client-cert"),
    pytest.param("other_ca_server", "client", CLIENT_DN, "unable to get local issuer",
                 "does not trust", id="wrong-ca-server"),
    pytest.param("server", "other_ca_client", CLIENT_DN, "does not trust",
                 "unable to get local issuer", id="wrong-ca-client"),
    pytest.param("wrong_name_server", "client", CLIENT_DN, "Hostname mismatch",
                 "refused our certificate", id="wrong-hostname"),
    pytest.param("expired_server", "client", CLIENT_DN, "expired", "expired",
                 id="expired-server"),
    pytest.param("server", "expired_client", CLIENT_DN, "expired", "expired",
                 id="expired-client"),
    pytest.param("server", None, CLIENT_DN, "", "without TLS", id="plain-source"),
    pytest.param(None, "client", None, "listening without tls-creds", "no tls-creds",
                 id="plain-destination"),
    pytest.param("server", "client", "CN=someone.else", "", "authz check", id="authz"),
    pytest.param("server", "client", DENY_SOURCES, "", "rule 0", id="authz-list"),
]


@pytest.mark.parametrize(("server", "client", "authz", "src_says", "dst_says"), REFUSALS)
def test_a_refused_peer_fails_both_sides_and_the_guest_stays(
        tmp_path: Path, dirs: TlsDirs, server: str | None, client: str | None, authz: Authz,
        src_says: str, dst_says: str) -> None:
    cfg = PairConfig("random", Backing.ANON_4K, src_caps=caps_of(postcopy=True),
                     params=NO_CONVERGENCE)
    with migration_pair(tmp_path, cfg) as p:
        secure(p, getattr(dirs, server) if server else None,
               getattr(dirs, client) if client else None, authz=authz)
        p.listen()
        p.migrate()
        src, dst = wait_migration(p.sq, 60), wait_migration(p.dq, 60)
        assert (src["status"], dst["status"]) == ("failed", "failed"), (src, dst)
        assert src_says in src.get("error-desc", ""), src
        assert dst_says in dst.get("error-desc", ""), dst
        assert p.src.vm.runstate is RunState.RUNNING
        assert p.dst.vm.runstate is not RunState.RUNNING
        assert migration_statuses(events(p.dq, ends_migration)) == ["setup", "failed"]
        # Not one byte of guest RAM reached the destination's memory.
        assert not p.dst.vm.main_block.array().any()


def test_livemig_run_objects_carry_a_migration_over_tcp_tls(tmp_path: Path,
                                                            dirs: TlsDirs) -> None:
    """--object on both command lines (the destination's tls-authz an authz-list with
    QEMU's dotted rules), the parameters over QMP, a TCP migration whose server
    certificate is checked against the URI's address (127.0.0.1)."""
    port = free_tcp_port()
    uri = f"tcp:127.0.0.1:{port}"
    server = f"tls-creds-x509,id=tls0,dir={dirs.server},endpoint=server,verify-peer=on"
    client = f"tls-creds-x509,id=tls0,dir={dirs.client},endpoint=client"
    authz = ("authz-list,id=auth0,policy=deny,rules.0.match=CN=*,,O=livemig tests,,C=GB,"
             "rules.0.policy=allow,rules.0.format=glob")
    with livemig_process(tmp_path, "src", ["--guest", "ab", "--mem", "32M",
                                           "--object", client]) as src, \
            livemig_process(tmp_path, "dst", ["--incoming", "defer", "--mem", "32M",
                                              "--object", server, "--object", authz]) as dst:
        assert src.wait_serial(2)
        dst.qmp.execute("migrate-set-parameters", **{"tls-creds": "tls0",
                                                     "tls-authz": "auth0"})
        dst.qmp.execute("migrate-incoming", uri=uri)
        src.qmp.execute("migrate-set-parameters", **{"tls-creds": "tls0",
                                                     "downtime-limit": 5000})
        src.qmp.execute("migrate", uri=uri)
        assert wait_migration(src.qmp, 60)["status"] == "completed"
        assert wait_migration(dst.qmp, 60)["status"] == "completed"
        assert dst.wait_serial(3), dst.serial()[-80:]


def test_livemig_run_refuses_an_object_it_cannot_load(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "livemig", "run", "--incoming", "defer",
                             "--mem", "32M", "--object",
                             f"tls-creds-x509,id=tls0,dir={tmp_path},endpoint=server"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "ca-cert.pem: No such file" in result.stderr, result.stderr
