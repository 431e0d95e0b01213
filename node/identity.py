"""Who a process is in a cluster: the join token, a key and certificate, and the gRPC credentials made from them.

Shared by nodes and the coordinator (which imports ``node``); the cluster CA itself lives in ``coordinator.pki``.

The token (``lln1.<secret>.<ca hash>``) carries a 128-bit secret and the SHA-256 of the cluster CA certificate
(DER), as ``kubeadm join --token … --discovery-token-ca-cert-hash sha256:…`` does in two flags. A node never
sends the secret: it proves it holds the token with an HMAC over its certificate signing request, and it pins the
coordinator by the CA hash before it sends anything at all.

Every certificate says its role in its subject's organizational unit: ``coordinator``, ``node`` or ``admin``
(``llama-node status``). The node server lets only the coordinator load, push or release shards.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import secrets
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

log = logging.getLogger(__name__)

TOKEN_PREFIX = "lln1"
#: The name the coordinator's join endpoint presents (its certificate is the CA's, pinned by hash, not by name).
COORDINATOR_TLS_NAME = "llama-node-coordinator"
_PROOF_CONTEXT = b"llama-node join v1\x00"


class Role(StrEnum):
    coordinator = "coordinator"
    node = "node"
    admin = "admin"


class TokenError(ValueError):
    """A malformed join token."""


class PinError(ConnectionError):
    """The coordinator's CA is not the one the token names: not our cluster, or someone in the middle."""


@dataclass(frozen=True, slots=True)
class JoinToken:
    """The join secret and the hash of the CA certificate it belongs to."""

    secret: bytes
    ca_sha256: bytes

    def __post_init__(self) -> None:
        if len(self.secret) != 16 or len(self.ca_sha256) != 32:
            raise TokenError("a join token has a 16-byte secret and a 32-byte CA hash")

    @classmethod
    def new(cls, ca_sha256: bytes) -> JoinToken:
        return cls(secrets.token_bytes(16), ca_sha256)

    @classmethod
    def parse(cls, text: str) -> JoinToken:
        """Parse ``lln1.<32 hex>.<64 hex>``.

        Raises:
            TokenError: not a token, with what is wrong.
        """
        parts = text.strip().split(".")
        if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
            raise TokenError(f"a join token looks like {TOKEN_PREFIX}.<32 hex digits>.<64 hex digits>")
        try:
            return cls(bytes.fromhex(parts[1]), bytes.fromhex(parts[2]))
        except ValueError as e:
            raise TokenError(f"bad join token: {e}") from None

    def __str__(self) -> str:
        return f"{TOKEN_PREFIX}.{self.secret.hex()}.{self.ca_sha256.hex()}"

    def proof(self, csr_der: bytes) -> bytes:
        """HMAC-SHA256 of the CSR under the secret: proves the token without revealing it. A replayed proof only
        gets a certificate for the CSR's key, which the replayer does not hold."""
        return hmac.new(self.secret, _PROOF_CONTEXT + csr_der, hashlib.sha256).digest()

    def check(self, csr_der: bytes, proof: bytes) -> bool:
        return hmac.compare_digest(self.proof(csr_der), proof)

    def purpose_proof(self, purpose: str) -> bytes:
        """HMAC-SHA256 of a fixed purpose (``echo``, ``status``): token-authenticated calls other than Join."""
        return hmac.new(self.secret, f"llama-node {purpose} v1".encode() + b"\x00", hashlib.sha256).digest()


def cert_sha256(pem: bytes) -> bytes:
    """SHA-256 of a certificate's DER encoding (what the token pins)."""
    return hashlib.sha256(x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)).digest()


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_csr(key: ec.EllipticCurvePrivateKey, common_name: str) -> bytes:
    """A DER certificate signing request for ``common_name`` (the coordinator sets role and addresses itself)."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.DER)


def peer_role(pem: bytes | str) -> tuple[str, Role | None]:
    """(common name, role) of a peer certificate, as the gRPC auth context gives it."""
    cert = x509.load_pem_x509_certificate(pem.encode() if isinstance(pem, str) else pem)
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ou = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    role: Role | None = None
    if ou:
        try:
            role = Role(str(ou[0].value))
        except ValueError:
            role = None
    return (str(cn[0].value) if cn else "", role)


@dataclass(frozen=True, slots=True)
class Identity:
    """A private key, the certificate the cluster CA signed for it, and the CA: what mutual TLS needs."""

    key_pem: bytes
    cert_pem: bytes
    ca_pem: bytes

    def server_credentials(self) -> grpc.ServerCredentials:
        """A server that speaks TLS only and accepts only clients whose certificate the CA signed."""
        return grpc.ssl_server_credentials(
            [(self.key_pem, self.cert_pem)], root_certificates=self.ca_pem, require_client_auth=True
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """A client that presents this certificate and trusts only servers the CA signed (for their IP SANs)."""
        return grpc.ssl_channel_credentials(self.ca_pem, self.key_pem, self.cert_pem)


def fetch_pinned_ca(host: str, port: int, ca_sha256: bytes, timeout: float = 5.0) -> bytes:
    """The coordinator's CA certificate, read from its TLS handshake and checked against the token's hash.

    The coordinator's join endpoint presents the CA certificate itself, so this is the only trust decision and it
    rests on the hash alone; nothing is sent before it.

    Raises:
        PinError: the certificate is not the pinned one.
        OSError: no TLS endpoint there.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # verified below, by hash: this is the pin
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection((host, port), timeout=timeout) as sock, ctx.wrap_socket(sock) as tls:
        der = tls.getpeercert(binary_form=True)
    if der is None:
        raise PinError(f"{host}:{port} presented no certificate")
    got = hashlib.sha256(der).digest()
    if not hmac.compare_digest(got, ca_sha256):
        raise PinError(
            f"{host}:{port} presents CA sha256:{got.hex()[:16]}…, the token pins sha256:{ca_sha256.hex()[:16]}…: "
            "not this token's cluster (or someone in the middle); refusing to join"
        )
    return ssl.DER_cert_to_PEM_cert(der).encode()


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def ip_sans(addresses: Sequence[str]) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    return [ipaddress.ip_address(a) for a in addresses if is_ip(a)]
