"""Weight slices: exactly the tensors one stage needs, hashed, written as a blob, and cached on disk by content.

A slice is the list of source tensors a stage reads (``slice_tensor_names``: a tied head on a later stage reads the
embedding), each as the weight source decodes it (GGUF is dequantised, q/k un-permuted; a packed slice keeps the
file's blocks instead, see ``node.packed``), so the same manifest verifies a node's own copy of the model and bytes
streamed by the coordinator. Its blob is those tensors' raw bytes concatenated in manifest order. Each tensor has
its sha256; the slice's sha256 is over the list of (name, dtype, shape, tensor sha256) entries, so verifying every
tensor's bytes verifies the slice, and a coordinator can compose the manifest of any split from per-tensor digests
it computed once.

The cache holds complete blobs as ``<sha256>.slice`` (a packed slice as ``<sha256>.gguf``, see ``node.packed``).
A push in progress writes ``<sha256>.part`` under an exclusive ``flock`` (a second writer of the same slice is
refused, writers of different slices never meet), so a broken stream resumes from the part's length; completion
renames atomically and then evicts the oldest blobs beyond the size cap.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import torch

from llama_shard.config import ModelConfig
from llama_shard.errors import ModelFormatError
from llama_shard.loading import WeightSource, stage_tensor_names
from llama_shard.shard import ShardSpec

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True, slots=True)
class TensorDigest:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    sha256: bytes


@dataclass(frozen=True, slots=True)
class SliceManifest:
    tensors: tuple[TensorDigest, ...]
    nbytes: int
    sha256: bytes

    @property
    def hex(self) -> str:
        return self.sha256.hex()

    @classmethod
    def of(cls, tensors: tuple[TensorDigest, ...]) -> SliceManifest:
        return cls(tensors, sum(t.nbytes for t in tensors), manifest_root(tensors))

    def offsets(self) -> dict[str, tuple[int, TensorDigest]]:
        out, offset = {}, 0
        for t in self.tensors:
            out[t.name] = (offset, t)
            offset += t.nbytes
        return out


def manifest_root(tensors: tuple[TensorDigest, ...]) -> bytes:
    """The slice's sha256: over each tensor's name, dtype, shape and sha256, in order."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(f"{t.name}\0{t.dtype}\0{','.join(map(str, t.shape))}\0{t.nbytes}\0".encode())
        h.update(t.sha256)
    return h.digest()


class SliceMismatchError(ModelFormatError):
    """A tensor's bytes do not match the coordinator's digest (a different or corrupt copy)."""


def _raw(t: torch.Tensor) -> np.ndarray:
    """The tensor's bytes as a uint8 array without a copy when it is already contiguous on the CPU."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()


def slice_tensor_names(source: WeightSource, spec: ShardSpec) -> list[str]:
    """Source names of the tensors a stage reads, in load order, each once."""
    names: list[str] = []
    for name in stage_tensor_names(source.config, spec):
        if name == "output.weight" and not source.has(name):
            name = "tok_embeddings.weight"  # tied head
        if name not in names:
            names.append(name)
    return names


def digest_tensor(name: str, t: torch.Tensor) -> tuple[TensorDigest, np.ndarray]:
    """A tensor's digest and its bytes (float32 unless it is already a float type the wire knows)."""
    if t.dtype not in _DTYPES.values():
        t = t.float()
    raw = _raw(t)
    dtype = next(k for k, v in _DTYPES.items() if v == t.dtype)
    return TensorDigest(name, dtype, tuple(t.shape), raw.nbytes, hashlib.sha256(raw.data).digest()), raw


