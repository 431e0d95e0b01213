"""``llama-node run`` as a user runs it: a real process, its stdout, stderr and exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llama_shard.embedded import smollm2_gguf_path

CLI = [str(Path(sys.executable).with_name("llama-node"))]


def run_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*CLI, "run", *args], capture_output=True, text=True, timeout=timeout, env=env)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], needle: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_json_output_is_one_object_with_the_fields() -> None:
    proc = run_cli("--prompt", "What is 2+2?", "--max-tokens", "12", "--threads", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)  # exactly one object: json.loads refuses trailing text
    assert set(out) >= {"model", "prompt_ids", "token_ids", "text", "finish_reason"}
    assert out["model"] == smollm2_gguf_path().name
    assert 1 <= len(out["token_ids"]) <= 12 and out["finish_reason"] in ("stop", "length")
    assert out["text"].strip()
    assert out["prefill_tokens_per_s"] > 0


def test_raw_prompt_parses_special_tokens_and_adds_no_bos() -> None:
    # SmolLM2's GGUF says add_bos_token = false; <|im_start|> is id 1, "user" one ordinary token.
    proc = run_cli("--raw", "--prompt", "<|im_start|>user", "--max-tokens", "1", "--threads", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["prompt_ids"][0] == 1 and len(out["prompt_ids"]) == 2


def test_seeded_sampling_is_reproducible() -> None:
    args = ("--prompt", "Tell me a story.", "--max-tokens", "10", "--temperature", "1.0", "--seed", "42")
    first, second = (json.loads(run_cli(*args, "--threads", "1", "--json").stdout) for _ in range(2))
    assert first["token_ids"] == second["token_ids"]


def test_missing_model_path() -> None:
    assert_one_line_error(run_cli("/nonexistent/model.gguf", "--prompt", "hi"), "no such file")


def test_not_a_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(os.urandom(4096))
    assert_one_line_error(run_cli(str(bad), "--prompt", "hi"), "GGUF")


def test_truncated_gguf(tmp_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    with smollm2_gguf_path().open("rb") as f:
        cut.write_bytes(f.read(2_000_000))  # the header survives, the tensors do not
    assert_one_line_error(run_cli(str(cut), "--prompt", "hi"), "cut.gguf")


def test_unsupported_architecture(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
    assert_one_line_error(run_cli(str(tmp_path), "--prompt", "hi"), "unsupported architecture 'gpt2'")


@pytest.mark.parametrize("context", ["32"])
def test_prompt_longer_than_context(context: str) -> None:
    proc = run_cli("--prompt", "word " * 100, "--context", context, "--threads", "1")
    assert_one_line_error(proc, f"the context holds {context}")


def test_interactive_chat_keeps_the_conversation() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*CLI, "run", "--max-tokens", "6", "--threads", "1"],
        input="My name is Ada.\nWhat is my name?\n\n",
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("> ") >= 3  # two turns answered, then the empty line ends the chat
    # the second turn's prompt carries the first exchange: more prompt tokens than the first turn
    counts = [int(line.split()[2]) for line in proc.stderr.splitlines() if "prompt tokens at" in line]
    assert len(counts) == 2 and counts[1] > counts[0] + 6
