"""The coordinator's own CPU per streamed token, route by route, with no model and no nodes: the real app, scheduler,
tokenizer (the embedded SmolLM2's) and route, over a step executor that answers at once with the ids of an English
text. What is measured is the process CPU of one streaming request divided by its tokens: scheduling, detokenising,
the route's encoding, HTTP framing, and the in-process client reading the stream (the same for every tree).

    python bench/api_overhead.py                                  # the four streaming routes, 1024 tokens each
    python bench/api_overhead.py --route /api/chat --tokens 4096
    python bench/api_overhead.py --baseline main --repeats 6      # main's tree against this one, interleaved

Each measurement is a fresh process (``--probe``) that streams the route once untimed and then ``--best-of`` times,
keeping the least CPU. With ``--baseline REV`` the revision's tree (``git archive REV``) and this checkout's run in
alternating processes, each from its own directory with its own ``LLAMA_NODE_CACHE``; the table shows medians of
``--repeats`` rounds and in how many rounds this checkout used less CPU.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fmt, interleaved, load_average, median, print_table, setup_logging, warn_if_busy  # noqa: E402

log = logging.getLogger("bench.api_overhead")

ROUTES = ["/api/generate", "/api/chat", "/v1/completions", "/v1/chat/completions"]
TEXT = "The quick brown fox jumps over the lazy dog, and then it writes a long essay about it. "


def probe(route: str, tokens: int, best_of: int) -> float:
    """In this process: CPU microseconds per token of streaming ``tokens`` tokens from ``route``, least of
    ``best_of`` streams."""
    from fastapi.testclient import TestClient

    from coordinator.api.app import create_app
    from coordinator.api.backend import Backend, ModelInfo
    from coordinator.scheduler import RowWork, Scheduler
    from llama_shard.embedded import smollm2_gguf_path
    from llama_shard.loading import load_tokenizer, open_source

    tok = load_tokenizer(open_source(smollm2_gguf_path()))
    ids = [i for i in tok.encode(TEXT * (tokens // 8 + 1)) if i not in tok.eos_ids]
    context = tokens + 64

    class Instant:
        """A step executor that samples the text's next id for every row that asks, at once."""

        n_slots, max_len, depth = 1, context, 1

        def __init__(self) -> None:
            self.k = 0

        async def run(self, rows: Sequence[RowWork]) -> list[int | None]:
            out: list[int | None] = []
            for r in rows:
                out.append(ids[self.k % len(ids)] if r.sample else None)
                self.k += r.sample
            return out

        async def close(self) -> None:
            pass

    info = ModelInfo("bench", frozenset(), "/x/bench.gguf", "gguf", "llama", 135_000_000, 1, "Q4_1", context, 0.0)
    backend = Backend(info, tok, context, Scheduler(Instant()))
    opts = {"num_predict": tokens, "temperature": 0}
    body: dict[str, object] = {"model": "bench", "max_tokens": tokens, "temperature": 0, "stream": True}
    if route == "/api/generate":
        body = {"model": "bench", "prompt": "Hello", "raw": True, "options": opts}
    elif route == "/api/chat":
        body = {"model": "bench", "messages": [{"role": "user", "content": "Hello"}], "options": opts}
    elif route == "/v1/completions":
        body["prompt"] = "Hello"
    else:
        body["messages"] = [{"role": "user", "content": "Hello"}]
    best = float("inf")
    with TestClient(create_app(backend)) as client:
        for attempt in range(best_of + 1):  # the first pass warms up (imports, caches) and is not counted
            t0 = time.process_time()
            with client.stream("POST", route, json=body) as r:
                r.raise_for_status()
                lines = sum(1 for line in r.iter_lines() if line)
            cpu = time.process_time() - t0
            if lines < tokens:
                raise RuntimeError(f"{route} streamed {lines} lines for {tokens} tokens")
            if attempt:
                best = min(best, cpu)
    return best / tokens * 1e6


def run_probe(tree: Path, cache: Path, route: str, tokens: int, best_of: int) -> float:
    """``probe`` in a fresh process running ``tree``'s code from ``tree``."""
    env = {**os.environ, "PYTHONPATH": str(tree), "LLAMA_NODE_CACHE": str(cache)}
    cmd = [sys.executable, __file__, "--probe", "--route", route, "--tokens", str(tokens), "--best-of", str(best_of)]
    out = subprocess.run(cmd, cwd=tree, env=env, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def report(route: str, tree: str, round_: int, us: float) -> None:
    log.info("%s %s: %.1f us/token", tree, route, us)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--route", action="append", choices=ROUTES, help="repeatable (default: all four)")
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per streamed answer")
    ap.add_argument("--best-of", type=int, default=5, help="streams per process; the least CPU is kept")
    ap.add_argument("--repeats", type=int, default=3, help="processes per route (and tree), interleaved")
    ap.add_argument("--baseline", metavar="REV", help="also measure git revision REV's tree, alternating with this")
    ap.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)  # the measuring child process
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    setup_logging(args.verbose)
    routes = args.route or ROUTES
    if args.probe:
        print(f"{probe(routes[0], args.tokens, args.best_of):.3f}")
        return
    warn_if_busy()
    load0 = load_average()
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory(prefix="api-overhead-") as tmp:
        trees = {"this": (root, Path(tmp) / "cache-this")}
        if args.baseline:
            base = Path(tmp) / "baseline"
            base.mkdir()
            archive = subprocess.run(["git", "archive", args.baseline], cwd=root, check=True, capture_output=True)
            subprocess.run(["tar", "-x", "-C", str(base)], input=archive.stdout, check=True)
            trees = {args.baseline: (base, Path(tmp) / "cache-baseline"), **trees}
        rows = []
        for route in routes:
            tasks = {
                name: (lambda t=tree, c=cache, r=route: run_probe(t, c, r, args.tokens, args.best_of))
                for name, (tree, cache) in trees.items()
            }
            runs = interleaved(tasks, args.repeats, on_result=partial(report, route))
            row = [route, fmt(median(runs["this"]), 1), " ".join(f"{v:.0f}" for v in runs["this"])]
            if args.baseline:
                base_runs = runs[args.baseline]
                wins = sum(new < old for old, new in zip(base_runs, runs["this"], strict=True))
                ratio = median(runs["this"]) / median(base_runs)
                row[1:1] = [fmt(median(base_runs), 1), " ".join(f"{v:.0f}" for v in base_runs)]
                row += [fmt(ratio, 3), f"{wins}/{args.repeats}"]
            rows.append(row)
    columns = ["route", "us CPU/token", "rounds"]
    if args.baseline:
        columns = ["route", f"{args.baseline} us/token", "rounds", "this us/token", "rounds", "this ÷ base", "less"]
    caption = (f"{args.tokens} tokens per stream, least of {args.best_of} per process, medians of {args.repeats} "
               f"interleaved processes; load avg {load0 or 0:.1f} → {load_average() or 0:.1f}")  # fmt: skip
    print_table("Coordinator CPU per streamed token (no model, no nodes)", columns, rows, caption)


if __name__ == "__main__":
    main()
