"""TLS on migration channels: x509 credentials, authorization, and the TLS endpoint.

Theory of operation
-------------------
As in QEMU, TLS is configured with user-created objects and three migration
parameters.  A ``tls-creds-x509`` object (:class:`TlsCredsX509`) names a directory
holding ``ca-cert.pem``, ``server-cert.pem``/``server-key.pem`` (endpoint=server) or
``client-cert.pem``/``client-key.pem`` (endpoint=client) and whether the peer's
certificate is checked (``verify-peer``); its files are loaded when the object is
created, so a missing or bad file is refused by ``object-add``.  An ``authz-simple``
object (:class:`AuthzSimple`) allows one client identity: the distinguished name of
the client certificate (RFC 4514, as QEMU prints it: ``CN=...,O=...,C=...``); an
``authz-list`` object (:class:`AuthzList`) holds QEMU's ordered rules (an identity,
``exact`` or as a ``glob``, allowed or denied) and a policy for identities no rule
matches.  Both are :class:`Authz` objects: one call, :meth:`Authz.check`.  The
parameters ``tls-creds``, ``tls-hostname`` and ``tls-authz`` name what a migration uses;
:class:`TlsObjects` (one per VMM instance) holds the objects and turns the parameters
into a :class:`TlsEndpoint` at ``migrate`` / ``migrate-incoming``: the one object that
secures every connection of that migration (main channel and its return path, the
postcopy channel, the helper processes' ends of it, the recovery connections, and any
other channel a migration opens: :meth:`~livemig.migration.channel.Channel.secure` is
the single seam).

TLS is userspace TLS (the ``ssl`` module over OpenSSL; ``SSL_read``/``SSL_write`` run
without the GIL).  The version is TLS 1.2 exactly, for two reasons that matter here:
the main channel is read by one thread (the return path) while another writes it, and
OpenSSL allows that only while neither direction has post-handshake messages to handle
(TLS 1.3 sends session tickets and may update keys; renegotiation is disabled too); and
with TLS 1.2 a client whose certificate the server refuses learns it in its own
handshake (TLS 1.3 tells it only at its first read, after it may already have sent
data), so both ends of a refused connection fail with a clear :class:`TlsError` before
any guest byte moves.  The cipher suites are OpenSSL's default ECDHE + AEAD suites.

The stream inside TLS is exactly the stream without it (docs/STREAM.md).  A session
cannot move from one process to another, so the postcopy channel, which the helper
processes own in ``x-postcopy-urgent-sender=process`` mode, opens its session where it
is used: its eight preamble bytes (``LMPC`` and a version) go in clear, so that the destination can
route the connection before anyone holds a session on it, and its TLS handshake is made
by the first read or write after them -- in the VMM for the in-process designs, in the
helper process (from the same credentials directory, :meth:`TlsEndpoint.describe`) for
``process``.  The main channel is TLS from its first byte, as QEMU's.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from livemig.errors import ConfigError, TlsError
from livemig.kernel.sock import peek_raw, unread_bytes
from livemig.objects import object_flag
from livemig.units import PAGE_SIZE

Buffer = bytes | bytearray | memoryview

CA_CERT = "ca-cert.pem"
CERT_FILES = {"server": ("server-cert.pem", "server-key.pem"),
              "client": ("client-cert.pem", "client-key.pem")}
HANDSHAKE_TIMEOUT = 30.0
# How a TLS record starts (content type handshake, version 3.x): what a TLS client
# sends first, told apart from livemig's and QEMU's plain preambles.
_TLS_HANDSHAKE_RECORD = b"\x16\x03"


def looks_like_tls(head: bytes) -> bool:
    """Do these first bytes of a connection open a TLS handshake?"""
    return head[:2] == _TLS_HANDSHAKE_RECORD


@dataclass(frozen=True)
class TlsCredsX509:
    """A ``tls-creds-x509`` object: its files are loaded into an SSL context at once."""

    id: str
    dir: str
    endpoint: str = "client"
    verify_peer: bool = True
    context: ssl.SSLContext = field(repr=False, compare=False,
                                    default_factory=lambda: ssl.SSLContext(ssl.PROTOCOL_TLS))

    @classmethod
    def create(cls, id: str, dir: str, endpoint: str = "client",
               verify_peer: Any = True) -> TlsCredsX509:
        if endpoint not in CERT_FILES:
            raise ConfigError(f"Parameter 'endpoint' expects 'server' or 'client', not "
                              f"{endpoint!r}")
        verify = object_flag("verify-peer", verify_peer)
        return cls(id, dir, endpoint, verify, _context(dir, endpoint, verify))

    def describe(self) -> dict[str, Any]:
        """Enough to build the same object in another process."""
        return {"id": self.id, "dir": self.dir, "endpoint": self.endpoint,
                "verify-peer": self.verify_peer}


def _context(directory: str, endpoint: str, verify: bool) -> ssl.SSLContext:
    """The SSL context for one endpoint; every file problem is a ConfigError naming it."""
    server = endpoint == "server"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    cert, key = (os.path.join(directory, f) for f in CERT_FILES[endpoint])
    ca = os.path.join(directory, CA_CERT)
    if verify:
        _load(ctx.load_verify_locations, ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        if not server:
            ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if os.path.exists(cert) or server:
        _load(lambda c: ctx.load_cert_chain(c, key), cert)
    return ctx


def _load(loader: Any, path: str) -> None:
    if not os.path.exists(path):
        raise ConfigError(f"Unable to access credentials {path}: No such file or directory")
    try:
        loader(path)
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(f"Unable to load credentials {path} (or its key): {e}") from None


class Authz(ABC):
    """What tls-authz names: a decision on the client certificate's distinguished name."""

    id: str
    QOM_TYPE: ClassVar[str]
    PROPS: ClassVar[tuple[str, ...]]  # the properties object-add takes (besides id)

    @classmethod
    @abstractmethod
    def create(cls, oid: str, props: Mapping[str, Any]) -> Authz:
        """The object from its (known) properties, each checked."""

    def check(self, identity: str) -> None:
        """Return if ``identity`` is allowed; a TlsError saying why not otherwise."""
        why = self.denied(identity)
        if why:
            raise TlsError(f"TLS x509 authz check for {identity!r} is denied ({why})")

    @abstractmethod
    def denied(self, identity: str) -> str:
        """Why ``identity`` is refused ('' when it is allowed)."""

    @abstractmethod
    def props(self) -> dict[str, Any]:
        """The object's properties as object-add takes them (without id)."""


