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
from safetensors import safe_open

from llama_shard.config import ModelConfig
from llama_shard.errors import ModelFormatError
from llama_shard.gguf_file import GGUF_TO_NATIVE, GGUFFile
from llama_shard.model import Stage
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


def iter_stage_tensors(source: WeightSource, spec: ShardSpec) -> Iterator[tuple[str, torch.Tensor]]:
    """The stage's tensors, one at a time, by native name (the tied head falls back to the embedding)."""
    config = source.config
    for name in stage_tensor_names(config, spec):
        if name == "output.weight" and not source.has(name):
            if not config.tie_embeddings:
                raise ModelFormatError("the checkpoint has no output.weight and does not tie embeddings")
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
) -> Stage:
    """Build the stage for ``spec`` and fill it with its own tensors, and nothing else, from ``source``."""
    config = source.config
    with torch.device("meta"):
        stage = Stage(config, spec)
    state: dict[str, torch.Tensor] = {}
    freq_factors = None
    nbytes = 0
    for name, tensor in iter_stage_tensors(source, spec):
        if name == "rope_freqs":
            freq_factors = tensor
            continue
        if name == "output.weight" and spec.has_embed and not source.has("output.weight"):
            continue  # tied: share the embedding's parameter below instead of a second copy
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
    if tied_here and stage.output is not None and stage.tok_embeddings is not None:
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