def build_manifest(
    source: WeightSource,
    spec: ShardSpec,
    blob: IO[bytes] | None = None,
    known: dict[str, TensorDigest] | None = None,
    digest_of: Callable[[str], tuple[TensorDigest, np.ndarray]] | None = None,
) -> SliceManifest:
    """The manifest of the slice of ``spec``; with ``blob``, also write the slice's bytes to it. Tensors in
    ``known`` are not read again (without ``blob``); new digests are added to it. ``digest_of(name)``: a tensor's
    digest and bytes (default: ``digest_tensor`` of the float tensor; ``node.packed`` passes the raw GGUF blocks)."""
    known = {} if known is None else known
    digests = []
    for name in slice_tensor_names(source, spec):
        if blob is None and name in known:
            digests.append(known[name])
            continue
        digest, raw = digest_of(name) if digest_of is not None else digest_tensor(name, source.get(name))
        if blob is not None:
            blob.write(raw.data)
        known[name] = digest
        digests.append(digest)
    return SliceManifest.of(tuple(digests))


class VerifiedSource:
    """A weight source whose tensors are checked against a manifest as they are read; nothing else is readable."""

    def __init__(self, inner: WeightSource, manifest: SliceManifest, on_tensor: Callable[[int], None] | None = None):
        self.inner, self.config = inner, inner.config
        self._digests = {t.name: t for t in manifest.tensors}
        self._on_tensor = on_tensor

    def has(self, name: str) -> bool:
        return name in self._digests and self.inner.has(name)

    def get(self, name: str) -> torch.Tensor:
        digest = self._digests.get(name)
        if digest is None:
            raise SliceMismatchError(f"tensor {name!r} is not part of this slice")
        t = self.inner.get(name)
        if t.dtype not in _DTYPES.values():
            t = t.float()
        raw = _raw(t)
        if tuple(t.shape) != digest.shape or hashlib.sha256(raw.data).digest() != digest.sha256:
            raise SliceMismatchError(
                f"tensor {name!r} ({list(t.shape)}) does not match the coordinator's digest "
                f"({list(digest.shape)}, sha256 {digest.sha256.hex()[:16]}…): a different or corrupt copy"
            )
        if self._on_tensor is not None:
            self._on_tensor(raw.nbytes)
        return t