@dataclass(frozen=True)
class AuthzSimple(Authz):
    """An ``authz-simple`` object: exactly one identity (a client certificate's DN)."""

    id: str
    identity: str
    QOM_TYPE: ClassVar[str] = "authz-simple"
    PROPS: ClassVar[tuple[str, ...]] = ("identity",)

    @classmethod
    def create(cls, oid: str, props: Mapping[str, Any]) -> AuthzSimple:
        if "identity" not in props:
            raise ConfigError("Parameter 'identity' is missing")
        return cls(oid, str(props["identity"]))

    def denied(self, identity: str) -> str:
        return "" if identity == self.identity else \
            f"authz '{self.id}' allows {self.identity!r}"

    def props(self) -> dict[str, Any]:
        return {"identity": self.identity}


POLICIES = ("deny", "allow")  # QEMU's QAuthZListPolicy
FORMATS = ("exact", "glob")   # QEMU's QAuthZListFormat


def _choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ConfigError(f"Parameter '{name}' does not accept value {value!r} (expected "
                          f"{' or '.join(choices)})")
    return str(value)


@dataclass(frozen=True)
class AuthzRule:
    """One rule of an ``authz-list``: an identity (``exact``) or a pattern (``glob``:
    ``*`` any run of characters, ``?`` any one, as GLib's g_pattern_match_simple) and
    what a match decides."""

    match: str
    policy: str
    format: str = "exact"

    @classmethod
    def create(cls, index: int, rule: Any) -> AuthzRule:
        if not isinstance(rule, Mapping):
            raise ConfigError(f"Parameter 'rules.{index}' expects an object")
        unknown = sorted(set(rule) - {"match", "policy", "format"})
        if unknown:
            raise ConfigError(f"Parameter 'rules.{index}.{unknown[0]}' is unexpected")
        for key in ("match", "policy"):
            if key not in rule:
                raise ConfigError(f"Parameter 'rules.{index}.{key}' is missing")
        return cls(str(rule["match"]),
                   _choice(f"rules.{index}.policy", rule["policy"], POLICIES),
                   _choice(f"rules.{index}.format", rule.get("format", "exact"), FORMATS))

    def matches(self, identity: str) -> bool:
        if self.format == "exact":
            return identity == self.match
        pattern = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c)
                          for c in self.match)
        return re.fullmatch(pattern, identity, re.DOTALL) is not None

    def props(self) -> dict[str, str]:
        return {"match": self.match, "policy": self.policy, "format": self.format}


