"""Prefill and decode tokens/s of ``llama-node run`` against llama.cpp (llama-cpp-python) on the same GGUF.

Both engines see the same prompt token ids (the ids ``llama-node run --raw --json`` reports in
``prompt_ids``), decode greedily a fixed number of tokens with EOS ignored, on the same thread count.
Repetitions are interleaved (A B A B ...) and the median is reported. Both use llama-node's definitions:

- prefill tokens/s = prompt tokens / time to the first generated token
- decode tokens/s = tokens after the first / time after the first token

Model load is excluded for both: llama-node reports its own numbers in its JSON; llama.cpp is timed around
generation only (model loaded once, KV cache cleared before each repetition).

    python bench/decode.py                       # packaged SmolLM2-135M Q4_1, 2 threads, 5 repetitions
    python bench/decode.py --dtype auto --dtype float32 --plot bench/out/decode.png
    python bench/decode.py --dtype auto --dtype auto-eager   # the fused step (llama_shard.fused) on and off
    python bench/decode.py --engines llama.cpp    # llama.cpp alone (prompt tokenised by llama.cpp)
    python bench/decode.py --engines llama-node --baseline main   # the working tree's kernels against main's

``--baseline REV`` adds, for each ``--dtype``, llama-node with the native kernels (``llama_shard/kernels/csrc``) of
git revision REV and the working tree's Python, interleaved with the rest; their greedy ids must match the working
tree's where REV's kernels are meant to give the same bits.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    baseline_tree,
    fmt,
    interleaved,
    llama_node_command,
    load_average,
    median,
    packaged_gguf,
    plot_grouped_bars,
    print_table,
    require_matplotlib,
    setup_logging,
    warn_if_busy,
)

log = logging.getLogger("bench.decode")

LLAMA_CPP = "llama.cpp"
LLAMA_NODE = "llama-node"

# Fixed English prose, about 128 tokens with the SmolLM2 tokenizer (the actual count is reported).
DEFAULT_PROMPT = (
    "The lighthouse keeper woke before dawn, as he had every morning for thirty years. He climbed the spiral "
    "stairs, counted the one hundred and twelve steps out of habit, and checked the great lens for salt and "
    "dust. Outside, the sea was grey and restless, and a thin line of light was spreading along the horizon. "
    "He wrote the weather in his logbook: wind from the north-west, visibility good, a fishing boat heading "
    "home to the harbour. Then he made tea, sat by the window, and watched the gulls circle above the rocks. "
    "Later that morning, a letter arrived from the mainland, and when he read it he"
)

REQUIRED_KEYS = ("prompt_ids", "token_ids", "prefill_tokens_per_s", "decode_tokens_per_s")


@dataclass
class Sample:
    """One generation: the speeds and what was generated."""

    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    prompt_ids: list[int]
    token_ids: list[int]
    text: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class LlamaCppEngine:
    """llama-cpp-python, loaded once; greedy argmax over the last logits, going on past EOS like llama-node's
    ``--ignore-eos`` (an EOS may be picked; generation just does not stop on it)."""

    def __init__(self, model: Path, threads: int, n_ctx: int) -> None:
        import llama_cpp
        import numpy as np

        self._llama_cpp = llama_cpp
        self._np = np
        t0 = time.perf_counter()
        self.llm = llama_cpp.Llama(
            model_path=str(model),
            n_threads=threads,
            n_threads_batch=threads,
            n_ctx=n_ctx,
            n_batch=max(512, n_ctx),
            n_ubatch=max(512, n_ctx),
            verbose=False,
        )
        log.info(
            "llama.cpp %s loaded %s in %.2f s (threads=%d, n_ctx=%d)",
            llama_cpp.__version__,
            model.name,
            time.perf_counter() - t0,
            threads,
            n_ctx,
        )
        self.n_vocab = self.llm.n_vocab()

    def tokenize(self, text: str) -> list[int]:
        """Raw tokenisation (no BOS, specials not parsed); used only when llama-node is not benchmarked."""
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.llm.detokenize(list(ids)).decode("utf-8", errors="replace")

    def _next_token(self) -> int:
        ptr = self._llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        logits = self._np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
        return int(logits.argmax())

    def log_likelihoods(self, ids: Sequence[int]) -> list[float]:
        """Teacher-forced: the log-probability of each of ``ids[1:]`` after the ids before it, fed one at a time
        (the decode path, as llama-node's ``bench/quant_mixes.py`` side), in fp64 from the fp32 logits."""
        np = self._np
        self.llm.reset()
        out = []
        for i, token in enumerate(ids[:-1]):
            self.llm.eval([token])
            ptr = self._llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
            logits = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).astype(np.float64)
            top = logits.max()
            out.append(float(logits[ids[i + 1]] - top - np.log(np.exp(logits - top).sum())))
        return out

    def generate(self, prompt_ids: Sequence[int], max_tokens: int) -> Sample:
        llm = self.llm
        llm.reset()  # n_tokens = 0; eval() then drops the whole KV cache
        t0 = time.perf_counter()
        llm.eval(prompt_ids)
        token = self._next_token()
        t1 = time.perf_counter()
        out = [token]
        while len(out) < max_tokens:
            llm.eval([token])
            token = self._next_token()
            out.append(token)
        t2 = time.perf_counter()
        decode_s = t2 - t1
        return Sample(
            prefill_tokens_per_s=len(prompt_ids) / (t1 - t0),
            decode_tokens_per_s=(len(out) - 1) / decode_s if len(out) > 1 and decode_s > 0 else float("nan"),
            prompt_ids=list(prompt_ids),
            token_ids=out,
            text=self.detokenize(out),
        )


