"""Several processes creating the cluster CA in one fresh state directory at once (two ``serve``, or ``serve`` and
``run``, started together) end up with one CA: the one on disk, whose key is the stored key, with one token and one
coordinator certificate signed by it. Real processes (``spawn``), released together by a barrier each round.
"""

from __future__ import annotations

import multiprocessing as mp
import stat
from multiprocessing.synchronize import Barrier
from pathlib import Path
from queue import Empty
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

PROCS = 4
ROUNDS = 8  # without the lock, every round split (or crashed) on 2 cores


def _racer(root: str, rounds: int, barrier: Barrier, results: Any) -> None:
    """Each round: wait for the others, then ``load_or_create`` the round's directory; report what it returned,
    then ``("end", None)``, or ``("end", error)`` at the first error (breaking the barrier for the others)."""
    try:
        from coordinator.pki import ClusterCA
        from node.identity import Role

        for r in range(rounds):
            barrier.wait(timeout=60)
            ca = ClusterCA.load_or_create(Path(root) / f"round{r}")
            results.put((r, ca.cert_pem, str(ca.token), ca.identity(Role.coordinator).cert_pem))
    except BaseException as e:  # reported to the test, which fails with it
        barrier.abort()
        results.put(("end", f"round {r}: {e!r}" if "r" in locals() else repr(e)))
    else:
        results.put(("end", None))


def _public(pem: bytes) -> bytes:
    key = serialization.load_pem_private_key(pem, password=None)
    return key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)  # fmt: skip


def _cert_public(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_racing_processes_share_one_ca(tmp_path: Path) -> None:
    # arrange: PROCS processes, imported and waiting at the barrier before each round
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(PROCS), ctx.Queue()
    procs = [ctx.Process(target=_racer, args=(str(tmp_path), ROUNDS, barrier, results)) for _ in range(PROCS)]
    for p in procs:
        p.start()
    # act: collect every process's answer for every round
    got: dict[int, list[tuple[bytes, str, bytes]]] = {r: [] for r in range(ROUNDS)}
    errors: list[str] = []
    try:
        ended = 0
        while ended < PROCS:
            msg = results.get(timeout=120)
            if msg[0] == "end":
                ended += 1
                errors += [msg[1]] if msg[1] is not None else []
            else:
                got[msg[0]].append(msg[1:])
    except Empty:
        raise AssertionError(f"racers stopped answering; exit codes {[p.exitcode for p in procs]}") from None
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert not errors, f"load_or_create failed while racing: {errors}"
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    # assert: per round, every process holds the CA on disk, its key is the stored key, and so on
    from coordinator.pki import ClusterCA
    from node.identity import JoinToken, cert_sha256

    split = [r for r in range(ROUNDS) if len({cert for cert, _, _ in got[r]}) > 1]
    assert not split, f"rounds {split} of {ROUNDS}: the racing processes hold different CAs"
    for r in range(ROUNDS):
        d = tmp_path / f"round{r}"
        ca_pem = (d / "ca.pem").read_bytes()
        ca_cert = x509.load_pem_x509_certificate(ca_pem)
        token = (d / "token").read_text()
        coord_pem = (d / "coordinator.pem").read_bytes()
        assert {cert for cert, _, _ in got[r]} == {ca_pem}, f"round {r}: a process holds a CA that is not on disk"
        assert {t for _, t, _ in got[r]} == {token}, f"round {r}: a process holds another token"
        assert {c for _, _, c in got[r]} == {coord_pem}, f"round {r}: a process holds another coordinator cert"
        assert _public((d / "ca.key").read_bytes()) == _cert_public(ca_cert), f"round {r}: ca.key is not ca.pem's"
        assert JoinToken.parse(token).ca_sha256 == cert_sha256(ca_pem)
        coord_cert = x509.load_pem_x509_certificate(coord_pem)
        coord_cert.verify_directly_issued_by(ca_cert)
        assert _public((d / "coordinator.key").read_bytes()) == _cert_public(coord_cert), f"round {r}: key mismatch"
        for secret in ("ca.key", "token", "coordinator.key"):
            assert stat.S_IMODE((d / secret).stat().st_mode) == 0o600, f"round {r}: {secret} is not 0600"
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
        assert not [p.name for p in d.iterdir() if ".tmp" in p.name], f"round {r}: temporary files left"
        assert ClusterCA.load_or_create(d).cert_pem == ca_pem  # and a later start loads it


def test_a_key_that_is_not_the_cas_is_refused(tmp_path: Path) -> None:
    # a CA key from another creation (what the unserialised race could leave) must not be used with this certificate
    from coordinator.pki import ClusterCA

    ClusterCA.load_or_create(tmp_path / "a")
    other = ClusterCA.load_or_create(tmp_path / "b")
    (tmp_path / "a" / "ca.key").write_bytes(other.key_pem)
    with pytest.raises(ValueError, match="is not the key of"):
        ClusterCA.load_or_create(tmp_path / "a")