@dataclass(frozen=True)
class AuthzList(Authz):
    """An ``authz-list`` object: rules tried in order, the first that matches decides;
    ``policy`` decides when none does (deny by default, as QEMU's)."""

    id: str
    policy: str = "deny"
    rules: tuple[AuthzRule, ...] = ()
    QOM_TYPE: ClassVar[str] = "authz-list"
    PROPS: ClassVar[tuple[str, ...]] = ("policy", "rules")

    @classmethod
    def create(cls, oid: str, props: Mapping[str, Any]) -> AuthzList:
        rules = props.get("rules", [])
        if not isinstance(rules, Sequence) or isinstance(rules, str):
            raise ConfigError("Parameter 'rules' expects an array")
        return cls(oid, _choice("policy", props.get("policy", "deny"), POLICIES),
                   tuple(AuthzRule.create(i, r) for i, r in enumerate(rules)))

    def denied(self, identity: str) -> str:
        for i, rule in enumerate(self.rules):
            if rule.matches(identity):
                return "" if rule.policy == "allow" else \
                    f"authz-list '{self.id}' rule {i} ({rule.match!r}) denies it"
        return "" if self.policy == "allow" else \
            f"authz-list '{self.id}': no rule matches and its policy is deny"

    def props(self) -> dict[str, Any]:
        return {"policy": self.policy, "rules": [r.props() for r in self.rules]}


AUTHZ_TYPES: dict[str, type[Authz]] = {c.QOM_TYPE: c for c in (AuthzSimple, AuthzList)}


def make_authz(qom_type: str, oid: str, props: Mapping[str, Any]) -> Authz:
    """An authz object of ``qom_type`` from its object-add properties (checked)."""
    cls = AUTHZ_TYPES[qom_type]
    unknown = sorted(set(props) - set(cls.PROPS))
    if unknown:
        raise ConfigError(f"Parameter '{unknown[0]}' is unexpected")
    return cls.create(oid, props)


# Attribute names as OpenSSL's getpeercert() gives them, and RFC 4514's short names.
_SHORT_NAMES = {"commonName": "CN", "countryName": "C", "stateOrProvinceName": "ST",
                "localityName": "L", "organizationName": "O",
                "organizationalUnitName": "OU", "streetAddress": "STREET",
                "domainComponent": "DC", "userId": "UID"}


def _escape(value: str) -> str:
    out = "".join("\\" + c if c in ',+"\\<>;=' else c for c in value)
    if out.startswith((" ", "#")):
        out = "\\" + out
    if out.endswith(" "):
        out = out[:-1] + "\\ "
    return out


def distinguished_name(subject: Sequence[Sequence[tuple[str, str]]]) -> str:
    """RFC 4514 text of a certificate subject as ``getpeercert()`` gives it (most
    specific attribute first, as QEMU prints DNs for tls-authz)."""
    return ",".join("+".join(f"{_SHORT_NAMES.get(k, k)}={_escape(v)}" for k, v in rdn)
                    for rdn in reversed(subject))


