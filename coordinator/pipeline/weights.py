"""What the coordinator knows about slices: their manifests (tensor sha256s), and their blobs to push.

Hashing a slice means decoding its tensors (GGUF dequantisation), so manifests are cached on disk as msgpack, keyed
by the model file's path, size and mtime and the shard; blobs are cached by their content hash. A push resumes
where the node's partial copy ends after a broken stream.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import grpc
import msgpack
from grpc import aio

from coordinator.pipeline.client import NodeClient
from llama_shard.loading import WeightSource
from llama_shard.shard import ShardSpec
from node.slices import SliceManifest, TensorDigest, build_manifest
from node.wire import LoadRequest
from protos.llama_node.v1 import node_pb2 as pb

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


def _model_key(model: Path, spec: ShardSpec) -> str:
    paths = sorted(model.rglob("*")) if model.is_dir() else [model]
    parts = [f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in paths if p.is_file()]
    parts.append(f"{spec.start}:{spec.end}:{spec.n_layers}:{sorted(spec.experts or ())}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def _pack(m: SliceManifest) -> bytes:
    tensors = [[t.name, t.dtype, list(t.shape), t.nbytes, t.sha256] for t in m.tensors]
    return msgpack.packb({"tensors": tensors, "nbytes": m.nbytes, "sha256": m.sha256})


def _unpack(data: bytes) -> SliceManifest:
    d = msgpack.unpackb(data)
    tensors = tuple(TensorDigest(n, dt, tuple(s), nb, bytes(h)) for n, dt, s, nb, h in d["tensors"])
    return SliceManifest(tensors, d["nbytes"], bytes(d["sha256"]))


class SliceCatalog:
    """Manifests and blobs of the slices of local model files, cached under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "manifests").mkdir(parents=True, exist_ok=True)
        (root / "blobs").mkdir(parents=True, exist_ok=True)

    def manifest(self, model: Path, source: WeightSource, spec: ShardSpec, *, blob: bool = False) -> SliceManifest:
        """The slice's manifest (computed once); with ``blob``, its blob is made sure to exist too."""
        key_path = self.root / "manifests" / f"{_model_key(model, spec)}.msgpack"
        if key_path.exists():
            manifest = _unpack(key_path.read_bytes())
            if not blob or self.blob_path(manifest).exists():
                return manifest
        with tempfile.NamedTemporaryFile(dir=self.root / "blobs", suffix=".tmp", delete=False) as f:
            tmp = Path(f.name)
            manifest = build_manifest(source, spec, f if blob else None)
        if blob:
            os.replace(tmp, self.blob_path(manifest))
        else:
            tmp.unlink()
        self._write(key_path, _pack(manifest))
        log.info("slice %s: %d tensors, %.1f MB, sha256 %s…", spec, len(manifest.tensors), manifest.nbytes / 1e6,
                 manifest.hex[:16])  # fmt: skip
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
