"""The cluster CA: created once, kept in the coordinator's state directory, signing every member's certificate.

Files under ``state_dir`` (keys mode 0600, the directory 0700):

* ``ca.key`` / ``ca.pem`` — the CA. Its certificate also serves the join endpoint (pinned by hash, see
  ``node.identity.fetch_pinned_ca``), so it carries the DNS name ``llama-node-coordinator``.
* ``token`` — the join token (secret + CA hash); kept, so nodes can rejoin after a coordinator restart.
* ``coordinator.key`` / ``coordinator.pem`` — the coordinator's own client certificate, for calling nodes.
* ``.lock`` — held (``flock``) while these are read or created, so that processes starting at once on a new
  directory (two ``serve``, ``serve`` and ``run``) make one CA: the first creates it, the others load it. The kernel
  drops the lock when its holder dies, so a crash leaves no stale lock.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from node.identity import (
    COORDINATOR_TLS_NAME,
    Identity,
    JoinToken,
    Role,
    cert_sha256,
    ip_sans,
    key_pem,
    make_csr,
    new_key,
)

log = logging.getLogger(__name__)

CERT_DAYS = 365


class JoinRefusedError(Exception):
    """A join request that does not prove the token or is malformed."""


def _write(path: Path, data: bytes, secret: bool) -> None:
    """Write ``path`` whole or not at all (a temporary file of this process, flushed to disk, then renamed)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if secret else 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    """Hold ``state_dir``'s lock: one process at a time reads or creates the CA there."""
    fd = os.open(state_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _validity(builder: x509.CertificateBuilder, days: int) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return builder.not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))


@dataclass
class ClusterCA:
    """The CA key and certificate, and the token that lets a node in."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    token: JoinToken
    state_dir: Path | None = None

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return key_pem(self.key)

    @classmethod
    def create(cls, cluster_name: str = "llama-node") -> ClusterCA:
        key = new_key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{cluster_name} cluster CA"),
                          x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, Role.coordinator.value)])  # fmt: skip
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),  # fmt: skip
                critical=True,
            )
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(COORDINATOR_TLS_NAME)]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        )
        cert = _validity(builder, 10 * 365).sign(key, hashes.SHA256())
        ca = cls(key, cert, JoinToken.new(b"\0" * 32))
        ca.token = JoinToken.new(cert_sha256(ca.cert_pem))
        return ca

    @classmethod
    def load_or_create(cls, state_dir: Path) -> ClusterCA:
        """The CA kept in ``state_dir``, created (with its token and the coordinator's certificate) on first use.

        Safe to call from several processes at once: creation is serialised by ``state_dir``'s lock, so all of them
        get the same CA, the one on disk.
        """
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with _locked(state_dir):
            ca_key, ca_pem, token = state_dir / "ca.key", state_dir / "ca.pem", state_dir / "token"
            if ca_key.exists() and ca_pem.exists() and token.exists():
                ca = cls._load(state_dir)
            else:
                # the token is written last: a CA with no token never served a join (a crash between the writes)
                ca = cls.create()
                ca.state_dir = state_dir
                _write(ca_key, ca.key_pem, secret=True)
                _write(ca_pem, ca.cert_pem, secret=False)
                _write(token, str(ca.token).encode(), secret=True)
                log.info("new cluster CA created in %s", state_dir)
            role = Role.coordinator
            if not (state_dir / f"{role.value}.pem").exists():
                ident = ca.issue(role.value, role)
                _write(state_dir / f"{role.value}.key", ident.key_pem, secret=True)
                _write(state_dir / f"{role.value}.pem", ident.cert_pem, secret=False)
        return ca

    @classmethod
    def _load(cls, state_dir: Path) -> ClusterCA:
        ca_key, ca_pem, token = state_dir / "ca.key", state_dir / "ca.pem", state_dir / "token"
        key = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{ca_key} is not an EC key")
        ca = cls(key, x509.load_pem_x509_certificate(ca_pem.read_bytes()),
                 JoinToken.parse(token.read_text()), state_dir)  # fmt: skip
        if ca.token.ca_sha256 != cert_sha256(ca.cert_pem):
            raise ValueError(f"{token} does not belong to {ca_pem}; remove {state_dir} to start a new cluster")
        if key.public_key() != ca.cert.public_key():
            raise ValueError(f"{ca_key} is not the key of {ca_pem}; remove {state_dir} to start a new cluster")
        log.info("cluster CA loaded from %s", state_dir)
        return ca

    def identity(self, role: Role) -> Identity:
        """The coordinator's kept identity (``load_or_create`` made it)."""
        if self.state_dir is None:
            return self.issue(role.value, role)
        d = self.state_dir
        return Identity((d / f"{role.value}.key").read_bytes(), (d / f"{role.value}.pem").read_bytes(), self.cert_pem)

    def server_identity(self) -> Identity:
        """What the join endpoint presents: the CA certificate itself (nodes pin it by hash)."""
        return Identity(self.key_pem, self.cert_pem, self.cert_pem)

    def issue(self, common_name: str, role: Role, addresses: Sequence[str] = ()) -> Identity:
        """A new key and a certificate for it (the coordinator's own, admin, and tests)."""
        key = new_key()
        csr = x509.load_der_x509_csr(make_csr(key, common_name))
        return Identity(key_pem(key), self.sign(csr, common_name, role, addresses), self.cert_pem)

    def sign(self, csr: x509.CertificateSigningRequest, common_name: str, role: Role,
             addresses: Sequence[str] = ()) -> bytes:  # fmt: skip
        """Sign ``csr``'s key as ``common_name`` in ``role`` with ``addresses`` (IPs) as SANs; PEM."""
        if not csr.is_signature_valid:
            raise JoinRefusedError("the certificate request's signature is invalid")
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                             x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role.value)])  # fmt: skip
        sans: list[x509.GeneralName] = [x509.DNSName(common_name)] if _dns_ok(common_name) else []
        sans += [x509.IPAddress(ip) for ip in ip_sans(addresses)]
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(csr.public_key())
            .serial_number(x509.random_serial_number())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return _validity(builder, CERT_DAYS).sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    def sign_join(self, node_id: str, csr_der: bytes, proof: bytes, addresses: Sequence[str]) -> bytes:
        """Check the token proof over the CSR and sign the node's certificate.

        Raises:
            JoinRefusedError: a wrong token, or a malformed request.
        """
        if not self.token.check(csr_der, proof):
            raise JoinRefusedError("the join token is wrong (its proof does not match this cluster's secret)")
        if not node_id or len(node_id) > 63:
            raise JoinRefusedError("a node id is 1 to 63 characters")
        try:
            csr = x509.load_der_x509_csr(csr_der)
        except ValueError as e:
            raise JoinRefusedError(f"malformed certificate request: {e}") from None
        if not ip_sans(addresses):
            raise JoinRefusedError("a node must give at least one IP address to be reached at")
        return self.sign(csr, node_id, Role.node, addresses)


def _dns_ok(name: str) -> bool:
    return bool(name) and all(c.isalnum() or c in "-." for c in name)
