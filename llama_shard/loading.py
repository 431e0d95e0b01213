"""Loading a stage: only the tensors of its own slice, from safetensors or GGUF.

Checkpoint names are mapped to this project's names in one place per format (``HF_TO_NATIVE`` here,
``GGUF_TO_NATIVE`` in ``gguf_file``). A source answers ``get(native_name)`` with a float tensor; nothing outside the
stage's list of names is ever read.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from gguf import GGMLQuantizationType
from safetensors import safe_open
from torch import nn

from llama_shard import kernels
from llama_shard.config import ModelConfig, kv_cache_dtype
from llama_shard.errors import ModelFormatError
from llama_shard.ggml_linear import KERNEL_TYPES, GGMLLinear, GGMLStack, TiedEmbedding, quantize_blocks
from llama_shard.gguf_file import GGUF_TO_NATIVE, GGUFFile
from llama_shard.model import Stage
from llama_shard.quant import (
    PACKED_TYPES,
    DenseEmbedding,
    DenseLinear,
    Int4Planes,
    QuantEmbedding,
    QuantLinear,
    QuantMode,
    gguf_planes,
    linear_from_planes,
    quantize_planes,
)
from llama_shard.shard import ShardSpec

if TYPE_CHECKING:
    from llama_shard.tokenizer import Tokenizer

log = logging.getLogger(__name__)

HF_TO_NATIVE = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attention_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.attention.wq.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "layers.{i}.attention.wk.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "layers.{i}.attention.wv.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.attention.wo.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.ffn_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "layers.{i}.feed_forward.w1.weight",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.feed_forward.w2.weight",
    "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.feed_forward.w3.weight",
}

_LAYER_SUFFIXES = (
    "attention_norm.weight",
    "attention.wq.weight",
    "attention.wk.weight",
    "attention.wv.weight",
    "attention.wo.weight",
    "ffn_norm.weight",
    "feed_forward.w1.weight",
    "feed_forward.w2.weight",
    "feed_forward.w3.weight",
)


def _name_map(table: dict[str, str]) -> list[tuple[re.Pattern[str], str]]:
    """Compile ``{i}`` templates into (checkpoint regex, native template) pairs."""
    return [(re.compile("^" + re.escape(k).replace(r"\{i\}", r"(\d+)") + "$"), v) for k, v in table.items()]


def _rename(name: str, table: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, native in table:
        m = pattern.match(name)
        if m:
            return native.format(i=m.group(1)) if m.groups() else native
    return None


def stage_tensor_names(config: ModelConfig, spec: ShardSpec) -> list[str]:
    """Native names of every tensor a stage holds (a tied head reads ``tok_embeddings.weight`` as ``output``)."""
    names = ["tok_embeddings.weight"] if spec.has_embed else []
    names += [f"layers.{i}.{suffix}" for i in spec.layers for suffix in _LAYER_SUFFIXES]
    if spec.has_head:
        names += ["norm.weight", "output.weight"]
    if config.rope_freqs_tensor:
        names.append("rope_freqs")
    return names


class WeightSource(Protocol):
    """Where a stage's tensors come from. ``get`` returns one tensor as float, in native layout."""

    config: ModelConfig

    def has(self, name: str) -> bool: ...

    def get(self, name: str) -> torch.Tensor: ...


def _unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's converter, which interleaves each head's two RoPE halves for its rotary kernel."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


