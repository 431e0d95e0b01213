"""Concurrent streams through a loopback pipeline: aggregate tokens/s at 1, 2, 4, 8, 16 streams ÷ 1 stream, and
time to first token p50/p95.

    python bench/concurrency.py                       # starts `llama-node serve --nodes 3` on a free port (packed)
    python bench/concurrency.py --dtype float32       # the same with dense fp32 stages
    python bench/concurrency.py --url http://host:11434 --model NAME   # an already running server
    python bench/concurrency.py --plot bench/concurrency.png
    python bench/concurrency.py --levels 1,8 --rounds 5   # the ratio at 8 alone, from 5 interleaved rounds
    python bench/concurrency.py --api ollama          # the streams are Ollama's /api/generate (NDJSON) instead

Each stream is a streaming ``/v1/completions`` (``--api ollama``: ``/api/generate``, raw) with its own prompt and
``max_tokens`` (``num_predict``); the tokens counted are the ones the server reports (``usage``, ``eval_count``).
The levels run ``--rounds`` times interleaved (1, 2, .., 16, 1, 2, ..) and the table shows each level's median, with
every round's tokens/s beside it: one pass of a single stream over a few dozen tokens swung by ±15% between runs, and
every ratio divides by it. The goal at 8 streams is at least 6x the single stream's tokens/s. When the bench starts
the server, it also reports the CPU time per token of the node processes and of the server: on a machine whose cores
are shared (with each other, or with other work), tokens/s follows the CPU a token costs.

``--ceiling`` adds what the machine itself allows at each level, measured in the same rounds: a fresh process
(``--ceiling-probe``) loads the whole model as one stage on all usable cores and times batched decode steps of n
rows (``llama_shard.batching.run_step``, greedy, the rows at the streams' positions) with no HTTP, no gRPC and no
prefill. With the nodes sharing this machine's cores, no pipeline of them can beat it, so "ceiling ÷ 1 stream" is
the most the ratio could be here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fmt, llama_node_command, load_average, print_table, require_matplotlib, setup_logging  # noqa: E402

log = logging.getLogger("bench.concurrency")

TOPICS = ["the sea", "a mountain", "bread", "the moon", "a library", "rain", "trains", "a garden",
          "winter", "music", "a river", "chess", "bees", "a lighthouse", "coffee", "the desert"]  # fmt: skip


@dataclass
class StreamResult:
    tokens: int
    ttft_s: float
    total_s: float


def cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU seconds (user + system) so far of the server process, and of its children (the node processes)."""
    import psutil

    server = psutil.Process(pid)
    own = sum(server.cpu_times()[:2])
    kids = 0.0
    for child in server.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            kids += sum(child.cpu_times()[:2])
    return own, kids


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def one_stream(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int, api: str) -> StreamResult:
    if api == "ollama":
        return await one_ollama_stream(client, model, prompt, max_tokens)
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    t0 = time.perf_counter()
    ttft, tokens = float("nan"), 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if obj.get("choices") and obj["choices"][0].get("text") and ttft != ttft:
                ttft = time.perf_counter() - t0
            if obj.get("usage"):
                tokens = int(obj["usage"]["completion_tokens"])
    return StreamResult(tokens, ttft, time.perf_counter() - t0)