# What OpenSSL reports, said in terms of the configuration that causes it.
_REASONS = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        "the client sent no certificate, and verify-peer=on requires one",
    "SSLV3_ALERT_HANDSHAKE_FAILURE":
        "the server refused the handshake (without a client certificate, verify-peer=on "
        "on the server refuses)",
    "TLSV1_ALERT_UNKNOWN_CA": "the peer does not trust the CA that signed our certificate",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the peer says our certificate has expired",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the peer refused our certificate",
    "WRONG_VERSION_NUMBER": "the peer does not speak TLS",
    "UNEXPECTED_EOF_WHILE_READING":
        "the peer closed the connection during the handshake (is it listening without "
        "tls-creds, or did it refuse us?)",
}


def _explain(e: BaseException) -> str:
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"the peer's certificate is not accepted: {e.verify_message}"
    if isinstance(e, ssl.SSLError):
        return _REASONS.get(str(e.reason), str(e.reason or e))
    if isinstance(e, (TimeoutError, socket.timeout)):
        return "the peer did not complete the handshake in time"
    if isinstance(e, (ConnectionError, EOFError)):
        return ("the peer closed the connection during the handshake (is it listening "
                "without tls-creds, or did it refuse us?)")
    return str(e)


@dataclass(frozen=True)
class TlsEndpoint:
    """Everything one side of a migration needs to secure its connections: the
    credentials, the host name the server must prove (client), the authz (server)."""

    creds: TlsCredsX509
    hostname: str = ""
    authz: Authz | None = None

    @property
    def server(self) -> bool:
        return self.creds.endpoint == "server"

    def toward(self, host: str) -> TlsEndpoint:
        """Client: check the server's certificate against ``host`` unless tls-hostname
        names another."""
        return self if self.hostname or self.server else replace(self, hostname=host)

    def handshake(self, sock: socket.socket, channel: str,
                  timeout: float | None = HANDSHAKE_TIMEOUT) -> ssl.SSLSocket:
        """The TLS session on ``sock`` (which it takes over, and closes on failure) once
        the handshake and the peer checks passed; TlsError names what was refused."""
        side = "server" if self.server else "client"
        if not (self.server or self.hostname or not self.creds.verify_peer):
            sock.close()
            raise TlsError(f"the {channel} channel has no host name to check the "
                           "server's certificate against: set tls-hostname")
        sock.settimeout(timeout)
        tls: ssl.SSLSocket | None = None
        try:
            tls = self.creds.context.wrap_socket(
                sock, server_side=self.server, do_handshake_on_connect=False,
                server_hostname=None if self.server else (self.hostname or None))
            tls.do_handshake()
            tls.settimeout(None)
            if self.server and self.authz is not None:
                cert = tls.getpeercert()
                if not cert:
                    raise TlsError(f"tls-authz '{self.authz.id}' needs the client's "
                                   "certificate: set verify-peer=on")
                self.authz.check(distinguished_name(cert["subject"]))  # type: ignore[arg-type]
        except (OSError, EOFError, TlsError) as e:
            (tls or sock).close()  # the socket handed to us is ours to close
            if isinstance(e, TlsError):
                raise
            raise TlsError(f"TLS handshake on the {channel} channel failed ({side}): "
                           f"{_explain(e)}") from None
        return tls

    def describe(self) -> dict[str, Any]:
        """JSON for a helper process, which builds the same endpoint (:meth:`of`)."""
        authz = self.authz
        return {"creds": self.creds.describe(), "hostname": self.hostname,
                "authz": None if authz is None else
                {"qom-type": authz.QOM_TYPE, "id": authz.id, **authz.props()}}

    @classmethod
    def of(cls, desc: Mapping[str, Any]) -> TlsEndpoint:
        c = desc["creds"]
        creds = TlsCredsX509.create(str(c["id"]), str(c["dir"]), str(c["endpoint"]),
                                    c["verify-peer"])
        a = desc.get("authz")
        authz = None
        if a:
            props = dict(a)
            qom_type, oid = str(props.pop("qom-type")), str(props.pop("id"))
            authz = make_authz(qom_type, oid, props)
        return cls(creds, str(desc.get("hostname", "")), authz)