class BlobSource:
    """A slice blob on disk as a weight source: each tensor is read (copied) from its offset when asked for."""

    def __init__(self, config: ModelConfig, manifest: SliceManifest, path: Path) -> None:
        self.config, self.path = config, path
        self._where = manifest.offsets()
        size = path.stat().st_size
        if size != manifest.nbytes:
            raise ModelFormatError(f"{path}: {size} bytes, the manifest says {manifest.nbytes}")

    def has(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise ModelFormatError(f"{self.path}: tensor {name!r} is not in this slice")
        offset, d = self._where[name]
        array = np.fromfile(self.path, dtype=np.uint8, count=d.nbytes, offset=offset)
        return torch.from_numpy(array).view(_DTYPES[d.dtype]).reshape(d.shape)


class PartialSlice:
    """A slice being received: appends at the end of ``<sha>.part`` under an exclusive lock, hashing as it goes.

    Each tensor's sha256 is checked the moment its last byte arrives; a bad tensor is cut off the part file (so a
    retry resumes at its start) and raises ``SliceMismatchError``. Opening an existing part re-hashes its prefix.
    """

    def __init__(self, cache: SliceCache, manifest: SliceManifest) -> None:
        if manifest_root(manifest.tensors) != manifest.sha256:
            raise SliceMismatchError("the manifest's sha256 does not match its tensors")
        self.cache, self.manifest = cache, manifest
        self.sha, self.total = manifest.sha256, manifest.nbytes
        self.path = cache.root / f"{self.sha.hex()}.part"
        self._file = open(self.path, "ab")  # noqa: SIM115 - held until close(), the lock with it
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise SliceBusyError(f"slice {self.sha.hex()[:16]}… is being received by another writer") from None
        self._index, self._start, self._hash = 0, 0, hashlib.sha256()  # current tensor, its offset, its hash
        have, self._have = self._file.tell(), 0
        if have > self.total:
            self._file.truncate(0)
            have = 0
        with open(self.path, "rb") as f:  # restore the hashing state over what an earlier stream wrote
            while self._have < have:
                block = f.read(min(have - self._have, 1 << 22))
                if not block:
                    break
                try:
                    self._consume(block, write=False)
                except SliceMismatchError:  # damaged on disk: cut back to the last good tensor
                    break

    @property
    def have(self) -> int:
        return self._have

    def append(self, data: bytes) -> None:
        if self._have + len(data) > self.total:
            raise ValueError(f"{self._have + len(data)} bytes exceed the slice's {self.total}")
        self._consume(data, write=True)

    def _consume(self, data: bytes, *, write: bool) -> None:
        view = memoryview(data)
        while view:
            t = self.manifest.tensors[self._index]
            take = min(len(view), self._start + t.nbytes - self._have)
            self._hash.update(view[:take])
            if write:
                self._file.write(view[:take])
            self._have += take
            view = view[take:]
            if self._have == self._start + t.nbytes:
                if self._hash.digest() != t.sha256:
                    self._file.flush()
                    self._file.truncate(self._start)
                    self._have = self._start
                    self._hash = hashlib.sha256()
                    raise SliceMismatchError(
                        f"received slice {self.sha.hex()[:16]}…: tensor {t.name!r} does not match its sha256"
                    )
                self._index, self._start, self._hash = self._index + 1, self._have, hashlib.sha256()

    def finish(self) -> Path:
        """Move the complete, verified slice into the cache (atomically) and evict beyond the cap."""
        if self._have != self.total:
            raise ValueError(f"slice has {self._have} of {self.total} bytes")
        self._file.flush()
        final = self.cache.path_for(self.sha)
        os.replace(self.path, final)  # readers see the whole blob or none; loading re-verifies every tensor
        self.close()
        self.cache.evict(keep=final)
        return final

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()  # releases the lock


class SliceBusyError(Exception):
    pass


class SliceCache:
    """Complete slice blobs by content hash, at most ``max_bytes`` in all (least recently used evicted first)."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root, self.max_bytes = root, max_bytes
        root.mkdir(parents=True, exist_ok=True)

    def path_for(self, sha: bytes) -> Path:
        return self.root / f"{sha.hex()}.slice"

    def gguf_path_for(self, sha: bytes) -> Path:
        """Where a packed slice lives once received: a slice GGUF (``node.packed``)."""
        return self.root / f"{sha.hex()}.gguf"

    def lookup(self, sha: bytes, nbytes: int) -> Path | None:
        path = self.path_for(sha)
        try:
            if path.stat().st_size != nbytes:
                return None
            os.utime(path)  # mark as recently used
        except FileNotFoundError:
            return None
        return path

    def lookup_gguf(self, sha: bytes) -> Path | None:
        """A packed slice's GGUF, if cached (written atomically, so a present file is whole; loading verifies it)."""
        path = self.gguf_path_for(sha)
        try:
            os.utime(path)
        except FileNotFoundError:
            return None
        return path

    def open_partial(self, manifest: SliceManifest) -> PartialSlice:
        return PartialSlice(self, manifest)

    def discard(self, sha: bytes) -> None:
        self.path_for(sha).unlink(missing_ok=True)
        self.gguf_path_for(sha).unlink(missing_ok=True)

    def evict(self, keep: Path | None = None) -> None:
        blobs = []
        for p in [*self.root.glob("*.slice"), *self.root.glob("*.gguf")]:
            try:
                st = p.stat()
            except FileNotFoundError:
                continue  # another node evicted it meanwhile
            blobs.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in blobs)
        for _, size, path in sorted(blobs):
            if total <= self.max_bytes:
                break
            if path == keep:
                continue
            path.unlink(missing_ok=True)
            total -= size
            log.info("evicted cached slice %s (%.1f MB)", path.name, size / 1e6)
