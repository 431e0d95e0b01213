"""Pure parts of joining: the token, the memory probe under a cgroup limit, re-announce thresholds, CA persistence."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from coordinator.pki import ClusterCA, JoinRefusedError
from node.identity import JoinToken, TokenError, cert_sha256, make_csr, new_key, peer_role
from node.member import moved_a_lot
from node.probe import DeviceMeasurement, cgroup_memory, parse_size, system_memory


def test_token_round_trip_and_proofs() -> None:
    token = JoinToken.new(bytes(range(32)))
    assert JoinToken.parse(str(token)) == token
    csr = make_csr(new_key(), "n1")
    assert token.check(csr, token.proof(csr))
    assert not JoinToken.new(token.ca_sha256).check(csr, token.proof(csr))  # another secret
    assert token.secret.hex() not in token.proof(csr).hex()
    for bad in ("", "lln1.zz.00", "lln2." + "0" * 32 + "." + "0" * 64, "lln1." + "0" * 30 + "." + "0" * 64):
        with pytest.raises(TokenError):
            JoinToken.parse(bad)


def test_ca_persists_with_private_keys_private(tmp_path: Path) -> None:
    ca = ClusterCA.load_or_create(tmp_path / "s")
    again = ClusterCA.load_or_create(tmp_path / "s")
    assert again.token == ca.token and cert_sha256(again.cert_pem) == ca.token.ca_sha256
    for name in ("ca.key", "token", "coordinator.key"):
        assert stat.S_IMODE((tmp_path / "s" / name).stat().st_mode) == 0o600


def test_signed_node_certificate_carries_role_and_ip_sans(tmp_path: Path) -> None:
    from cryptography import x509

    ca = ClusterCA.create()
    key = new_key()
    csr = make_csr(key, "laptop-abc123")
    pem = ca.sign_join("laptop-abc123", csr, ca.token.proof(csr), ["10.0.0.7", "not-an-ip"])
    cert = x509.load_pem_x509_certificate(pem)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.7"]
    assert peer_role(pem)[1] is not None and peer_role(pem) == ("laptop-abc123", peer_role(pem)[1])
    with pytest.raises(JoinRefusedError, match="token is wrong"):
        ca.sign_join("laptop-abc123", csr, b"\0" * 32, ["10.0.0.7"])
    with pytest.raises(JoinRefusedError, match="IP address"):
        ca.sign_join("laptop-abc123", csr, ca.token.proof(csr), [])


def test_cgroup_v2_limit_bounds_memory(tmp_path: Path) -> None:
    (tmp_path / "memory.max").write_text("2000000000\n")
    (tmp_path / "memory.current").write_text("500000000\n")
    assert cgroup_memory(tmp_path) == (2_000_000_000, 500_000_000)
    total, free = system_memory(cgroup_root=tmp_path)
    assert total <= 2_000_000_000 and free <= 1_500_000_000
    assert system_memory(cap=10**8, cgroup_root=tmp_path) == (10**8, 10**8)
    (tmp_path / "memory.max").write_text("max\n")
    assert cgroup_memory(tmp_path) is None


def test_sizes_and_reannounce_threshold() -> None:
    assert parse_size("12GB") == 12 * 10**9 and parse_size("1.5GiB") == 3 * 2**29 and parse_size("512mb") == 512e6
    with pytest.raises(ValueError):
        parse_size("lots")
    m = DeviceMeasurement("cpu", "cpu", 16 * 10**9, 8 * 10**9, 1.0, 10.0)
    assert not moved_a_lot(m, DeviceMeasurement("cpu", "cpu", 16 * 10**9, 7 * 10**9, 1.0, 10.0))
    assert moved_a_lot(m, DeviceMeasurement("cpu", "cpu", 16 * 10**9, 6 * 10**9, 1.0, 10.0))
