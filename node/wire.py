"""The one place where protobuf messages become domain types and back (servicers and clients stay thin).

Tensors cross the wire as raw little-endian bytes with an explicit dtype and shape, never pickled. A frame is one
micro-batch of rows; ``frame_to_messages`` splits it into parts below the message size limit and
``FrameAssembler`` puts it back together, checking every size it is told before it allocates anything.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import grpc
import torch
from gguf import GGMLQuantizationType

from llama_shard.config import ModelConfig, RopeScaling
from llama_shard.errors import LlamaShardError
from llama_shard.quant import QuantMode
from llama_shard.sampling import SamplingParams
from llama_shard.shard import ShardSpec
from node.packed import RAW_PREFIX
from node.slices import SliceManifest, TensorDigest
from protos.llama_node.v1 import node_pb2 as pb

#: Bytes of tensor data per FramePart: well below the default 4 MiB gRPC limit, large enough to stream fast.
DEFAULT_PART_BYTES = 1 << 20
#: Largest message a node or client accepts (a part plus its rows fits easily).
MAX_MESSAGE_BYTES = 8 << 20
#: Largest frame (all its parts together) a node assembles: a long prefill of a big model fits.
MAX_FRAME_BYTES = 1 << 30


class WireError(Exception):
    """Bad input from a peer: the call ends with ``code`` and the node goes on serving others."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# ---- dtypes and tensors ------------------------------------------------------------------------------------

_DTYPES: dict[torch.dtype, pb.DType.ValueType] = {
    torch.float32: pb.DTYPE_FLOAT32,
    torch.bfloat16: pb.DTYPE_BFLOAT16,
    torch.float16: pb.DTYPE_FLOAT16,
    torch.int64: pb.DTYPE_INT64,
    torch.int32: pb.DTYPE_INT32,
    torch.uint8: pb.DTYPE_UINT8,
}
_FROM_PB = {v: k for k, v in _DTYPES.items()}
_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16",
          torch.int64: "int64", torch.int32: "int32", torch.uint8: "uint8"}  # fmt: skip
_BY_NAME = {v: k for k, v in _NAMES.items()}


def dtype_to_pb(dtype: torch.dtype) -> pb.DType.ValueType:
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype} has no wire encoding")
    return _DTYPES[dtype]


def dtype_from_pb(value: int) -> torch.dtype:
    if value not in _FROM_PB:
        raise WireError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown or unspecified dtype {value}")
    return _FROM_PB[value]  # type: ignore[index]


def dtype_name(dtype: torch.dtype) -> str:
    return _NAMES[dtype]


def dtype_from_name(name: str) -> torch.dtype:
    if name not in _BY_NAME:
        raise ValueError(f"unknown dtype {name!r} (known: {', '.join(_BY_NAME)})")
    return _BY_NAME[name]


_ITEMSIZE = {d: torch.empty(0, dtype=d).element_size() for d in _DTYPES}
_NUMPY = frozenset(d for d in _DTYPES if d is not torch.bfloat16)  # dtypes that .numpy() takes as they are


def tensor_bytes(t: torch.Tensor) -> bytes:
    """Raw bytes of a CPU tensor in row-major order (any dtype, bf16 included). Few torch calls on the common path
    (each may hand the GIL to the compute thread and wait to get it back)."""
    if t.dtype in _NUMPY and not t.requires_grad and t.device.type == "cpu" and t.is_contiguous():
        return t.numpy().tobytes()
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def tensor_from_bytes(data: bytes | bytearray, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    """The inverse of ``tensor_bytes``; checks the byte count against dtype and shape first."""
    numel = 1
    for d in shape:
        if d < 0:
            raise WireError(grpc.StatusCode.INVALID_ARGUMENT, f"negative dimension in shape {list(shape)}")
        numel *= d
    expected = numel * _ITEMSIZE[dtype]
    if len(data) != expected:
        raise WireError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"tensor of {dtype_name(dtype)} {list(shape)} needs {expected} bytes, got {len(data)}",
        )
    if expected == 0:
        return torch.empty(tuple(shape), dtype=dtype)
    buf = data if isinstance(data, bytearray) else bytearray(data)
    return torch.frombuffer(buf, dtype=dtype).view(tuple(shape))


def tensor_to_pb(t: torch.Tensor) -> pb.Tensor:
    data = tensor_bytes(t)
    header = pb.TensorHeader(dtype=dtype_to_pb(t.dtype), shape=list(t.shape), nbytes=len(data))
    return pb.Tensor(header=header, data=data)


