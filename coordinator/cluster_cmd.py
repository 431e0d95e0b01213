"""``llama-node cluster``: a coordinator over joined nodes without the HTTP API — discovery, plan, load, and with
``--prompt`` one answer (then exit): for scripts and tests that want tokens without a server.

``llama-node serve`` runs the same ``ClusterRuntime`` behind its API (``coordinator.serve_cluster``) and takes the same
options (``--peer``, ``--insecure``, ``--state-dir``, ``--join-port``, ``--min-nodes``, ``--no-mdns``).
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from coordinator.cluster_defaults import DEFAULT_JOIN_PORT, DEFAULT_STATE_DIR
from coordinator.run_cmd import DType, KVCache, kv_cache_option

if TYPE_CHECKING:
    from coordinator.cluster import ClusterRuntime, ClusterSettings
    from llama_shard.quant import QuantMode

log = logging.getLogger(__name__)


def cluster_settings(model: Path, peer: list[str], insecure: bool, state_dir: Path, join_port: int,
                     min_nodes: int, context: int, no_mdns: bool = False, *, slots: int = 1,
                     join_host: str = "0.0.0.0", quantize: QuantMode | None = None,
                     kv_cache: str | None = None) -> ClusterSettings:  # fmt: skip
    """The shared settings from the flags (``serve`` calls this too)."""
    from coordinator.cluster import ClusterSettings

    return ClusterSettings(model=model, state_dir=state_dir, insecure=insecure, peers=list(peer), port=join_port,
                           min_nodes=min_nodes, context=context, mdns=not no_mdns, slots=slots,
                           host=join_host, quantize=quantize, kv_cache=kv_cache)  # fmt: skip


def announce(runtime: ClusterRuntime, insecure: bool, join_host: str = "0.0.0.0") -> None:
    """Tell the user how to add machines (stderr, so --json stays one object on stdout)."""
    from node.probe import lan_addresses

    where = lan_addresses()[:1] if join_host in ("0.0.0.0", "::", "") else [join_host]
    lines = [runtime.join_command()]
    lines += [f"{runtime.join_command(a)}    (where multicast is blocked)" for a in where]
    typer.echo("\nOn every other machine, run:\n\n    " + "\n    ".join(lines) + "\n", err=True)
    if insecure:
        typer.echo("WARNING: --insecure: no TLS and no token; anyone on this network can join.\n", err=True)


def cluster_command(
    model: str | None = typer.Argument(None, help=".gguf file or HF model directory (default: embedded SmolLM2)"),
    peer: list[str] = typer.Option(
        [], "--peer", help="HOST:PORT of a node, for networks without multicast (repeatable)"
    ),  # fmt: skip
    insecure: bool = typer.Option(False, "--insecure", help="no TLS, no token: ONLY for trusted test networks"),
    state_dir: Path = typer.Option(DEFAULT_STATE_DIR, "--state-dir", help="cluster CA, token and caches"),
    join_port: int = typer.Option(DEFAULT_JOIN_PORT, "--join-port", min=0, max=65535, help="port nodes join at"),
    min_nodes: int = typer.Option(1, "--min-nodes", min=1, help="plan once this many nodes are known"),
    context: int = typer.Option(2048, "--context", min=16, help="KV cache length per request"),
    no_mdns: bool = typer.Option(False, "--no-mdns", help="neither advertise nor browse by mDNS (use --peer)"),
    prompt: str | None = typer.Option(None, "--prompt", "-p", help="answer once when ready, then exit"),
    raw: bool = typer.Option(False, "--raw", help="tokenise the prompt as is, without the chat template"),
    prompt_ids: str | None = typer.Option(
        None,
        "--prompt-ids",
        help="answer these token ids (1,2,3) greedily, ignoring EOS: for tests and models without a tokenizer",
    ),  # fmt: skip
    max_tokens: int = typer.Option(32, "--max-tokens", "-n", min=1),
    ready_timeout: float = typer.Option(300.0, "--ready-timeout", help="with --prompt: seconds to wait for a plan"),
    as_json: bool = typer.Option(False, "--json", help="with --prompt: print one JSON object on stdout"),
    dtype: DType = typer.Option(DType.auto, "--dtype", help="auto: a GGUF's blocks stay packed; float32: exact"),
    kv_cache: KVCache | None = kv_cache_option(),
) -> None:
    """Coordinate joined nodes: print the join command, discover, plan, load (and answer --prompt)."""
    from coordinator.cluster import ClusterRuntime
    from coordinator.pipeline.local import weight_mode
    from coordinator.run_cmd import resolve_model

    path = resolve_model(model)
    settings = cluster_settings(path, peer, insecure, state_dir, join_port, min_nodes, context, no_mdns,
                                quantize=weight_mode(path, dtype.value),
                                kv_cache=kv_cache.dtype_name if kv_cache is not None else None)  # fmt: skip
    try:
        runtime = ClusterRuntime(settings)
    except OSError as e:  # the join port is taken (another coordinator?)
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    try:
        announce(runtime, insecure)
        if prompt is None and prompt_ids is None:
            stop = threading.Event()
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: stop.set())
            stop.wait()
            return
        try:
            runtime.wait_ready(ready_timeout)
        except TimeoutError:
            typer.echo(f"error: not ready after {ready_timeout:.0f} s ({runtime.cluster.state})", err=True)
            raise typer.Exit(4) from None
        if prompt_ids is not None:
            result = _answer_ids(runtime, [int(t) for t in prompt_ids.split(",")], max_tokens, context)
        else:
            assert prompt is not None
            result = _answer(runtime, path, prompt, raw, max_tokens, context)
    finally:
        runtime.close()
    if as_json:
        typer.echo(json.dumps(result))
    else:
        typer.echo(str(result.get("text", result["token_ids"])))


def _cluster_json(runtime: object) -> dict[str, object]:
    from coordinator.cluster import ClusterRuntime

    assert isinstance(runtime, ClusterRuntime)
    c = runtime.cluster
    return {"stages": [{"node": n, "address": a, "start": b, "end": e} for n, a, b, e in c.stage_nodes],
            "nodes": {r.node_id: {"address": r.address, "source": r.source, "found_at": r.found_at}
                      for r in c.registry.nodes.values()},
            "started_at": c.discovery.started_at if c.discovery else None}  # fmt: skip


def _answer_ids(runtime: object, ids: list[int], max_tokens: int, context: int) -> dict[str, object]:
    from coordinator.cluster import ClusterRuntime
    from llama_shard.sampling import SamplingParams

    assert isinstance(runtime, ClusterRuntime)
    engine = runtime.engine(SamplingParams(), context)
    tokens = [engine.step(ids, 0)]
    while len(tokens) < max_tokens:
        tokens.append(engine.step([tokens[-1]], len(ids) + len(tokens) - 1))
    return {"prompt_ids": ids, "token_ids": tokens, **_cluster_json(runtime)}


def _answer(runtime: object, path: Path, prompt: str, raw: bool, max_tokens: int, context: int) -> dict[str, object]:
    from coordinator.cluster import ClusterRuntime
    from llama_shard.generate import generate
    from llama_shard.loading import load_tokenizer, open_source
    from llama_shard.sampling import SamplingParams

    assert isinstance(runtime, ClusterRuntime)
    tokenizer = load_tokenizer(open_source(path))
    ids = tokenizer.encode(prompt) if raw else tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    result = generate(runtime.engine(SamplingParams(), context), tokenizer, ids, max_tokens=max_tokens)
    return {"prompt_ids": result.prompt_ids, "token_ids": result.token_ids, "text": result.text,
            **_cluster_json(runtime)}  # fmt: skip
