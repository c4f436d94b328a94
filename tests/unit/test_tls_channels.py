"""TLS on migration channels, without a VM: real TCP connections on loopback, real
certificates made at test time.  Each refusal is checked on both ends, each before a
byte of the stream is read by the other side."""

from __future__ import annotations

import os
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from livemig.errors import ChannelClosedError, ConfigError, TlsError
from livemig.migration.channel import (
    Channel,
    ChannelWriter,
    Listener,
    MigrationUri,
    connect,
    identify_incoming,
)
from livemig.migration.state import Parameters
from livemig.migration.tls import (
    RECORD_PLAINTEXT,
    Authz,
    AuthzList,
    AuthzRule,
    AuthzSimple,
    TlsCredsX509,
    TlsEndpoint,
    TlsObjects,
    distinguished_name,
)
from livemig.objects import parse_object
from livemig.tlslab import CLIENT_DN, TlsDirs, make_tls_dirs
from livemig.units import PAGE_SIZE
from livemig.wire.channel import ChannelKind
from livemig.wire.encoder import Encoder


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> TlsDirs:
    return make_tls_dirs(tmp_path_factory.mktemp("tls"))


def server(d: str, verify: bool = True, authz: Authz | None = None) -> TlsEndpoint:
    return TlsEndpoint(TlsCredsX509.create("tls0", d, "server", verify), authz=authz)


def client(d: str, verify: bool = True, hostname: str = "") -> TlsEndpoint:
    return TlsEndpoint(TlsCredsX509.create("tls0", d, "client", verify), hostname=hostname)


def accept_in_thread(listener: Listener, tls: TlsEndpoint | None,
                     then: Callable[[Channel], Any] = lambda ch: None
                     ) -> tuple[threading.Thread, dict[str, Any]]:
    """Accept one connection and identify it (the destination's way) on a thread."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            ch = listener.accept(timeout=20)
            out["kind"] = identify_incoming(ch, tls)
            out["channel"] = ch
            out["then"] = then(ch)
        except Exception as e:
            out["error"] = e
    t = threading.Thread(target=run)
    t.start()
    return t, out


@pytest.fixture
def listener() -> Iterator[Listener]:
    lst = Listener(MigrationUri.parse("tcp:127.0.0.1:0"))
    yield lst
    lst.close()


def uri(listener: Listener, host: str = "127.0.0.1") -> MigrationUri:
    return MigrationUri("tcp", host=host, port=listener.port)


def refused_on_both_ends(listener: Listener, srv: TlsEndpoint | None,
                         cli: TlsEndpoint | None, host: str = "127.0.0.1"
                         ) -> tuple[Exception, Exception]:
    """Connect ``cli`` to ``srv`` and send the main channel's preamble: both ends fail;
    the destination's error is raised before it read any byte of the stream."""
    t, out = accept_in_thread(listener, srv, then=lambda ch: ch.recv(4))
    try:
        ch = connect(uri(listener, host), tls=cli)
        ch.send([Encoder().preamble()])
        answer = ch.recv(1)  # the destination's answer: it closes
        ch.close()
        src_error: Exception = (ChannelClosedError("closed") if answer == b""
                                else AssertionError("the source was not refused"))
    except Exception as e:
        src_error = e
    t.join(30)
    assert "then" not in out, "the destination read the stream"
    return src_error, out.get("error", AssertionError("the destination accepted"))


# --- good sessions --------------------------------------------------------------------

