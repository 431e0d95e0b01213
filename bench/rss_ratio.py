"""Peak RSS of a one-node ``llama-node run`` ÷ (quantised weights + KV cache + runtime).

- peak RSS: ``ru_maxrss`` of the ``llama-node run --prompt ... --dtype auto`` child process;
- quantised weights: the bytes of the GGUF's tensors (what llama.cpp would hold);
- KV cache: ``2 · layers · positions · kv_heads · head_dim · 2`` bytes (f16, as a packed stage allocates it), where
  ``run --prompt`` reserves the prompt + ``--tokens`` positions (``llama_shard.batching.cache_len``);
- runtime: ``ru_maxrss`` of a child that does everything ``run`` does but hold weights and KV: imports torch and
  llama-node, opens the GGUF, builds the tokenizer, runs one attention op.

    python bench/rss_ratio.py --context 512 --threads 2
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import llama_node_command, packaged_gguf, print_table, setup_logging  # noqa: E402

log = logging.getLogger("bench.rss_ratio")

RUNTIME_PROBE = """
import sys, torch
from llama_shard.loading import load_tokenizer, open_source
import coordinator.run_cmd, llama_shard.generate, llama_shard.quant
from llama_shard import kernels
kernels.available()  # the native kernel library is part of the runtime
torch.set_num_threads(int(sys.argv[2]))
tokenizer = load_tokenizer(open_source(sys.argv[1]))
q = torch.randn(1, 9, 4, 64)
torch.nn.functional.scaled_dot_product_attention(q, q, q)
"""


def child_peak_mb(argv: list[str]) -> tuple[float, str]:
    """Run ``argv`` to completion and return its peak RSS and its stdout (the only child of this process at a
    time)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[:3]} exited {proc.returncode}: {proc.stderr[-800:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak <= before:
        log.warning("ru_maxrss did not grow (%d KB): this child peaked below an earlier one", peak)
    return peak / 1024, proc.stdout


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", nargs="?", default=None, help=".gguf (default: the packaged SmolLM2 Q4_1)")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=32)
    args = p.parse_args(argv)
    setup_logging()
    from llama_shard.gguf_meta import read_gguf

    model = Path(args.model) if args.model else packaged_gguf()
    header = read_gguf(model, arrays=False)
    weights_mb = sum(t.n_bytes for t in header.tensors) / 2**20
    meta = {k: v for k, v in header.metadata.items() if k.startswith("llama.")}
    layers, heads = int(meta["llama.block_count"]), int(meta["llama.attention.head_count"])
    kv_heads = int(meta.get("llama.attention.head_count_kv", heads))
    head_dim = int(meta["llama.embedding_length"]) // heads
    # the runtime probe first: ru_maxrss of children is a running max, so the smaller child must go first
    runtime_mb, _ = child_peak_mb([sys.executable, "-c", RUNTIME_PROBE, str(model), str(args.threads)])
    run = [*llama_node_command(), "run", str(model), "--prompt", "Tell me a story.", "--max-tokens", str(args.tokens)]
    run += ["--threads", str(args.threads), "--context", str(args.context), "--ignore-eos", "--json", "--dtype", "auto"]
    peak_mb, out = child_peak_mb(run)
    # the KV cache run allocated: an answer's (prompt + max tokens, within the context), in cache_len positions
    from llama_shard.batching import cache_len

    positions = cache_len(min(args.context, len(json.loads(out)["prompt_ids"]) + args.tokens))
    kv_mb = 2 * layers * positions * kv_heads * head_dim * 2 / 2**20  # f16: llama_shard.config.kv_cache_dtype
    ratio = peak_mb / (weights_mb + kv_mb + runtime_mb)
    rows = [[f"{weights_mb:.1f}", f"{kv_mb:.1f}", f"{runtime_mb:.1f}", f"{peak_mb:.1f}", f"{ratio:.3f}"]]
    print_table(
        f"{model.name}: one-node run, --dtype auto, context {args.context}",
        ["weights MiB", "KV MiB", "runtime MiB", "peak RSS MiB", "peak ÷ (w + KV + runtime)"],
        rows,
    )
    print(json.dumps({"weights_mib": weights_mb, "kv_mib": kv_mb, "runtime_mib": runtime_mb, "peak_mib": peak_mb,
                      "ratio": ratio}))  # fmt: skip


if __name__ == "__main__":
    main()
