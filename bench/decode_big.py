"""Decode and prefill on a Llama-3.2-1B-shaped GGUF (random weights), llama-node ``--dtype auto`` vs llama.cpp.

The model is written here with the ``gguf`` package: Llama 3.2 1B's shapes (16 layers, dim 2048, 32 query and 8
key/value heads, FFN 8192, vocabulary 128256, tied embedding) with random Q4_0 or Q8_0 blocks (small random
scales, so activations stay finite). At this size a decoded token reads ~0.7 GB (Q4_0) or ~1.3 GB (Q8_0) of
weights, so memory bandwidth dominates. Both engines run in this process on the same thread count, one after
the other per round (A B A B ...), and the median of the rounds is reported, with

- achieved GB/s = weight bytes read per token (each engine's own resident matrices) × decode tokens/s, and
- its ratio to the machine's read bandwidth, measured here with the same threads (a large tensor ``sum``).

    python bench/decode_big.py --types Q4_0 Q8_0 --threads 2 --rounds 3
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import fmt, have_module, median, print_table, setup_logging  # noqa: E402

log = logging.getLogger("bench.decode_big")

LLAMA_3_2_1B = {
    "n_layers": 16,
    "dim": 2048,
    "n_heads": 32,
    "n_kv_heads": 8,
    "ffn": 8192,
    "vocab": 128256,
    "rope_theta": 500000.0,
}


def write_model(path: Path, qtype_name: str, seed: int = 0, shape: dict[str, float] | None = None) -> Path:
    """A Llama-3.2-1B-shaped GGUF with random ``qtype_name`` (Q4_0 or Q8_0) blocks for every matrix."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter

    s = {**LLAMA_3_2_1B, **(shape or {})}
    dim, ffn, nl = int(s["dim"]), int(s["ffn"]), int(s["n_layers"])
    hd = dim // int(s["n_heads"])
    qtype = GGMLQuantizationType[qtype_name]
    block, nbytes = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)

    def blocks(rows: int, cols: int, std: float) -> np.ndarray:
        raw = rng.integers(0, 256, (rows, cols // block, nbytes), dtype=np.uint8)
        # the block's fp16 scale first; codes spread uniformly over the format's range
        levels = 8 if qtype == GGMLQuantizationType.Q4_0 else 128
        d = (rng.uniform(0.5, 1.5, (rows, cols // block)) * std * 1.7 / levels).astype(np.float16)
        raw[..., 0:2] = d.view(np.uint8).reshape(rows, cols // block, 2)
        return raw.reshape(rows, -1)

    w = GGUFWriter(str(path), "llama")
    w.add_name(f"llama-3.2-1b-shaped-{qtype_name}")
    w.add_context_length(4096)
    w.add_embedding_length(dim)
    w.add_block_count(nl)
    w.add_feed_forward_length(ffn)
    w.add_head_count(int(s["n_heads"]))
    w.add_head_count_kv(int(s["n_kv_heads"]))
    w.add_rope_freq_base(float(s["rope_theta"]))
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(int(s["vocab"]))
    w.add_rope_dimension_count(hd)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"<t{i}>" for i in range(int(s["vocab"]))])
    w.add_token_scores([0.0] * int(s["vocab"]))
    w.add_token_types([1] * int(s["vocab"]))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    kv = int(s["n_kv_heads"]) * hd
    w.add_tensor("token_embd.weight", blocks(int(s["vocab"]), dim, 1.0), raw_dtype=qtype)
    w.add_tensor("output_norm.weight", np.ones(dim, dtype=np.float32))
    for i in range(nl):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(dim, dtype=np.float32))
        w.add_tensor(p + "ffn_norm.weight", np.ones(dim, dtype=np.float32))
        for name, rows, cols in (
            ("attn_q", dim, dim),
            ("attn_k", kv, dim),
            ("attn_v", kv, dim),
            ("attn_output", dim, dim),
            ("ffn_gate", ffn, dim),
            ("ffn_up", ffn, dim),
            ("ffn_down", dim, ffn),
        ):
            w.add_tensor(p + name + ".weight", blocks(rows, cols, cols**-0.5), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    log.info("wrote %s (%.2f GB)", path, path.stat().st_size / 1e9)
    return path


def read_bandwidth_gbs(threads: int, nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Read bandwidth (GB/s) as torch sums a tensor far larger than the caches, best of ``repeats``."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


@dataclass
class Speed:
    prefill: float
    decode: float


class Ours:
    """llama-node's stage in this process: ``quantize=gguf`` (the ``--dtype auto`` path), greedy."""

    def __init__(self, path: Path, threads: int, n_ctx: int) -> None:
        import torch

        from llama_shard.generate import LocalEngine
        from llama_shard.ggml_linear import GGMLLinear
        from llama_shard.loading import load_stage, open_source
        from llama_shard.quant import QuantLinear, QuantMode
        from llama_shard.sampling import SamplingParams
        from llama_shard.shard import ShardSpec

        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        source = open_source(path)
        self.stage = load_stage(source, ShardSpec.whole(source.config.n_layers), quantize=QuantMode.gguf)
        self.load_s = time.perf_counter() - t0
        self.engine_cls, self.params, self.n_ctx = LocalEngine, SamplingParams(), n_ctx
        # the native kernel's raw blocks, or torch's int4 planes where it is not built (LLAMA_NODE_KERNELS=0)
        self.weight_bytes = sum(
            m.blocks.nbytes if isinstance(m, GGMLLinear) else m.packed.nbytes + m.scale_zeros.nbytes
            for m in self.stage.modules()
            if isinstance(m, GGMLLinear | QuantLinear)
        )

    def run(self, prompt: list[int], n: int) -> Speed:
        engine = self.engine_cls(self.stage, self.params, self.n_ctx)
        t0 = time.perf_counter()
        token = engine.step(prompt, 0)
        t1 = time.perf_counter()
        for i in range(n - 1):
            token = engine.step([token], len(prompt) + i)
        t2 = time.perf_counter()
        return Speed(len(prompt) / (t1 - t0), (n - 1) / (t2 - t1))


class LlamaCpp:
    def __init__(self, path: Path, threads: int, n_ctx: int) -> None:
        from decode import LlamaCppEngine  # the SmolLM2 bench's wrapper: same timing definitions

        t0 = time.perf_counter()
        self.engine = LlamaCppEngine(path, threads, n_ctx)
        self.load_s = time.perf_counter() - t0
        self.weight_bytes = _gguf_matrix_bytes(path)

    def run(self, prompt: list[int], n: int) -> Speed:
        s = self.engine.generate(prompt, n)
        return Speed(s.prefill_tokens_per_s, s.decode_tokens_per_s)


def _gguf_matrix_bytes(path: Path) -> int:
    """Bytes of the matrices a decoded token reads in the GGUF: every 2-D tensor (the tied embedding, as the head)."""
    from llama_shard.gguf_meta import read_gguf

    return sum(t.n_bytes for t in read_gguf(path, arrays=False).tensors if len(t.shape) == 2)


def bench_type(qtype: str, args: argparse.Namespace, bandwidth: float) -> list[list[str]]:
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        path = write_model(Path(tmp) / f"llama-3.2-1b-shaped.{qtype}.gguf", qtype, shape=args.shape)
        prompt = [int(t) for t in np.random.default_rng(1).integers(3, 128000, args.prompt_tokens)]
        engines: dict[str, Ours | LlamaCpp] = {"llama-node auto": Ours(path, args.threads, args.ctx)}
        if have_module("llama_cpp") and not args.no_llama_cpp:
            engines["llama.cpp"] = LlamaCpp(path, args.threads, args.ctx)
        else:
            log.warning("llama_cpp is not installed: llama-node alone")
        runs: dict[str, list[Speed]] = {k: [] for k in engines}
        for round_ in range(args.warmup + args.rounds):
            for name, eng in engines.items():
                s = eng.run(prompt, args.tokens)
                log.info(
                    "%s %s round %d: prefill %.1f tok/s, decode %.2f tok/s", qtype, name, round_, s.prefill, s.decode
                )
                if round_ >= args.warmup:
                    runs[name].append(s)
        rows = []
        ref = runs.get("llama.cpp")
        for name, speeds in runs.items():
            dec, pre = median(s.decode for s in speeds), median(s.prefill for s in speeds)
            gbs = engines[name].weight_bytes * dec / 1e9
            ratio_dec = dec / median(s.decode for s in ref) if ref else float("nan")
            ratio_pre = pre / median(s.prefill for s in ref) if ref else float("nan")
            rows.append([
                f"{qtype} {name}", fmt(pre), fmt(ratio_pre, 2), fmt(dec, 2), fmt(ratio_dec, 2),
                fmt(engines[name].weight_bytes / 1e9, 2), fmt(gbs, 1), fmt(gbs / bandwidth, 2),
                fmt(engines[name].load_s, 1),
            ])  # fmt: skip
        return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--types", nargs="+", default=["Q4_0", "Q8_0"], choices=["Q4_0", "Q8_0"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--tokens", type=int, default=24, help="tokens generated per round (the first is prefill's)")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--tmp", default=None, help="where the GGUF is written (default: the system temp dir)")
    p.add_argument("--no-llama-cpp", action="store_true")
    p.add_argument("--small", action="store_true", help="a 4-layer model of the same widths (a quick check)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    args.shape = {"n_layers": 4} if args.small else None
    bandwidth = read_bandwidth_gbs(args.threads)
    log.info("read bandwidth with %d threads: %.1f GB/s", args.threads, bandwidth)
    rows = [row for qtype in args.types for row in bench_type(qtype, args, bandwidth)]
    print_table(
        f"Llama-3.2-1B-shaped GGUF, {args.threads} threads, median of {args.rounds} interleaved rounds",
        ["engine", "prefill tok/s", "÷ llama.cpp", "decode tok/s", "÷ llama.cpp", "weights GB", "GB/s", "÷ bandwidth",
         "load s"],
        rows,
        caption=f"read bandwidth {bandwidth:.1f} GB/s ({args.threads} threads, torch sum over 1 GiB)",
    )  # fmt: skip


if __name__ == "__main__":
    main()