def test_main_channel_carries_pages_and_return_path_over_mutual_tls(
        dirs: TlsDirs, listener: Listener) -> None:
    ram = np.random.default_rng(1).integers(0, 256, 64 * PAGE_SIZE, dtype=np.uint8)
    got = bytearray()

    def receive(ch: Channel) -> None:
        while not got.endswith(b"DONE!"):
            data = ch.recv(1 << 16)
            if not data:
                break
            got.extend(data)
        ch.send([b"reply"])  # the return path: the same socket, the other direction

    t, out = accept_in_thread(listener, server(dirs.server), then=receive)
    ch = connect(uri(listener), tls=client(dirs.client))
    assert ch.secured
    preamble = Encoder().preamble()
    enc = Encoder(channel=ChannelKind.POSTCOPY, postcopy=True)  # RAM records at once
    enc.preamble()
    writer = ChannelWriter(ch)
    writer.write([preamble])
    offsets = np.arange(0, 64 * PAGE_SIZE, PAGE_SIZE, dtype=np.uint64)[::-1].copy()
    rec = enc.page_records("pc.ram", offsets, len(ram))
    writer.write_pages(rec, memoryview(ram))
    writer.write_now([b"DONE!"])
    reply = bytearray(5)
    ch.recv_exact_into(memoryview(reply))
    t.join(30)
    ch.close()
    assert "error" not in out, out
    assert out["kind"] is ChannelKind.MAIN and reply == b"reply"
    # The bytes received are exactly what the same records give on a plain channel.
    head = len(preamble)
    first = got[head: head + 8 + len(rec.prefix) + PAGE_SIZE]
    assert first[8 + len(rec.prefix):] == ram[63 * PAGE_SIZE:].tobytes()
    assert got.endswith(ram[:PAGE_SIZE].tobytes() + b"DONE!")


def test_a_descriptor_taken_before_the_tls_session_still_names_the_connection(
        dirs: TlsDirs) -> None:
    """The session starts in whichever thread first reads or writes the channel (the
    source's return-path thread, for the postcopy channel); another thread that took
    the channel's descriptor a moment before (to read its queued bytes) must not find
    it closed, or a postcopy pauses on EBADF."""
    raw, peer = socket.socketpair()
    ch = Channel(sock=raw, name="postcopy", tls=server(dirs.server))
    sender = BioClient(dirs.client, peer)
    taken = ch.fileno()
    before = os.fstat(taken)
    shake = threading.Thread(target=sender.handshake)
    shake.start()
    ch.secure(timeout=20)
    shake.join(20)
    after = os.fstat(taken)  # EBADF if the plain socket was closed under the session
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)
    peer.sendall(sender.record(b"page"))
    assert ch.recv(16) == b"page"
    ch.close()
    with pytest.raises(OSError):
        os.fstat(taken)  # the channel's close closes it too
    peer.close()


def test_postcopy_channel_routes_in_clear_then_a_helper_opens_its_session(
        dirs: TlsDirs, listener: Listener) -> None:
    """The preamble goes in clear; the session is opened by whoever owns the channel
    next (here: channels adopted from a handover, as the helper processes do)."""
    t, out = accept_in_thread(listener, server(dirs.server))
    src = connect(uri(listener), tls=client(dirs.client), kind=ChannelKind.POSTCOPY)
    enc = Encoder(channel=ChannelKind.POSTCOPY, postcopy=True)
    enc_preamble = enc.preamble()
    src.send([enc_preamble])  # in clear: no handshake yet
    assert not src.secured
    t.join(30)
    assert out["kind"] is ChannelKind.POSTCOPY, out
    dst: Channel = out["channel"]
    assert not dst.secured
    # Both ends move to "helpers", which handshake on their own.
    assert src.sock is not None and dst.sock is not None
    src2 = Channel.adopt(src.sock, src.handover(), "postcopy")
    dst2 = Channel.adopt(dst.sock, dst.handover(), "postcopy")
    done: dict[str, Any] = {}

    def dst_side() -> None:
        dst2.secure()
        buf = bytearray(8 + 9)
        dst2.recv_exact_into(memoryview(buf))
        done["got"] = bytes(buf)
    th = threading.Thread(target=dst_side)
    th.start()
    src2.secure()
    src2.send([b"requested"])
    th.join(30)
    assert done["got"] == enc_preamble + b"requested"
    assert src2.secured and dst2.secured
    with pytest.raises(TlsError, match="cannot move"):
        src2.handover()
    src2.close()
    dst2.close()


# --- refusals -----------------------------------------------------------------------------

def test_client_without_certificate_is_refused_when_verify_peer_is_on(
        dirs: TlsDirs, listener: Listener) -> None:
    src, dst = refused_on_both_ends(listener, server(dirs.server), client(dirs.no_cert_client))
    assert isinstance(src, TlsError) and "refused" in str(src), src
    assert isinstance(dst, TlsError) and "no certificate" in str(dst), dst


def test_client_certificate_from_another_ca_is_refused(dirs: TlsDirs,
                                                       listener: Listener) -> None:
    src, dst = refused_on_both_ends(listener, server(dirs.server), client(dirs.other_ca_client))
    assert isinstance(src, TlsError) and "does not trust" in str(src), src
    assert isinstance(dst, TlsError) and "not accepted" in str(dst), dst


