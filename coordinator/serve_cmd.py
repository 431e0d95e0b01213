"""``llama-node serve``: the coordinator's HTTP server (OpenAI- and Ollama-compatible), with continuous batching.

``MODEL`` is a path (``.gguf`` or an HF directory), a name from the local Ollama store or HF cache
(``llama3.1:70b``, ``HuggingFaceTB/SmolLM2-135M-Instruct``), or nothing for the embedded SmolLM2. Where the layers run:

- by default, on the nodes that join this coordinator (``llama-node join``, found by mDNS or ``--peer``): it keeps a
  cluster CA in ``--state-dir``, advertises itself by mDNS, prints the ``llama-node join --token …`` line, and
  plans, loads and serves once nodes are there (re-planning when more join). Until then the API answers 503;
- with ``--nodes N``, on N local node processes (one machine, no set-up);
- with ``--local``, in this process, in a worker thread.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from coordinator.cluster_defaults import DEFAULT_JOIN_PORT, DEFAULT_STATE_DIR
from coordinator.run_cmd import DType

if TYPE_CHECKING:
    import torch

    from coordinator.api.backend import Backend, ModelInfo
    from coordinator.scheduler import StepExecutor
    from llama_shard.loading import WeightSource
    from llama_shard.quant import QuantMode

log = logging.getLogger(__name__)

EMBEDDED_ALIASES = frozenset({"smollm2", "smollm2:135m", "smollm2:135m-instruct", "smollm2-135m-instruct"})


def serve_command(
    model: str | None = typer.Argument(None, help="path, local Ollama/HF name, or nothing for embedded SmolLM2"),
    port: int = typer.Option(11434, "--port", min=0, max=65535),
    host: str = typer.Option("127.0.0.1", "--host", help="bind address; 0.0.0.0 serves the LAN"),
    nodes: int = typer.Option(0, "--nodes", min=0, help="run the layers on N local node processes"),
    local: bool = typer.Option(False, "--local", help="run the model in this process (no nodes)"),
    peer: list[str] = typer.Option(
        [], "--peer", help="HOST:PORT of a node, for networks without multicast (repeatable)"
    ),  # fmt: skip
    insecure: bool = typer.Option(False, "--insecure", help="no TLS, no token: ONLY for trusted test networks"),
    state_dir: Path = typer.Option(DEFAULT_STATE_DIR, "--state-dir", help="cluster CA, token and caches"),
    join_port: int = typer.Option(DEFAULT_JOIN_PORT, "--join-port", min=0, max=65535, help="port nodes join at"),
    join_host: str = typer.Option("0.0.0.0", "--join-host", help="address the join endpoint listens on"),
    min_nodes: int = typer.Option(1, "--min-nodes", min=1, help="plan once this many nodes are known"),
    no_mdns: bool = typer.Option(False, "--no-mdns", help="neither advertise nor browse by mDNS (use --peer)"),
    api_key: str | None = typer.Option(None, "--api-key", help="require 'Authorization: Bearer KEY'"),
    context: int = typer.Option(2048, "--context", min=16, help="tokens per request (prompt + answer)"),
    slots: int = typer.Option(16, "--slots", min=1, help="requests decoded at once (one KV slot each)"),
    kv_budget_mb: int = typer.Option(2048, "--kv-budget-mb", min=1, help="KV cache memory; caps --slots"),
    max_queue: int | None = typer.Option(None, "--max-queue", min=0, help="waiting requests (default 4 x slots)"),
    prefill_chunk: int = typer.Option(32, "--prefill-chunk", min=1, help="prompt tokens per step"),
    threads: int | None = typer.Option(None, "--threads", min=1, help="torch threads (default: all cores)"),
    dtype: DType = typer.Option(
        DType.auto, "--dtype", help="auto: a GGUF's blocks stay packed (on the nodes too); float32: the exact path"
    ),
    micro_batches: int = typer.Option(
        0, "--micro-batches", min=0, help="with --nodes: frames in flight (0: one per stage, at most one per core)"
    ),
) -> None:
    """Serve a model over HTTP: OpenAI /v1 and Ollama /api, many requests batched together.

    By default the layers run on the nodes that join (`llama-node join`, the line it prints); --nodes N runs N local
    node processes instead, --local runs the model in this process.
    """
    import uvicorn

    from coordinator.api.app import create_app
    from coordinator.api.backend import Backend
    from coordinator.pipeline.local import weight_mode
    from coordinator.scheduler import Scheduler
    from llama_shard.errors import LlamaShardError
    from llama_shard.loading import load_tokenizer, open_source

    if nodes and local:
        raise typer.BadParameter("--nodes and --local exclude each other")
    if (nodes or local) and (peer or insecure or no_mdns or min_nodes != 1):
        raise typer.BadParameter("--peer, --insecure, --no-mdns and --min-nodes are for serving over joined nodes, "
                                 "not with --nodes or --local")  # fmt: skip
    try:
        path, name = resolve_served_model(model)
        source = open_source(path)
        tokenizer = load_tokenizer(source)
        max_len = min(context, source.config.max_seq_len)
        n_slots = min(slots, max(1, kv_budget_mb * 2**20 // kv_bytes_per_slot(source, max_len)))
        if n_slots < slots:
            log.warning("--kv-budget-mb %d holds %d slots of %d tokens, not %d", kv_budget_mb, n_slots, max_len, slots)
        info = model_info(source, path, name, model)
        mode = weight_mode(path, dtype.value)
        log.info("weights: %s", f"{mode} (packed)" if mode else f"dense {dtype.value}")
        backend: Backend
        if nodes or local:
            executor: StepExecutor
            if nodes:
                from coordinator.pipeline_executor import PipelineExecutor

                executor = PipelineExecutor(path, nodes, n_slots, max_len, threads=threads or 1, quantize=mode,
                                            dtype=_torch_dtype(dtype), depth=micro_batches or None)  # fmt: skip
            else:
                executor = _local_executor(source, n_slots, max_len, threads, mode, dtype)
            scheduler = Scheduler(executor, max_queue=max_queue, prefill_chunk=prefill_chunk)
            backend = Backend(info, tokenizer, max_len, scheduler)
        else:
            from coordinator.cluster_cmd import ClusterFlags, serve_cluster_backend

            flags = ClusterFlags(peer, insecure, state_dir, join_port, join_host, min_nodes, no_mdns, quantize=mode)
            backend = serve_cluster_backend(path, info, tokenizer, flags, n_slots, max_len, max_queue, prefill_chunk)
    except LlamaShardError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(code=2) from None
    app = create_app(backend, api_key=api_key)
    log.info("serving %s on http://%s:%d (%d slots x %d tokens)", info.name, host, port, n_slots, max_len)
    uvicorn.run(app, host=host, port=port, log_config=None, access_log=False, timeout_graceful_shutdown=5)


def resolve_served_model(model: str | None) -> tuple[Path, str]:
    """The model's path and the name it is served under."""
    from llama_shard.errors import ModelFormatError

    if model is None:
        from llama_shard.embedded import smollm2_gguf_path

        path = smollm2_gguf_path()
        return path, path.stem
    path = Path(model).expanduser()
    if path.exists():
        return path, path.stem if path.is_file() else path.name
    from coordinator.models_store import find_model, list_local_models

    models = list_local_models()
    found = find_model(model, models)
    if found is None:
        names = ", ".join(m.name for m in models[:12]) or "none"
        raise ModelFormatError(
            f"{model!r} is neither a file nor a model in the local Ollama store or Hugging Face cache (found: {names})"
        )
    log.info("%s is %s from the %s store", model, found.path, found.source)
    return found.path, found.name


