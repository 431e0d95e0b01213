"""``llama-node status``: the nodes the coordinator knows, from its ``Coordinator.ListNodes`` gRPC call.

The coordinator is reached on its join port (default: this machine, port 50050). A secure coordinator answers only
callers that prove its join token, over TLS pinned to its CA: on the coordinator's machine the token is read from
its state directory; from elsewhere, pass ``--token``.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from coordinator.cluster_defaults import DEFAULT_JOIN_PORT, DEFAULT_STATE_DIR


def _node_json(status: object) -> dict[str, object]:
    from protos.llama_node.v1 import cluster_pb2 as cpb

    assert isinstance(status, cpb.NodeStatus)
    d = status.node.device
    return {
        "id": status.node.node_id, "address": status.address, "device": d.kind, "device_name": d.name,
        "memory": d.memory_free, "memory_total": d.memory_total, "source": status.source,
        "layers": [status.layer_start, status.layer_end] if status.has_layers else None,
        "link_ms": status.node.link.latency_ms, "link_gbits": status.node.link.bandwidth_gbits,
    }  # fmt: skip


def fetch_status(coordinator: str, token: str | None, timeout: float = 5.0) -> dict[str, object]:
    """The coordinator's node list as JSON-ready data (``token`` None: an --insecure coordinator).

    Raises:
        grpc.RpcError: the call failed. OSError: no TLS endpoint there, or not the token's CA (``PinError``).
    """
    import grpc

    from node.identity import COORDINATOR_TLS_NAME, JoinToken, fetch_pinned_ca
    from protos.llama_node.v1 import cluster_pb2 as cpb
    from protos.llama_node.v1 import cluster_pb2_grpc as cpb_grpc

    proof = b""
    if token is None:
        channel = grpc.insecure_channel(coordinator)
    else:
        parsed = JoinToken.parse(token)
        host, _, port = coordinator.rpartition(":")
        ca = fetch_pinned_ca(host.strip("[]"), int(port), parsed.ca_sha256, timeout)
        options = [("grpc.ssl_target_name_override", COORDINATOR_TLS_NAME)]
        channel = grpc.secure_channel(coordinator, grpc.ssl_channel_credentials(ca), options=options)
        proof = parsed.purpose_proof("status")
    with channel:
        reply = cpb_grpc.CoordinatorStub(channel).ListNodes(cpb.ListNodesRequest(proof=proof), timeout=timeout)
    return {"coordinator": reply.coordinator_id, "model": reply.model, "state": reply.state,
            "nodes": [_node_json(n) for n in reply.nodes]}  # fmt: skip


def status_command(
    coordinator: str = typer.Option(
        f"127.0.0.1:{DEFAULT_JOIN_PORT}", "--coordinator", "-c", help="HOST:PORT of the coordinator's join endpoint"
    ),  # fmt: skip
    token: str | None = typer.Option(
        None, "--token", envvar="LLAMA_NODE_TOKEN", help="the cluster's join token (default: read from --state-dir)"
    ),  # fmt: skip
    state_dir: Path = typer.Option(DEFAULT_STATE_DIR, "--state-dir", help="the coordinator's state directory"),
    insecure: bool = typer.Option(False, "--insecure", help="the coordinator runs --insecure (plain text)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object with a `nodes` list"),
) -> None:
    """List the nodes the coordinator knows and the layers its plan gives each."""
    import grpc

    coordinator = coordinator.removeprefix("grpc://").removeprefix("http://").rstrip("/")
    if not insecure and token is None:
        try:
            token = (state_dir / "token").read_text().strip()
        except OSError:
            typer.echo(f"error: no token in {state_dir}; pass --token (or --insecure)", err=True)
            raise typer.Exit(2) from None
    try:
        data = fetch_status(coordinator, None if insecure else token)
    except grpc.RpcError as e:
        typer.echo(f"error: coordinator {coordinator}: {e.code().name}: {e.details()}", err=True)
        raise typer.Exit(3) from None
    except (OSError, ValueError) as e:
        typer.echo(f"error: coordinator {coordinator}: {e}", err=True)
        raise typer.Exit(3) from None
    if as_json:
        typer.echo(json.dumps(data))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"coordinator {data['coordinator']} — {data['model']} — {data['state']}")
    for col in ("id", "address", "device", "free memory", "layers", "found by"):
        table.add_column(col)
    nodes = data["nodes"]
    assert isinstance(nodes, list)
    for n in nodes:
        layers = n["layers"]
        table.add_row(n["id"], n["address"], n["device"], f"{n['memory'] / 1e9:.2f} GB",
                      f"[{layers[0]}, {layers[1]})" if layers else "none", n["source"])  # fmt: skip
    Console().print(table)