class LlamaNodeEngine:
    """``llama-node run ... --json`` as a subprocess; the speeds are the ones it reports itself."""

    def __init__(
        self,
        model: Path,
        threads: int,
        dtype: str,
        prompt: str,
        max_tokens: int,
        timeout: float,
        pythonpath: str | None = None,
    ) -> None:
        self.argv = [
            *llama_node_command(),
            "run",
            str(model),
            "--prompt",
            prompt,
            "--raw",
            "--max-tokens",
            str(max_tokens),
            "--temperature",
            "0",
            "--threads",
            str(threads),
            "--ignore-eos",
            "--json",
            "--dtype",
            dtype.removesuffix("-eager"),
        ]
        # auto-eager: the packed weights without the fused step (llama_shard.fused), to show what it is worth
        self.env = {**os.environ, "LLAMA_NODE_FUSED": "0"} if dtype.endswith("-eager") else None
        if pythonpath is not None:  # --baseline: another revision's kernels first on the path
            self.env = {**(self.env or os.environ), "PYTHONPATH": pythonpath}
        self.dtype = dtype
        self.timeout = timeout

    def generate(self) -> Sample:
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(
                self.argv, capture_output=True, text=True, timeout=self.timeout, check=False, env=self.env
            )
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"llama-node run (dtype={self.dtype}) timed out after {self.timeout:.0f} s") from exc
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-20:])
            raise RuntimeError(f"llama-node run (dtype={self.dtype}) exited {proc.returncode}:\n{tail}")
        data = _parse_json_object(proc.stdout)
        missing = [k for k in REQUIRED_KEYS if k not in data]
        if missing:
            raise RuntimeError(f"llama-node run --json output lacks {missing}: {proc.stdout[:500]!r}")
        log.debug("llama-node (dtype=%s) process took %.2f s wall", self.dtype, wall)
        return Sample(
            prefill_tokens_per_s=float(data["prefill_tokens_per_s"]),
            decode_tokens_per_s=float(data["decode_tokens_per_s"]),
            prompt_ids=[int(i) for i in data["prompt_ids"]],
            token_ids=[int(i) for i in data["token_ids"]],
            text=str(data.get("text", "")),
            extra={
                "model": data.get("model"),
                "finish_reason": data.get("finish_reason"),
                "process_wall_s": wall,
            },
        )


def _parse_json_object(stdout: str) -> dict[str, Any]:
    """The contract is exactly one JSON object on stdout; tolerate stray lines before it."""
    text = stdout.strip()
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        start = text.rfind("\n{")
        try:
            obj = json.loads(text[start + 1 :] if start >= 0 else text[text.index("{") :])
        except (ValueError, json.JSONDecodeError) as exc:
            raise RuntimeError(f"llama-node run --json printed no JSON object: {stdout[:500]!r}") from exc
        log.warning("llama-node run --json printed extra text on stdout before the JSON object")
    if not isinstance(obj, dict):
        raise RuntimeError(f"llama-node run --json printed {type(obj).__name__}, not an object")
    return obj


