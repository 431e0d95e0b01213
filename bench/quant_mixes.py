"""llama.cpp's own K-quant mixes (Q2_K ... Q8_0) of one model, each run by llama-node and by llama.cpp.

The files are made the way users get them: a higher-precision source GGUF (the packaged SmolLM2's weights,
dequantised to F16, norms F32, with its metadata and tokenizer) quantised by llama.cpp itself
(``llama_cpp.llama_model_quantize``), so each file has llama.cpp's per-tensor types: Q6_K/Q8_0 head, attn_v and
ffn_down raised in some layers, and the fallbacks of rows that are not a multiple of 256 (SmolLM2's 576 columns:
Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, Q2_K/Q3_K -> IQ4_NL).

For each file and each llama-node ``--dtype`` (``auto``: the packed path; ``auto-nokernels``: the same with
``LLAMA_NODE_KERNELS=0``; ``float32``: the exact path) the table gives whether it loads and runs, the greedy tokens
shared with llama.cpp, the mean per-token log-likelihood of a fixed text against llama.cpp's on the same file
(``bench/decode.py``'s engines and numerics), and decode tokens/s against llama.cpp's at the same threads
(interleaved runs, median).

    python bench/quant_mixes.py                          # all mixes, --dtype auto and float32, 2 threads
    python bench/quant_mixes.py --mix Q3_K_M --dtype auto --dtype auto-nokernels --repeats 5
    python bench/quant_mixes.py --make-only --out /tmp/mixes   # just write the files
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import fmt, interleaved, load_average, median, packaged_gguf, print_table, setup_logging  # noqa: E402
from decode import DEFAULT_PROMPT, LlamaCppEngine, LlamaNodeEngine, Sample, _common_prefix  # noqa: E402

log = logging.getLogger("bench.quant_mixes")

#: llama.cpp's file types, by the name ``llama-quantize`` gives them
MIXES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")


def write_source(src: Path, dst: Path) -> Path:
    """``src``'s tensors dequantised to F16 (1-D ones, the norms, F32) in a new GGUF with all of its metadata (the
    tokenizer included): llama.cpp's quantiser then starts from about the precision a converter gives it. The rows
    stay in the file's order (Q/K permuted as llama.cpp's converter left them)."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
    from gguf.quants import dequantize

    reader = GGUFReader(src)
    arch = str(reader.fields["general.architecture"].contents())
    writer = GGUFWriter(dst, arch)
    for field in reader.fields.values():
        # the writer writes these itself (the architecture in its constructor, the header counts on write)
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", "general.file_type"):
            continue
        sub = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub)
    writer.add_file_type(1)  # LLAMA_FTYPE_MOSTLY_F16
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))  # ggml lists the row length first
        w = dequantize(t.data, GGMLQuantizationType(t.tensor_type)).reshape(shape)
        writer.add_tensor(t.name, w.astype(np.float32 if len(shape) == 1 else np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def quantize(src: Path, dst: Path, mix: str, threads: int = 2) -> Path:
    """llama.cpp's quantiser: ``src`` (F16) -> ``dst`` as file type ``mix`` (one of ``MIXES``)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{mix}")
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize {src.name} -> {mix} returned {rc}")
    return dst


def make_mixes(out: Path, mixes: Sequence[str], threads: int = 2, src: Path | None = None) -> dict[str, Path]:
    """The F16 source and one file per mix under ``out`` (kept: made once, reused by later runs)."""
    out.mkdir(parents=True, exist_ok=True)
    model = src or packaged_gguf()
    source = out / f"{model.stem.split('.')[0]}.F16.gguf"
    if not source.is_file():
        log.info("writing the F16 source %s", source)
        write_source(model, source)
    files = {}
    for mix in mixes:
        files[mix] = out / f"{model.stem.split('.')[0]}.{mix}.gguf"
        if not files[mix].is_file():
            log.info("llama.cpp quantises %s -> %s", source.name, files[mix].name)
            quantize(source, files[mix], mix, threads)
    return files


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each GGUF type the file holds (its mix)."""
    from llama_shard.gguf_file import GGUFFile

    f = GGUFFile(path)
    counts: dict[str, int] = {}
    for name in f.tensor_names:
        counts[f.tensor_type(name).name] = counts.get(f.tensor_type(name).name, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


#: the text whose mean per-token log-likelihood both engines compute (teacher-forced, one token at a time)
TEXT = (
    "The lighthouse keeper woke before dawn, as he had every morning for thirty years. He climbed the spiral "
    "stairs, counted the one hundred and twelve steps out of habit, and checked the great lens for salt and "
    "dust. Outside, the sea was grey and restless, and a thin line of light was spreading along the horizon."
)


def node_log_likelihoods(path: Path, dtype: str, ids: Sequence[int], threads: int) -> list[float]:
    """llama-node's log-probability of each of ``ids[1:]``, fed one token at a time through ``run_step`` (the
    fused or eager decode step a ``run`` takes): ``auto*`` the packed load, ``float32`` the exact one."""
    import torch

    from llama_shard.batching import StepRow, cache_len, run_step
    from llama_shard.loading import load_stage, open_source
    from llama_shard.quant import QuantMode
    from llama_shard.shard import ShardSpec

    torch.set_num_threads(threads)
    source = open_source(path)
    packed = dtype.startswith("auto")
    stage = load_stage(source, ShardSpec.whole(source.config.n_layers), quantize=QuantMode.gguf if packed else None)
    cache = stage.new_cache(2, cache_len(len(ids)))
    x = torch.tensor(list(ids))
    out = []
    for i in range(len(ids) - 1):
        logits = run_step(stage, cache, [StepRow(0, i, x[i : i + 1], prefill=False)], 1)[0]
        assert logits is not None
        out.append(float(torch.log_softmax(logits.double(), -1)[ids[i + 1]]))
    return out


def _node_env(dtype: str) -> dict[str, str]:
    """``auto-nokernels``: the packed load without the native kernels (torch's int4 kernel, bf16 elsewhere)."""
    return {**os.environ, "LLAMA_NODE_KERNELS": "0"} if dtype == "auto-nokernels" else dict(os.environ)


def _node_ll_child(path: Path, dtype: str, ids: Sequence[int], threads: int) -> list[float] | str:
    """``node_log_likelihoods`` in a fresh process (the kernels' switch is read once per process); the error's last
    line when it fails."""
    argv = [sys.executable, __file__, "--ll-child", str(path), dtype, json.dumps(list(ids)), "--threads", str(threads)]
    proc = subprocess.run(argv, capture_output=True, text=True, env=_node_env(dtype), check=False, timeout=1800)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        return lines[-1] if lines else f"exit {proc.returncode}"
    return [float(v) for v in json.loads(proc.stdout.strip().splitlines()[-1])]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def run_mix(mix: str, path: Path, args: argparse.Namespace) -> list[list[str]]:
    """The table's rows for one file: one per llama-node dtype, then llama.cpp's."""
    from llama_shard.loading import load_tokenizer, open_source

    ids = load_tokenizer(open_source(path)).encode(TEXT)
    prompt_ids = load_tokenizer(open_source(path)).encode(DEFAULT_PROMPT)
    cpp = LlamaCppEngine(path, args.threads, n_ctx=512)
    cpp_lp = cpp.log_likelihoods(ids)
    node_lp = {d: _node_ll_child(path, d, ids, args.threads) for d in args.dtype}
    engines: dict[str, LlamaNodeEngine] = {}
    for d in args.dtype:
        engines[d] = LlamaNodeEngine(
            path, args.threads, d.removesuffix("-nokernels"), DEFAULT_PROMPT, args.max_tokens, 900
        )
        engines[d].env = _node_env(d)

    def attempt(engine: LlamaNodeEngine) -> Sample | str:
        try:
            return engine.generate()
        except RuntimeError as e:  # one failing path is a row of the table, not the end of the bench
            return str(e).strip().splitlines()[-1]

    tasks: dict[str, Any] = {d: (lambda e=e: attempt(e)) for d, e in engines.items()}
    tasks["llama.cpp"] = lambda: cpp.generate(prompt_ids, args.max_tokens)
    runs = interleaved(tasks, args.repeats, warmup=1)
    ref = runs["llama.cpp"]
    ref_speed = median(s.decode_tokens_per_s for s in ref)
    kinds = ", ".join(f"{k} {n}" for k, n in tensor_types(path).items())
    rows = []
    for d in args.dtype:
        samples, lp = runs[d], node_lp[d]
        failed = next((s for s in samples if isinstance(s, str)), lp if isinstance(lp, str) else None)
        if failed is not None:
            rows.append([mix, d, f"fails: {failed[:80]}", "", "", "", "", "", kinds])
            continue
        ok = [s for s in samples if isinstance(s, Sample)]
        if ok[0].prompt_ids != prompt_ids:
            log.warning("%s %s: llama-node's prompt ids differ from the tokenizer's here", mix, d)
        assert not isinstance(lp, str)
        speed = median(s.decode_tokens_per_s for s in ok)
        diff = [a - b for a, b in zip(lp, cpp_lp, strict=True)]
        rows.append([
            mix, d, "yes", f"{_common_prefix(ok[0].token_ids, ref[0].token_ids)}/{args.max_tokens}",
            f"{_mean(lp):.4f}", f"{_mean(diff):+.4f}", f"{max(abs(v) for v in diff):.3f}",
            f"{fmt(speed)} ({fmt(speed / ref_speed, 2, 'x')})", kinds,
        ])  # fmt: skip
    rows.append([mix, "llama.cpp", "yes", "—", f"{_mean(cpp_lp):.4f}", "", "", fmt(ref_speed), kinds])
    return rows


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mix", action="append", choices=MIXES, help="file types to make and run (default all)")
    p.add_argument(
        "--dtype",
        action="append",
        choices=["auto", "auto-nokernels", "float32"],
        help="llama-node paths (default auto and float32)",
    )
    p.add_argument("--out", type=Path, default=Path("bench/out/mixes"), help="where the files are kept")
    p.add_argument("--threads", type=int, default=2, help="threads of both engines (default 2)")
    p.add_argument("--max-tokens", type=int, default=32, help="greedy tokens per run (default 32)")
    p.add_argument("--repeats", type=int, default=3, help="kept interleaved runs per engine (default 3)")
    p.add_argument("--make-only", action="store_true", help="write the files, run nothing")
    p.add_argument("--ll-child", nargs=3, metavar=("GGUF", "DTYPE", "IDS"), help=argparse.SUPPRESS)
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    args.mix = list(dict.fromkeys(args.mix or MIXES))
    args.dtype = list(dict.fromkeys(args.dtype or ["auto", "float32"]))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    if args.ll_child:
        path, dtype, ids = args.ll_child
        print(json.dumps(node_log_likelihoods(Path(path), dtype, json.loads(ids), args.threads)))
        return 0
    files = make_mixes(args.out, args.mix, args.threads)
    for mix, path in files.items():
        log.info("%s: %s", mix, tensor_types(path))
    if args.make_only:
        return 0
    load_before = load_average()
    rows = [row for mix, path in files.items() for row in run_mix(mix, path, args)]
    columns = ["file", "llama-node", "runs", "greedy = llama.cpp", "mean log-lik", "- llama.cpp", "max |Δ|",
               "decode tok/s (÷ llama.cpp)", "tensor types"]  # fmt: skip
    caption = (
        f"{args.threads} threads; greedy: common prefix of {args.max_tokens} tokens after a ~128-token prompt; "
        f"log-lik: mean over the tokens of a fixed text, fed one at a time; decode: median of {args.repeats} "
        f"interleaved runs; load average {fmt(load_before, 1)} before, {fmt(load_average(), 1)} after"
    )
    print_table("llama.cpp's quant mixes in llama-node", columns, rows, caption=caption)
    return 0


if __name__ == "__main__":
    sys.exit(main())
