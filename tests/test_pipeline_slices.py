"""The node's slice cache without any process: resume, per-tensor verification, concurrent writers, eviction."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from node.slices import SliceBusyError, SliceCache, SliceManifest, SliceMismatchError, TensorDigest


def _manifest(*blobs: bytes) -> SliceManifest:
    return SliceManifest.of(
        tuple(TensorDigest(f"t{i}", "float32", (len(b) // 4,), len(b), hashlib.sha256(b).digest())
              for i, b in enumerate(blobs))
    )  # fmt: skip


def test_a_slice_resumes_and_lands_in_the_cache(tmp_path: Path) -> None:
    a, b = os.urandom(4000), os.urandom(2400)
    manifest = _manifest(a, b)
    cache = SliceCache(tmp_path, 10**9)
    part = cache.open_partial(manifest)
    part.append(a[:1000])
    part.close()  # the stream broke
    part = cache.open_partial(manifest)
    assert part.have == 1000
    part.append(a[1000:] + b)
    path = part.finish()
    assert path.read_bytes() == a + b and cache.lookup(manifest.sha256, manifest.nbytes) == path


def test_a_bad_tensor_is_refused_and_cut_off(tmp_path: Path) -> None:
    a, b = os.urandom(400), os.urandom(400)
    manifest = _manifest(a, b)
    part = SliceCache(tmp_path, 10**9).open_partial(manifest)
    part.append(a)
    with pytest.raises(SliceMismatchError, match="t1"):
        part.append(b[:-1] + bytes([b[-1] ^ 1]))
    assert part.have == len(a)  # resumes at the bad tensor's start
    part.append(b)
    assert part.finish().read_bytes() == a + b


def test_a_second_writer_of_the_same_slice_is_refused(tmp_path: Path) -> None:
    manifest = _manifest(os.urandom(40))
    cache = SliceCache(tmp_path, 10**9)
    first = cache.open_partial(manifest)
    with pytest.raises(SliceBusyError):
        cache.open_partial(manifest)
    first.close()
    cache.open_partial(manifest).close()


def test_the_oldest_slices_are_evicted_beyond_the_cap(tmp_path: Path) -> None:
    cache = SliceCache(tmp_path, 2500)
    paths = []
    for i in range(3):
        data = os.urandom(1000)
        manifest = _manifest(data)
        part = cache.open_partial(manifest)
        part.append(data)
        paths.append(part.finish())
        os.utime(paths[-1], (i, i))  # distinct ages
    cache.evict()
    assert [p.exists() for p in paths] == [False, True, True]