def test_server_certificate_from_another_ca_is_refused(dirs: TlsDirs,
                                                       listener: Listener) -> None:
    src, dst = refused_on_both_ends(listener, server(dirs.other_ca_server), client(dirs.client))
    assert isinstance(src, TlsError) and "unable to get local issuer" in str(src), src
    assert isinstance(dst, TlsError) and "does not trust" in str(dst), dst


def test_server_certificate_for_another_host_is_refused(dirs: TlsDirs,
                                                        listener: Listener) -> None:
    src, dst = refused_on_both_ends(listener, server(dirs.wrong_name_server),
                                    client(dirs.client), host="localhost")
    assert isinstance(src, TlsError) and "Hostname mismatch" in str(src), src
    assert isinstance(dst, TlsError), dst


def test_tls_hostname_overrides_the_uri_host(dirs: TlsDirs, listener: Listener) -> None:
    """The URI says 127.0.0.1, the certificate also names dest.example: tls-hostname
    'elsewhere.example' is what is checked, and refused."""
    src, dst = refused_on_both_ends(listener, server(dirs.server),
                                    client(dirs.client, hostname="elsewhere.example"))
    assert isinstance(src, TlsError) and "elsewhere.example" in str(src), src
    assert isinstance(dst, TlsError), dst


@pytest.mark.parametrize("side", ["server", "client"])
def test_expired_certificate_is_refused(dirs: TlsDirs, listener: Listener, side: str) -> None:
    if side == "server":
        src, dst = refused_on_both_ends(listener, server(dirs.expired_server),
                                        client(dirs.client))
        assert isinstance(src, TlsError) and "expired" in str(src), src
        assert isinstance(dst, TlsError), dst
    else:
        src, dst = refused_on_both_ends(listener, server(dirs.server),
                                        client(dirs.expired_client))
        assert isinstance(src, TlsError) and "expired" in str(src), src
        assert isinstance(dst, TlsError) and "expired" in str(dst), dst


def test_plain_peer_against_a_tls_listener_is_refused(dirs: TlsDirs,
                                                      listener: Listener) -> None:
    _src, dst = refused_on_both_ends(listener, server(dirs.server), None)
    assert isinstance(dst, TlsError) and "without TLS" in str(dst), dst


def test_tls_peer_against_a_plain_listener_is_refused(dirs: TlsDirs,
                                                      listener: Listener) -> None:
    src, dst = refused_on_both_ends(listener, None, client(dirs.client))
    assert isinstance(src, TlsError) and "handshake" in str(src), src
    assert isinstance(dst, TlsError) and "no tls-creds" in str(dst), dst


def test_authz_simple_allows_exactly_its_identity(dirs: TlsDirs, listener: Listener) -> None:
    good = server(dirs.server, authz=AuthzSimple("auth0", CLIENT_DN))
    t, out = accept_in_thread(listener, good)
    ch = connect(uri(listener), tls=client(dirs.client))
    ch.send([Encoder().preamble()])
    t.join(30)
    ch.close()
    t.join(30)
    assert out.get("kind") is ChannelKind.MAIN, out
    bad = server(dirs.server, authz=AuthzSimple("auth0", "CN=someone.else"))
    src, dst = refused_on_both_ends(listener, bad, client(dirs.client))
    # As with QEMU, authz is checked after the handshake: the client sees the server
    # close the session.
    assert isinstance(src, ChannelClosedError), src
    assert isinstance(dst, TlsError) and "denied" in str(dst) and CLIENT_DN in str(dst), dst


def authz_list(*rules: tuple[str, str, str], policy: str = "deny") -> AuthzList:
    return AuthzList.create("auth0", {"policy": policy, "rules": [
        {"match": m, "policy": p, "format": f} for m, p, f in rules]})


def test_authz_list_takes_the_first_matching_rule_then_its_policy() -> None:
    acl = authz_list(("CN=mallory,*", "deny", "glob"), ("CN=*,O=livemig tests,C=GB", "allow",
                                                        "glob"),
                     ("CN=admin,O=other,C=GB", "allow", "exact"))
    acl.check(CLIENT_DN)  # the glob rule
    acl.check("CN=admin,O=other,C=GB")  # the exact rule
    with pytest.raises(TlsError, match="rule 0"):
        acl.check("CN=mallory,O=livemig tests,C=GB")  # denied before the allowing glob
    with pytest.raises(TlsError, match="no rule matches"):
        acl.check("CN=admin,O=other,C=FR")
    authz_list(policy="allow").check("CN=anyone")