class TlsObjects:
    """The TLS objects of one VMM instance (``--object`` / ``object-add``)."""

    def __init__(self) -> None:
        self._creds: dict[str, TlsCredsX509] = {}
        self._authz: dict[str, Authz] = {}

    def add(self, qom_type: str, props: Mapping[str, Any]) -> None:
        props = dict(props)
        oid = str(props.pop("id", ""))
        if not oid:
            raise ConfigError("Parameter 'id' is missing")
        if oid in self._creds or oid in self._authz:
            raise ConfigError(f"attempt to add duplicate property '{oid}' to object "
                              "(type 'container')")
        if qom_type in AUTHZ_TYPES:
            self._authz[oid] = make_authz(qom_type, oid, props)
            return
        if qom_type != "tls-creds-x509":
            raise ConfigError(f"Invalid parameter type for 'qom-type', expected: one of "
                              f"tls-creds-x509, {', '.join(AUTHZ_TYPES)} (not {qom_type!r})")
        unknown = sorted(set(props) - {"dir", "endpoint", "verify-peer"})
        if unknown:
            raise ConfigError(f"Parameter '{unknown[0]}' is unexpected")
        if "dir" not in props:
            raise ConfigError("Parameter 'dir' is missing")
        self._creds[oid] = TlsCredsX509.create(
            oid, str(props["dir"]), str(props.get("endpoint", "client")),
            props.get("verify-peer", True))

    def delete(self, oid: str) -> None:
        if self._creds.pop(oid, None) is None and self._authz.pop(oid, None) is None:
            raise ConfigError(f"object '{oid}' not found")

    def endpoint(self, creds: str, hostname: str, authz: str, *,
                 endpoint: str) -> TlsEndpoint | None:
        """The endpoint the parameters name (None without tls-creds)."""
        if not creds:
            return None
        c = self._creds.get(creds)
        if c is None:
            raise ConfigError(f"No TLS credentials with id '{creds}'")
        if c.endpoint != endpoint:
            raise ConfigError(f"Expected TLS credentials for a {endpoint} endpoint "
                              f"('{creds}' is for a {c.endpoint})")
        a = None
        if authz and endpoint == "server":
            a = self._authz.get(authz)
            if a is None:
                raise ConfigError(f"No authz object with id '{authz}'")
        return TlsEndpoint(c, hostname if endpoint == "client" else "", a)


# --- sending over a session ------------------------------------------------------------

# Buffers are joined into writes of about this size: large enough for full TLS records
# and few calls, small enough that the copy (made holding the GIL) never keeps another
# thread -- one answering a page request -- waiting for long.
WRITE_CHUNK = 256 * 1024
PAGES_PER_WRITE = WRITE_CHUNK // (8 + PAGE_SIZE)
# A read gathers the records already arrived up to this size (decrypted at ~0.5 GB/s:
# half a millisecond of work before the reader sees the first byte of it).
READ_CHUNK = 256 * 1024
_RECORD_HEADER = 5  # content type, version (2 bytes), be16 length
# The most plaintext one record carries (TLS 1.2, RFC 5246 6.2.1): a write is cut into
# records of this size, so a shorter record is the last one of the sender's write.
RECORD_PLAINTEXT = 16384


# The most bytes one record takes on the wire: its header, the most plaintext, and the
# most expansion TLS 1.2 allows (RFC 5246 6.2.3; TLS 1.3 allows less).
RECORD_WIRE_MAX = _RECORD_HEADER + RECORD_PLAINTEXT + 2048


