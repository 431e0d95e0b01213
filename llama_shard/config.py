"""Model configuration: one frozen dataclass, read from an HF ``config.json`` or from GGUF metadata.

Every invariant is checked in ``__post_init__`` with a message that names the numbers involved, so a bad
checkpoint fails at load with a sentence, not deep inside a matmul.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llama_shard.errors import ModelFormatError

SUPPORTED_ARCHITECTURES = ("llama",)

#: bytes per element of each KV cache dtype (torch's names)
KV_CACHE_BYTES: Mapping[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2}
#: ``--kv-cache`` choices (llama.cpp's short names) and the dtype each means
KV_CACHE_CHOICES: Mapping[str, str] = {"f16": "float16", "f32": "float32"}


def kv_cache_dtype(*, quantised: bool, compute: str = "float32", requested: str | None = None) -> str:
    """The element type of a stage's KV cache, by torch dtype name: the one place that decides it, for the stage
    that allocates the cache (``llama_shard.loading.load_stage``) and the coordinator that sizes it.

    ``requested`` (``--kv-cache``, a ``KV_CACHE_BYTES`` name) wins. Otherwise a stage with quantised weights (packed
    GGUF blocks or int4/int8; fp32 activations) keeps float16, as llama.cpp does by default: half the bytes, and at
    long context attention reads the cache from DRAM every token. Keys and values are rounded to nearest even once,
    when written (a relative error of at most 2^-11, 8x below the 8-bit rounding every activation of such a stage
    already gets before each matmul) and read back exactly. A dense stage caches in its compute dtype: float32 is the
    exact path, which must keep matching the reference; bfloat16 and float16 stages keep theirs.

    Raises:
        ValueError: an unknown ``compute`` or ``requested`` name.
    """
    for name in (compute, requested):
        if name is not None and name not in KV_CACHE_BYTES:
            raise ValueError(f"unknown KV cache dtype {name!r} (known: {', '.join(KV_CACHE_BYTES)})")
    if requested is not None:
        return requested
    return "float16" if quantised and compute == "float32" else compute


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """RoPE frequency scaling. ``kind`` is ``default``, ``linear`` or ``llama3``."""

    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.kind not in ("default", "linear", "llama3"):
            raise ModelFormatError(f"unsupported rope scaling type {self.kind!r} (supported: default, linear, llama3)")
        if self.factor <= 0:
            raise ModelFormatError(f"rope scaling factor must be > 0, got {self.factor}")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Shape and hyper-parameters of a Llama-family decoder.

    Attributes:
        n_layers: number of transformer blocks.
        dim: hidden size.
        n_heads / n_kv_heads: query heads and key/value heads (grouped-query attention when fewer).
        head_dim: per-head size; ``dim // n_heads`` unless the checkpoint says otherwise.
        ffn_dim: SwiGLU intermediate size.
        rope_freqs_tensor: the checkpoint carries explicit RoPE frequency factors (Llama 3.1 GGUF ``rope_freqs``).
    """

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    head_dim: int = 0
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    rope_freqs_tensor: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    arch: str = "llama"

    def __post_init__(self) -> None:
        if self.arch not in SUPPORTED_ARCHITECTURES:
            raise ModelFormatError(
                f"unsupported architecture {self.arch!r} (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        if self.head_dim == 0:
            if self.dim % self.n_heads:
                raise ModelFormatError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ModelFormatError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ModelFormatError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ModelFormatError(f"head_dim ({self.head_dim}) must be even for RoPE")

    def kv_bytes_per_token(self, kv_dtype: str = "float32") -> int:
        """K and V bytes one token costs in every layer together, in a cache of ``kv_dtype`` (``kv_cache_dtype``)."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * KV_CACHE_BYTES[kv_dtype]

    # ---- readers -------------------------------------------------------------------------------------------

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> ModelConfig:
        """Build from a parsed HF ``config.json``."""
        model_type = cfg.get("model_type", "llama")
        if model_type != "llama":
            raise ModelFormatError(f"unsupported architecture {model_type!r} (supported: llama)")
        for flag in ("attention_bias", "mlp_bias"):
            if cfg.get(flag):
                raise ModelFormatError(f"unsupported Llama variant: {flag} is set")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ModelFormatError(f"unsupported activation {cfg['hidden_act']!r} (Llama uses silu)")
        # transformers 5 writes rope_parameters (theta included); older checkpoints have rope_theta + rope_scaling
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        try:
            eos = cfg.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            n_heads = int(cfg["num_attention_heads"])
            return cls(
                vocab_size=int(cfg["vocab_size"]),
                dim=int(cfg["hidden_size"]),
                n_layers=int(cfg["num_hidden_layers"]),
                n_heads=n_heads,
                n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
                ffn_dim=int(cfg["intermediate_size"]),
                head_dim=int(cfg.get("head_dim") or 0),
                norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
                rope_scaling=_rope_scaling_from_hf(rope),
                max_seq_len=int(cfg.get("max_position_embeddings", 4096)),
                tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=eos_ids,
            )
        except KeyError as e:
            raise ModelFormatError(f"config.json lacks required field {e.args[0]!r}") from None

    @classmethod
    def from_hf_dir(cls, path: Path) -> ModelConfig:
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise ModelFormatError(f"{path}: no config.json (not an HF model directory)")
        try:
            return cls.from_hf(json.loads(cfg_path.read_text()))
        except json.JSONDecodeError as e:
            raise ModelFormatError(f"{cfg_path}: invalid JSON ({e})") from None

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], tensor_names: set[str]) -> ModelConfig:
        """Build from GGUF key/value metadata (``general.architecture`` picks the key prefix)."""
        arch = str(meta.get("general.architecture", ""))
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelFormatError(f"unsupported architecture {arch!r} (supported: llama)")

        def get(key: str, default: Any = None) -> Any:
            value = meta.get(f"{arch}.{key}", default)
            if value is None:
                raise ModelFormatError(f"GGUF metadata lacks {arch}.{key}")
            return value

        n_heads = int(get("attention.head_count"))
        dim = int(get("embedding_length"))
        vocab = meta.get(f"{arch}.vocab_size")
        if vocab is None:
            tokens = meta.get("tokenizer.ggml.tokens")
            if tokens is None:
                raise ModelFormatError("GGUF metadata has neither a vocab size nor a token list")
            vocab = len(tokens)
        scaling_type = meta.get(f"{arch}.rope.scaling.type")
        rope_scaling = RopeScaling()
        if scaling_type == "linear":
            rope_scaling = RopeScaling(kind="linear", factor=float(get("rope.scaling.factor")))
        elif scaling_type not in (None, "none"):
            raise ModelFormatError(f"unsupported GGUF rope scaling type {scaling_type!r}")
        eos = meta.get("tokenizer.ggml.eos_token_id")
        eot = meta.get("tokenizer.ggml.eot_token_id")
        eos_ids = tuple(dict.fromkeys(int(t) for t in (eos, eot) if t is not None))
        bos = meta.get("tokenizer.ggml.bos_token_id")
        key_length = meta.get(f"{arch}.attention.key_length")
        return cls(
            vocab_size=int(vocab),
            dim=dim,
            n_layers=int(get("block_count")),
            n_heads=n_heads,
            n_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv", n_heads)),
            ffn_dim=int(get("feed_forward_length")),
            head_dim=int(key_length) if key_length else 0,
            norm_eps=float(get("attention.layer_norm_rms_epsilon")),
            rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
            rope_scaling=rope_scaling,
            max_seq_len=int(get("context_length")),
            tie_embeddings="output.weight" not in tensor_names,
            rope_freqs_tensor="rope_freqs.weight" in tensor_names,
            bos_token_id=None if bos is None else int(bos),
            eos_token_ids=eos_ids,
        )


def _rope_scaling_from_hf(raw: Mapping[str, Any] | None) -> RopeScaling:
    if not raw:
        return RopeScaling()
    kind = raw.get("rope_type", raw.get("type", "default"))
    if kind == "default":
        return RopeScaling()
    if kind == "linear":
        return RopeScaling(kind="linear", factor=float(raw["factor"]))
    if kind == "llama3":
        return RopeScaling(
            kind="llama3",
            factor=float(raw["factor"]),
            low_freq_factor=float(raw.get("low_freq_factor", 1.0)),
            high_freq_factor=float(raw.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(raw.get("original_max_position_embeddings", 8192)),
        )
    raise ModelFormatError(f"unsupported rope scaling type {kind!r} (supported: default, linear, llama3)")