class GGUFSource:
    def __init__(self, gguf: GGUFFile) -> None:
        self.gguf = gguf
        self.config = ModelConfig.from_gguf_metadata(gguf.metadata, gguf.tensor_names)
        table = _name_map(GGUF_TO_NATIVE)
        self._native = {}
        for name in gguf.tensor_names:
            native = _rename(name, table)
            if native is not None:
                self._native[native] = name

    def has(self, name: str) -> bool:
        return name in self._native

    def get(self, name: str) -> torch.Tensor:
        if name not in self._native:
            raise ModelFormatError(f"{self.gguf.path}: tensor for {name!r} is missing")
        w = self.gguf.tensor(self._native[name])
        # llama.cpp's converter permutes Q and K rows for the llama architecture; transformers' layout is the
        # un-permuted one, which our rotate-half RoPE expects.
        if name.endswith("attention.wq.weight"):
            w = _unpermute_qk(w, self.config.n_heads)
        elif name.endswith("attention.wk.weight"):
            w = _unpermute_qk(w, self.config.n_kv_heads)
        return w

    def blocks(self, name: str, *, fresh_map: bool = False) -> tuple[torch.Tensor, GGMLQuantizationType, int]:
        """``name``'s raw GGUF blocks (see ``GGUFFile.blocks``); Q/K rows are still in llama.cpp's order."""
        if name not in self._native:
            raise ModelFormatError(f"{self.gguf.path}: tensor for {name!r} is missing")
        return self.gguf.blocks(self._native[name], fresh_map=fresh_map)

    def row_order(self, name: str) -> torch.Tensor | None:
        """The row permutation ``get`` applies to ``name`` (Q and K), as an index: ``native = raw[index]``."""
        if name.endswith("attention.wq.weight"):
            heads = self.config.n_heads
        elif name.endswith("attention.wk.weight"):
            heads = self.config.n_kv_heads
        else:
            return None
        return _unpermute_qk(torch.arange(heads * self.config.head_dim)[:, None], heads)[:, 0]


