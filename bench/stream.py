"""Coordinator → node weight streaming over a shaped 1 Gbit/s link, against raw TCP on the same link; node RSS.

Needs root (network namespaces, ``tc``). The nodes run in a network namespace joined to this one by a veth pair
shaped with ``tc tbf`` in both directions. In one run:

- raw TCP: bytes sent through one socket to a sink in the namespace, timed until the sink acknowledges them;
- streaming: each node is asked to load its slice by push (LoadShard → AWAITING_BYTES → PushSlice); MB/s is the
  slice's bytes over the PushSlice call (it ends once the node has verified every tensor's sha256);
- memory: each node's peak RSS (VmHWM) after loading and decoding, over its slice bytes + its KV cache bytes + the
  RSS of the same node idle (goal <= 1.15).

    sudo python bench/stream.py                    # embedded SmolLM2, 2 nodes, 1 Gbit/s
    sudo python bench/stream.py --nodes 1 --rate 100mbit --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("bench.stream")

NS, HOST_IF, NS_IF = "llnbench", "llnb0", "llnb1"
HOST_IP, NS_IP = "10.78.0.1", "10.78.0.2"
SINK = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(1); print("ready", flush=True)
c, _ = s.accept(); total = int(c.recv(32).decode().strip()); got = 0
while got < total:
    got += len(c.recv(1 << 20))
c.sendall(b"k"); c.close()
"""


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True)


def setup_link(rate: str) -> None:
    teardown_link()
    sh("ip", "netns", "add", NS)
    sh("ip", "link", "add", HOST_IF, "type", "veth", "peer", "name", NS_IF)
    sh("ip", "link", "set", NS_IF, "netns", NS)
    sh("ip", "addr", "add", f"{HOST_IP}/24", "dev", HOST_IF)
    sh("ip", "link", "set", HOST_IF, "up")
    for args in (
        ["addr", "add", f"{NS_IP}/24", "dev", NS_IF],
        ["link", "set", NS_IF, "up"],
        ["link", "set", "lo", "up"],
    ):
        sh("ip", "netns", "exec", NS, "ip", *args)
    tbf = ["root", "tbf", "rate", rate, "burst", "256kb", "latency", "50ms"]
    sh("tc", "qdisc", "add", "dev", HOST_IF, *tbf)
    sh("ip", "netns", "exec", NS, "tc", "qdisc", "add", "dev", NS_IF, *tbf)


def teardown_link() -> None:
    subprocess.run(["ip", "netns", "del", NS], capture_output=True)
    subprocess.run(["ip", "link", "del", HOST_IF], capture_output=True)


def raw_tcp_mb_s(nbytes: int, port: int = 5999) -> float:
    sink = subprocess.Popen(["ip", "netns", "exec", NS, sys.executable, "-c", SINK, NS_IP, str(port)],
                            stdout=subprocess.PIPE)  # fmt: skip
    assert sink.stdout is not None
    sink.stdout.readline()
    block = os.urandom(1 << 20)
    with socket.create_connection((NS_IP, port)) as s:
        s.sendall(f"{nbytes:<32}".encode())
        t0 = time.perf_counter()
        sent = 0
        while sent < nbytes:
            n = min(len(block), nbytes - sent)
            s.sendall(block[:n])
            sent += n
        s.recv(1)
        elapsed = time.perf_counter() - t0
    sink.wait(10)
    return nbytes / elapsed / 1e6


def proc_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def start_nodes(n: int, tmp: Path) -> tuple[list[subprocess.Popen[bytes]], list[str]]:
    procs, addresses = [], []
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    for i in range(n):
        port_file = tmp / f"n{i}.port"
        cmd = ["ip", "netns", "exec", NS, sys.executable, "-m", "node", "--host", NS_IP, "--port", "0",
               "--port-file", str(port_file), "--cache-dir", str(tmp / f"cache{i}"),
               "--log-level", "WARNING"]  # fmt: skip
        procs.append(subprocess.Popen(cmd, env=env))
    for i in range(n):
        port_file = tmp / f"n{i}.port"
        while not port_file.exists():
            time.sleep(0.05)
        addresses.append(f"{NS_IP}:{int(port_file.read_text())}")
    return procs, addresses