def test_authz_list_globs_are_glib_simple_patterns_and_exact_rules_are_literal() -> None:
    assert AuthzRule("CN=?,O=*", "allow", "glob").matches("CN=x,O=")
    assert not AuthzRule("CN=?,O=*", "allow", "glob").matches("CN=xy,O=a")
    # Only * and ? are special: brackets, dots and backslashes are themselves.
    assert AuthzRule("CN=[ab].c\\*", "allow", "glob").matches("CN=[ab].c\\z")
    assert not AuthzRule("CN=[ab].c*", "allow", "glob").matches("CN=a.c")
    assert not AuthzRule("CN=*", "allow", "exact").matches("CN=x")
    assert AuthzRule("CN=*", "allow", "exact").matches("CN=*")


def test_authz_list_from_the_command_line_and_object_add_is_the_same_object(
        dirs: TlsDirs) -> None:
    spec = ("authz-list,id=auth0,policy=deny,rules.0.match=CN=mallory*,,O=*,"
            "rules.0.policy=deny,rules.0.format=glob,rules.1.match=*O=livemig tests*,"
            "rules.1.policy=allow,rules.1.format=glob")
    qmp = {"id": "auth0", "policy": "deny", "rules": [
        {"match": "CN=mallory*,O=*", "policy": "deny", "format": "glob"},
        {"match": "*O=livemig tests*", "policy": "allow", "format": "glob"}]}
    from_cli, from_qmp = TlsObjects(), TlsObjects()
    for objs in (from_cli, from_qmp):
        objs.add(*parse_object(f"tls-creds-x509,id=tls0,dir={dirs.server},endpoint=server"))
    from_cli.add(*parse_object(spec))
    from_qmp.add("authz-list", qmp)
    ep = from_cli.endpoint("tls0", "", "auth0", endpoint="server")
    assert ep is not None and ep == from_qmp.endpoint("tls0", "", "auth0", endpoint="server")
    assert ep.authz == authz_list(("CN=mallory*,O=*", "deny", "glob"),
                                  ("*O=livemig tests*", "allow", "glob"))
    # What a helper process gets rebuilds the same endpoint.
    assert TlsEndpoint.of(ep.describe()) == ep


@pytest.mark.parametrize(("props", "error"), [
    ({"policy": "maybe"}, "'policy' does not accept"),
    ({"rules": [{"match": "x"}]}, "'rules.0.policy' is missing"),
    ({"rules": [{"policy": "allow"}]}, "'rules.0.match' is missing"),
    ({"rules": [{"match": "x", "policy": "allow", "format": "regex"}]},
     "'rules.0.format' does not accept"),
    ({"rules": [{"match": "x", "policy": "allow", "colour": "red"}]},
     "'rules.0.colour' is unexpected"),
    ({"rules": "CN=x"}, "'rules' expects an array"),
    ({"identity": "CN=x"}, "'identity' is unexpected"),
])
def test_authz_list_refuses_bad_properties_at_object_add(props: dict[str, Any],
                                                        error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        TlsObjects().add("authz-list", {"id": "auth0", **props})


def test_command_line_arrays_need_indexes_from_zero() -> None:
    with pytest.raises(ConfigError, match="array indexes"):
        parse_object("authz-list,id=a,rules.1.match=x,rules.1.policy=allow")


def test_authz_list_decides_who_may_connect(dirs: TlsDirs, listener: Listener) -> None:
    allowing = server(dirs.server, authz=authz_list(("*,O=livemig tests,*", "allow", "glob")))
    t, out = accept_in_thread(listener, allowing)
    ch = connect(uri(listener), tls=client(dirs.client))
    ch.send([Encoder().preamble()])
    t.join(30)
    ch.close()
    assert out.get("kind") is ChannelKind.MAIN, out
    denying = server(dirs.server, authz=authz_list(("CN=source.*", "deny", "glob"),
                                                   policy="allow"))
    src, dst = refused_on_both_ends(listener, denying, client(dirs.client))
    assert isinstance(src, ChannelClosedError), src
    assert isinstance(dst, TlsError) and "rule 0" in str(dst) and CLIENT_DN in str(dst), dst


def test_distinguished_names_are_printed_as_rfc4514() -> None:
    subject = ((("countryName", "GB"),), (("organizationName", "A, B"),),
               (("commonName", "x"),))
    assert distinguished_name(subject) == "CN=x,O=A\\, B,C=GB"


class BioClient:
    """A TLS client whose encrypted bytes the test hands to the socket itself (an
    ``ssl.SSLObject`` over memory BIOs), so that a record can arrive in parts."""

    def __init__(self, creds: str, sock: socket.socket) -> None:
        ctx = TlsCredsX509.create("tls0", creds, "client").context
        self.sock, self.inc, self.out = sock, ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inc, self.out, server_hostname="dest.example")

    def handshake(self) -> None:
        while True:
            try:
                self.obj.do_handshake()
                self.sock.sendall(self.out.read())
                return
            except ssl.SSLWantReadError:
                self.sock.sendall(self.out.read())
                self.inc.write(self.sock.recv(65536))

    def record(self, data: bytes) -> bytes:
        """``data`` encrypted: the bytes of its record(s), not sent."""
        self.obj.write(data)
        return self.out.read()


