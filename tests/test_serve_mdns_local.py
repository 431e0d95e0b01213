"""``llama-node serve --nodes 1`` plans its own local node together with a node it finds by mDNS alone (no
``--peer``): a ``llama-node join`` on another host of a real LAN (network namespaces on a bridge, as in
``test_join_lan``), which itself finds the coordinator by mDNS.

Each node is capped so that the model needs both. ``llama-node status`` (the coordinator's node list) shows the
local node (found as a peer) and the remote one (found by mDNS) each holding layers, the greedy chat answer equals
``llama-node run --json``'s, and no log has a traceback.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coordinator.pki import ClusterCA
from coordinator.planner.loaders import load_model_profile
from llama_shard.embedded import smollm2_gguf_path
from tests.cluster_helpers import LLAMA_NODE, memory_cap_for, stop, wait_for_log
from tests.netns_lan import NetnsLan, why_not_available

REASON = why_not_available()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

QUESTION = "What is the capital of France?"
N = 12
CONTEXT, SLOTS = 256, 4
HTTP_PORT, JOIN_PORT, NODE_PORT = 11434, 50050, 50051

# the chat request, made from inside the coordinator's namespace (the test's own has no route to the LAN)
CHAT = """
import json, sys, urllib.request
body = {"model": "smollm2", "messages": [{"role": "user", "content": sys.argv[2]}], "max_tokens": int(sys.argv[3]),
        "temperature": 0}
req = urllib.request.Request(sys.argv[1], json.dumps(body).encode(), {"Content-Type": "application/json"})
print(json.load(urllib.request.urlopen(req, timeout=120))["choices"][0]["message"]["content"])
"""


def test_serve_nodes_plans_in_a_node_found_by_mdns(tmp_path: Path) -> None:
    # arrange: the reference answer (loading meanwhile); caps that make the model need two nodes; a two-host LAN
    t0 = time.monotonic()
    model = smollm2_gguf_path()
    reference = subprocess.Popen([LLAMA_NODE, "run", "-p", QUESTION, "--json", "-n", str(N), "-t", "0", "--threads",
                                  "1"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)  # fmt: skip
    cap = memory_cap_for(model, 2, CONTEXT, SLOTS, upper=8 * 10**9)
    state, serve_log, join_log = tmp_path / "state", tmp_path / "serve.log", tmp_path / "join.log"
    token = str(ClusterCA.load_or_create(state).token)  # what `serve` prints, given to the join before it starts
    procs: list[subprocess.Popen[bytes]] = [reference]
    with NetnsLan(2) as lan:
        try:
            # act: serve with one local node on host 0, mDNS on and no --peer; a join on host 1, mDNS only
            serve = [LLAMA_NODE, "serve", "--port", str(HTTP_PORT), "--nodes", "1", "--node-memory", str(cap),
                     "--min-nodes", "2", "--state-dir", str(state), "--join-port", str(JOIN_PORT), "--context",
                     str(CONTEXT), "--slots", str(SLOTS), "--threads", "1"]  # fmt: skip
            procs.append(subprocess.Popen(lan.exec_args(0, serve), stdout=serve_log.open("wb"),
                                          stderr=subprocess.STDOUT))  # fmt: skip
            join = [LLAMA_NODE, "join", "--token", token, "--name", "remote", "--port", str(NODE_PORT), "--memory",
                    str(cap), "--device", "cpu", "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
            procs.append(subprocess.Popen(lan.exec_args(1, join), stdout=join_log.open("wb"),
                                          stderr=subprocess.STDOUT))  # fmt: skip
            wait_for_log(serve_log, "Uvicorn running", procs[1], timeout=90)
            wait_for_log(serve_log, "ready:", procs[1], timeout=90)
            t_ready = time.monotonic() - t0
            chat = subprocess.run(lan.exec_args(0, [sys.executable, "-c", CHAT,
                                                    f"http://127.0.0.1:{HTTP_PORT}/v1/chat/completions", QUESTION,
                                                    str(N)]), capture_output=True, text=True, timeout=120)  # fmt: skip
            status = subprocess.run(lan.exec_args(0, [LLAMA_NODE, "status", "--json", "--coordinator",
                                                      f"127.0.0.1:{JOIN_PORT}", "--state-dir", str(state)]),
                                    capture_output=True, text=True, timeout=30)  # fmt: skip
            ref_out, _ = reference.communicate(timeout=120)
        finally:
            stop(procs)
    logs = {p.name: p.read_text(errors="replace") for p in (serve_log, join_log)}
    # assert: both nodes hold layers, the remote one found by mDNS; the same greedy text as `run`; no traceback
    assert chat.returncode == 0, chat.stderr + "\n".join(logs.values())
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    assert data["state"] == "ready", data
    nodes = sorted(data["nodes"], key=lambda n: n["layers"][0])
    assert len(nodes) == 2, nodes
    by_source = {n["source"]: n for n in nodes}
    assert set(by_source) == {"peer", "mdns"}, nodes  # the local node is given as a peer; the other was found
    assert by_source["mdns"]["address"] == f"{lan.addresses[1]}:{NODE_PORT}" and by_source["mdns"]["id"].startswith(
        "remote-"
    )  # fmt: skip
    assert by_source["peer"]["address"].startswith(f"{lan.addresses[0]}:")
    (a0, a1), (b0, b1) = nodes[0]["layers"], nodes[1]["layers"]
    assert a0 == 0 and a1 == b0 and b1 == load_model_profile(str(model)).n_layers and 0 < a1 < b1, nodes
    assert reference.returncode == 0
    assert chat.stdout.rstrip("\n") == json.loads(ref_out)["text"]
    assert "by mDNS" in logs["join.log"] and "holding layers" in logs["join.log"]
    for name, text in logs.items():
        assert "Traceback" not in text, f"{name}:\n{text}"
    print(f"\nserve ready {t_ready:.1f} s after the test started; whole test {time.monotonic() - t0:.1f} s")
