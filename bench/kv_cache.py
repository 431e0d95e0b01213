"""The f16 KV cache of packed stages against an fp32 one: attention CPU time per token, KV bytes, and the
teacher-forced log-likelihood of a text (SmolLM2 Q4_1, ``--dtype auto``, the fused decode step).

- attention per token: one decode row of the packed stage at ``--positions`` (it attends to position + 1 keys),
  thread CPU time of the whole token minus that of a token at position 1 (same matmuls, no attention to speak of).
  fp32 and f16 caches run interleaved (A B A B ...), medians of ``--reps``; 1 thread by default.
- KV bytes: ``KVCache.nbytes`` of one slot of ``--context`` positions.
- log-likelihood: the mean log-probability of each next token of a fixed text, every position a row of one fused
  call (the logits of all rows), with each cache.

    python bench/kv_cache.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import interleaved, load_average, packaged_gguf, print_table, setup_logging  # noqa: E402

log = logging.getLogger("bench.kv_cache")

TEXT = (
    "The lighthouse keeper woke before dawn, as he had every morning for thirty years. He climbed the spiral "
    "stairs, counted the one hundred and twelve steps out of habit, and checked the great lens for salt and "
    "dust. Outside, the sea was grey and restless."
)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--positions", type=int, nargs="+", default=[128, 1022])
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--reps", type=int, default=30)
    args = p.parse_args(argv)
    setup_logging()
    import torch

    from llama_shard import batching, fused
    from llama_shard.batching import StepRow, run_step
    from llama_shard.loading import load_stage, load_tokenizer, open_source
    from llama_shard.quant import QuantMode
    from llama_shard.shard import ShardSpec

    torch.set_num_threads(args.threads)
    source = open_source(packaged_gguf())
    stage = load_stage(source, ShardSpec.whole(source.config.n_layers), quantize=QuantMode.gguf)
    length = batching.cache_len(max(args.positions) + 2)
    caches = {"fp32": stage.new_cache(1, length, torch.float32), "f16": stage.new_cache(1, length, torch.float16)}
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, source.config.vocab_size, (max(args.positions) + 1,), generator=gen)
    for cache in caches.values():
        for at in range(0, len(prompt), 256):
            run_step(stage, cache, [StepRow(0, at, prompt[at : at + 256], prefill=True)], 0)

    def token_cpu(cache_name: str, position: int) -> float:
        row = StepRow(0, position, prompt[position : position + 1], prefill=False)
        t0 = time.thread_time()
        run_step(stage, caches[cache_name], [row], 0)
        return (time.thread_time() - t0) * 1e3

    tasks = {f"{c}@{q}": (lambda c=c, q=q: token_cpu(c, q)) for q in [1, *args.positions] for c in caches}
    times = {k: statistics.median(v) for k, v in interleaved(tasks, args.reps, warmup=2).items()}
    rows = []
    for q in args.positions:
        att = {c: times[f"{c}@{q}"] - times[f"{c}@1"] for c in caches}
        rows.append([str(q + 1), f"{times[f'fp32@{q}']:.2f}", f"{times[f'f16@{q}']:.2f}", f"{att['fp32']:.2f}",
                     f"{att['f16']:.2f}", f"{att['fp32'] / att['f16']:.2f}x"])  # fmt: skip
    print_table(
        f"SmolLM2 Q4_1 packed, fused decode, {args.threads} thread(s), load average {load_average()}",
        ["keys", "token ms fp32", "token ms f16", "attention ms fp32", "attention ms f16", "speed-up"],
        rows,
    )
    kv_mib = {c: stage.new_cache(1, args.context, getattr(torch, {"fp32": "float32", "f16": "float16"}[c])).nbytes
              / 2**20 for c in caches}  # fmt: skip

    ids = load_tokenizer(source).encode(TEXT)
    x = torch.tensor(ids)
    nll = {}
    for name, dtype in (("fp32", torch.float32), ("f16", torch.float16)):
        cache = stage.new_cache(1, batching.cache_len(len(ids)), dtype)
        decoder = fused.decoder(stage, cache)
        assert decoder is not None
        with torch.inference_mode():
            logits = decoder(x, cache, [0] * len(ids), list(range(len(ids))))  # [T, V]
        lp = torch.log_softmax(logits.double(), -1)[:-1].gather(1, x[1:, None])[:, 0]
        nll[name] = lp
    diff = nll["f16"] - nll["fp32"]
    print(json.dumps({
        "kv_mib_per_slot": {k: round(v, 3) for k, v in kv_mib.items()}, "context": args.context,
        "attention_ms": {r[0]: {"fp32": float(r[3]), "f16": float(r[4])} for r in rows},
        "mean_log_likelihood": {k: round(v.mean().item(), 5) for k, v in nll.items()},
        "ll_diff_mean": round(diff.mean().item(), 6), "ll_diff_max_abs": round(diff.abs().max().item(), 5),
        "tokens": len(ids) - 1, "load_average": load_average(),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