class SafetensorsSource:
    """An HF model directory: ``config.json`` + ``*.safetensors`` (single file or sharded with an index)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.config = ModelConfig.from_hf_dir(path)
        table = _name_map(HF_TO_NATIVE)
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ModelFormatError(f"{path}: no *.safetensors files")
        self._where: dict[str, tuple[Path, str]] = {}
        for file in files:
            try:
                with safe_open(str(file), framework="pt") as f:
                    keys = list(f.keys())
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise ModelFormatError(f"{file}: not a readable safetensors file ({e})") from None
            for key in keys:
                native = _rename(key, table)
                if native is not None:
                    self._where[native] = (file, key)

    def has(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise ModelFormatError(f"{self.path}: tensor for {name!r} is missing")
        file, key = self._where[name]
        with safe_open(str(file), framework="pt") as f:
            return f.get_tensor(key)


def open_source(path: str | Path) -> WeightSource:
    """A ``.gguf`` file or an HF model directory."""
    p = Path(path)
    if not p.exists():
        raise ModelFormatError(f"{p}: no such file or directory")
    if p.is_dir():
        return SafetensorsSource(p)
    if p.suffix != ".gguf":
        raise ModelFormatError(f"{p}: expected a .gguf file or an HF model directory")
    return GGUFSource(GGUFFile(p))


@dataclass(frozen=True, slots=True)
class LoadReport:
    tensors: int
    bytes: int


def iter_stage_tensors(
    source: WeightSource, spec: ShardSpec, *, share_tied: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """The stage's tensors, one at a time, by native name (the tied head falls back to the embedding).

    ``share_tied``: a stage that holds both the embedding and a tied head skips the head, which the caller shares
    with the embedding, instead of reading (and dequantising) the same tensor twice.
    """
    config = source.config
    for name in stage_tensor_names(config, spec):
        if name == "output.weight" and not source.has(name):
            if not config.tie_embeddings:
                raise ModelFormatError("the checkpoint has no output.weight and does not tie embeddings")
            if share_tied and spec.has_embed:
                continue
            name_in_source = "tok_embeddings.weight"
        else:
            name_in_source = name
        yield name, source.get(name_in_source)


def load_stage(
    source: WeightSource,
    spec: ShardSpec,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    quantize: QuantMode | None = None,
    kv_cache: str | None = None,
) -> Stage:
    """Build the stage for ``spec`` and fill it with its own tensors, and nothing else, from ``source``.

    With ``quantize`` the linear weights stay (or become) packed low-bit weights and ``dtype`` is ignored: see
    ``load_quantised_stage``. Without it every weight is dequantised to ``dtype`` (float32: the exact path).
    ``kv_cache``: the KV cache dtype by name (``--kv-cache``); None: ``kv_cache_dtype``'s choice for the stage
    (float16 when quantised, else ``dtype``). It becomes ``stage.kv_dtype``, what ``Stage.new_cache`` allocates.
    """
    if quantize is not None:
        stage = load_quantised_stage(source, spec, quantize, device=device)
    else:
        stage = _load_dense(source, spec, dtype, device)
    compute = "float32" if quantize is not None else str(dtype).removeprefix("torch.")  # quantised: fp32 activations
    stage.kv_dtype = getattr(torch, kv_cache_dtype(quantised=quantize is not None, compute=compute, requested=kv_cache))
    return stage


def _load_dense(source: WeightSource, spec: ShardSpec, dtype: torch.dtype, device: torch.device | str) -> Stage:
    config = source.config
    with torch.device("meta"):
        stage = Stage(config, spec)
    state: dict[str, torch.Tensor] = {}
    freq_factors = None
    nbytes = 0
    for name, tensor in iter_stage_tensors(source, spec, share_tied=True):  # a tied head is shared below
        if name == "rope_freqs":
            freq_factors = tensor
            continue
        state[name] = tensor.to(device=device, dtype=dtype)
        nbytes += state[name].numel() * state[name].element_size()
    expected = dict(stage.state_dict(keep_vars=True))
    if "output.weight" not in state and "output.weight" in expected:
        state["output.weight"] = state["tok_embeddings.weight"]
    for name, tensor in state.items():
        if name not in expected:
            raise ModelFormatError(f"unexpected tensor {name!r} for stage {spec}")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ModelFormatError(
                f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(expected[name].shape)}"
            )
    stage.load_state_dict(state, strict=True, assign=True)
    tied_here = spec.has_embed and spec.has_head and not source.has("output.weight")
    if tied_here and isinstance(stage.output, nn.Linear) and isinstance(stage.tok_embeddings, nn.Embedding):
        stage.output.weight = stage.tok_embeddings.weight
    stage.setup_rope(freq_factors)
    stage.eval().requires_grad_(False)
    log.info("loaded stage %s: %d tensors, %.1f MB", spec, len(state), nbytes / 1e6)
    return stage


def load_tokenizer(source: WeightSource) -> Tokenizer:
    """The tokenizer that ships with the weights: GGUF metadata or the HF directory's tokenizer files."""
    from llama_shard.tokenizer import Tokenizer

    if isinstance(source, GGUFSource):
        return Tokenizer.from_gguf_metadata(source.gguf.metadata)
    if isinstance(source, SafetensorsSource):
        return Tokenizer.from_hf_dir(source.path)
    raise TypeError(f"no tokenizer for {type(source).__name__}")


_FUSED = {
    "attention.wqkv": ("attention.wq", "attention.wk", "attention.wv"),
    "feed_forward.w13": ("feed_forward.w1", "feed_forward.w3"),
}
_SINGLE = ("attention.wo", "feed_forward.w2")


@dataclass(frozen=True, slots=True)
class _Rows:
    """The raw blocks of consecutive tensors of one type, stacked by rows (Q/K rows un-permuted)."""

    blocks: torch.Tensor
    qtype: GGMLQuantizationType
    cols: int
    tensors: int  # how many: one may be the file's mapping itself, several are a copy