def tensor_from_pb(msg: pb.Tensor) -> torch.Tensor:
    return tensor_from_bytes(msg.data, dtype_from_pb(msg.header.dtype), list(msg.header.shape))


# ---- shard, config, sampling, manifest -----------------------------------------------------------------------


def spec_to_pb(spec: ShardSpec) -> pb.ShardSpec:
    experts = sorted(spec.experts) if spec.experts is not None else []
    return pb.ShardSpec(
        start=spec.start, end=spec.end, n_layers=spec.n_layers,
        has_expert_subset=spec.experts is not None, experts=experts,
    )  # fmt: skip


def spec_from_pb(msg: pb.ShardSpec) -> ShardSpec:
    try:
        experts = frozenset(msg.experts) if msg.has_expert_subset else None
        return ShardSpec(msg.start, msg.end, msg.n_layers, experts)
    except LlamaShardError as e:
        raise WireError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None


def config_to_pb(c: ModelConfig) -> pb.ModelConfig:
    r = c.rope_scaling
    return pb.ModelConfig(
        vocab_size=c.vocab_size, dim=c.dim, n_layers=c.n_layers, n_heads=c.n_heads, n_kv_heads=c.n_kv_heads,
        ffn_dim=c.ffn_dim, head_dim=c.head_dim, norm_eps=c.norm_eps, rope_theta=c.rope_theta,
        rope_scaling=pb.RopeScaling(
            kind=r.kind, factor=r.factor, low_freq_factor=r.low_freq_factor, high_freq_factor=r.high_freq_factor,
            original_max_position_embeddings=r.original_max_position_embeddings,
        ),
        max_seq_len=c.max_seq_len, tie_embeddings=c.tie_embeddings, rope_freqs_tensor=c.rope_freqs_tensor,
        bos_token_id=c.bos_token_id, eos_token_ids=list(c.eos_token_ids), arch=c.arch,
    )  # fmt: skip


def config_from_pb(m: pb.ModelConfig) -> ModelConfig:
    r = m.rope_scaling
    try:
        return ModelConfig(
            vocab_size=m.vocab_size, dim=m.dim, n_layers=m.n_layers, n_heads=m.n_heads, n_kv_heads=m.n_kv_heads,
            ffn_dim=m.ffn_dim, head_dim=m.head_dim, norm_eps=m.norm_eps, rope_theta=m.rope_theta,
            rope_scaling=RopeScaling(
                kind=r.kind, factor=r.factor, low_freq_factor=r.low_freq_factor,
                high_freq_factor=r.high_freq_factor,
                original_max_position_embeddings=r.original_max_position_embeddings,
            ),
            max_seq_len=m.max_seq_len, tie_embeddings=m.tie_embeddings, rope_freqs_tensor=m.rope_freqs_tensor,
            bos_token_id=m.bos_token_id if m.HasField("bos_token_id") else None,
            eos_token_ids=tuple(m.eos_token_ids), arch=m.arch,
        )  # fmt: skip
    except LlamaShardError as e:
        raise WireError(grpc.StatusCode.INVALID_ARGUMENT, f"bad model config: {e}") from None


def sampling_to_pb(p: SamplingParams) -> pb.SamplingParams:
    return pb.SamplingParams(
        temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p,
        repetition_penalty=p.repetition_penalty, seed=p.seed, frequency_penalty=p.frequency_penalty,
        presence_penalty=p.presence_penalty, penalty_last_n=p.penalty_last_n, penalty_start=p.penalty_start,
    )  # fmt: skip


def sampling_from_pb(m: pb.SamplingParams) -> SamplingParams:
    try:
        return SamplingParams(
            temperature=m.temperature, top_k=m.top_k, top_p=m.top_p, min_p=m.min_p,
            repetition_penalty=m.repetition_penalty, seed=m.seed, frequency_penalty=m.frequency_penalty,
            presence_penalty=m.presence_penalty, penalty_last_n=m.penalty_last_n, penalty_start=m.penalty_start,
        )  # fmt: skip
    except LlamaShardError as e:
        raise WireError(grpc.StatusCode.INVALID_ARGUMENT, f"bad sampling parameters: {e}") from None


