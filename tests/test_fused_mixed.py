"""A layer whose wq/wk/wv (or w1/w3) are of different GGUF types, as llama.cpp's Q3_K_M and Q2_K mixes make them
(attn_v a type or two above attn_q, some attn_k / ffn_up raised too): it loads as one ``GGMLStack`` per matrix, so
the stage still decodes through the fused plan (``llama_shard.fused``), which runs each part's kernel into its own
columns. Before, such a layer held separate linears and the whole stage fell back to the eager path.

The fused logits are held to ``tests/test_fused_decode.py``'s bound (against the exact fp32 model, within 1.25x of
the eager packed path's error, plus a small slack), and greedy decoding gives the eager path's tokens.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import TINY_LLAMA
from gguf import GGMLQuantizationType as Q
from gguf_util import hf_to_gguf
from torch import Tensor

from llama_shard import batching, fused, kernels
from llama_shard.batching import StepRow, run_step
from llama_shard.ggml_linear import GGMLLinear, GGMLStack
from llama_shard.loading import load_stage, open_source
from llama_shard.model import Stage
from llama_shard.quant import QuantMode
from llama_shard.shard import ShardSpec

pytestmark = pytest.mark.skipif(not kernels.available(), reason="the native kernels could not be built")

PROMPT = torch.tensor([5, 17, 99, 3, 250, 41, 7, 8, 123, 64, 300, 2, 11])
FORCED = torch.tensor([9, 44, 181, 6, 73, 210, 15, 99, 31, 5, 260, 140, 77, 20, 1, 66, 7, 3, 301, 48])
SCRATCH = 3

# (base type, overrides, model): Q3_K_M-like (attn_v raised in layers 0 and 1, attn_k with it in layer 1 so k|v is
# one part, ffn_up raised in layer 2, the head Q6_K), and one of the 32-value types, with Q8_0 / Q4_0 parts that the
# loader repacks 8 rows at a time (``repack_x8``). The models are seeded here, not by ``make_hf_llama`` (whose seed
# is the order the session makes models in): greedy decoding on a random model can meet a near-tie that the last
# bits of either path decide, the single-type fused plan's as well, and these seeds meet none.
MIXES = {
    "q3_k_m": (
        Q.Q3_K,
        {
            "output.weight": Q.Q6_K,
            "blk.0.attn_v.weight": Q.Q5_K,
            "blk.1.attn_k.weight": Q.Q4_K,
            "blk.1.attn_v.weight": Q.Q4_K,
            "blk.2.ffn_up.weight": Q.Q4_K,
            "blk.1.ffn_down.weight": Q.Q4_K,
        },
        # K-quants need rows of 256; a wider init than the default, whose models of this size mostly want one token
        # whatever their input
        {"seed": 2, "hidden_size": 256, "intermediate_size": 512, "initializer_range": 0.05},
    ),
    "x8": (
        Q.Q4_0,
        {"blk.0.attn_v.weight": Q.Q8_0, "blk.1.attn_k.weight": Q.Q5_1, "blk.3.ffn_gate.weight": Q.Q8_0},
        {"seed": 2, "hidden_size": 64, "intermediate_size": 160, "initializer_range": 0.02},
    ),
}
# the row-stacked parts' types, per layer and matrix, that each file must load as
PARTS = {
    "q3_k_m": {
        ("0", "attention.wqkv"): [Q.Q3_K, Q.Q5_K],
        ("1", "attention.wqkv"): [Q.Q3_K, Q.Q4_K],
        ("2", "feed_forward.w13"): [Q.Q3_K, Q.Q4_K],
    },
    "x8": {
        ("0", "attention.wqkv"): [Q.Q4_0, Q.Q8_0],
        ("1", "attention.wqkv"): [Q.Q4_0, Q.Q5_1, Q.Q4_0],
        ("3", "feed_forward.w13"): [Q.Q8_0, Q.Q4_0],
    },
}


@pytest.fixture(autouse=True)
def _fresh_decoders() -> Iterator[None]:
    fused._decoders.clear()
    yield
    fused._decoders.clear()


@pytest.fixture(scope="module", params=list(MIXES))
def mixed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """A tiny random Llama (as ``conftest.make_hf_llama``'s, with its own seed) written as the GGUF mix ``name``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    name: str = request.param
    qtype, overrides, model = MIXES[name]
    kwargs = dict(model)
    seed = kwargs.pop("seed")
    with torch.random.fork_rng(devices=[]):  # the global generator stays as other tests expect it
        torch.manual_seed(seed)
        hf = LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **kwargs})).eval()
        with torch.no_grad():  # norms off 1, so that a wrong norm cannot hide
            for n, p in hf.named_parameters():
                if "norm" in n:
                    p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path_factory.mktemp(f"mixed_{name}")
    hf.save_pretrained(path)
    return name, hf_to_gguf(path, path / f"{name}.gguf", weight_type=qtype, type_overrides=overrides)


