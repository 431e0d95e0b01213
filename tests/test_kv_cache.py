"""The f16 KV cache of packed (``--dtype auto``) stages, against the fp32 cache of the exact path.

Which dtype a stage caches in is decided in one place, ``llama_shard.config.kv_cache_dtype``: float16 for quantised
stages, the compute dtype otherwise (float32: the exact path, still checked against transformers by
``tests/test_model_parity.py``; bfloat16/float16 stages keep theirs). The packed stages of every other test run on
an f16 cache, so the bitwise invariances there (a row alone or in a batch, 1 or 2 threads, prompt chunking, decode
== prefill, 2 stages == 1, N nodes == 1 process: ``test_fused_decode``, ``test_batch_invariance_quant``,
``test_scheduler_invariance``, ``test_batch_invariance_nodes``) hold with it; ``test_fused_decode``'s accuracy
bound compares fused and eager on f16 caches.

Accuracy of f16 against fp32 keys and values, isolated on the dense fp32 stage (no other rounding to hide behind;
the eager path casts the cache to fp32 on read). f16 has an 11-bit significand: a key or value moves by at most
2^-11 of itself, once, when written. A packed stage rounds every matmul input to 8 bits per block of 32 (2^-8 of
the block's largest value, 8x coarser), and not only keys and values but every activation of every matmul (and, for
int8, the weights likewise). So the f16 cache alone must move the logits by less than 1/16 of what the int8 packed
path's roundings move them from the exact ones (measured on the tiny model: 1/100, 2.0e-5 vs 2.0e-3 mean |logit|).
Control: a bfloat16 cache (8-bit significand, the activation rounding's precision) moves them by 1/10 (1.9e-4) and
fails the bound. On the packed path itself, an f16 cache leaves its error against the exact logits within 1.25x of
an fp32 cache's (measured 1.06x: the 8-bit roundings turn any perturbation into rounding noise of about 1e-3).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from test_fused_decode import _error, _fresh_decoders, _stage, _teacher_forced, tiny  # noqa: F401
from torch import Tensor

from llama_shard import batching, fused, kernels
from llama_shard.batching import StepRow, run_step
from llama_shard.config import KV_CACHE_BYTES, ModelConfig, kv_cache_dtype
from llama_shard.loading import load_stage, open_source
from llama_shard.model import KVCache, Stage
from llama_shard.quant import QuantMode
from llama_shard.shard import ShardSpec

log = logging.getLogger(__name__)

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="the native kernels could not be built")


def test_the_policy_picks_f16_for_quantised_stages_only() -> None:
    assert kv_cache_dtype(quantised=True) == "float16"
    assert kv_cache_dtype(quantised=False) == "float32"  # the exact path
    assert kv_cache_dtype(quantised=False, compute="bfloat16") == "bfloat16"
    assert kv_cache_dtype(quantised=False, compute="float16") == "float16"
    assert kv_cache_dtype(quantised=True, requested="float32") == "float32"
    assert kv_cache_dtype(quantised=False, requested="float16") == "float16"
    with pytest.raises(ValueError, match="unknown KV cache dtype 'int8'"):
        kv_cache_dtype(quantised=True, requested="int8")
    config = ModelConfig(vocab_size=32, dim=64, n_layers=4, n_heads=8, n_kv_heads=2, ffn_dim=128, max_seq_len=64)
    assert config.kv_bytes_per_token("float16") * 2 == config.kv_bytes_per_token("float32") == 2 * 4 * 2 * 8 * 4
    assert KV_CACHE_BYTES["float16"] == 2


def test_stages_allocate_the_policys_cache(tiny: Path) -> None:  # noqa: F811
    source = open_source(tiny)
    whole = ShardSpec.whole(4)
    cases: list[tuple[dict[str, object], torch.dtype]] = [
        ({"quantize": QuantMode.int4}, torch.float16),
        ({"quantize": QuantMode.int8, "kv_cache": "float32"}, torch.float32),
        ({}, torch.float32),
        ({"dtype": torch.bfloat16}, torch.bfloat16),
        ({"kv_cache": "float16"}, torch.float16),
    ]
    for kwargs, expected in cases:
        stage = load_stage(source, whole, **kwargs)  # type: ignore[arg-type]
        cache = stage.new_cache(2, 64)
        assert cache.dtype == expected and cache.k[0].dtype == expected, kwargs
        assert cache.nbytes == 2 * 4 * 2 * 64 * 2 * 8 * expected.itemsize  # k and v, 4 layers, 2 slots, 64, K 2, E 8


@needs_kernels
def test_the_fused_plan_takes_f16_and_fp32_caches_only(tiny: Path) -> None:  # noqa: F811
    stage = _stage(tiny, QuantMode.int4)
    for dtype in (torch.float16, torch.float32):
        assert fused.decoder(stage, stage.new_cache(2, 64, dtype)) is not None, dtype
    assert fused.decoder(stage, stage.new_cache(2, 64, torch.bfloat16)) is None  # the eager path's


def _layer0_kv(stage_cache: tuple[object, KVCache], n: int) -> tuple[Tensor, Tensor]:
    _, cache = stage_cache
    return cache.k[0][0, :n].clone(), cache.v[0][0, :n].clone()


@needs_kernels
@pytest.mark.parametrize("path", ["avx2", "scalar", "eager"])
def test_writes_round_to_nearest_even_as_torch_does(
    tiny: Path,  # noqa: F811
    path: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Layer 0's keys and values depend on the tokens only (not on the cache), so the f16 cache must hold exactly
    the fp32 cache's values rounded by torch's ``.to(float16)`` (nearest, ties to even): the same rounding in the
    fused plan's F16C and portable code and in the eager path."""
    if path == "scalar":
        import functools

        real = fused._build
        monkeypatch.setattr(fused, "_build", functools.partial(real, scalar=True))
    monkeypatch.setenv("LLAMA_NODE_FUSED", "0" if path == "eager" else "1")
    stage = _stage(tiny, QuantMode.int4)
    prompt = torch.randint(3, 320, (40,), generator=torch.Generator().manual_seed(3))
    got = {}
    for dtype in (torch.float32, torch.float16):
        fused._decoders.clear()
        cache = stage.new_cache(2, batching.cache_len(64), dtype)
        assert (fused.decoder(stage, cache) is None) == (path == "eager")
        run_step(stage, cache, [StepRow(0, 0, prompt, prefill=True)], 1)
        got[dtype] = _layer0_kv((stage, cache), len(prompt))
    (k32, v32), (k16, v16) = got[torch.float32], got[torch.float16]
    assert k16.dtype == torch.float16 and not torch.equal(k16.float(), k32)  # really rounded
    assert torch.equal(k16, k32.to(torch.float16)) and torch.equal(v16, v32.to(torch.float16))


