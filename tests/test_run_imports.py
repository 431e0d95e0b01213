"""Cold start (issue #8): a plain one-process ``llama-node run`` imports none of the server/cluster stacks nor the
other commands' modules, and reads the GGUF header with ``gguf_meta`` rather than gguf-py's ``GGUFReader`` (seconds
on a 49K-token vocabulary). ``--help`` still lists every command.
"""

from __future__ import annotations

import gc
import json
import os
import re
import subprocess
import sys

import pytest

#: Packages only ``serve``/``node``/``join``/tests need; each costs 0.1-2 s to import.
SERVER_STACKS = ("fastapi", "uvicorn", "starlette", "grpc", "zeroconf", "transformers", "aiomqtt", "prometheus_client")
#: The other commands' modules (``coordinator.cli`` imports a command's module only when it is looked up); plan's
#: planner alone is ~50 ms of CPU.
OTHER_COMMANDS = (
    "coordinator.plan_cmd",
    "coordinator.planner",
    "coordinator.serve_cmd",
    "coordinator.cluster_cmd",
    "coordinator.status_cmd",
    "node.join_cmd",
    "node.node_cmd",
)
#: ``llama-node --help``'s commands, in order
ALL_COMMANDS = ["run", "plan", "node", "serve", "join", "cluster", "status"]

_PROBE = """
import atexit, gc, json, sys
full = []
gc.callbacks.append(lambda phase, info: full.append(1) if phase == "stop" and info["generation"] == 2 else None)
import gguf
def never(*args, **kwargs):
    raise AssertionError("GGUFReader used on the run path")
gguf.GGUFReader.__init__ = never
def report():
    print(len(full), file=sys.stderr)
    print(json.dumps(sorted(sys.modules)), file=sys.stderr)
atexit.register(report)
from coordinator.cli import main
sys.argv = ["llama-node", "run", "--prompt", "hi", "--max-tokens", "1", "--threads", "1"]
main()
"""


def test_plain_run_imports_no_server_stack_and_no_gguf_reader() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr
    *_, full_collections, report = proc.stderr.strip().splitlines()
    modules = set(json.loads(report))
    loaded = {m.split(".")[0] for m in modules}
    assert {"torch", "tokenizers", "llama_shard"} <= loaded  # the probe did run the model
    assert not loaded & set(SERVER_STACKS), sorted(loaded & set(SERVER_STACKS))
    assert not modules & set(OTHER_COMMANDS), sorted(modules & set(OTHER_COMMANDS))
    # torch's import and the load run with the cyclic GC paused (run_cmd.paused_gc): 3 full collections without
    assert int(full_collections) <= 1


def test_paused_gc_pauses_then_freezes_and_restores() -> None:
    from coordinator.run_cmd import paused_gc

    assert gc.isenabled()
    frozen = gc.get_freeze_count()
    try:
        with pytest.raises(RuntimeError), paused_gc():
            assert not gc.isenabled()
            raise RuntimeError("the load failed")
        assert gc.isenabled() and gc.get_freeze_count() > frozen  # back on, the survivors frozen
        gc.disable()
        with paused_gc():
            pass
        assert not gc.isenabled()  # as it was
    finally:
        gc.enable()
        gc.unfreeze()


def _cli(*args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """``llama-node ARGS`` in a fresh process; its result and the modules it had imported when it exited."""
    code = (
        "import atexit, json, sys\n"
        "atexit.register(lambda: print(json.dumps(sorted(sys.modules)), file=sys.stderr))\n"
        "from coordinator.cli import main\n"
        "main()\n"
    )
    env = {**os.environ, "COLUMNS": "200", "TERM": "dumb"}
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120, env=env)
    return proc, set(json.loads(proc.stderr.strip().splitlines()[-1]))


def test_a_command_imports_its_own_module_only() -> None:
    """``run --help`` builds the run command (its options are listed) from ``coordinator.run_cmd`` alone: no other
    command's module, no torch, no server stack. Cheap: nothing is loaded."""
    proc, modules = _cli("run", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "--prompt" in proc.stdout and "--max-tokens" in proc.stdout
    assert "coordinator.run_cmd" in modules
    assert not modules & set(OTHER_COMMANDS), sorted(modules & set(OTHER_COMMANDS))
    assert not {m.split(".")[0] for m in modules} & {"torch", *SERVER_STACKS}


def test_help_lists_every_command_in_order() -> None:
    proc, modules = _cli("--help")
    assert proc.returncode == 0, proc.stderr
    listed = proc.stdout[proc.stdout.index("Commands") :].splitlines()[1:]
    names = [m.group(1) for line in listed if (m := re.match(r"^[\s│|]*([a-z]+)\s{2,}\S", line))]
    assert names == ALL_COMMANDS, proc.stdout
    assert "torch" not in modules
