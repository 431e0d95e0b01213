"""The HTTP API against a real ``llama-node serve --nodes 2`` (embedded SmolLM2 on 2 local node processes) with the
official ``openai`` and ``ollama`` clients, unchanged; greedy answers are compared with ``llama-node run --json``.

One server for the module; the ``run`` references start at the same time, so the model loads overlap.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

CLI = [str(Path(sys.executable).with_name("llama-node"))]
QUESTION = "What is the capital of France?"
RAW_PROMPT = "The three primary colours are"
N = 12  # tokens per answer: enough to compare, small enough for 2 shared cores
PROMPTS = [
    "Name a fruit.",
    "What is 2 + 2?",
    "Say hello in French.",
    "What colour is the sky?",
    "Name a planet.",
    "What is water made of?",
    "Who wrote Hamlet?",
    "Name a large animal.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until_up(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not come up in {timeout_s} s")


@pytest.fixture(scope="module")
def references() -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    """``llama-node run --json`` for the chat question and the raw prompt, started before the server loads; both with
    the default ``--dtype auto``: the GGUF's blocks packed, in that one process as on ``serve``'s nodes."""
    common = ["--json", "-n", str(N), "-t", "0", "--threads", "1"]
    procs = {
        "chat": subprocess.Popen([*CLI, "run", "-p", QUESTION, *common], stdout=subprocess.PIPE),
        "raw": subprocess.Popen([*CLI, "run", "--raw", "-p", RAW_PROMPT, *common], stdout=subprocess.PIPE),
    }
    yield procs
    for p in procs.values():
        p.kill()


def reference_text(references: dict[str, subprocess.Popen[bytes]], key: str) -> str:
    out, _ = references[key].communicate(timeout=300)
    assert references[key].returncode == 0
    return str(json.loads(out)["text"])


@contextlib.contextmanager
def serving(proc: subprocess.Popen[bytes], url: str) -> Iterator[str]:
    """``url`` once the ``serve`` process ``proc`` answers on it; the process is stopped on the way out."""
    try:
        wait_until_up(url + "/", proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def server(references: object) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [*CLI, "serve", "--port", str(port), "--nodes", "2", "--context", "256", "--slots", "8", "--max-queue", "2"],
        stdout=subprocess.DEVNULL,
    )
    with serving(proc, f"http://127.0.0.1:{port}") as url:
        yield url


@pytest.fixture(scope="module")
def oai(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def oll(server: str) -> ollama.Client:
    return ollama.Client(host=server)


MODEL = "smollm2"


def test_openai_chat_greedy_equals_run(oai: openai.OpenAI, references: dict[str, subprocess.Popen[bytes]]) -> None:
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": QUESTION}]
    r = oai.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=N)
    expected = reference_text(references, "chat")
    assert r.choices[0].message.content == expected
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage is not None and r.usage.completion_tokens <= N and r.usage.prompt_tokens > 5

    stream = oai.chat.completions.create(
        model=MODEL,
        messages=messages,
        temperature=0,
        max_tokens=N,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == r.usage.total_tokens


def test_openai_completion_greedy_equals_run_raw(
    oai: openai.OpenAI, references: dict[str, subprocess.Popen[bytes]]
) -> None:
    r = oai.completions.create(model=MODEL, prompt=RAW_PROMPT, temperature=0, max_tokens=N)
    assert r.choices[0].text == reference_text(references, "raw")
    streamed = "".join(
        c.choices[0].text
        for c in oai.completions.create(model=MODEL, prompt=RAW_PROMPT, temperature=0, max_tokens=N, stream=True)
    )
    assert streamed == r.choices[0].text


def test_openai_stop_string_ends_text_in_stream_and_not(oai: openai.OpenAI) -> None:
    full = oai.completions.create(model=MODEL, prompt=RAW_PROMPT, temperature=0, max_tokens=N).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), full
    cut = oai.completions.create(model=MODEL, prompt=RAW_PROMPT, temperature=0, max_tokens=N, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = oai.completions.create(
        model=MODEL, prompt=RAW_PROMPT, temperature=0, max_tokens=N, stop=[stop], stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_openai_models_and_errors(oai: openai.OpenAI) -> None:
    models = oai.models.list().data
    assert models[0].id.startswith("SmolLM2-135M-Instruct")
    with pytest.raises(openai.NotFoundError, match="not loaded"):
        oai.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="temperature"):
        oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=7)
    with pytest.raises(openai.BadRequestError, match=r"prompt has \d+ tokens but the context holds 256"):
        oai.completions.create(model=MODEL, prompt="word " * 400, max_tokens=2)


def test_ollama_client_generate_chat_and_listing(
    oll: ollama.Client, references: dict[str, subprocess.Popen[bytes]]
) -> None:
    expected = reference_text(references, "chat")
    options = {"temperature": 0, "num_predict": N}
    g = oll.generate(model=MODEL, prompt=QUESTION, options=options, stream=False)
    assert g.response == expected and g.done and g.eval_count and g.prompt_eval_count and g.total_duration
    parts = list(oll.chat(model=MODEL, messages=[{"role": "user", "content": QUESTION}], options=options, stream=True))
    assert "".join(p.message.content or "" for p in parts) == expected
    assert parts[-1].done and parts[-1].done_reason in ("stop", "length") and parts[-1].eval_duration
    assert oll.list().models[0].model is not None
    assert oll.show(MODEL).details is not None
    assert len(oll.ps().models) == 1
    with pytest.raises(ollama.ResponseError) as e:
        oll.generate(model="nope", prompt="hi")
    assert e.value.status_code == 404


def test_seed_curl_example_as_written(server: str, references: dict[str, subprocess.Popen[bytes]]) -> None:
    body = json.dumps(
        {"model": MODEL, "prompt": QUESTION, "stream": False, "options": {"temperature": 0, "num_predict": N}}
    )
    out = subprocess.run(["curl", "-s", f"{server}/api/generate", "-d", body], capture_output=True, check=True)
    assert json.loads(out.stdout)["response"] == reference_text(references, "chat")
    head = subprocess.run(["curl", "-sI", server + "/"], capture_output=True, check=True, text=True)
    assert head.stdout.startswith("HTTP/1.1 200")
    # and the seeds' body exactly, with Ollama's default sampling
    body = json.dumps(
        {"model": MODEL, "prompt": "Why is the sky blue?", "stream": False, "options": {"num_predict": 4}}
    )
    out = subprocess.run(["curl", "-s", f"{server}/api/generate", "-d", body], capture_output=True, check=True)
    assert json.loads(out.stdout)["done"] is True


async def _chat_all(server: str, prompts: list[str]) -> list[str]:
    client = openai.AsyncOpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)
    rs = await asyncio.gather(
        *(
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": p}], temperature=0, max_tokens=8
            )
            for p in prompts
        )
    )
    return [r.choices[0].message.content or "" for r in rs]


def test_eight_concurrent_prompts_equal_their_answers_alone(server: str, oai: openai.OpenAI) -> None:
    alone = [
        oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": p}], temperature=0, max_tokens=8)
        .choices[0]
        .message.content
        for p in PROMPTS
    ]
    assert len(set(alone)) > 4  # different prompts, different answers: cross-talk could not hide
    together = asyncio.run(_chat_all(server, PROMPTS))
    assert together == alone


def test_disconnect_mid_stream_frees_the_slot(server: str) -> None:
    body = {"model": MODEL, "prompt": RAW_PROMPT, "max_tokens": 200, "stream": True, "temperature": 0}
    with httpx.stream("POST", server + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        next(lines)
        next(lines)
        assert httpx.get(server + "/stats").json()["active"] == 1
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stats = httpx.get(server + "/stats").json()
        if stats["active"] == 0 and stats["free_slots"] == stats["slots"]:
            break
        time.sleep(0.2)
    assert stats["active"] == 0 and stats["free_slots"] == stats["slots"], stats