def _gguf_runs(source: WeightSource, names: list[str], packable: frozenset[GGMLQuantizationType]) -> list[_Rows] | None:
    """The raw blocks of ``names``, each run of consecutive tensors of one type stacked by rows (a single run when
    they share a type), if they are all of ``packable`` types and of one width."""
    if not isinstance(source, GGUFSource):
        return None
    blocks = [source.blocks(n) for n in names]
    if len({b[2] for b in blocks}) != 1 or any(b[1] not in packable for b in blocks):
        return None
    runs: list[tuple[GGMLQuantizationType, list[torch.Tensor]]] = []
    for name, (raw, qtype, _) in zip(names, blocks, strict=True):
        order = source.row_order(name)  # permuting whole rows of blocks = permuting weight rows
        rows = raw if order is None else raw[order]
        if runs and runs[-1][0] == qtype:
            runs[-1][1].append(rows)
        else:
            runs.append((qtype, [rows]))
    cols = blocks[0][2]
    return [_Rows(r[0] if len(r) == 1 else torch.cat(r), qtype, cols, len(r)) for qtype, r in runs]


def _use_kernel(device: torch.device) -> bool:
    """Whether linears are ``GGMLLinear`` (the ggml-style kernel) rather than the int4-plane ``QuantLinear``."""
    return device.type == "cpu" and kernels.available()


def _linear(source: WeightSource, names: list[str], mode: QuantMode, device: torch.device) -> nn.Module | None:
    """One module for the row-stack of ``names``; None when several cannot share one packed matmul. With the native
    kernel, parts of different types (llama.cpp's Q3_K_M attn_v) are one ``GGMLStack``."""
    ggml = _use_kernel(device)
    if mode == QuantMode.gguf:
        runs = _gguf_runs(source, names, KERNEL_TYPES if ggml else frozenset(PACKED_TYPES))
        if runs is not None and ggml:  # the file's bytes, copied out of the mapping
            parts = [GGMLLinear(r.blocks, r.qtype, r.cols, copy=r.tensors == 1) for r in runs]
            return parts[0] if len(parts) == 1 else GGMLStack(parts)
        if runs is not None and len(runs) == 1:
            raw, qtype, cols = runs[0].blocks, runs[0].qtype, runs[0].cols
            if device.type == "cpu":
                return QuantLinear.from_gguf(raw, qtype, cols)
            return linear_from_planes(gguf_planes(raw, qtype, cols), device)
        if len(names) > 1:
            return None
        log.debug("%s: no packed kernel for its type, held as bf16", names[0])
        return DenseLinear(source.get(names[0])).to(device)
    bits = 4 if mode == QuantMode.int4 else 8
    weights = [source.get(n) for n in names]
    if ggml:
        blocks, qtype = quantize_blocks(weights[0] if len(weights) == 1 else torch.cat(weights), bits)
        return GGMLLinear(blocks, qtype, weights[0].shape[1])
    planes = [quantize_planes(w, bits) for w in weights]
    return linear_from_planes(planes[0] if len(planes) == 1 else Int4Planes.cat(planes), device)


def _single(source: WeightSource, name: str, mode: QuantMode, device: torch.device) -> nn.Module:
    module = _linear(source, [name], mode, device)
    assert module is not None  # a single weight always has a module
    return module


