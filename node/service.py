"""What a node is: its shard (if any), its slice cache, and the loading of a shard. No gRPC types here.

Loading and computing run on one compute thread (``NodeService.compute``), never on the gRPC event loop, so
Health answers while a layer computes or a slice loads.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import grpc
import psutil
import torch

from llama_shard.errors import LlamaShardError
from llama_shard.loading import GGUFSource, WeightSource, load_stage, open_source
from llama_shard.quant import QuantMode
from llama_shard.shard import ShardSpec
from node.packed import SliceGGUFSource, is_packed, is_raw, verify_packed, write_slice_gguf
from node.progress import NodeBars
from node.slices import BlobSource, PartialSlice, SliceBusyError, SliceCache, SliceMismatchError, VerifiedSource
from node.stage_host import StageHost
from node.wire import LoadRequest, WireError, dtype_name

log = logging.getLogger(__name__)


class NodeState(StrEnum):
    idle = "idle"
    loading = "loading"
    ready = "ready"


@dataclass(frozen=True, slots=True)
class LoadOutcome:
    """READY (``from_cache`` says whether a pushed slice was already on disk) or awaiting ``have_bytes``."""

    ready: bool
    have_bytes: int = 0
    from_cache: bool = False


Progress = Callable[[str, int, int], None]  # (phase, done bytes, total bytes)


class NodeService:
    def __init__(self, cache: SliceCache, device: str = "cpu", node_id: str | None = None) -> None:
        self.cache, self.device = cache, device
        self.node_id = node_id or uuid.uuid4().hex[:12]
        self.compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
        self.host: StageHost | None = None
        self.spec: ShardSpec | None = None
        self.state = NodeState.idle
        self.load_done = self.load_total = 0
        self._pending: dict[bytes, LoadRequest] = {}  # pushed slices awaited, by manifest sha256
        self._lock = threading.Lock()
        self.bars = NodeBars()

    @property
    def rss_bytes(self) -> int:
        return int(psutil.Process().memory_info().rss)

    # ---- loading (on the compute thread) ------------------------------------------------------------------

    def load(self, req: LoadRequest, progress: Progress) -> LoadOutcome:
        """Hold ``req.spec``. The current shard is kept until the new one's bytes are at hand."""

        what = f"load {req.spec}"

        def on_tensor(nbytes: int) -> None:
            self.load_done += nbytes
            progress("loading", self.load_done, self.load_total)
            self.bars.update(what, self.load_done, self.load_total)

        t0 = time.perf_counter()
        try:
            outcome = self._load(req, on_tensor)
            if outcome.ready:
                self.bars.done(what, req.manifest.nbytes, time.perf_counter() - t0)
            return outcome
        except BaseException:
            self.state, self.spec = NodeState.idle, None
            raise

    def _load(self, req: LoadRequest, on_tensor: Callable[[int], None]) -> LoadOutcome:
        packed = _check_mode(req)
        from_cache = False
        source: WeightSource
        if req.local_path is not None:
            try:
                source = open_source(req.local_path)
            except LlamaShardError as e:
                raise WireError(grpc.StatusCode.FAILED_PRECONDITION, f"node's copy is unusable: {e}") from None
            if source.config != req.config:
                raise WireError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"{req.local_path} is a different model than the coordinator's ({source.config} != {req.config})",
                )
        else:
            sha = req.manifest.sha256
            path = self.cache.lookup_gguf(sha) if packed else self.cache.lookup(sha, req.manifest.nbytes)
            if path is None:
                with self._lock:
                    self._pending[sha] = req
                part = self.cache.root / f"{req.manifest.hex}.part"
                have = part.stat().st_size if part.exists() else 0
                return LoadOutcome(ready=False, have_bytes=min(have, req.manifest.nbytes))
            try:
                source = SliceGGUFSource(path, req.config) if packed else BlobSource(req.config, req.manifest, path)
            except LlamaShardError as e:
                self.cache.discard(sha)
                raise WireError(grpc.StatusCode.DATA_LOSS, f"cached slice {path.name} is unusable: {e}") from None
            from_cache = True
        self.release()
        self.state, self.spec = NodeState.loading, req.spec
        self.load_done, self.load_total = 0, req.manifest.nbytes
        device = req.device or self.device
        kv = dtype_name(req.kv_dtype) if req.kv_dtype is not None else None
        try:
            if packed:
                assert isinstance(source, GGUFSource)
                verify_packed(source, req.spec, req.manifest, on_tensor)
                stage = load_stage(source, req.spec, device=device, quantize=QuantMode.gguf, kv_cache=kv)
            else:
                verified = VerifiedSource(source, req.manifest, on_tensor)
                stage = load_stage(verified, req.spec, dtype=req.compute_dtype, device=device, quantize=req.quantize,
                                   kv_cache=kv)  # fmt: skip
        except SliceMismatchError as e:
            if req.local_path is None:
                self.cache.discard(req.manifest.sha256)  # a corrupt cache entry: fetch it again next time
            raise WireError(grpc.StatusCode.DATA_LOSS, str(e)) from None
        except LlamaShardError as e:
            raise WireError(grpc.StatusCode.FAILED_PRECONDITION, f"cannot load {req.spec}: {e}") from None
        self.host = host = StageHost(
            stage,
            slots=req.slots,
            max_len=req.max_len,
            input_dtype=req.input_dtype,
            output_dtype=req.output_dtype,
        )
        self.state = NodeState.ready
        log.info(
            "holding layers %s (%.1f MB, %s, from %s); KV cache %s, %.1f MB; RSS %.1f MB",
            req.spec, req.manifest.nbytes / 1e6, req.quantize or req.compute_dtype,
            req.local_path or ("cache" if from_cache else "push"), dtype_name(host.cache.dtype),
            host.cache.nbytes / 1e6, self.rss_bytes / 1e6,
        )  # fmt: skip
        return LoadOutcome(ready=True, from_cache=from_cache)

    def release(self) -> bool:
        had = self.host is not None
        self.host, self.spec, self.state = None, None, NodeState.idle
        gc.collect()
        return had

    # ---- pushed slices ------------------------------------------------------------------------------------

    def open_push(self, sha: bytes) -> PartialSlice:
        with self._lock:
            req = self._pending.get(sha)
        if req is None:
            raise WireError(grpc.StatusCode.FAILED_PRECONDITION, f"no LoadShard awaits slice {sha.hex()[:16]}…")
        try:
            return self.cache.open_partial(req.manifest)
        except SliceBusyError as e:
            raise WireError(grpc.StatusCode.ABORTED, str(e)) from None
        except SliceMismatchError as e:
            raise WireError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None

    def finish_push(self, partial: PartialSlice) -> Path:
        try:
            path = partial.finish()
        except SliceMismatchError as e:
            raise WireError(grpc.StatusCode.DATA_LOSS, str(e)) from None
        with self._lock:
            req = self._pending.pop(partial.sha, None)
        if is_packed(partial.manifest):
            # the verified blocks become a slice GGUF, which loads exactly as a node's own copy of the file would
            config = req.config if req is not None else None
            if config is None:
                raise WireError(grpc.StatusCode.FAILED_PRECONDITION, "no LoadShard awaits this packed slice")
            try:
                gguf = write_slice_gguf(path, partial.manifest, config, self.cache.gguf_path_for(partial.sha))
            finally:
                path.unlink(missing_ok=True)
            self.cache.evict(keep=gguf)
            return gguf
        return path


def _check_mode(req: LoadRequest) -> bool:
    """Whether ``req`` loads a packed slice; refuses (INVALID_ARGUMENT) a weight mode its source cannot give."""
    bad = grpc.StatusCode.INVALID_ARGUMENT
    raw = [is_raw(t) for t in req.manifest.tensors]
    if req.quantize != QuantMode.gguf:
        if any(raw):
            mode = req.quantize or "dense"
            raise WireError(bad, f"a manifest of raw GGUF blocks needs quantize='gguf', not {mode!r}")
        return False
    if req.local_path is not None and (Path(req.local_path).is_dir() or Path(req.local_path).suffix != ".gguf"):
        raise WireError(bad, f"quantize='gguf' keeps a GGUF file's blocks packed; {req.local_path} is not a .gguf file "
                             "(use int4/int8 to quantise float weights, or '' for dense)")  # fmt: skip
    if not all(raw):
        raise WireError(bad, "quantize='gguf' needs a packed manifest (every tensor's raw GGUF blocks)")
    return True


def configure_torch(threads: int) -> None:
    """Threads per node process: several nodes share a few cores."""
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # already set once in this process
        torch.set_num_interop_threads(1)
