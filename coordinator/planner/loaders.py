"""``ModelProfile`` from an HF ``config.json``, a GGUF header, or a preset name. The only I/O of the planner.

The GGUF path reads the key/value metadata and the tensor infos (name, type, shape, byte size) with
``gguf_header.read_gguf_header`` over a memory map: tensor data is never read.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from coordinator.planner.gguf_header import GGUFHeaderError, read_gguf_header
from coordinator.planner.profiles import PRESETS, ModelProfile, StoredWeights, preset

log = logging.getLogger(__name__)

_BLK = re.compile(r"^blk\.(\d+)\.")


class ModelSourceError(ValueError):
    """A model argument that is neither a preset, a readable config.json nor a readable GGUF file."""


def profile_from_hf_config(cfg: Mapping[str, Any], name: str = "hf-model") -> ModelProfile:
    """Build from a parsed HF ``config.json`` (``llama``, ``mixtral``, ``llama4`` / ``llama4_text``).

    Raises:
        ModelSourceError: unsupported ``model_type`` or a missing field.
    """
    model_type = cfg.get("model_type", "llama")
    if model_type == "llama4":
        cfg = cfg.get("text_config") or {}
        model_type = "llama4_text"
    if model_type not in ("llama", "mixtral", "llama4_text"):
        raise ModelSourceError(f"unsupported model_type {model_type!r} (supported: llama, mixtral, llama4)")
    try:
        n_layers = int(cfg["num_hidden_layers"])
        n_heads = int(cfg["num_attention_heads"])
        common: dict[str, Any] = dict(
            name=name,
            vocab_size=int(cfg["vocab_size"]),
            dim=int(cfg["hidden_size"]),
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            head_dim=int(cfg.get("head_dim") or 0),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_seq_len=int(cfg.get("max_position_embeddings", 4096)),
        )
        if model_type == "llama":
            return ModelProfile(ffn_dim=int(cfg["intermediate_size"]), **common)
        if model_type == "mixtral":
            return ModelProfile(
                ffn_dim=int(cfg["intermediate_size"]),
                n_experts=int(cfg["num_local_experts"]),
                experts_per_token=int(cfg["num_experts_per_tok"]),
                expert_ffn_dim=int(cfg["intermediate_size"]),
                moe_layers=frozenset(range(n_layers)),
                **common,
            )
        step = int(cfg.get("interleave_moe_layer_step", 1))
        moe = cfg.get("moe_layers")
        moe_layers = frozenset(range(step - 1, n_layers, step))
        if moe is not None:
            moe_layers = frozenset(int(i) for i in moe)
        return ModelProfile(
            ffn_dim=int(cfg.get("intermediate_size_mlp") or cfg["intermediate_size"]),
            n_experts=int(cfg["num_local_experts"]),
            experts_per_token=int(cfg.get("num_experts_per_tok", 1)),
            expert_ffn_dim=int(cfg["intermediate_size"]),
            shared_expert_ffn_dim=int(cfg["intermediate_size"]),
            moe_layers=moe_layers,
            **common,
        )
    except KeyError as e:
        raise ModelSourceError(f"config.json lacks required field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise ModelSourceError(f"config.json has a bad value: {e}") from None


def profile_from_gguf(path: str | Path) -> ModelProfile:
    """Read only the header of a GGUF file: its shape from metadata, its exact bytes from the tensor infos.

    Raises:
        ModelSourceError: unreadable file, unsupported architecture or missing metadata.
    """
    p = Path(path)
    try:
        header = read_gguf_header(p)
    except (OSError, GGUFHeaderError) as e:
        raise ModelSourceError(f"{p}: not a readable GGUF file ({e})") from None
    meta = header.metadata
    arch = meta.get("general.architecture")
    if arch not in ("llama", "llama4"):
        raise ModelSourceError(f"{p}: unsupported GGUF architecture {arch!r} (supported: llama, llama4)")

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}")
        if value is None:
            if default is None:
                raise ModelSourceError(f"{p}: GGUF metadata lacks {arch}.{key}")
            return default
        return value

    tensors = {t.name: t for t in header.tensors}
    n_layers = int(get("block_count"))
    n_heads = int(get("attention.head_count"))
    vocab = meta.get(f"{arch}.vocab_size")
    if vocab is None:
        if "token_embd.weight" not in tensors:
            raise ModelSourceError(f"{p}: neither a vocab size nor a token_embd tensor")
        vocab = tensors["token_embd.weight"].shape[1]
    layer_bytes = [0] * n_layers
    expert_bytes = [0] * n_layers
    moe_layers: set[int] = set()
    embed = head = 0
    n_experts = int(get("expert_count", 0))
    shared = 0
    for t in header.tensors:
        m = _BLK.match(t.name)
        if m:
            i = int(m.group(1))
            if not 0 <= i < n_layers:
                raise ModelSourceError(f"{p}: tensor {t.name} outside the {n_layers} blocks")
            layer_bytes[i] += t.n_bytes
            if "_exps." in t.name and n_experts:
                moe_layers.add(i)
                expert_bytes[i] += t.n_bytes // n_experts
            if "ffn_up_shexp" in t.name:
                shared = t.shape[1]
        elif t.name in ("token_embd.weight", "rope_freqs.weight"):
            embed += t.n_bytes
        elif t.name in ("output.weight", "output_norm.weight"):
            head += t.n_bytes
    tied = "output.weight" not in tensors
    if tied and "token_embd.weight" in tensors:
        head += tensors["token_embd.weight"].n_bytes
    ftype = meta.get("general.file_type")
    label = f"gguf (file_type {ftype})" if ftype is not None else "gguf"
    ffn = int(get("feed_forward_length"))
    log.debug("read GGUF header of %s: %d tensors", p, len(tensors))
    try:
        return ModelProfile(
            name=str(meta.get("general.name") or p.stem),
            vocab_size=int(vocab),
            dim=int(get("embedding_length")),
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=int(get("attention.head_count_kv", n_heads)),
            ffn_dim=ffn,
            head_dim=int(get("attention.key_length", 0)),
            tie_embeddings=tied,
            max_seq_len=int(get("context_length", 4096)),
            n_experts=n_experts if moe_layers else 0,
            experts_per_token=int(get("expert_used_count", 0)) if moe_layers else 0,
            expert_ffn_dim=int(get("expert_feed_forward_length", ffn)) if moe_layers else 0,
            shared_expert_ffn_dim=shared,
            moe_layers=frozenset(moe_layers),
            stored=StoredWeights(label, tuple(layer_bytes), tuple(expert_bytes), embed, head),
        )
    except (TypeError, ValueError) as e:
        raise ModelSourceError(f"{p}: inconsistent GGUF metadata ({e})") from None


def load_model_profile(source: str) -> ModelProfile:
    """A preset name, an HF model directory or ``config.json`` path, or a ``.gguf`` file.

    Raises:
        ModelSourceError: none of these.
    """
    if source.lower() in PRESETS:
        return preset(source)
    p = Path(source)
    if p.is_dir():
        p = p / "config.json"
    if p.suffix == ".gguf" and p.is_file():
        return profile_from_gguf(p)
    if p.name.endswith(".json") and p.is_file():
        try:
            cfg = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ModelSourceError(f"{p}: not readable JSON ({e})") from None
        if not isinstance(cfg, dict):
            raise ModelSourceError(f"{p}: config.json is not an object")
        return profile_from_hf_config(cfg, name=p.parent.name or "hf-model")
    raise ModelSourceError(
        f"{source!r} is neither a preset ({', '.join(PRESETS)}), a config.json / HF model directory nor a .gguf file"
    )
