"""A real LAN in network namespaces: three `llama-node join` hosts and a coordinator host on one bridge.

The coordinator (``llama-node cluster``, the runtime ``serve`` uses) finds the nodes by mDNS alone, plans over
them, streams each its slice over mutual TLS, and answers with the same greedy tokens as one process. Then the same
with multicast dropped by nftables in every namespace, the nodes given ``--coordinator`` and the coordinator
``--peer``. Each node's ``--memory`` is capped so that the planner must use all three.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from coordinator.pki import ClusterCA
from llama_shard.generate import LocalEngine
from llama_shard.loading import load_stage, open_source
from llama_shard.sampling import SamplingParams
from llama_shard.shard import ShardSpec
from tests.cluster_helpers import LLAMA_NODE, memory_cap_for, stop, wait_for_log
from tests.netns_lan import NetnsLan, why_not_available

REASON = why_not_available()
# about 50 s each on 2 cores (four Python + torch processes start per LAN): run with `pytest -m slow`
pytestmark = [pytest.mark.slow, pytest.mark.skipif(REASON is not None, reason=REASON or "")]

PROMPT = [5, 17, 99, 3, 250, 41, 7, 300, 12, 64]
STEPS = 12
CONTEXT = 128
JOIN_PORT, NODE_PORT = 50050, 50051


@pytest.fixture(scope="module")
def model(make_hf_llama: Callable[..., Path]) -> Path:
    return make_hf_llama(num_hidden_layers=6)


@pytest.fixture(scope="module")
def expected(model: Path) -> list[int]:
    source = open_source(model)
    engine = LocalEngine(load_stage(source, ShardSpec.whole(source.config.n_layers), dtype=torch.float32),
                         SamplingParams(), CONTEXT)  # fmt: skip
    tokens = [engine.step(PROMPT, 0)]
    while len(tokens) < STEPS:
        tokens.append(engine.step([tokens[-1]], len(PROMPT) + len(tokens) - 1))
    return tokens


def run_lan(tmp: Path, model: Path, *, multicast: bool) -> tuple[dict[str, object], list[str], str, NetnsLan]:
    """Three joins and a coordinator on a fresh LAN; (coordinator's JSON, node logs, coordinator log, lan)."""
    cap = memory_cap_for(model, 3, CONTEXT, 1, upper=2 * 10**9)
    ca = ClusterCA.load_or_create(tmp / "state")
    lan = NetnsLan(4)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        coord_addr = lan.addresses[3]
        if not multicast:
            lan.drop_multicast(range(4))
        for i in range(3):
            args = [LLAMA_NODE, "join", "--token", str(ca.token), "--name", "node", "--port", str(NODE_PORT),
                    "--memory", str(cap), "--device", "cpu", "--cache-dir", str(tmp / f"cache{i}")]  # fmt: skip
            if not multicast:
                args += ["--coordinator", f"{coord_addr}:{JOIN_PORT}"]
            out = open(tmp / f"node{i}.log", "wb")  # noqa: SIM115 - lives as long as the process
            procs.append(subprocess.Popen(lan.exec_args(i, args), stdout=out, stderr=subprocess.STDOUT))
        waiting = "looking for a coordinator" if multicast else "retrying"
        for i, p in enumerate(procs):
            wait_for_log(tmp / f"node{i}.log", waiting, p, timeout=90)  # probes done, torch imported
        args = [LLAMA_NODE, "cluster", str(model), "--state-dir", str(tmp / "state"), "--min-nodes", "3",
                "--prompt-ids", ",".join(map(str, PROMPT)), "-n", str(STEPS), "--json", "--context", str(CONTEXT),
                "--ready-timeout", "150", "--join-port", str(JOIN_PORT)]  # fmt: skip
        if not multicast:
            args += [a for i in range(3) for a in ("--peer", f"{lan.addresses[i]}:{NODE_PORT}")]
        coord_log = open(tmp / "coordinator.log", "wb")  # noqa: SIM115
        coordinator = subprocess.Popen(lan.exec_args(3, args), stdout=subprocess.PIPE, stderr=coord_log)
        procs.append(coordinator)
        out_bytes, _ = coordinator.communicate(timeout=240)
        logs = [(tmp / f"node{i}.log").read_text(errors="replace") for i in range(3)]
        coord_text = (tmp / "coordinator.log").read_text(errors="replace")
        assert coordinator.returncode == 0, coord_text + "\n".join(logs)
        return json.loads(out_bytes), logs, coord_text, lan
    finally:
        stop(procs)
        if multicast:
            lan.close()


def _check(result: dict[str, object], logs: list[str], coord_log: str, expected: list[int], source: str) -> float:
    """Common assertions; the discovery time (coordinator start → all three listed), seconds."""
    nodes = result["nodes"]
    stages = result["stages"]
    assert isinstance(nodes, dict) and isinstance(stages, list)
    assert len(nodes) == 3, nodes
    assert len(set(nodes)) == 3 and all(n.startswith("node-") for n in nodes)  # same name, unique ids
    assert {n["source"] for n in nodes.values()} == {source}
    assert all(not n["address"].startswith("127.") for n in nodes.values())
    assert len(stages) == 3 and {s["node"] for s in stages} == set(nodes)
    assert result["token_ids"] == expected
    for log in logs:
        assert "joined coordinator" in log and "serving mutual TLS" in log
        assert "holding layers" in log
    assert "node list: 3 node(s)" in coord_log and "proved the token" in coord_log
    started = result["started_at"]
    assert isinstance(started, float)
    return max(n["found_at"] for n in nodes.values()) - started


def test_lan_mdns_discovery_plan_load_and_answer(tmp_path: Path, model: Path, expected: list[int]) -> None:
    t0 = time.monotonic()
    result, logs, coord_log, _ = run_lan(tmp_path, model, multicast=True)
    discovery_s = _check(result, logs, coord_log, expected, "mdns")
    for log in logs:
        assert "advertised as node-" in log and "127.0.0.1" not in log.split("advertised as")[1].split("\n")[0]
        assert "by mDNS" in log  # found the coordinator by mDNS too
    print(f"\nmDNS: all three nodes discovered {discovery_s:.2f} s after the coordinator started "
          f"(whole test {time.monotonic() - t0:.1f} s)")  # fmt: skip
    assert discovery_s < 5.0


def test_lan_multicast_dropped_with_peers(tmp_path: Path, model: Path, expected: list[int]) -> None:
    result, logs, coord_log, lan = run_lan(tmp_path, model, multicast=False)
    try:
        _check(result, logs, coord_log, expected, "peer")
        assert sum(lan.dropped_packets(i) for i in range(4)) > 0  # mDNS was tried, and really dropped
    finally:
        lan.close()