def kv_bytes_per_slot(source: WeightSource, max_len: int) -> int:
    c = source.config
    return 2 * c.n_layers * max_len * c.n_kv_heads * c.head_dim * 4  # fp32 keys and values


def model_info(source: WeightSource, path: Path, name: str, requested: str | None) -> ModelInfo:
    from coordinator.api.backend import ModelInfo

    c = source.config
    attn = c.dim * c.n_heads * c.head_dim * 2 + c.dim * c.n_kv_heads * c.head_dim * 2
    params = (
        c.n_layers * (attn + 3 * c.dim * c.ffn_dim + 2 * c.dim)
        + c.vocab_size * c.dim * (1 if c.tie_embeddings else 2)
        + c.dim
    )
    if path.is_file():
        size, fmt = path.stat().st_size, "gguf"
    else:
        size, fmt = sum(f.stat().st_size for f in path.glob("*.safetensors")), "safetensors"
    aliases = {path.name, str(path), name}
    if requested:
        aliases.add(requested)
    if requested is None:
        aliases |= EMBEDDED_ALIASES
    return ModelInfo(
        name=name,
        aliases=frozenset(aliases),
        path=str(path),
        format=fmt,
        family=c.arch,
        parameter_count=params,
        size_bytes=size,
        quantization=_quantization(source),
        context_length=c.max_seq_len,
        modified_at=path.stat().st_mtime if path.exists() else time.time(),
    )


def _quantization(source: WeightSource) -> str:
    from llama_shard.loading import GGUFSource

    if isinstance(source, GGUFSource):
        file_type = source.gguf.metadata.get("general.file_type")
        try:
            import gguf

            return str(gguf.LlamaFileType(int(str(file_type))).name).removeprefix("MOSTLY_")
        except ValueError:
            return "unknown"
    return "F32"


def _torch_dtype(dtype: DType) -> torch.dtype:
    import torch

    return {DType.bfloat16: torch.bfloat16, DType.float16: torch.float16}.get(dtype, torch.float32)


def _local_executor(
    source: WeightSource, n_slots: int, max_len: int, threads: int | None, mode: QuantMode | None, dtype: DType
) -> StepExecutor:
    import torch

    from coordinator.local_executor import LocalExecutor
    from llama_shard.loading import load_stage
    from llama_shard.shard import ShardSpec

    if threads is not None:
        torch.set_num_threads(threads)
    spec = ShardSpec.whole(source.config.n_layers)
    stage = load_stage(source, spec, dtype=_torch_dtype(dtype), quantize=mode)
    return LocalExecutor(stage, n_slots, max_len)