def _digest_to_pb(t: TensorDigest) -> pb.TensorDigest:
    msg = pb.TensorDigest(name=t.name, shape=list(t.shape), nbytes=t.nbytes, sha256=t.sha256)
    if t.dtype.startswith(RAW_PREFIX):
        msg.gguf_type = t.dtype.removeprefix(RAW_PREFIX)
    else:
        msg.dtype = dtype_to_pb(dtype_from_name(t.dtype))
    return msg


def _digest_from_pb(t: pb.TensorDigest) -> TensorDigest:
    if t.gguf_type:
        if t.gguf_type not in GGMLQuantizationType.__members__:
            raise WireError(grpc.StatusCode.INVALID_ARGUMENT, f"tensor {t.name!r}: unknown ggml type {t.gguf_type!r}")
        dtype = RAW_PREFIX + t.gguf_type
    else:
        dtype = dtype_name(dtype_from_pb(t.dtype))
    return TensorDigest(t.name, dtype, tuple(t.shape), t.nbytes, bytes(t.sha256))


def manifest_to_pb(m: SliceManifest) -> pb.SliceManifest:
    return pb.SliceManifest(tensors=[_digest_to_pb(t) for t in m.tensors], nbytes=m.nbytes, sha256=m.sha256)


def manifest_from_pb(m: pb.SliceManifest) -> SliceManifest:
    tensors = tuple(_digest_from_pb(t) for t in m.tensors)
    if len(m.sha256) != 32 or any(len(t.sha256) != 32 for t in tensors):
        raise WireError(grpc.StatusCode.INVALID_ARGUMENT, "manifest digests must be 32-byte sha256 values")
    manifest = SliceManifest.of(tensors)
    if manifest.nbytes != m.nbytes or manifest.sha256 != m.sha256:
        raise WireError(grpc.StatusCode.INVALID_ARGUMENT, "the manifest's size or sha256 does not match its tensors")
    return manifest


