"""The per-token cost of a decode step beyond its matmuls: ms per token and aten ops per layer, packed and fp32.

``packed`` is the ``--dtype auto`` stage (GGUF blocks on the packed kernel, row-invariant: attention row by row),
``packed-matmul`` the same with decode attention by two small matmuls (``Stage.decode_matmul``), ``fp32`` the exact
path (decode rows padded to 16). One row decodes ``--tokens`` tokens through ``batching.run_step`` after a
``--context``-token prompt (each repetition starts at the same position, so reads the same key counts). The paths
are run interleaved (A B A B ...) for ``--reps`` rounds; the table keeps the median and the minimum. Then
``torch.profiler`` records a few tokens of each path and counts the aten ops per layer per token (every recorded op,
nested ones included, so a ``.to()`` that copies counts its ``_to_copy``/``copy_``) and the ones that dominate.

    python bench/step_overhead.py --threads 2
    python bench/step_overhead.py --threads 2 --paths packed --top 30
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import interleaved, load_average, packaged_gguf, print_table, setup_logging  # noqa: E402

log = logging.getLogger("bench.step_overhead")


def _decoder(stage: Any, context: int, tokens: int) -> Callable[[], tuple[float, float]]:
    """A function that decodes ``tokens`` tokens of one row after the prompt and returns ms per token, wall and CPU
    (all threads: the robust comparison on a shared machine, where wall time includes waiting for a core)."""
    import torch

    from llama_shard import batching
    from llama_shard.batching import StepRow, run_step

    cache = stage.new_cache(2, batching.cache_len(context + tokens + 64))
    prompt = torch.randint(100, 40000, (context,), generator=torch.Generator().manual_seed(0))
    head = stage.spec.has_embed
    if not head:
        raise SystemExit("the bench needs a whole model (embedding to head)")
    run_step(stage, cache, [StepRow(0, 0, prompt, prefill=True, logits=False)], 1)

    def run() -> tuple[float, float]:
        token = 1234
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(tokens):
            (logits,) = run_step(stage, cache, [StepRow(0, context + i, torch.tensor([token]), prefill=False)], 1)
            assert logits is not None
            token = int(logits.argmax())
        return (time.perf_counter() - t0) * 1e3 / tokens, (time.process_time() - c0) * 1e3 / tokens

    return run


def _profile(
    run: Callable[[], tuple[float, float]], n_layers: int, tokens: int, top: int
) -> tuple[float, list[tuple[str, float]]]:
    """Aten ops per layer per token (all recorded ops), and the ``top`` most frequent with their counts."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    counts: Counter[str] = Counter()
    for event in prof.key_averages():
        if event.key.startswith("aten::"):
            counts[event.key] += event.count
    per = n_layers * tokens
    return sum(counts.values()) / per, [(k, v / per) for k, v in counts.most_common(top)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?", type=Path, help="GGUF (default: the packaged SmolLM2 Q4_1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=16, help="decode tokens per repetition")
    parser.add_argument("--context", type=int, default=200, help="prompt length before the decoded tokens")
    parser.add_argument(
        "--paths",
        nargs="+",
        choices=["packed", "packed-matmul", "fp32"],
        default=["packed", "fp32"],
        help="packed-matmul: the packed stage with decode attention by matmuls (Stage.decode_matmul on)",
    )
    parser.add_argument("--top", type=int, default=12, help="most frequent ops to list per path")
    args = parser.parse_args()
    setup_logging()

    import torch

    from llama_shard.loading import load_stage, open_source
    from llama_shard.quant import QuantMode
    from llama_shard.shard import ShardSpec

    torch.set_num_threads(args.threads)
    source = open_source(args.model or packaged_gguf())
    n_layers = source.config.n_layers
    runs: dict[str, Callable[[], tuple[float, float]]] = {}
    for path in args.paths:
        quantize = QuantMode.gguf if path.startswith("packed") else None
        t0 = time.perf_counter()
        stage = load_stage(source, ShardSpec.whole(n_layers), quantize=quantize)
        if path == "packed-matmul":
            stage.decode_matmul = True
        runs[path] = _decoder(stage, args.context, args.tokens)
        log.info("%s: loaded and prefilled in %.1f s", path, time.perf_counter() - t0)
    load_before = load_average()
    with torch.inference_mode():
        times = interleaved(runs, args.reps, warmup=1)
    rows = []
    for path, run in runs.items():
        with torch.inference_mode():
            ops, most = _profile(run, n_layers, args.tokens, args.top)
        ms, cpu = [w for w, _ in times[path]], [c for _, c in times[path]]
        med = statistics.median
        rows.append([path, f"{med(ms):.2f}", f"{min(ms):.2f}", f"{1e3 / min(ms):.1f}", f"{med(cpu):.2f}", f"{ops:.1f}"])
        print_table(
            f"{path}: aten ops per layer per token (top {args.top})",
            ["op", "per layer"],
            [[k, f"{v:.2f}"] for k, v in most],
        )
    print_table(
        f"decode, one row, {args.threads} threads, {args.context}-token context, {args.tokens} tokens x {args.reps}",
        ["path", "ms/token (median)", "ms/token (min)", "tokens/s (best)", "CPU ms/token (median)", "aten ops/layer"],
        rows,
        caption=f"load average {load_before} before, {load_average()} after",
    )


if __name__ == "__main__":
    main()
