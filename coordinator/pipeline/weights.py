"""What the coordinator knows about slices: their manifests (tensor sha256s), and their blobs to push.

Hashing a float tensor means decoding it (GGUF dequantisation), so each tensor's digest is computed once and
cached on disk as msgpack, keyed by the model file's path, size and mtime; the manifest of any split is composed
from them. Packed slices (``node.packed``) hash the file's blocks as stored, under their own key. Blobs are cached
by their content hash. A push resumes where the node's partial copy ends after a broken stream.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO

import grpc
import msgpack
from grpc import aio

from coordinator.pipeline.client import NodeClient
from llama_shard.errors import ModelFormatError
from llama_shard.loading import GGUFSource, WeightSource
from llama_shard.shard import ShardSpec
from node.packed import build_packed_manifest
from node.slices import SliceManifest, TensorDigest, build_manifest, slice_tensor_names
from node.wire import LoadRequest
from protos.llama_node.v1 import node_pb2 as pb

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


def _model_key(model: Path) -> str:
    paths = sorted(model.rglob("*")) if model.is_dir() else [model]
    parts = [f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in paths if p.is_file()]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def _pack(digests: dict[str, TensorDigest]) -> bytes:
    rows = [[t.name, t.dtype, list(t.shape), t.nbytes, t.sha256] for t in digests.values()]
    return bytes(msgpack.packb({"version": 1, "tensors": rows}))


def _unpack(data: bytes) -> dict[str, TensorDigest]:
    d = msgpack.unpackb(data)
    return {n: TensorDigest(n, dt, tuple(s), nb, bytes(h)) for n, dt, s, nb, h in d["tensors"]}


class SliceCatalog:
    """Tensor digests of local model files (decoded and hashed once, kept as msgpack) and slice blobs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "digests").mkdir(parents=True, exist_ok=True)
        (root / "blobs").mkdir(parents=True, exist_ok=True)
        self._known: dict[str, dict[str, TensorDigest]] = {}
        self._lock = threading.Lock()

    def _digests(self, key: str) -> dict[str, TensorDigest]:
        if key not in self._known:
            path = self.root / "digests" / f"{key}.msgpack"
            self._known[key] = _unpack(path.read_bytes()) if path.exists() else {}
        return self._known[key]

    def manifest(
        self, model: Path, source: WeightSource, spec: ShardSpec, *, blob: bool = False, packed: bool = False
    ) -> SliceManifest:
        """The slice's manifest, from cached digests where it can; with ``blob``, its blob exists afterwards.
        ``packed``: the tensors' raw GGUF blocks (``node.packed``), not their decoded floats."""
        if packed and not isinstance(source, GGUFSource):
            raise ModelFormatError(f"{model}: packed slices keep GGUF blocks; this model is not a .gguf file")
        key = _model_key(model) + ("-packed" if packed else "")

        def build(out: IO[bytes] | None, known: dict[str, TensorDigest]) -> SliceManifest:
            if packed:
                assert isinstance(source, GGUFSource)
                return build_packed_manifest(source, spec, out, known)
            return build_manifest(source, spec, out, known)

        with self._lock:
            known = self._digests(key)
            before = len(known)
            names = slice_tensor_names(source, spec)
            manifest = None
            if all(n in known for n in names):
                manifest = SliceManifest.of(tuple(known[n] for n in names))
            if manifest is None or (blob and not self.blob_path(manifest).exists()):
                if blob:
                    with tempfile.NamedTemporaryFile(dir=self.root / "blobs", suffix=".tmp", delete=False) as f:
                        tmp = Path(f.name)
                        manifest = build(f, known)
                    os.replace(tmp, self.blob_path(manifest))
                else:
                    manifest = build(None, known)
            if len(known) != before:
                self._write(self.root / "digests" / f"{key}.msgpack", _pack(known))
        log.info("slice %s%s: %d tensors, %.1f MB, sha256 %s…", spec, " (packed)" if packed else "",
                 len(manifest.tensors), manifest.nbytes / 1e6, manifest.hex[:16])  # fmt: skip
        return manifest

    def blob_path(self, manifest: SliceManifest) -> Path:
        return self.root / "blobs" / f"{manifest.hex}.slice"

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)


_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED, grpc.StatusCode.DEADLINE_EXCEEDED,
              grpc.StatusCode.CANCELLED, grpc.StatusCode.DATA_LOSS, grpc.StatusCode.INTERNAL}  # fmt: skip


async def load_shard(
    client: NodeClient,
    req: LoadRequest,
    blob: Path | None = None,
    *,
    on_push: Progress | None = None,
    on_load: Progress | None = None,
    attempts: int = 4,
) -> pb.LoadProgress:
    """Load ``req`` on a node; when it asks for the bytes, push ``blob`` from where its copy ends, and retry
    (resuming) after a broken stream."""
    for attempt in range(1, attempts + 1):
        final = await client.load(req, on_load)
        if final.state == pb.LoadProgress.READY:
            return final
        if final.state != pb.LoadProgress.AWAITING_BYTES or blob is None:
            raise RuntimeError(f"node {client.address} did not load {req.spec}: {final}")
        log.info("pushing slice %s to %s from byte %d of %d", req.spec, client.address, final.have_bytes,
                 final.total_bytes)  # fmt: skip
        try:
            await client.push(blob, req.manifest, final.have_bytes, on_push)
        except aio.AioRpcError as e:
            if e.code() not in _RETRYABLE or attempt == attempts:
                raise
            log.warning("push to %s broke (%s: %s); resuming", client.address, e.code().name, e.details())
    raise RuntimeError(f"node {client.address} did not load {req.spec} after {attempts} attempts")