def _stage(path: Path, quantize: QuantMode | None) -> Stage:
    return load_stage(open_source(path), ShardSpec.whole(4), quantize=quantize)


def _decode(stage: Stage, monkeypatch: pytest.MonkeyPatch, *, fused_on: bool, greedy: bool) -> tuple[Tensor, Tensor]:
    """Prefill PROMPT, then decode FORCED (or, ``greedy``, each step's argmax) one token at a time: the decode steps'
    logits ``[len(FORCED), V]`` and the tokens fed."""
    monkeypatch.setenv("LLAMA_NODE_FUSED", "1" if fused_on else "0")
    fused._decoders.clear()
    cache = stage.new_cache(SCRATCH + 1, batching.cache_len(64))
    (x,) = run_step(stage, cache, [StepRow(0, 0, PROMPT, prefill=True)], SCRATCH)
    assert x is not None
    logits, fed = [], []
    for i, forced in enumerate(FORCED):
        token = x.reshape(-1).argmax().view(1) if greedy else forced.view(1)
        (x,) = run_step(stage, cache, [StepRow(0, len(PROMPT) + i, token, prefill=False)], SCRATCH)
        assert x is not None
        logits.append(x.reshape(-1))
        fed.append(token)
    return torch.stack(logits), torch.cat(fed)


def _error(x: Tensor, exact: Tensor) -> float:
    return float((x - exact).abs().mean())


def test_a_mixed_type_layer_loads_as_one_stacked_linear(mixed: tuple[str, Path]) -> None:
    name, path = mixed
    packed = _stage(path, QuantMode.gguf)
    for (layer, matrix), types in PARTS[name].items():
        module = packed.layers[layer].get_submodule(matrix)
        assert isinstance(module, GGMLStack), (layer, matrix, module)
        assert [p.qtype for p in module.parts if isinstance(p, GGMLLinear)] == types
    assert isinstance(packed.layers["2" if name == "x8" else "3"].attention.wqkv, GGMLLinear)  # one type: as before
    # the stack's columns are its parts' own, bitwise, in order
    stack = packed.layers["0"].attention.wqkv
    x = torch.randn(5, stack.in_features, generator=torch.Generator().manual_seed(3))
    assert torch.equal(stack(x), torch.cat([p(x) for p in stack.parts], dim=1))
    exact = _stage(path, None).layers["0"].attention
    weight = torch.cat([exact.wq.weight, exact.wk.weight, exact.wv.weight])
    assert ((stack.dequantize() - weight).norm() / weight.norm()).item() < 0.1  # q|k|v rows, un-permuted


def test_a_mixed_type_stage_decodes_fused_as_the_eager_path(
    mixed: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, path = mixed
    packed, dense = _stage(path, QuantMode.gguf), _stage(path, None)
    assert fused.decoder(packed, packed.new_cache(1, 64)) is not None
    exact, _ = _decode(dense, monkeypatch, fused_on=True, greedy=False)
    eager, _ = _decode(packed, monkeypatch, fused_on=False, greedy=False)
    one, _ = _decode(packed, monkeypatch, fused_on=True, greedy=False)
    assert not torch.equal(one, eager)  # the switch really changes the path
    e_eager, e_fused = _error(eager, exact), _error(one, exact)
    assert e_fused <= 1.25 * e_eager + 1e-3, (e_fused, e_eager)
    assert torch.equal(one.argmax(-1), eager.argmax(-1))  # every step's greedy token
    assert len(set(eager.argmax(-1).tolist())) > 3  # ... over steps that want different ones
    monkeypatch.setattr(fused, "_build", functools.partial(fused._build, scalar=True))
    scalar, _ = _decode(packed, monkeypatch, fused_on=True, greedy=False)
    assert _error(scalar, exact) <= 1.25 * e_eager + 1e-3  # the plan's portable code takes the parts too


def test_a_mixed_type_stage_decodes_the_eager_paths_greedy_tokens(
    mixed: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, path = mixed
    packed = _stage(path, QuantMode.gguf)
    _, eager = _decode(packed, monkeypatch, fused_on=False, greedy=True)
    _, one = _decode(packed, monkeypatch, fused_on=True, greedy=True)
    assert fused.decoder(packed, packed.new_cache(1, 64)) is not None
    assert torch.equal(one, eager)
    assert len(set(eager.tolist())) > 3  # not one token over and over