def load_quantised_stage(
    source: WeightSource, spec: ShardSpec, mode: QuantMode, *, device: torch.device | str = "cpu"
) -> Stage:
    """A stage whose linears stay quantised; norms stay fp32, activations fp32.

    On CPU with the native kernel (``llama_shard.kernels``), linears are ``GGMLLinear``: ``gguf`` keeps a GGUF
    file's Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q2_K/Q3_K/Q4_K/Q5_K/Q6_K blocks (Q4_0/Q4_1/Q8_0 reordered 8 rows at a time),
    and ``int4``/``int8`` quantise float weights to Q4_1/Q8_0 blocks. Without it (no compiler,
    ``LLAMA_NODE_KERNELS=0``, or another device) they are int4 planes for torch's kernel (``QuantLinear``,
    ``llama_shard.quant``): Q4_0/Q4_1/Q4_K/Q5_0/Q5_1/Q8_0 repacked, other types bf16.
    wq/wk/wv and w1/w3 are fused into one matmul each (with the native kernel also where their types differ, as
    llama.cpp's Q3_K_M attn_v: a ``GGMLStack``; ``QuantLinear`` then keeps them apart: stacking those of one int4
    plane count into one matmul measured no faster, 3.9-4.0 tok/s either way on llama.cpp's Q4_K_M of SmolLM2, where
    torch's int4 kernel itself takes ~1.75 ms a call). The GGUF token embedding is looked up from the file's own
    blocks, row by row (a tied one from the head's blocks, held once); no float copy of any quantised matrix is kept,
    and the file's pages read while loading are dropped from this process after each layer (they stay in the page
    cache).
    """
    config, dev = source.config, torch.device(device)
    with torch.device("meta"):
        stage = Stage(config, spec)
    release = source.gguf.release_pages if isinstance(source, GGUFSource) else (lambda: None)
    for i in spec.layers:
        prefix = f"layers.{i}."
        block = stage.layers[str(i)]
        for fused, parts in _FUSED.items():
            parent, _, attr = fused.partition(".")
            holder = block.get_submodule(parent)
            module = _linear(source, [f"{prefix}{p}.weight" for p in parts], mode, dev)
            for p in parts:
                name = p.partition(".")[2]
                if module is None:
                    setattr(holder, name, _single(source, f"{prefix}{p}.weight", mode, dev))
                else:
                    delattr(holder, name)
            if module is not None:
                setattr(holder, attr, module)
        for single in _SINGLE:
            parent, _, attr = single.partition(".")
            setattr(block.get_submodule(parent), attr, _single(source, f"{prefix}{single}.weight", mode, dev))
        for norm in ("attention_norm", "ffn_norm"):
            block.get_submodule(norm).weight = nn.Parameter(source.get(f"{prefix}{norm}.weight").float().to(dev))
        release()
    if spec.has_head:
        assert stage.norm is not None
        stage.norm.weight = nn.Parameter(source.get("norm.weight").float().to(dev))
        head = "output.weight" if source.has("output.weight") else "tok_embeddings.weight"
        if head == "tok_embeddings.weight" and not config.tie_embeddings:
            raise ModelFormatError("the checkpoint has no output.weight and does not tie embeddings")
        stage.output = _single(source, head, mode, dev)
        release()
    if spec.has_embed:
        head_module = stage.output if spec.has_head else None
        if isinstance(head_module, GGMLLinear) and isinstance(source, GGUFSource) and not source.has("output.weight"):
            # one copy of the tied matrix: the embedding looks its rows up in the head's blocks
            stage.tok_embeddings = TiedEmbedding(head_module)
        else:
            stage.tok_embeddings = _embedding(source, dev)
    leftover = [n for n, t in stage.state_dict().items() if t.is_meta]
    if leftover:
        raise ModelFormatError(f"quantised load left {leftover[:3]} unset for stage {spec}")
    freq = source.get("rope_freqs") if config.rope_freqs_tensor else None
    stage.setup_rope(freq)
    stage.eval().requires_grad_(False)
    nbytes = sum(t.numel() * t.element_size() for t in stage.state_dict().values())
    log.info("loaded stage %s quantised (%s): %.1f MB resident weights", spec, mode, nbytes / 1e6)
    return stage


def _embedding(source: WeightSource, device: torch.device) -> nn.Module:
    """GGUF: rows dequantised on lookup from a fresh mapping of the file; otherwise a dense table in its dtype."""
    if isinstance(source, GGUFSource) and device.type == "cpu":
        raw, qtype, cols = source.blocks("tok_embeddings.weight", fresh_map=True)
        return QuantEmbedding(raw, qtype, cols)
    w = source.get("tok_embeddings.weight")
    return DenseEmbedding(w if w.dtype in (torch.bfloat16, torch.float16) else w.to(torch.bfloat16), device)