def _bio_pair(dirs: TlsDirs) -> tuple[Channel, BioClient, socket.socket]:
    """A secured channel and a sender whose records the test puts on the wire."""
    raw, peer = socket.socketpair()
    ch = Channel(sock=raw, name="postcopy", tls=server(dirs.server))
    sender = BioClient(dirs.client, peer)
    shake = threading.Thread(target=sender.handshake)
    shake.start()
    ch.secure(timeout=20)
    shake.join(20)
    return ch, sender, peer


@pytest.mark.parametrize("whole", [1, 3, 12])
def test_a_tls_read_returns_the_records_arrived_without_waiting_for_one_in_flight(
        dirs: TlsDirs, whole: int) -> None:
    ch, sender, peer = _bio_pair(dirs)
    # Full records: the read would go on to the next one if it had arrived whole.
    first = b"".join(bytes([65 + i]) * RECORD_PLAINTEXT for i in range(whole))
    second = b"z" * RECORD_PLAINTEXT
    wire_first = b"".join(sender.record(first[i : i + RECORD_PLAINTEXT])
                          for i in range(0, len(first), RECORD_PLAINTEXT))
    wire_second = sender.record(second)
    # The last record is still arriving: all but its last bytes are here.
    peer.sendall(wire_first + wire_second[:-100])
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(ch.recv(1 << 20)))
    reader.start()
    reader.join(5)
    arrived_whole = not reader.is_alive()
    peer.sendall(wire_second[-100:])
    reader.join(20)
    assert arrived_whole, "the read waited for the record still in flight"
    assert got == [first]
    assert ch.recv(1 << 20) == second
    ch.close()
    peer.close()


def test_a_tls_read_ends_with_the_senders_write_though_the_next_has_arrived(
        dirs: TlsDirs) -> None:
    # An urgent page (or a page request) is one write and one short record: its reader
    # gets it at once, without asking the kernel whether the next write is there.
    ch, sender, peer = _bio_pair(dirs)
    page, request = b"p" * (8 + PAGE_SIZE), b"r" * 24
    peer.sendall(sender.record(page) + sender.record(request))
    assert ch.recv(1 << 20) == page
    assert ch.recv(1 << 20) == request
    ch.close()
    peer.close()


def test_a_tls_read_allocates_about_the_records_it_returns(
        dirs: TlsDirs, peak_allocated: Callable[[Callable[[], bytes]], tuple[bytes, int]]
) -> None:
    ch, sender, peer = _bio_pair(dirs)
    request = b"r" * 24
    peer.sendall(sender.record(request))
    got, peak = peak_allocated(lambda: ch.recv(1 << 20))
    assert got == request
    assert peak < 64 * 1024
    ch.close()
    peer.close()


def _records(wire: bytes) -> list[tuple[int, int]]:
    """(content type, length) of each TLS record in ``wire``."""
    out, pos = [], 0
    while pos < len(wire):
        out.append((wire[pos], int.from_bytes(wire[pos + 3 : pos + 5], "big")))
        pos += 5 + out[-1][1]
    return out


