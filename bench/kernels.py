"""Microseconds per call of the quantised matmuls on SmolLM2-135M's shapes: the native kernel over raw GGUF blocks
(``llama_node::ggml_mm``), torch's int4 kernel on repacked planes (``QuantLinear``, the fallback) and fp32
``F.linear`` on the dequantised weight.

The three run interleaved (A B C A B C ...), each repetition timing a batch of calls, and the median per call is
reported with the ratios, so a load spike from other processes hits all three alike. The load average is printed.

    python bench/kernels.py                    # M = 1 (decode), 2 threads
    python bench/kernels.py --threads 1 --m 1 --m 16
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from common import load_average, median, print_table, setup_logging, warn_if_busy  # noqa: E402

log = logging.getLogger("bench.kernels")

# (name, GGUF type, N, K): SmolLM2-135M's linears (wo, fused wqkv, fused w13, w2) and its tied Q8_0 head
SHAPES = [
    ("wo", "Q4_1", 576, 576),
    ("wqkv", "Q4_1", 960, 576),
    ("w13", "Q4_1", 3072, 576),
    ("w2", "Q4_1", 576, 1536),
    ("head", "Q8_0", 49152, 576),
    ("w13 Q4_0", "Q4_0", 3072, 576),
    ("w13 Q4_K", "Q4_K", 3072, 768),
    ("w13 Q6_K", "Q6_K", 3072, 768),
]


def _per_call(fn: Callable[[], object], budget_s: float) -> float:
    """Seconds per call over a batch of calls lasting about ``budget_s``."""
    fn()
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= budget_s:
            return elapsed / calls


def main(threads: int, rows: list[int], repeats: int, budget_s: float) -> None:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from ggml_reference import random_blocks
    from gguf import GGMLQuantizationType

    from llama_shard import kernels
    from llama_shard.ggml_linear import GGMLLinear
    from llama_shard.quant import PACKED_TYPES, QuantLinear, dequantize_rows

    torch.set_num_threads(threads)
    if not kernels.available():
        raise SystemExit("the native kernel could not be built; nothing to compare")
    warn_if_busy("the kernel bench")
    load_before = load_average()
    table = []
    rng = np.random.default_rng(0)
    for name, type_name, n, k in SHAPES:
        qtype = GGMLQuantizationType[type_name]
        raw = torch.from_numpy(random_blocks(qtype, n, k, rng)).view(n, -1)
        ggml = GGMLLinear(raw, qtype, k)
        int4 = QuantLinear.from_gguf(raw, qtype, k) if qtype in PACKED_TYPES else None
        w = dequantize_rows(raw, qtype, k)
        for m in rows:
            x = torch.randn(m, k)
            fns: dict[str, Callable[[], object]] = {"ggml": partial(ggml, x), "fp32": partial(F.linear, x, w)}
            if int4 is not None:
                fns["int4pack"] = partial(int4, x)
            times: dict[str, list[float]] = {key: [] for key in fns}
            with torch.inference_mode():
                for _ in range(repeats):
                    for key, fn in fns.items():
                        times[key].append(_per_call(fn, budget_s))
            us = {key: median(v) * 1e6 for key, v in times.items()}
            int4_us = us.get("int4pack")
            table.append(
                [
                    name,
                    type_name,
                    f"{n}x{k}",
                    str(m),
                    f"{us['ggml']:.1f}",
                    f"{int4_us:.1f}" if int4_us else "-",
                    f"{us['fp32']:.1f}",
                    f"{int4_us / us['ggml']:.2f}x" if int4_us else "-",
                    f"{us['fp32'] / us['ggml']:.2f}x",
                    f"{2 * m * n * k / us['ggml'] / 1e3:.1f}",
                ]
            )
    load_after = load_average()
    headers = ["matrix", "type", "NxK", "M", "ggml µs", "int4pack µs", "fp32 µs"]
    headers += ["int4pack/ggml", "fp32/ggml", "GFLOP/s"]
    print_table(f"µs per call, {threads} threads, median of {repeats} interleaved repetitions", headers, table)
    print(f"load average: {load_before} before, {load_after} after; AVX2 path: {kernels.has_avx2()}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--m", type=int, action="append", help="rows per call (repeatable; default 1)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--budget", type=float, default=0.05, help="seconds per timed batch of calls")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    setup_logging(args.verbose)
    main(args.threads, args.m or [1], args.repeats, args.budget)
