"""Test and benchmark tooling: certificates made on the spot, good and bad.

Theory of operation
-------------------
TLS tests and benchmarks need x509 credentials that nobody has to keep: :class:`Ca`
makes a CA with the ``cryptography`` package (a test and bench extra, imported only
by this module) and issues server and client certificates from it, expired ones too;
:func:`make_tls_dirs` lays them out as QEMU's tls-creds-x509 directories
(``ca-cert.pem``, ``server-cert.pem``, ``server-key.pem``, ``client-cert.pem``,
``client-key.pem``), so livemig and QEMU load the very same files.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CLIENT_DN = "CN=source.example,O=livemig tests,C=GB"
SERVER_NAMES = ("localhost", "dest.example")


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "GB"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "livemig tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass
class Ca:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def make(cls, cn: str = "livemig test CA") -> Ca:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=30))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
                .add_extension(x509.KeyUsage(False, False, False, False, False, True, True,
                                             False, False), True)
                .sign(key, hashes.SHA256()))
        return cls(key, cert)

    def issue(self, cn: str, *, server: bool, names: tuple[str, ...] = (),
              expired: bool = False) -> tuple[bytes, bytes]:
        """PEM certificate and key for a server (with ``names`` as SANs) or a client."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        end = now - datetime.timedelta(days=1) if expired else now + datetime.timedelta(days=30)
        sans: list[x509.GeneralName] = []
        for n in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                sans.append(x509.DNSName(n))
        subject = (x509.Name.from_rfc4514_string(cn) if "=" in cn else _name(cn))
        b = (x509.CertificateBuilder().subject_name(subject)
             .issuer_name(self.cert.subject).public_key(key.public_key())
             .serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(days=10)).not_valid_after(end)
             .add_extension(x509.ExtendedKeyUsage(
                 [ExtendedKeyUsageOID.SERVER_AUTH if server else
                  ExtendedKeyUsageOID.CLIENT_AUTH]), False))
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), False)
        cert = b.sign(self.key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


def creds_dir(path: Path, trusted: Ca, *, server: tuple[bytes, bytes] | None = None,
              client: tuple[bytes, bytes] | None = None) -> str:
    """A tls-creds-x509 directory: ``trusted`` as ca-cert.pem, and the given pairs."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "ca-cert.pem").write_bytes(trusted.pem)
    for role, pair in (("server", server), ("client", client)):
        if pair is not None:
            (path / f"{role}-cert.pem").write_bytes(pair[0])
            (path / f"{role}-key.pem").write_bytes(pair[1])
    return str(path)


@dataclass
class TlsDirs:
    """The directories of one test: a good server and client, and bad variants."""

    server: str           # server cert for localhost, 127.0.0.1, dest.example
    client: str           # client cert (DN CLIENT_DN) from the same CA
    no_cert_client: str   # trusts the CA but has no client certificate
    other_ca_client: str  # a client cert from another CA (trusting the right one)
    other_ca_server: str  # a server cert from another CA
    expired_server: str
    expired_client: str
    wrong_name_server: str  # a valid server cert for another host only


def make_tls_dirs(root: Path) -> TlsDirs:
    ca, other = Ca.make(), Ca.make("another CA")
    names = (*SERVER_NAMES, "127.0.0.1")
    return TlsDirs(
        server=creds_dir(root / "server", ca, server=ca.issue("dest.example", server=True,
                                                               names=names)),
        client=creds_dir(root / "client", ca, client=ca.issue(CLIENT_DN, server=False)),
        no_cert_client=creds_dir(root / "nocert", ca),
        other_ca_client=creds_dir(root / "other-ca-client", ca,
                                  client=other.issue(CLIENT_DN, server=False)),
        other_ca_server=creds_dir(root / "other-ca-server", ca,
                                  server=other.issue("dest.example", server=True, names=names)),
        expired_server=creds_dir(root / "expired-server", ca,
                                 server=ca.issue("dest.example", server=True, names=names,
                                                 expired=True)),
        expired_client=creds_dir(root / "expired-client", ca,
                                 client=ca.issue(CLIENT_DN, server=False, expired=True)),
        wrong_name_server=creds_dir(root / "wrong-name", ca,
                                    server=ca.issue("elsewhere.example", server=True,
                                                    names=("elsewhere.example",))),
    )