@needs_kernels
def test_f16_keys_and_values_cost_a_fraction_of_the_8_bit_roundings(
    tiny: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dense, packed = _stage(tiny, None), _stage(tiny, QuantMode.int8)

    def run(stage: Stage, kv: torch.dtype) -> Tensor:
        return _teacher_forced([stage], fused_on=True, monkeypatch=monkeypatch, kv_dtype=kv)

    exact = run(dense, torch.float32)
    f16, bf16 = _error(run(dense, torch.float16), exact), _error(run(dense, torch.bfloat16), exact)
    packed_f32, packed_f16 = _error(run(packed, torch.float32), exact), _error(run(packed, torch.float16), exact)
    log.info("mean |logit| error vs exact: f16 KV %.2e, bf16 KV %.2e, int8 packed %.2e (with f16 KV %.2e)",
             f16, bf16, packed_f32, packed_f16)  # fmt: skip
    assert 0 < f16 < packed_f32 / 16, (f16, packed_f32)
    assert bf16 > packed_f32 / 16, (bf16, packed_f32)  # control: a cache as coarse as the activations' rounding
    assert packed_f16 <= 1.25 * packed_f32, (packed_f16, packed_f32)


def _load_request(kv_dtype: torch.dtype | None) -> object:
    from node.slices import SliceManifest, TensorDigest
    from node.wire import LoadRequest

    config = ModelConfig(vocab_size=32, dim=64, n_layers=4, n_heads=8, n_kv_heads=2, ffn_dim=128, max_seq_len=64)
    manifest = SliceManifest.of((TensorDigest("norm.weight", "float32", (64,), 256, bytes(32)),))
    return LoadRequest("m", ShardSpec(0, 4, 4), config, manifest, "/m.gguf", quantize=QuantMode.gguf, kv_dtype=kv_dtype)


def test_the_kv_dtype_reaches_the_node_and_is_checked_there() -> None:
    import grpc

    from node.wire import WireError, load_request_from_pb, load_request_to_pb
    from protos.llama_node.v1 import node_pb2 as pb

    for kv in (torch.float16, torch.float32, torch.bfloat16, None):
        assert load_request_from_pb(load_request_to_pb(_load_request(kv))).kv_dtype == kv  # type: ignore[arg-type]
    msg = load_request_to_pb(_load_request(torch.float16))  # type: ignore[arg-type]
    msg.kv_dtype = pb.DTYPE_INT64
    with pytest.raises(WireError, match="kv_dtype .* is not float32, bfloat16 or float16") as e:
        load_request_from_pb(msg)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_the_coordinator_sizes_the_cache_it_asks_for() -> None:
    from coordinator.cluster import ClusterSettings, plan_options
    from coordinator.planner.loaders import load_model_profile
    from coordinator.serve_cmd import kv_bytes_per_slot
    from llama_shard.embedded import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    packed = ClusterSettings(model=gguf, quantize=QuantMode.gguf)
    assert packed.kv_dtype == "float16" and ClusterSettings(model=gguf).kv_dtype == "float32"
    assert ClusterSettings(model=gguf, quantize=QuantMode.gguf, kv_cache="float32").kv_dtype == "float32"
    assert ClusterSettings(model=gguf, compute_dtype="bfloat16").kv_dtype == "bfloat16"
    profile = load_model_profile(str(gguf))
    assert plan_options(profile, 512, 2, packed.kv_dtype).kv_bytes_per_element == 2
    assert plan_options(profile, 512, 2, "float32").kv_bytes_per_element == 4
    source = open_source(gguf)
    c = source.config  # SmolLM2-135M: 30 layers, 3 KV heads of 64
    assert kv_bytes_per_slot(source, 1024, "float16") == 2 * 30 * 3 * 64 * 2 * 1024 == 23_592_960
    assert kv_bytes_per_slot(source, 1024, "float32") == 2 * kv_bytes_per_slot(source, 1024, "float16")
    stage = load_stage(source, ShardSpec.whole(c.n_layers), quantize=QuantMode.gguf)
    assert stage.new_cache(1, 1024).nbytes == kv_bytes_per_slot(source, 1024, "float16")


def test_kv_cache_option_is_validated_and_used(caplog: pytest.LogCaptureFixture) -> None:
    from typer.testing import CliRunner

    from coordinator.cli import app

    bad = CliRunner().invoke(app, ["run", "--kv-cache", "q8", "--prompt", "Hi"])
    assert bad.exit_code == 2 and "Invalid value for '--kv-cache'" in bad.output, bad.output
    for option, dtype in (([], "float16"), (["--kv-cache", "f32"], "float32")):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="coordinator.run_cmd"):
            argv = ["run", "--prompt", "Hi", "--max-tokens", "2", "--context", "64", "--json", *option]
            done = CliRunner().invoke(app, argv)
        assert done.exit_code == 0, done.output
        assert any(f"KV cache: {dtype}" in r.getMessage() for r in caplog.records), (option, caplog.text)