def _finite(obj: Any) -> Any:
    """NaN/inf to None so the JSON stays strict."""
    if isinstance(obj, float):
        return obj if obj == obj and abs(obj) != float("inf") else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", help="GGUF path (default: the packaged SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--threads", type=int, default=2, help="threads for both engines (default 2)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens generated per run (default 64)")
    p.add_argument("--repeats", type=int, default=5, help="kept repetitions per engine (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="discarded rounds before the kept ones (default 1)")
    p.add_argument(
        "--dtype",
        action="append",
        choices=["auto", "auto-eager", "float32", "bfloat16", "float16"],
        help="llama-node --dtype; repeat to compare paths, e.g. --dtype auto --dtype float32 (default auto); "
        "auto-eager: packed weights without the fused step (LLAMA_NODE_FUSED=0)",
    )
    p.add_argument(
        "--engines",
        default=f"{LLAMA_NODE},{LLAMA_CPP}",
        help=f"comma-separated subset of {LLAMA_NODE},{LLAMA_CPP} (default both)",
    )
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="prompt text (default: a fixed ~128-token paragraph)")
    prompt.add_argument("--prompt-file", type=Path, help="read the prompt text from a file")
    p.add_argument("--baseline", metavar="REV", help="also llama-node with git revision REV's native kernels")
    p.add_argument("--timeout", type=float, default=900, help="seconds allowed per llama-node run (default 900)")
    p.add_argument("--plot", metavar="OUT.png", help="also draw a bar chart (needs matplotlib)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object on stdout")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = p.parse_args(argv)
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(args.engines) - {LLAMA_NODE, LLAMA_CPP}
    if unknown or not args.engines:
        p.error(f"--engines: unknown {sorted(unknown)}; choose from {LLAMA_NODE},{LLAMA_CPP}")
    args.dtype = list(dict.fromkeys(args.dtype or ["auto"]))
    if args.threads < 1 or args.max_tokens < 2 or args.repeats < 1 or args.warmup < 0:
        p.error("need --threads >= 1, --max-tokens >= 2, --repeats >= 1, --warmup >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    if args.plot and not require_matplotlib():
        return 2

    model = Path(args.model) if args.model else packaged_gguf()
    if not model.is_file():
        log.error("model not found: %s", model)
        return 2
    prompt = args.prompt_file.read_text() if args.prompt_file else (args.prompt or DEFAULT_PROMPT)

    node_engines: dict[str, LlamaNodeEngine] = {}
    own_names: dict[str, str] = {}  # dtype -> the working tree's engine
    if LLAMA_NODE in args.engines:
        for dtype in args.dtype:
            name = f"{LLAMA_NODE} ({dtype})" if len(args.dtype) > 1 or dtype != "auto" else LLAMA_NODE
            node_engines[name] = LlamaNodeEngine(model, args.threads, dtype, prompt, args.max_tokens, args.timeout)
            own_names[dtype] = name
        if args.baseline:
            base = tempfile.TemporaryDirectory(prefix="decode-baseline-")  # removed when main returns
            root = Path(__file__).resolve().parent.parent
            path = os.pathsep.join([str(baseline_tree(args.baseline, Path(base.name))), str(root)])
            for dtype in args.dtype:
                name = f"{LLAMA_NODE} ({dtype}) @{args.baseline}"
                node_engines[name] = LlamaNodeEngine(
                    model, args.threads, dtype, prompt, args.max_tokens, args.timeout, pythonpath=path
                )

    # The prompt ids: whatever llama-node's raw tokenisation produced, so llama.cpp sees exactly the same ids.
    probe: Sample | None = None
    if node_engines:
        first_name, first = next(iter(node_engines.items()))
        log.info("probing %s for the prompt ids (its run is not counted)", first_name)
        probe = first.generate()
        prompt_ids = probe.prompt_ids
        log.info("llama-node raw prompt: %d tokens", len(prompt_ids))
    cpp: LlamaCppEngine | None = None
    if LLAMA_CPP in args.engines:
        n_ctx_needed = (len(probe.prompt_ids) if probe else 4 * len(prompt) // 3 + 8) + args.max_tokens + 16
        cpp = LlamaCppEngine(model, args.threads, n_ctx=max(512, n_ctx_needed))
        own_ids = cpp.tokenize(prompt)
        if probe is None:
            prompt_ids = own_ids
            log.info("llama.cpp raw prompt: %d tokens", len(prompt_ids))
        elif own_ids != prompt_ids:
            log.warning(
                "llama.cpp tokenises the prompt differently from llama-node (%d vs %d ids, first "
                "difference at %d); benchmarking both on llama-node's ids",
                len(own_ids),
                len(prompt_ids),
                _common_prefix(own_ids, prompt_ids),
            )
        else:
            log.info("llama.cpp's raw tokenisation of the prompt matches llama-node's ids")

    load_before = warn_if_busy("the timed rounds")
    tasks: dict[str, Any] = {name: engine.generate for name, engine in node_engines.items()}
    if cpp is not None:
        tasks[LLAMA_CPP] = lambda: cpp.generate(prompt_ids, args.max_tokens)

    def report(name: str, index: int, sample: Sample) -> None:
        what = "warmup" if index < 0 else f"run {index + 1}/{args.repeats}"
        log.info(
            "%-22s %-10s prefill %8.1f tok/s  decode %7.1f tok/s",
            name,
            what,
            sample.prefill_tokens_per_s,
            sample.decode_tokens_per_s,
        )

    log.info(
        "%d warmup + %d kept rounds of %s; %d prompt tokens, %d generated, %d threads",
        args.warmup,
        args.repeats,
        " / ".join(tasks),
        len(prompt_ids),
        args.max_tokens,
        args.threads,
    )
    results: dict[str, list[Sample]] = interleaved(tasks, args.repeats, args.warmup, on_result=report)
    load_after = load_average()

    # Consistency: same prompt ids everywhere, the asked number of tokens, deterministic greedy ids.
    for name, samples in results.items():
        for s in samples:
            if s.prompt_ids != prompt_ids:
                log.warning("%s: prompt ids differ from the probe's (%d ids)", name, len(s.prompt_ids))
            if len(s.token_ids) != args.max_tokens:
                log.warning(
                    "%s: generated %d tokens, asked %d (finish_reason=%s)",
                    name,
                    len(s.token_ids),
                    args.max_tokens,
                    s.extra.get("finish_reason"),
                )
        if any(s.token_ids != samples[0].token_ids for s in samples):
            log.warning("%s: greedy token ids differ between repetitions", name)
        log.info("%s text: %r", name, samples[0].text[:300])
    for dtype, name in own_names.items() if args.baseline else ():
        new, old = results[name][0].token_ids, results[f"{LLAMA_NODE} ({dtype}) @{args.baseline}"][0].token_ids
        if new == old:
            log.info("%s: greedy ids equal to @%s's", name, args.baseline)
        else:
            log.warning("%s: greedy ids differ from @%s's at %d", name, args.baseline, _common_prefix(new, old))

    summary: dict[str, dict[str, Any]] = {}
    for name, samples in results.items():
        summary[name] = {
            "prefill_tokens_per_s": median(s.prefill_tokens_per_s for s in samples),
            "decode_tokens_per_s": median(s.decode_tokens_per_s for s in samples),
        }
    ref = summary.get(LLAMA_CPP)
    ref_ids = results[LLAMA_CPP][0].token_ids if LLAMA_CPP in results else None
    for name, row in summary.items():
        is_node = name != LLAMA_CPP
        row["prefill_ratio"] = row["prefill_tokens_per_s"] / ref["prefill_tokens_per_s"] if ref and is_node else None
        row["decode_ratio"] = row["decode_tokens_per_s"] / ref["decode_tokens_per_s"] if ref and is_node else None
        row["greedy_ids_matching_llama_cpp"] = (
            _common_prefix(results[name][0].token_ids, ref_ids) if ref_ids is not None and is_node else None
        )

    columns = ["engine", "prefill tok/s", "decode tok/s", "prefill ÷ llama.cpp", "decode ÷ llama.cpp"]
    if ref_ids is not None and node_engines:
        columns.append("greedy ids = llama.cpp")
    rows = []
    for name, row in summary.items():
        cells = [
            name,
            fmt(row["prefill_tokens_per_s"]),
            fmt(row["decode_tokens_per_s"]),
            fmt(row["prefill_ratio"], 2, "×"),
            fmt(row["decode_ratio"], 2, "×"),
        ]
        if len(columns) > 5:
            match = row["greedy_ids_matching_llama_cpp"]
            cells.append("—" if match is None else f"{match}/{args.max_tokens}")
        rows.append(cells)
    title = f"Decode bench: {model.name}, {args.threads} threads"
    caption = (
        f"{len(prompt_ids)} prompt tokens, {args.max_tokens} generated (EOS ignored, greedy); "
        f"median of {args.repeats} interleaved runs, model load excluded; load average "
        f"{fmt(load_before, 1)} before, {fmt(load_after, 1)} after on {os.cpu_count()} cores"
    )
    print_table(title, columns, rows, caption=caption, file=sys.stderr if args.json else None)

    if args.plot:
        plot_grouped_bars(
            args.plot,
            ["prefill", "decode"],
            {n: [r["prefill_tokens_per_s"], r["decode_tokens_per_s"]] for n, r in summary.items()},
            title=f"{model.name}, {args.threads} threads (median of {args.repeats})",
            ylabel="tokens/s",
        )

    if args.json:
        out = {
            "model": str(model),
            "threads": args.threads,
            "prompt_tokens": len(prompt_ids),
            "max_tokens": args.max_tokens,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "load_average_before": load_before,
            "load_average_after": load_after,
            "cpu_count": os.cpu_count(),
            "prompt_ids": prompt_ids,
            "summary": summary,
            "samples": {
                n: [{k: v for k, v in asdict(s).items() if k != "prompt_ids"} for s in ss] for n, ss in results.items()
            },
        }
        if cpp is not None:
            import llama_cpp

            out["llama_cpp_version"] = llama_cpp.__version__
        json.dump(_finite(out), sys.stdout, indent=2, allow_nan=False, default=str)
        sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