def chunk_crc(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


# ---- frames -----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RowInput:
    """One request's share of a frame: ``tokens`` enter KV slot ``slot`` at positions ``start..``.

    ``prefill`` marks a prompt chunk; it matters for a chunk of one token, which is computed as prefill rather than
    as a decode row (``llama_shard.batching``), so the logits do not depend on how the prompt was chunked.
    """

    request_id: int
    slot: int
    start: int
    tokens: tuple[int, ...]
    sampling: SamplingParams = SamplingParams()
    return_logits: bool = False
    prefill: bool = False


@dataclass(frozen=True, slots=True)
class Frame:
    """A micro-batch entering layer ``layer``. ``hidden`` is ``[sum of row token counts, D]``, rows packed in
    order, or ``None`` when the frame enters layer 0 (the rows' token ids are the input)."""

    frame_id: int
    layer: int
    rows: tuple[RowInput, ...]
    hidden: torch.Tensor | None = None

    @property
    def n_tokens(self) -> int:
        return sum(len(r.tokens) for r in self.rows)


@dataclass(frozen=True, slots=True)
class RowOutput:
    request_id: int
    token: int
    logits: torch.Tensor | None = None  # [V] fp32, when the row asked for it


@dataclass(frozen=True, slots=True)
class FrameResult:
    frame_id: int
    rows: tuple[RowOutput, ...]


def _row_to_pb(r: RowInput) -> pb.Row:
    return pb.Row(
        request_id=r.request_id, slot=r.slot, start=r.start, tokens=r.tokens,
        sampling=_sampling_pb(r.sampling), return_logits=r.return_logits, prefill=r.prefill,
    )  # fmt: skip


@functools.lru_cache(maxsize=4096)
def _sampling_pb(p: SamplingParams) -> pb.SamplingParams:
    """``sampling_to_pb``, remembered (``SamplingParams`` is frozen, so hashable): a request's rows carry the same
    params step after step, and building the message costs more than the rest of the row. ``pb.Row`` copies it."""
    return sampling_to_pb(p)


#: Decoded ``SamplingParams`` by their encoding: a request's rows carry the same ones frame after frame, and
#: decoding (with its checks) costs several times the lookup.
_SAMPLING: dict[bytes, SamplingParams] = {}


def _sampling_from_row(m: pb.Row) -> SamplingParams:
    key = m.sampling.SerializeToString()
    params = _SAMPLING.get(key)
    if params is None:
        params = sampling_from_pb(m.sampling)
        if len(_SAMPLING) >= 4096:
            _SAMPLING.clear()
        _SAMPLING[key] = params
    return params


def _row_from_pb(m: pb.Row) -> RowInput:
    if not m.tokens:
        raise WireError(grpc.StatusCode.INVALID_ARGUMENT, f"row of request {m.request_id} has no tokens")
    return RowInput(m.request_id, m.slot, m.start, tuple(m.tokens), _sampling_from_row(m), m.return_logits, m.prefill)


def frame_to_messages(
    frame: Frame, part_bytes: int = DEFAULT_PART_BYTES, rows_pb: Sequence[pb.Row] | None = None
) -> Iterator[pb.ForwardMessage]:
    """The frame as one or more ``FramePart`` messages of at most ``part_bytes`` tensor bytes each. ``rows_pb``:
    ``frame.rows`` already encoded (a stage passes on the rows it was sent: ``PendingFrame.rows_pb``)."""
    rows = [_row_to_pb(r) for r in frame.rows] if rows_pb is None else rows_pb
    if frame.hidden is None:
        part = pb.FramePart(frame_id=frame.frame_id, layer=frame.layer, rows=rows, last=True)
        yield pb.ForwardMessage(part=part)
        return
    data = tensor_bytes(frame.hidden)
    header = pb.TensorHeader(dtype=dtype_to_pb(frame.hidden.dtype), shape=list(frame.hidden.shape), nbytes=len(data))
    offsets = list(range(0, len(data), part_bytes)) or [0]
    for i, offset in enumerate(offsets):
        part = pb.FramePart(
            frame_id=frame.frame_id, layer=frame.layer, data=data[offset : offset + part_bytes],
            last=i == len(offsets) - 1,
        )  # fmt: skip
        if i == 0:
            part.rows.extend(rows)
            part.hidden.CopyFrom(header)
        yield pb.ForwardMessage(part=part)


@dataclass(frozen=True, slots=True)
class PendingFrame:
    """A frame whose parts have all arrived (``FrameAssembler.take``), not made yet: ``build()`` makes it, its tensor
    from the bytes (checked there), which a node leaves to its compute thread (no torch call on the event loop).
    ``rows_pb`` are its rows as they came, so a stage passes them on without encoding them again."""

    frame_id: int
    rows_pb: Sequence[pb.Row]
    build: Callable[[], Frame]


class FrameAssembler:
    """Collects the parts of one frame at a time (parts of different frames never interleave on a stream)."""

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self.max_frame_bytes = max_frame_bytes
        self._first: pb.FramePart | None = None
        self._data = bytearray()

    def push(self, part: pb.FramePart) -> Frame | None:
        """Add a part; returns the frame when its last part arrived."""
        pending = self.take(part)
        return None if pending is None else pending.build()

    def take(self, part: pb.FramePart) -> PendingFrame | None:
        """``push``, but the whole frame comes as a ``PendingFrame``, to be made where its tensor may be built."""
        if self._first is None:
            if part.HasField("hidden") and part.hidden.nbytes > self.max_frame_bytes:
                raise WireError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"frame of {part.hidden.nbytes} bytes exceeds the limit of {self.max_frame_bytes}",
                )
            self._first = part
            self._data = bytearray()
        elif part.frame_id != self._first.frame_id:
            raise WireError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"part of frame {part.frame_id} arrived before frame {self._first.frame_id} was complete",
            )
        first = self._first
        self._data += part.data
        declared = first.hidden.nbytes if first.HasField("hidden") else 0
        if len(self._data) > declared:
            raise WireError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"frame {first.frame_id} carries more than the {declared} bytes its header declares",
            )
        if not part.last:
            return None
        self._first = None
        rows = tuple(map(_row_from_pb, first.rows))
        if not rows:
            raise WireError(grpc.StatusCode.INVALID_ARGUMENT, f"frame {first.frame_id} has no rows")
        if not first.HasField("hidden"):
            build = functools.partial(Frame, first.frame_id, first.layer, rows, None)
        else:
            dtype, shape = dtype_from_pb(first.hidden.dtype), list(first.hidden.shape)
            build = functools.partial(_frame_of_bytes, first.frame_id, first.layer, rows, self._data, dtype, shape)
        return PendingFrame(first.frame_id, first.rows, build)


def _frame_of_bytes(
    frame_id: int, layer: int, rows: tuple[RowInput, ...], data: bytearray, dtype: torch.dtype, shape: list[int]
) -> Frame:
    return Frame(frame_id, layer, rows, tensor_from_bytes(data, dtype, shape))