def test_an_urgent_page_goes_out_as_one_tls_record(dirs: TlsDirs) -> None:
    # A page request is answered with one record, made by one write: its header and
    # its page are not two records, and the reader needs one record for it.
    raw, peer = socket.socketpair()
    ch = Channel(sock=raw, name="postcopy", tls=client(dirs.client, hostname="dest.example"))
    other = TlsCredsX509.create("tls0", dirs.server, "server").context.wrap_bio(
        inc := ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_side=True)

    def serve_handshake() -> None:
        while True:
            try:
                other.do_handshake()
                peer.sendall(out.read())
                return
            except ssl.SSLWantReadError:
                peer.sendall(out.read())
                inc.write(peer.recv(65536))
    shake = threading.Thread(target=serve_handshake)
    shake.start()
    ch.secure(timeout=20)
    shake.join(20)
    enc = Encoder(channel=ChannelKind.POSTCOPY, postcopy=True)
    enc.preamble()
    header, page = enc.page_header("pc.ram", 0x5000), bytes(range(256)) * 16
    ch.send([header, memoryview(page)])
    wire = peer.recv(1 << 20)
    assert [t for t, _n in _records(wire)] == [23]  # one application-data record
    inc.write(wire)
    assert other.read(1 << 20) == header + page
    ch.close()
    peer.close()


def test_a_tls_read_gathers_the_arrived_records_of_one_large_write(dirs: TlsDirs) -> None:
    ch, sender, peer = _bio_pair(dirs)
    batch = bytes(range(256)) * (3 * 64 + 1)  # three full records and a short one
    peer.sendall(sender.record(batch))
    assert ch.recv(1 << 20) == batch
    ch.close()
    peer.close()


# --- objects and parameters --------------------------------------------------------------

def test_objects_are_created_from_qemu_syntax_and_checked_at_once(dirs: TlsDirs,
                                                                  tmp_path: Path) -> None:
    objs = TlsObjects()
    objs.add(*parse_object(f"tls-creds-x509,id=tls0,dir={dirs.server},endpoint=server,"
                           "verify-peer=on"))
    objs.add("authz-simple", {"id": "auth0", "identity": CLIENT_DN})
    ep = objs.endpoint("tls0", "", "auth0", endpoint="server")
    assert ep is not None and ep.authz == AuthzSimple("auth0", CLIENT_DN)
    assert objs.endpoint("", "", "", endpoint="server") is None
    with pytest.raises(ConfigError, match="client endpoint"):
        objs.endpoint("tls0", "", "", endpoint="client")
    with pytest.raises(ConfigError, match="No such file"):
        objs.add("tls-creds-x509", {"id": "bad", "dir": str(tmp_path), "endpoint": "server"})
    with pytest.raises(ConfigError, match="duplicate"):
        objs.add("authz-simple", {"id": "auth0", "identity": "x"})
    objs.delete("tls0")
    with pytest.raises(ConfigError, match="No TLS credentials"):
        objs.endpoint("tls0", "", "", endpoint="server")


def test_tls_parameters_are_strings_shown_by_query() -> None:
    p = Parameters().updated({"tls-creds": "tls0", "tls-hostname": "dest.example",
                              "tls-authz": "auth0"})
    q = p.to_qmp()
    assert (q["tls-creds"], q["tls-hostname"], q["tls-authz"]) == ("tls0", "dest.example",
                                                                   "auth0")
    with pytest.raises(ConfigError, match="expects a string"):
        Parameters().updated({"tls-creds": 1})


def test_a_unix_socket_needs_tls_hostname_to_check_the_server(dirs: TlsDirs,
                                                             tmp_path: Path) -> None:
    refusing = Listener(MigrationUri.parse(f"unix:{tmp_path / 'refused.sock'}"))
    with pytest.raises(TlsError, match="set tls-hostname"):
        connect(refusing.uri, tls=client(dirs.client))
    refusing.close()
    lst = Listener(MigrationUri.parse(f"unix:{tmp_path / 'mig.sock'}"))
    try:
        t, out = accept_in_thread(lst, server(dirs.server))
        ch = connect(lst.uri, tls=client(dirs.client, hostname="dest.example"))
        ch.send([Encoder().preamble()])
        t.join(30)
        ch.close()
        assert out.get("kind") is ChannelKind.MAIN, out
    finally:
        lst.close()