async def stream_and_load(model: Path, addresses: list[str], pids: list[int], max_len: int) -> list[dict[str, Any]]:
    import torch

    from coordinator.pipeline.client import NodeClient, PipelineClient
    from coordinator.pipeline.weights import SliceCatalog
    from llama_shard.loading import open_source
    from llama_shard.sampling import SamplingParams
    from llama_shard.shard import split_evenly
    from node.wire import LoadRequest, RowInput
    from protos.llama_node.v1 import node_pb2 as pb

    source = open_source(model)
    config = source.config
    specs = split_evenly(config.n_layers, len(addresses))
    catalog = SliceCatalog(Path(tempfile.mkdtemp(prefix="llnb-catalog-")))
    clients = [NodeClient(a) for a in addresses]
    for c in clients:
        await c.health()
    idle = [proc_kb(pid, "VmRSS") * 1024 for pid in pids]
    rows: list[dict[str, Any]] = []
    for client, spec, pid, idle_rss in zip(clients, specs, pids, idle, strict=True):
        manifest = await asyncio.to_thread(catalog.manifest, model, source, spec, blob=True)
        req = LoadRequest(model.name, spec, config, manifest, None, max_len=max_len)
        first = await client.load(req)
        assert first.state == pb.LoadProgress.AWAITING_BYTES, first
        t0 = time.perf_counter()
        reply = await client.push(catalog.blob_path(manifest), manifest, 0)
        push_s = time.perf_counter() - t0
        assert reply.complete
        final = await client.load(req)
        assert final.state == pb.LoadProgress.READY and final.from_cache
        kv = 2 * len(spec.layers) * max_len * config.n_kv_heads * config.head_dim * torch.float32.itemsize
        rows.append({"spec": str(spec), "slice_mb": manifest.nbytes / 1e6, "push_s": push_s,
                     "mb_s": manifest.nbytes / push_s / 1e6, "kv_mb": kv / 1e6, "idle_rss_mb": idle_rss / 1e6,
                     "pid": pid})  # fmt: skip
    pipe = PipelineClient(addresses)
    await pipe.open()
    (out,) = await pipe.forward([RowInput(1, 0, 0, tuple(range(1, 33)), SamplingParams())])
    for i in range(16):
        (out,) = await pipe.forward([RowInput(1, 0, 32 + i, (out.token,), SamplingParams())])
    await pipe.close()
    for row in rows:
        peak = proc_kb(int(row["pid"]), "VmHWM") * 1024 / 1e6
        row["peak_rss_mb"] = peak
        row["rss_ratio"] = peak / (row["slice_mb"] + row["kv_mb"] + row["idle_rss_mb"])
    for c in clients:
        await c.close()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help=".gguf or HF directory (default: embedded SmolLM2)")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--rate", default="1gbit", help="tc rate of the link (each direction)")
    parser.add_argument("--max-len", type=int, default=2048, help="KV cache length per node")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    if os.geteuid() != 0:
        log.error("needs root: network namespaces and tc")
        return 2
    if args.model is None:
        from llama_shard.embedded import smollm2_gguf_path

        model = smollm2_gguf_path()
    else:
        model = Path(args.model)
    setup_link(args.rate)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="llnb-") as tmp:
            procs, addresses = start_nodes(args.nodes, Path(tmp))
            rows = asyncio.run(stream_and_load(model, addresses, [p.pid for p in procs], args.max_len))
            raw = raw_tcp_mb_s(int(max(r["slice_mb"] for r in rows) * 1e6))
            for p in procs:
                p.terminate()
                p.wait(10)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        teardown_link()
    _report(model.name, args, raw, rows)
    return 0


def _report(model: str, args: argparse.Namespace, raw: float, rows: list[dict[str, Any]]) -> None:
    if args.json:
        print(json.dumps({"model": model, "rate": args.rate, "raw_tcp_mb_s": raw,
                          "nodes": [{**r, "stream_over_raw": r["mb_s"] / raw} for r in rows]}))  # fmt: skip
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"weight streaming over a {args.rate} veth (tc tbf), {model}; raw TCP {raw:.1f} MB/s")
    cols = ("node", "slice", "slice MB", "stream MB/s", "÷ raw TCP", "KV MB", "idle RSS MB", "peak RSS MB",
            "peak ÷ (slice+KV+idle)")  # fmt: skip
    for col in cols:
        table.add_column(col, justify="right")
    for i, r in enumerate(rows):
        table.add_row(str(i), str(r["spec"]), f"{r['slice_mb']:.1f}", f"{r['mb_s']:.1f}", f"{r['mb_s'] / raw:.3f}",
                      f"{r['kv_mb']:.1f}", f"{r['idle_rss_mb']:.1f}", f"{r['peak_rss_mb']:.1f}",
                      f"{r['rss_ratio']:.3f}")  # fmt: skip
    Console().print(table)


if __name__ == "__main__":
    sys.exit(main())
