"""``llama-node serve``: the coordinator's HTTP server (OpenAI- and Ollama-compatible), with continuous batching.

``MODEL`` is a path (``.gguf`` or an HF directory), a name from the local Ollama store or HF cache
(``llama3.1:70b``, ``HuggingFaceTB/SmolLM2-135M-Instruct``), or nothing for the embedded SmolLM2. Where the layers run:

- by default, on the nodes that join this coordinator (``llama-node join``, found by mDNS or ``--peer``): it keeps a
  cluster CA in ``--state-dir``, advertises itself by mDNS, prints the ``llama-node join --token …`` line, and
  plans, loads and serves once nodes are there (re-planning when more join). Until then the API answers 503;
- with ``--nodes N``, the same coordinator also starts N local ``join`` processes (one machine, no set-up): it
  answers once they are loaded, each holds a stage, and nodes that join later are planned in with them
  (``coordinator.serve_cluster``);
- with ``--local``, in this process, in a worker thread.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from coordinator.cluster_defaults import DEFAULT_JOIN_PORT, DEFAULT_STATE_DIR
from coordinator.run_cmd import DType, KVCache, kv_cache_option

if TYPE_CHECKING:
    import torch

    from coordinator.api.backend import ModelInfo
    from coordinator.scheduler import StepExecutor
    from llama_shard.loading import WeightSource
    from llama_shard.quant import QuantMode

log = logging.getLogger(__name__)

EMBEDDED_ALIASES = frozenset({"smollm2", "smollm2:135m", "smollm2:135m-instruct", "smollm2-135m-instruct"})


def serve_command(
    model: str | None = typer.Argument(None, help="path, local Ollama/HF name, or nothing for embedded SmolLM2"),
    port: int = typer.Option(11434, "--port", min=0, max=65535),
    host: str = typer.Option("127.0.0.1", "--host", help="bind address; 0.0.0.0 serves the LAN"),
    nodes: int = typer.Option(0, "--nodes", min=0, help="also start N local node processes (they join this cluster)"),
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
    threads: int | None = typer.Option(
        None, "--threads", min=1, help="torch threads: --local (default: all cores), each --nodes node (default 1)"
    ),
    dtype: DType = typer.Option(
        DType.auto, "--dtype", help="auto: a GGUF's blocks stay packed (on the nodes too); float32: the exact path"
    ),
    micro_batches: int = typer.Option(
        0, "--micro-batches", min=0, help="frames in flight (0: one per stage, local stages at most one per core)"
    ),
    node_memory: str | None = typer.Option(
        None, "--node-memory", help="with --nodes: cap on the memory each local node offers, e.g. 4GB"
    ),
    ready_timeout: float = typer.Option(600.0, "--ready-timeout", min=1, help="with --nodes: seconds to load"),
    kv_cache: KVCache | None = kv_cache_option(),
) -> None:
    """Serve a model over HTTP: OpenAI /v1 and Ollama /api, many requests batched together.

    The layers run on the nodes that join (`llama-node join`, the line it prints); --nodes N also starts N local node
    processes that join (one machine serves with no set-up; remote nodes that join later are planned in with them);
    --local runs the model in this process.
    """
    problem = bad_combination(nodes, local, peer, insecure, no_mdns, min_nodes, micro_batches, node_memory)
    if problem:
        typer.echo(f"error: {problem}", err=True)
        raise typer.Exit(code=2)
    import uvicorn

    from coordinator.api.app import create_app
    from coordinator.api.backend import Backend
    from coordinator.pipeline.local import weight_mode
    from coordinator.scheduler import Scheduler
    from coordinator.serve_cluster import ClusterFlags, ServedCluster, ServeError, serve_cluster
    from llama_shard.config import kv_cache_dtype
    from llama_shard.errors import LlamaShardError
    from llama_shard.loading import load_tokenizer, open_source

    served: ServedCluster | None = None
    try:
        path, name = resolve_served_model(model)
        source = open_source(path)
        tokenizer = load_tokenizer(source)
        max_len = min(context, source.config.max_seq_len)
        mode = weight_mode(path, dtype.value)
        half = dtype.value if dtype in (DType.bfloat16, DType.float16) and mode is None else None
        kv = kv_cache_dtype(quantised=mode is not None, compute=half or "float32",
                            requested=kv_cache.dtype_name if kv_cache is not None else None)  # fmt: skip
        n_slots = min(slots, max(1, kv_budget_mb * 2**20 // kv_bytes_per_slot(source, max_len, kv)))
        if n_slots < slots:
            log.warning("--kv-budget-mb %d holds %d slots of %d tokens, not %d", kv_budget_mb, n_slots, max_len, slots)
        info = model_info(source, path, name, model)
        log.info("weights: %s; KV cache %s", f"{mode} (packed)" if mode else f"dense {dtype.value}", kv)
        backend: Backend
        if local:
            executor = _local_executor(source, n_slots, max_len, threads, mode, dtype, kv)
            backend = Backend(info, tokenizer, max_len, Scheduler(executor, max_queue=max_queue,
                                                                  prefill_chunk=prefill_chunk))  # fmt: skip
        else:
            flags = ClusterFlags(peer, insecure, state_dir, join_port, join_host, min_nodes, no_mdns, quantize=mode,
                                 nodes=nodes, threads=threads or 1, node_memory=node_memory, kv_cache=kv,
                                 micro_batches=micro_batches, compute_dtype=half,
                                 port_fallback=bool(nodes) and join_port == DEFAULT_JOIN_PORT)  # fmt: skip
            served = serve_cluster(path, info, tokenizer, flags, n_slots, max_len, max_queue, prefill_chunk)
            backend = served.backend
            if nodes >= min_nodes:  # the local nodes are enough: answer once they are loaded
                served.wait_local_ready(ready_timeout)
    except LlamaShardError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(code=2) from None
    except (ServeError, OSError) as e:
        if served is not None:
            served.close_unserved()
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(code=4) from None
    app = create_app(backend, api_key=api_key)
    log.info("serving %s on http://%s:%d (%d slots x %d tokens)", info.name, host, port, n_slots, max_len)
    try:
        config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False,
                                timeout_graceful_shutdown=5)  # fmt: skip
        server = uvicorn.Server(config)
        try:
            if served is not None:
                served.runtime.serve(server)  # on the pipeline's event loop: a step crosses no threads
            else:
                server.run()
        except KeyboardInterrupt:  # as uvicorn.run: the SIGINT it handled is raised again once it has shut down
            pass
        if not server.started:  # as uvicorn.run: the port was taken, the app failed to start
            raise typer.Exit(code=3)
    finally:
        if served is not None:
            served.stop_local()


def bad_combination(nodes: int, local: bool, peer: list[str], insecure: bool, no_mdns: bool, min_nodes: int,
                    micro_batches: int, node_memory: str | None) -> str | None:  # fmt: skip
    """Why these options contradict each other (one line), or None when they do not."""
    from node.probe import parse_size

    if nodes and local:
        return "--nodes starts local node processes and --local runs the model in this process: give one of them"
    if local and (peer or insecure or no_mdns or min_nodes != 1 or micro_batches or node_memory):
        return ("--peer, --insecure, --no-mdns, --min-nodes, --micro-batches and --node-memory are for serving on "
                "nodes, not with --local")  # fmt: skip
    if node_memory is not None:
        if not nodes:
            return "--node-memory caps the local nodes of --nodes N; give --nodes too"
        try:
            parse_size(node_memory)
        except ValueError as e:
            return f"--node-memory: {e}"
    if min_nodes > nodes and nodes and no_mdns and not peer:
        return (f"--min-nodes {min_nodes} waits for {min_nodes - nodes} node(s) besides the {nodes} local one(s), "
                "but with --no-mdns and no --peer none can be found")  # fmt: skip
    return None


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


def kv_bytes_per_slot(source: WeightSource, max_len: int, kv_dtype: str) -> int:
    """The keys and values of one request of ``max_len`` tokens in every layer, in a ``kv_dtype`` cache."""
    return source.config.kv_bytes_per_token(kv_dtype) * max_len


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
        vocab_size=c.vocab_size,
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
    source: WeightSource,
    n_slots: int,
    max_len: int,
    threads: int | None,
    mode: QuantMode | None,
    dtype: DType,
    kv_dtype: str,
) -> StepExecutor:
    import torch

    from coordinator.local_executor import LocalExecutor
    from llama_shard.loading import load_stage
    from llama_shard.shard import ShardSpec

    if threads is not None:
        torch.set_num_threads(threads)
    spec = ShardSpec.whole(source.config.n_layers)
    stage = load_stage(source, spec, dtype=_torch_dtype(dtype), quantize=mode, kv_cache=kv_dtype)
    return LocalExecutor(stage, n_slots, max_len)
