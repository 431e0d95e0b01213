"""Steps through all of a stage's layers in one native call (``kernels/csrc/decode.cpp``).

A packed stage (every linear a ``GGMLLinear``, or a ``GGMLStack`` of them where wq/wk/wv or w1/w3 differ in type, fp32
norms, an fp32 or f16 KV cache, on CPU) runs a step through a ``DecodePlan``: the layers' math of ``llama_shard.model``
in C++, with the same matmul kernels, so a token costs its matmuls plus little else (the eager path spent about half of
a SmolLM2 token in ~150 small torch ops and the Python between them per layer). Every token of a step is one row of the
plan at its own position, decode rows and the tokens of prompt chunks alike (``llama_shard.batching.run_step``): the
plan writes all rows' keys before any row attends, and a row's arithmetic depends only on its own token, position and
slot, so a token's bits do not depend on what shares its step, on how its prompt was chunked, or on whether it was
decoded or prefilled.

The plan's numerics are its own: fp32 throughout, as the eager packed path, but norms, softmax and SiLU round in
another order, so its logits differ from the eager path's in the last bits. An f16 cache (the packed stages'
default, ``llama_shard.config.kv_cache_dtype``) is rounded as the eager path rounds it: to nearest even on write,
exactly back to fp32 on read. Every node of a pipeline uses it as a
single process does, so N nodes still give one node's bits. ``LLAMA_NODE_FUSED=0`` turns it off.
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import Any

import torch
from torch import Tensor

from llama_shard import kernels
from llama_shard.ggml_linear import GGMLLinear, GGMLStack
from llama_shard.model import Block, KVCache, Stage

log = logging.getLogger(__name__)


class FusedDecoder:
    """A stage's ``DecodePlan`` and the KV cache it is bound to.

    It refers to its stage weakly: it is the value of ``_decoders``, whose key is the stage, and a strong reference
    would keep every stage a node ever loaded (and its weights) alive.
    """

    def __init__(self, stage: Stage, plan: Any) -> None:
        self._stage, self.plan = weakref.ref(stage), plan
        self._cache: weakref.ref[KVCache] | None = None

    @property
    def stage(self) -> Stage:
        stage = self._stage()
        if stage is None:
            raise RuntimeError("the stage of this fused decoder is gone")
        return stage

    def bind(self, cache: KVCache) -> None:
        if self._cache is not None and self._cache() is cache:
            return
        layers = list(self.stage.spec.layers)
        self.plan.bind_cache([cache.k[i] for i in layers], [cache.v[i] for i in layers])
        self._cache = weakref.ref(cache)

    def __call__(
        self, x: Tensor, cache: KVCache, slots: list[int], positions: list[int], head_rows: list[int] | None = None
    ) -> Tensor:
        """Rows ``b`` of ``x`` (token ids ``[B]`` on a first stage, activations ``[B, D]`` elsewhere) at
        ``positions[b]`` of KV slot ``slots[b]``; rows may share a slot (a prompt chunk's tokens). Returns activations
        ``[B, D]``, or on a last stage the logits ``[R, V]`` of the rows ``head_rows`` (default: all)."""
        self.bind(cache)
        stage = self.stage
        h: Tensor = stage.tok_embeddings(x) if stage.tok_embeddings is not None else x
        if h.dtype != torch.float32:
            h = h.float()
        cos, sin = stage._rope_table(max(positions) + 1, torch.float32)
        wanted = list(range(len(slots))) if head_rows is None else head_rows
        out: Tensor = self.plan.forward(h, slots, positions, cos, sin, wanted)
        return out


#: KV cache element types the plan reads and writes (a bf16 cache, of a bf16 stage, is the eager path's)
_CACHE_DTYPES = (torch.float32, torch.float16)
_decoders: weakref.WeakKeyDictionary[Stage, FusedDecoder | None] = weakref.WeakKeyDictionary()


def decoder(stage: Stage, cache: KVCache) -> FusedDecoder | None:
    """The stage's fused decoder, or None where the stage or cache is not one it computes (then the eager path)."""
    if stage in _decoders:
        found = _decoders[stage]
    else:
        found = _decoders[stage] = _build(stage)
    if found is None or cache.dtype not in _CACHE_DTYPES or any(not t.is_contiguous() for t in cache.k.values()):
        return None
    return found


def _linear(module: object) -> GGMLLinear | None:
    return module if isinstance(module, GGMLLinear) else None


def _parts(module: object) -> list[GGMLLinear] | None:
    """A matrix of the plan as its row-stacked parts: one for a ``GGMLLinear``, a ``GGMLStack``'s parts."""
    if isinstance(module, GGMLStack):
        return module.linears
    return [module] if isinstance(module, GGMLLinear) else None


def _build(stage: Stage, *, scalar: bool = False) -> FusedDecoder | None:
    """``scalar``: the plan's portable code (what CPUs without AVX2 run), for tests on a machine with it."""
    if os.environ.get("LLAMA_NODE_FUSED", "1") == "0" or stage.inv_freq.device.type != "cpu":
        return None
    if not kernels.available() or not hasattr(torch.classes.llama_node, "DecodePlan"):
        return None
    c = stage.config
    norms: list[Tensor] = []
    blocks: list[Tensor] = []
    qtypes: list[int] = []
    counts: list[int] = []
    for block in stage.layers.values():
        if type(block) is not Block:  # another block kind (e.g. a future MoE layer): the eager path
            return None
        attn, ffn = block.attention, block.feed_forward
        found = [_parts(attn.wqkv), _parts(attn.wo), _parts(ffn.w13), _parts(ffn.w2)]
        layer_norms = [block.attention_norm.weight.detach(), block.ffn_norm.weight.detach()]
        if any(not f for f in found) or any(n.dtype != torch.float32 for n in layer_norms):
            return None
        norms += layer_norms
        for parts in found:
            assert parts is not None
            blocks += [p.blocks for p in parts]
            qtypes += [p._qtype for p in parts]
            counts.append(len(parts))
    plan = torch.classes.llama_node.DecodePlan(
        c.dim, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim, c.norm_eps, norms, blocks, qtypes, counts, scalar
    )
    if stage.spec.has_head:
        head = _linear(stage.output)
        if head is None or stage.norm is None or stage.norm.weight.dtype != torch.float32:
            return None
        plan.set_head(stage.norm.weight.detach(), head.blocks, head._qtype)
    log.debug("fused decode for layers %s", stage.spec.layers)
    return FusedDecoder(stage, plan)
