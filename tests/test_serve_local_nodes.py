"""``llama-node serve --nodes N`` is the cluster coordinator plus N local ``join`` processes: other nodes (here one
started separately, given with ``--peer``) join the same cluster and are planned in with the local ones. All real
processes on loopback, no mDNS.

Each node is capped (``--node-memory`` for the local one, ``join --memory`` for the other) so that the model needs
both; the greedy answer equals ``llama-node run --json``'s, ``llama-node status`` lists both with their layers, and
the local node process stops with ``serve``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import openai
import pytest
from typer.testing import CliRunner

from coordinator.cli import app
from coordinator.planner.loaders import load_model_profile
from llama_shard.embedded import smollm2_gguf_path
from tests.cluster_helpers import LLAMA_NODE, free_port, memory_cap_for, start_join, stop, wait_for_log

QUESTION = "What is the capital of France?"
N = 12
CONTEXT, SLOTS = 256, 4


def _gone(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_serve_nodes_plans_local_and_peer_nodes_together(tmp_path: Path) -> None:
    # arrange: the reference answer (its own process, loading meanwhile), caps that make the model need two nodes
    model = smollm2_gguf_path()
    reference = subprocess.Popen([LLAMA_NODE, "run", "-p", QUESTION, "--json", "-n", str(N), "-t", "0", "--threads",
                                  "1"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)  # fmt: skip
    cap = memory_cap_for(model, 2, CONTEXT, SLOTS, upper=8 * 10**9)
    http_port, join_port, peer_port = free_port(), free_port(), free_port()
    state, serve_log = tmp_path / "state", tmp_path / "serve.log"
    args = [LLAMA_NODE, "serve", "--port", str(http_port), "--nodes", "1", "--node-memory", str(cap), "--min-nodes",
            "2", "--peer", f"127.0.0.1:{peer_port}", "--state-dir", str(state), "--join-host", "127.0.0.1",
            "--join-port", str(join_port), "--no-mdns", "--context", str(CONTEXT), "--slots", str(SLOTS),
            "--threads", "1"]  # fmt: skip
    procs = [subprocess.Popen(args, stdout=serve_log.open("wb"), stderr=subprocess.STDOUT)]
    try:
        # act: a node on "another machine" joins with the printed token; the coordinator plans over both
        wait_for_log(serve_log, "llama-node join --token", procs[0])
        token = (state / "token").read_text().strip()
        procs.append(start_join(["--token", token, "--coordinator", f"127.0.0.1:{join_port}", "--address",
                                 "127.0.0.1", "--host", "127.0.0.1", "--port", str(peer_port), "--no-mdns", "--device",
                                 "cpu", "--memory", str(cap), "--cache-dir", str(tmp_path / "cache")],
                                tmp_path / "join.log"))  # fmt: skip
        log = wait_for_log(serve_log, "Uvicorn running", procs[0], timeout=90)
        wait_for_log(serve_log, "ready:", procs[0], timeout=90)
        oai = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused", max_retries=0)
        chat = oai.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": QUESTION}],
                                           max_tokens=N, temperature=0)  # fmt: skip
        status = subprocess.run([LLAMA_NODE, "status", "--json", "--coordinator", f"127.0.0.1:{join_port}",
                                 "--state-dir", str(state)], capture_output=True, text=True, timeout=30)  # fmt: skip
        ref_out, _ = reference.communicate(timeout=120)
        match = re.search(r"started 1 local node process\(es\) \(pids (\d+)\)", log)
        assert match, log
        local_pid = int(match.group(1))
        procs[0].terminate()
        procs[0].wait(timeout=20)
    finally:
        reference.kill()
        stop(procs)
    # assert: the same greedy text as `run`; both nodes hold layers; the local node stopped with serve
    assert reference.returncode == 0
    assert chat.choices[0].message.content == json.loads(ref_out)["text"]
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    assert data["state"] == "ready"
    nodes = sorted(data["nodes"], key=lambda n: n["layers"][0])
    assert len(nodes) == 2 and f"127.0.0.1:{peer_port}" in {n["address"] for n in nodes}
    (a0, a1), (b0, b1) = nodes[0]["layers"], nodes[1]["layers"]
    assert a0 == 0 and a1 == b0 and b1 == load_model_profile(str(model)).n_layers and 0 < a1 < b1, nodes
    assert _gone(local_pid), f"local node {local_pid} outlived serve"
    assert "Traceback" not in serve_log.read_text(errors="replace")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nodes", "2", "--local"], "--local runs the model in this process"),
        (["--node-memory", "1GB"], "give --nodes too"),
        (["--local", "--peer", "127.0.0.1:1"], "not with --local"),
        (["--nodes", "1", "--min-nodes", "3", "--no-mdns"], "none can be found"),
        (["--nodes", "1", "--node-memory", "lots"], "not a memory size"),
    ],
)
def test_bad_combinations_are_one_clear_line(args: list[str], message: str) -> None:
    # the real CLI, in this process (a fresh interpreter per case would take seconds each)
    result = CliRunner().invoke(app, ["serve", *args])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert result.output.startswith("error: ") and message in result.output and result.output.count("\n") == 1