class RecordGauge:
    """Tells one gathering read whether to go on, with no wait: yes while the record
    being read has plaintext left, or when a whole record (``last``, the full record
    size) was read and another has arrived whole.  A shorter record ends the sender's
    write -- a requested page, a page request, the tail of a background batch -- and
    the read returns at once: asking the kernel whether the next write has arrived
    costs a system call on the path of every request and every answer, and whatever
    has arrived is read by the next read anyway.

    Whether a record has arrived whole costs system calls, which are dear on a
    virtual machine; one ``FIONREAD`` answers for every record it proves is there
    (``RECORD_WIRE_MAX`` bytes each, at most), and only the last one may need a look at
    its header (:func:`record_waiting`).  So a bulk read pays about one system call
    per :data:`READ_CHUNK`, not two per record."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self._sock = sock
        self._whole = 0  # records known to be waiting whole, not read yet

    def read_on(self, last: int) -> bool:
        if self._sock.pending():
            return True
        if last != RECORD_PLAINTEXT:
            return False
        if not self._whole:
            available = unread_bytes(self._sock)
            self._whole = available // RECORD_WIRE_MAX
            if not self._whole:
                return record_waiting(self._sock, available)
        self._whole -= 1  # the next read takes one of them
        return True


def record_waiting(sock: ssl.SSLSocket, available: int) -> bool:
    """Is a whole TLS record in the socket's receive queue, which holds ``available``
    bytes, so that the next read returns at once?  OpenSSL (without read-ahead, as
    Python leaves it) takes from the kernel exactly the records it decrypts, so the
    queue starts at a record header.  A record still arriving is not waiting: reading
    it would hold the reader -- and the records already decrypted, perhaps a requested
    page -- until its last byte."""
    if available < _RECORD_HEADER:
        return False
    head = peek_raw(sock, _RECORD_HEADER)
    if len(head) < _RECORD_HEADER:
        return False
    return available >= _RECORD_HEADER + int.from_bytes(head[3:5], "big")


def send_all(sock: ssl.SSLSocket, buffers: Sequence[Buffer]) -> int:
    """Send ``buffers`` in writes of about :data:`WRITE_CHUNK` bytes (small ones joined,
    a large one as it is); records are encrypted without the GIL."""
    total = 0
    pending: list[Buffer] = []
    size = 0
    for b in buffers:
        n = len(b)
        if n >= WRITE_CHUNK:
            if pending:
                sock.sendall(b"".join(pending))
                pending, size = [], 0
            sock.sendall(b)
        else:
            pending.append(b)
            size += n
            if size >= WRITE_CHUNK:
                sock.sendall(b"".join(pending))
                pending, size = [], 0
        total += n
    if pending:
        sock.sendall(pending[0] if len(pending) == 1 else b"".join(pending))
    return total


def gather_pages(words: npt.NDArray[np.generic], prefix: bytes, ram: memoryview,
                 offsets: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint8]:
    """PAGE records [header i, (prefix after the first), the 4 KiB page of ``ram`` at
    ``offsets[i]``] as one contiguous buffer, built with NumPy (TLS encrypts a copy
    anyway; one buffer makes one write)."""
    n, lead = len(offsets), len(prefix)
    rec = 8 + PAGE_SIZE
    out = np.empty(lead + n * rec, dtype=np.uint8)
    hdr = np.ascontiguousarray(words).view(np.uint8).reshape(n, 8)
    rows = out[lead:].reshape(n, rec)
    pages = np.frombuffer(ram, dtype=np.uint8)
    starts = offsets.astype(np.int64)
    if np.all(starts % PAGE_SIZE == 0):
        rows[:, 8:] = pages[: len(pages) // PAGE_SIZE * PAGE_SIZE].reshape(
            -1, PAGE_SIZE)[starts // PAGE_SIZE]
    else:
        rows[:, 8:] = pages[starts[:, None] + np.arange(PAGE_SIZE)]
    rows[1:, :8] = hdr[1:]
    out[:8] = hdr[0]  # the first record: header, then the prefix, then its page
    out[8 : 8 + lead] = np.frombuffer(prefix, dtype=np.uint8)
    return out