async def one_ollama_stream(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> StreamResult:
    """``one_stream`` through ``/api/generate``: raw, so the prompt is the same tokens as ``/v1/completions``'."""
    body = {"model": model, "prompt": prompt, "raw": True, "stream": True,
            "options": {"num_predict": max_tokens, "temperature": 0}}  # fmt: skip
    t0 = time.perf_counter()
    ttft, tokens = float("nan"), 0
    async with client.stream("POST", "/api/generate", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line:
                continue
            obj = json.loads(line)
            if "error" in obj:
                raise RuntimeError(f"the server reported: {obj['error']}")
            if obj.get("response") and ttft != ttft:
                ttft = time.perf_counter() - t0
            if obj.get("done"):
                tokens = int(obj["eval_count"])
    return StreamResult(tokens, ttft, time.perf_counter() - t0)


async def level(url: str, model: str, n: int, max_tokens: int, api: str = "openai") -> tuple[float, list[StreamResult]]:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(
            *(one_stream(client, model, f"Here is a short story about {TOPICS[i % len(TOPICS)]}:", max_tokens, api)
              for i in range(n))
        )  # fmt: skip
        wall = time.perf_counter() - t0
    return sum(r.tokens for r in results) / wall, list(results)


def scheduler_stats(url: str) -> dict[str, int]:
    """The server's scheduler counters (``GET /stats``); empty where the server has none."""
    try:
        r = httpx.get(url + "/stats", timeout=10)
        return dict(r.json()) if r.status_code == 200 else {}
    except (httpx.HTTPError, ValueError):
        return {}


def percentile(values: list[float], q: float) -> float:
    data = sorted(v for v in values if v == v)
    if not data:
        return float("nan")
    k = min(len(data) - 1, max(0, round(q / 100 * (len(data) - 1))))
    return data[k]


def measure(
    url: str, model: str, n: int, max_tokens: int, proc: subprocess.Popen[bytes] | None, api: str = "openai"
) -> dict[str, float]:
    """One level: ``n`` streams at once; tokens/s, TTFT and the CPU per token of the server, nodes and this bench."""
    cpu0 = cpu_seconds(proc.pid) if proc is not None else (float("nan"), float("nan"))
    stats0 = scheduler_stats(url)
    client0 = time.process_time()
    tps, results = asyncio.run(level(url, model, n, max_tokens, api))
    client_s = time.process_time() - client0
    cpu1 = cpu_seconds(proc.pid) if proc is not None else cpu0
    stats1 = scheduler_stats(url)
    steps = stats1.get("steps", 0) - stats0.get("steps", 0)
    decode_rows = stats1.get("decode_rows", 0) - stats0.get("decode_rows", 0)
    tokens = sum(r.tokens for r in results)
    serve_ms, nodes_ms = ((b - a) * 1e3 / tokens for a, b in zip(cpu0, cpu1, strict=True))
    ttfts = [r.ttft_s for r in results]
    return {"tokens_per_s": tps, "ttft_p50_s": percentile(ttfts, 50), "ttft_p95_s": percentile(ttfts, 95),
            "serve_cpu_ms_per_token": serve_ms, "nodes_cpu_ms_per_token": nodes_ms,
            "client_cpu_ms_per_token": client_s * 1e3 / tokens, "steps": steps,
            "decode_rows_per_step": decode_rows / steps if steps else float("nan")}  # fmt: skip


def start_server(
    nodes: int, slots: int, context: int, threads: int, dtype: str, micro_batches: int
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [*llama_node_command(), "serve", "--port", str(port), "--nodes", str(nodes), "--slots", str(slots),
           "--context", str(context), "--threads", str(threads), "--dtype", dtype,
           "--micro-batches", str(micro_batches)]  # fmt: skip
    log.info("starting %s", " ".join(cmd))
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise TimeoutError("the server did not come up in 600 s")


def ceiling_probe(levels: list[int], max_tokens: int, dtype: str) -> dict[int, float]:
    """In this process: decode tokens/s of the served model as one stage on every usable core, ``n`` rows per step
    for each ``n`` in ``levels`` (``--ceiling``)."""
    import os

    import torch

    from coordinator.pipeline.local import weight_mode
    from llama_shard import batching
    from llama_shard.embedded import smollm2_gguf_path
    from llama_shard.loading import load_stage, open_source
    from llama_shard.shard import ShardSpec

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    path = smollm2_gguf_path()
    source = open_source(path)
    n_layers = source.config.n_layers
    mode = weight_mode(path, dtype)
    stage = load_stage(source, ShardSpec.whole(n_layers), quantize=mode, dtype=torch.float32)
    start = 16  # about the streams' prompt length
    cache = stage.new_cache(max(levels) + 1, start + max_tokens + 8)
    out: dict[int, float] = {}
    with torch.inference_mode():
        for n in [*levels, *levels]:  # a first pass untimed: it pages the weights in (1 row: 7 tok/s, then 250)
            tokens = [torch.tensor([1 + i]) for i in range(n)]
            t0 = 0.0
            for step in range(max_tokens + 4):  # 4 warm-up steps, not timed
                if step == 4:
                    t0 = time.perf_counter()
                rows = [batching.StepRow(i, start + step, tokens[i], prefill=False) for i in range(n)]
                logits = batching.run_step(stage, cache, rows, max(levels))
                tokens = [lg.argmax().reshape(1) for lg in logits if lg is not None]
            out[n] = n * max_tokens / (time.perf_counter() - t0)
    return out


def ceiling(levels: list[int], max_tokens: int, dtype: str) -> dict[int, float]:
    """``ceiling_probe`` in a fresh process (this file with ``--ceiling-probe``), so nothing of this one is warm."""
    cmd = [sys.executable, __file__, "--ceiling-probe", "--levels", ",".join(map(str, levels)),
           "--max-tokens", str(max_tokens), "--dtype", dtype]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return {int(k): float(v) for k, v in json.loads(out.strip().splitlines()[-1]).items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="an already running server (default: start one)")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per node process")
    ap.add_argument("--levels", default="1,2,4,8,16")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="passes over the levels (1,2,..,16, 1,2,..,16, ...); the table shows each level's median",
    )
    ap.add_argument("--dtype", default="auto", help="serve --dtype: auto (GGUF blocks packed on the nodes), float32")
    ap.add_argument("--api", choices=["openai", "ollama"], default="openai",
                    help="the streams' route: /v1/completions (SSE) or /api/generate (NDJSON)")  # fmt: skip
    ap.add_argument("--micro-batches", type=int, default=0, help="serve --micro-batches (0: the server's default)")
    ap.add_argument(
        "--ceiling",
        action="store_true",
        help="also measure each level's ceiling: one process, the whole model, all cores, batched decode",
    )
    ap.add_argument("--ceiling-probe", action="store_true", help=argparse.SUPPRESS)  # --ceiling's child process
    ap.add_argument("--plot", help="write a PNG plot here")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    setup_logging(args.verbose)
    levels = [int(x) for x in args.levels.split(",")]
    if args.ceiling_probe:
        print(json.dumps(ceiling_probe(levels, args.max_tokens, args.dtype)))
        return
    if args.ceiling and args.url:
        ap.error("--ceiling measures the embedded default model the bench serves itself: drop --url")
    if args.plot and not require_matplotlib():
        sys.exit(2)
    proc = None
    url = args.url
    if url is None:
        proc, url = start_server(args.nodes, max(levels), 256 + args.max_tokens, args.threads, args.dtype,
                                 args.micro_batches)  # fmt: skip
    try:
        asyncio.run(level(url, args.model, 1, 4, args.api))  # warm-up
        runs: dict[int, list[dict[str, float]]] = {n: [] for n in levels}
        for _ in range(args.rounds):  # interleaved, so a load spike does not land on one level only
            for n in levels:
                runs[n].append(measure(url, args.model, n, args.max_tokens, proc, args.api))
                log.info("%d streams: %.1f tok/s", n, runs[n][-1]["tokens_per_s"])
            if args.ceiling:  # the server is idle meanwhile
                for n, tps in ceiling(levels, args.max_tokens, args.dtype).items():
                    runs[n][-1]["ceiling_tokens_per_s"] = tps
                    log.info("%d rows in one process: %.1f tok/s", n, tps)
        data = {n: {k: statistics.median(r[k] for r in runs[n]) for k in runs[n][0]} for n in levels}
        base = data[levels[0]]["tokens_per_s"]
        rows = []
        for n in levels:
            d = data[n]
            d["speedup"] = d["tokens_per_s"] / base
            rows.append([n, fmt(d["tokens_per_s"]), " ".join(f"{r['tokens_per_s']:.0f}" for r in runs[n]),
                         fmt(d["speedup"], 2, "x"), fmt(d["ttft_p50_s"] * 1e3, 0), fmt(d["ttft_p95_s"] * 1e3, 0),
                         fmt(d["nodes_cpu_ms_per_token"]), fmt(d["serve_cpu_ms_per_token"]),
                         fmt(d["client_cpu_ms_per_token"]), fmt(d["decode_rows_per_step"])])  # fmt: skip
            if args.ceiling:
                rows[-1] += [fmt(d["ceiling_tokens_per_s"]), fmt(d["ceiling_tokens_per_s"] / base, 2, "x")]
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    if args.json:
        rounds = {n: [r["tokens_per_s"] for r in runs[n]] for n in levels}
        print(json.dumps({"nodes": args.nodes, "max_tokens": args.max_tokens, "dtype": args.dtype, "api": args.api,
                          "load_avg_1m": load_average(), "levels": data, "tokens_per_s_rounds": rounds}))  # fmt: skip
    else:
        caption = (f"{args.nodes}-node loopback pipeline, --api {args.api}, --dtype {args.dtype}, "
                   f"--micro-batches {args.micro_batches}, "
                   f"{args.max_tokens} tokens/stream, medians of {args.rounds} interleaved rounds, "
                   f"load avg {load_average() or 0:.1f}; goal at 8: 6x")  # fmt: skip
        columns = ["streams", "tok/s", "rounds", f"÷ {levels[0]} stream(s)", "TTFT p50 ms", "TTFT p95 ms",
                   "nodes CPU ms/tok", "serve CPU ms/tok", "bench CPU ms/tok", "decode rows/step"]  # fmt: skip
        if args.ceiling:
            columns += ["1-process ceiling tok/s", f"ceiling ÷ {levels[0]} stream(s)"]
        print_table("Concurrent streams", columns, rows, caption)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
        a.plot(levels, [data[n]["speedup"] for n in levels], "o-", label="measured")
        a.plot(levels, levels, "--", color="grey", label="ideal")
        if args.ceiling:
            a.plot(levels, [data[n]["ceiling_tokens_per_s"] / base for n in levels], "^:", label="1-process ceiling")
        a.set(xlabel="concurrent streams", ylabel="aggregate tok/s ÷ 1 stream", xscale="log", yscale="log")
        a.legend()
        b.plot(levels, [data[n]["ttft_p50_s"] * 1e3 for n in levels], "o-", label="p50")
        b.plot(levels, [data[n]["ttft_p95_s"] * 1e3 for n in levels], "s-", label="p95")
        b.set(xlabel="concurrent streams", ylabel="time to first token (ms)", xscale="log")
        b.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        log.info("plot written to %s", args.plot)


if __name__ == "__main__":
    main()
