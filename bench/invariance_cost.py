"""What batch invariance costs on the packed (``--dtype auto``) SmolLM2 stage, side by side in one process.

Decode, ms per token (``--tokens`` consecutive tokens per repetition, each slot rewound before it):

- ``plain``: one row through a plain unpadded ``stage(...)`` call (not invariant; the floor);
- ``padded``: one row through ``run_step`` on the padded convention (16 rows, a scratch slot) — what every stage
  ran before packed stages were recognised as ``row_invariant``, forced here on the same stage;
- ``row-invariant``: one row through ``run_step`` as it runs now (unpadded, attention row by row);
- the same two with 8 rows in one step (ms per step, and per token = step / 8).

Prefill, ms per prompt token: a chunk of T tokens through a plain call vs ``run_step`` (padded to 16 tokens, which
the packed stage still needs for attention). Tasks run interleaved (A B C ... A B C ...); the table keeps the minimum
over ``--reps`` rounds.

    python bench/invariance_cost.py --threads 1 --reps 5
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import interleaved, packaged_gguf, print_table, setup_logging, warn_if_busy  # noqa: E402

log = logging.getLogger("bench.invariance_cost")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?", type=Path, help="GGUF (default: the packaged SmolLM2 Q4_1)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=8, help="decode tokens per repetition")
    parser.add_argument("--context", type=int, default=200, help="prompt length already in each slot")
    args = parser.parse_args()
    setup_logging()

    import torch

    from llama_shard import batching
    from llama_shard.batching import StepRow, run_step
    from llama_shard.loading import load_stage, open_source
    from llama_shard.quant import QuantMode
    from llama_shard.shard import ShardSpec

    torch.set_num_threads(args.threads)
    source = open_source(args.model or packaged_gguf())
    stage = load_stage(source, ShardSpec.whole(source.config.n_layers), quantize=QuantMode.gguf)
    if not batching.row_invariant(stage):
        raise SystemExit("this stage is not row-invariant: nothing to compare")
    rows, scratch = 8, 8
    cache = stage.new_cache(rows + 1, batching.cache_len(args.context + args.tokens + 64))
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for slot in range(rows):
            prompt = torch.randint(100, 40000, (args.context - 8 * slot,), generator=gen)  # positions differ per row
            run_step(stage, cache, [StepRow(slot, 0, prompt, prefill=True, logits=False)], scratch)
    starts = [args.context - 8 * slot for slot in range(rows)]

    def set_padded(padded: bool) -> None:
        batching._row_invariant[stage] = not padded  # the cached decision, overridden for this comparison

    def decode(n_rows: int, padded: bool) -> Callable[[], float]:
        def run() -> float:
            set_padded(padded)
            t0 = time.perf_counter()
            for i in range(args.tokens):
                step = [StepRow(s, starts[s] + i, torch.tensor([1000 + s]), prefill=False) for s in range(n_rows)]
                run_step(stage, cache, step, scratch)
            set_padded(False)
            return (time.perf_counter() - t0) / args.tokens * 1e3  # ms per step

        return run

    @torch.inference_mode()
    def plain() -> float:
        t0 = time.perf_counter()
        for i in range(args.tokens):
            batch = stage.batch(torch.tensor([0]), torch.tensor([starts[0] + i]), 1)
            stage(torch.tensor([[1000]]), batch, cache, last_only=True)
        return (time.perf_counter() - t0) / args.tokens * 1e3

    def prefill(chunk: int, convention: bool) -> Callable[[], float]:
        ids = torch.randint(100, 40000, (chunk,), generator=gen)

        @torch.inference_mode()
        def run() -> float:
            t0 = time.perf_counter()
            if convention:
                run_step(stage, cache, [StepRow(0, starts[0], ids, prefill=True)], scratch)
            else:
                batch = stage.batch(torch.tensor([0]), torch.tensor([starts[0]]), chunk)
                stage(ids[None], batch, cache, last_only=True)
            return (time.perf_counter() - t0) / chunk * 1e3  # ms per prompt token

        return run

    tasks: dict[str, Callable[[], float]] = {
        "decode 1 row: plain stage call": plain,
        "decode 1 row: run_step, padded to 16 (old)": decode(1, padded=True),
        "decode 1 row: run_step, row-invariant (new)": decode(1, padded=False),
        "decode 8 rows: run_step, padded to 16 (old)": decode(8, padded=True),
        "decode 8 rows: run_step, row-invariant (new)": decode(8, padded=False),
    }
    for chunk in (1, 7, 32):
        tasks[f"prefill chunk of {chunk}: plain stage call"] = prefill(chunk, convention=False)
        tasks[f"prefill chunk of {chunk}: run_step (padded to 16)"] = prefill(chunk, convention=True)
    load = warn_if_busy()
    results = interleaved(tasks, args.reps, warmup=1)
    table = []
    for name, times in results.items():
        best = min(times)
        per_token = best / 8 if name.startswith("decode 8") else best
        table.append((name, f"{best:.1f}", f"{per_token:.1f}"))
    caption = (
        f"{source.config.n_layers} layers, {args.threads} thread(s), {args.tokens} decode tokens per rep, "
        f"context ~{args.context}, min of {args.reps} interleaved reps, load {load}"
    )
    print_table("batch-invariance cost (packed SmolLM2)", ["case", "ms/step", "ms/token"], table, caption)


if __name__ == "__main__":
    main()