def result_to_pb(result: FrameResult) -> pb.ForwardReply:
    rows = []
    for r in result.rows:
        row = pb.RowResult(request_id=r.request_id, token=r.token)
        if r.logits is not None:
            row.logits.CopyFrom(tensor_to_pb(r.logits))
        rows.append(row)
    return pb.ForwardReply(frame_id=result.frame_id, rows=rows)


def result_from_pb(m: pb.ForwardReply) -> FrameResult:
    rows = tuple(
        RowOutput(r.request_id, r.token, tensor_from_pb(r.logits) if r.HasField("logits") else None) for r in m.rows
    )
    return FrameResult(m.frame_id, rows)


# ---- loading ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoadRequest:
    """What a node is asked to hold and where its bytes come from (``local_path``, or pushed when ``None``)."""

    model_id: str
    spec: ShardSpec
    config: ModelConfig
    manifest: SliceManifest
    local_path: str | None
    compute_dtype: torch.dtype = torch.float32
    input_dtype: torch.dtype = torch.float32
    output_dtype: torch.dtype = torch.float32
    slots: int = 1
    max_len: int = 2048
    device: str = ""
    quantize: QuantMode | None = None  # None: dense in compute_dtype; gguf: the file's blocks packed (node.packed)
    kv_dtype: torch.dtype | None = None  # the KV cache's element type; None: the node's llama_shard.config choice


def load_request_to_pb(r: LoadRequest) -> pb.LoadShardRequest:
    msg = pb.LoadShardRequest(
        model_id=r.model_id, spec=spec_to_pb(r.spec), config=config_to_pb(r.config),
        manifest=manifest_to_pb(r.manifest), compute_dtype=dtype_to_pb(r.compute_dtype),
        input_dtype=dtype_to_pb(r.input_dtype), output_dtype=dtype_to_pb(r.output_dtype),
        slots=r.slots, max_len=r.max_len, device=r.device, quantize=r.quantize.value if r.quantize else "",
        kv_dtype=dtype_to_pb(r.kv_dtype) if r.kv_dtype is not None else pb.DTYPE_UNSPECIFIED,
    )  # fmt: skip
    if r.local_path is None:
        msg.pushed = True
    else:
        msg.local_path = r.local_path
    return msg


def load_request_from_pb(m: pb.LoadShardRequest) -> LoadRequest:
    bad = grpc.StatusCode.INVALID_ARGUMENT
    if m.WhichOneof("source") is None:
        raise WireError(bad, "LoadShard needs a source: local_path or pushed")
    if not m.HasField("config") or not m.HasField("spec") or not m.HasField("manifest"):
        raise WireError(bad, "LoadShard needs spec, config and manifest")
    spec, config = spec_from_pb(m.spec), config_from_pb(m.config)
    if spec.n_layers != config.n_layers:
        raise WireError(bad, f"shard {spec} does not fit a {config.n_layers}-layer model")
    if m.slots < 1 or m.max_len < 1:
        raise WireError(bad, f"slots ({m.slots}) and max_len ({m.max_len}) must be >= 1")
    floats = (torch.float32, torch.bfloat16, torch.float16)
    dtypes = [dtype_from_pb(v) for v in (m.compute_dtype, m.input_dtype, m.output_dtype)]
    if any(d not in floats for d in dtypes):
        raise WireError(bad, "compute, input and output dtypes must be float32, bfloat16 or float16")
    if m.quantize and m.quantize not in QuantMode.__members__:
        known = ", ".join(repr(q.value) for q in QuantMode)
        raise WireError(bad, f"unknown weight mode quantize={m.quantize!r} (known: '' for dense, {known})")
    kv_dtype = None
    if m.kv_dtype != pb.DTYPE_UNSPECIFIED:
        kv_dtype = _FROM_PB.get(m.kv_dtype)
        if kv_dtype not in floats:
            raise WireError(bad, f"kv_dtype {m.kv_dtype} is not float32, bfloat16 or float16")
    return LoadRequest(
        model_id=m.model_id, spec=spec, config=config, manifest=manifest_from_pb(m.manifest),
        local_path=m.local_path if m.WhichOneof("source") == "local_path" else None,
        compute_dtype=dtypes[0], input_dtype=dtypes[1], output_dtype=dtypes[2],
        slots=m.slots, max_len=m.max_len, device=m.device, quantize=QuantMode(m.quantize) if m.quantize else None,
        kv_dtype=kv_dtype,
    )  # fmt: skip
