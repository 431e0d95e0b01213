"""The API's edges in process, with a real tokenizer (embedded SmolLM2) and a fake step executor: bearer keys,
form-encoded JSON under /api, validation errors as 400s in each dialect, 429 with Retry-After, 503 while waiting
for nodes; and model discovery in Ollama's store and the Hugging Face cache."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from coordinator.api.app import create_app
from coordinator.api.backend import Backend, ModelInfo
from coordinator.models_store import find_model, list_local_models
from coordinator.scheduler import RowWork, Scheduler


class SlowExecutor:
    n_slots, max_len, depth = 1, 128, 1

    async def run(self, rows: Sequence[RowWork]) -> list[int | None]:
        import asyncio

        await asyncio.sleep(0.05)
        return [200 if r.sample else None for r in rows]

    async def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def tokenizer() -> object:
    from llama_shard.embedded import smollm2_gguf_path
    from llama_shard.loading import load_tokenizer, open_source

    return load_tokenizer(open_source(smollm2_gguf_path()))


INFO = ModelInfo("tiny", frozenset({"tiny-alias"}), "/x/tiny.gguf", "gguf", "llama", 135_000_000, 1, "Q4_1", 128, 0.0)


@pytest.fixture()
def client(tokenizer: object) -> Iterator[TestClient]:
    backend = Backend(INFO, tokenizer, 128, Scheduler(SlowExecutor(), max_queue=0))  # type: ignore[arg-type]
    with TestClient(create_app(backend, api_key="sesame")) as c:
        yield c


AUTH = {"Authorization": "Bearer sesame"}


def test_api_key_is_required_everywhere_but_root(client: TestClient) -> None:
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    r = client.get("/api/tags")
    assert r.status_code == 401 and "API key" in r.json()["error"]
    assert client.get("/v1/models", headers=AUTH).json()["data"][0]["id"] == "tiny"
    assert client.get("/stats").status_code == 401 and client.get("/stats", headers=AUTH).status_code == 200
    assert client.post("/v1/completions", json={"model": "tiny", "prompt": "x"}).status_code == 401
    assert client.get("/no/such/path").status_code == 401  # nothing about the server without the key
    assert client.head("/").status_code == 200 and client.get("/").status_code == 200
    schema = client.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    assert schema["paths"]["/v1/chat/completions"]["post"]["security"] == [{"bearer": []}]
    assert schema["paths"]["/"]["get"]["security"] == []


def test_form_encoded_json_under_api_is_read_as_json(client: TestClient) -> None:
    body = json.dumps({"model": "tiny-alias", "prompt": "hi", "stream": False, "options": {"num_predict": 2}})
    r = client.post(
        "/api/generate",
        content=body,
        headers={**AUTH, "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["done"] is True and r.json()["eval_count"] == 2


@pytest.mark.parametrize(
    ("path", "body", "needle"),
    [
        ("/v1/chat/completions", {"model": "tiny", "messages": []}, "messages"),
        (
            "/v1/chat/completions",
            {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_p": 2},
            "top_p",
        ),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 500}, "at most"),
        ("/v1/completions", {"model": "tiny", "prompt": [1, 2, 99999999]}, "vocabulary"),
        ("/api/generate", {"model": "tiny", "prompt": "x", "options": {"temperature": -1}}, "temperature"),
        ("/api/chat", {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, "role"),
        ("/v1/completions", {"model": "tiny", "prompt": "x\ud800"}, "prompt: text with a lone UTF-16 surrogate"),
        ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "\udfff"}]}, "surrogate"),
        ("/api/generate", {"model": "tiny", "prompt": "hi", "system": "\ud800"}, "system: text with a lone"),
        ("/api/show", {"model": "\ud800"}, "model: text with a lone UTF-16 surrogate"),
        ("/api/show", {}, "model is required"),
        (
            "/v1/chat/completions",
            {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text"}]}]},
            "needs a 'text' string",
        ),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "frequency_penalty": 2.5}, "frequency_penalty"),
        ("/api/generate", {"model": "tiny", "prompt": "x", "options": {"repeat_last_n": -3}}, "repeat_last_n"),
    ],
)
def test_bad_fields_are_400_in_the_callers_dialect(client: TestClient, path: str, body: dict, needle: str) -> None:
    # json.dumps escapes lone surrogates as JSON allows ("\ud800"); httpx's own encoder cannot send them
    r = client.post(path, content=json.dumps(body), headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    message = r.json()["error"] if path.startswith("/api") else r.json()["error"]["message"]
    assert needle in message


def test_body_that_is_not_json_is_400(client: TestClient) -> None:
    for path in ("/api/generate", "/v1/completions"):
        r = client.post(path, content=b"{nope", headers={**AUTH, "Content-Type": "application/json"})
        assert r.status_code == 400 and "not JSON" in str(r.json()["error"]), r.text


def test_prompt_longer_than_context_names_both_numbers(client: TestClient) -> None:
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "word " * 200}, headers=AUTH)
    assert r.status_code == 400
    assert "the prompt has 201 tokens but the context holds 128" in r.json()["error"]["message"]
    for path, body in [
        ("/api/generate", {"model": "tiny", "prompt": "word " * 200, "raw": True}),
        ("/api/chat", {"model": "tiny", "messages": [{"role": "user", "content": "word " * 200}]}),
        ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "word " * 200}]}),
    ]:
        r = client.post(path, json=body, headers=AUTH)
        message = str(r.json()["error"] if path.startswith("/api") else r.json()["error"]["message"])
        assert r.status_code == 400 and re.search(r"the prompt has \d+ tokens but the context holds 128", message)


def test_busy_server_answers_429_with_retry_after(client: TestClient) -> None:
    import threading

    body = {"model": "tiny", "prompt": "x", "max_tokens": 40}
    t = threading.Thread(target=lambda: client.post("/v1/completions", json=body, headers=AUTH))
    t.start()
    import time

    deadline = time.monotonic() + 5
    while client.get("/stats", headers=AUTH).json().get("active", 0) == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    r = client.post("/v1/completions", json=body, headers=AUTH)
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    assert r.json()["error"]["type"] == "rate_limit_exceeded"
    t.join()


def test_waiting_for_nodes_is_503(tokenizer: object) -> None:
    backend = Backend(INFO, tokenizer, 128, None)  # type: ignore[arg-type]
    with TestClient(create_app(backend)) as c:
        r = c.post("/api/generate", json={"model": "tiny", "prompt": "hi"})
        assert r.status_code == 503 and "no node has joined" in r.json()["error"] and r.headers["Retry-After"]


def test_models_found_in_ollama_store_and_hf_cache(tmp_path: Path) -> None:
    ollama_root = tmp_path / "ollama"
    blob = ollama_root / "blobs" / ("sha256-" + "ab" * 32)
    blob.parent.mkdir(parents=True)
    blob.write_bytes(b"GGUF....")
    manifest = ollama_root / "manifests" / "registry.ollama.ai" / "library" / "llama3.1" / "70b"
    manifest.parent.mkdir(parents=True)
    layers = [
        {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "cd" * 32, "size": 1},
        {"mediaType": "application/vnd.ollama.image.model", "digest": "sha256:" + "ab" * 32, "size": 8},
    ]
    manifest.write_text(json.dumps({"schemaVersion": 2, "layers": layers}))
    hf_root = tmp_path / "hf"
    snap = hf_root / "models--HuggingFaceTB--SmolLM2-135M-Instruct" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (snap / "model.safetensors").write_bytes(b"x" * 10)
    (hf_root / "models--HuggingFaceTB--SmolLM2-135M-Instruct" / "refs").mkdir()
    (hf_root / "models--HuggingFaceTB--SmolLM2-135M-Instruct" / "refs" / "main").write_text("abc123")

    models = list_local_models([ollama_root, tmp_path / "missing"], [hf_root])
    assert sorted(m.name for m in models) == ["HuggingFaceTB/SmolLM2-135M-Instruct", "llama3.1:70b"]
    found = find_model("llama3.1:70b", models)
    assert found is not None and found.path == blob and found.source == "ollama"
    hf = find_model("HuggingFaceTB/SmolLM2-135M-Instruct", models)
    assert hf is not None and hf.path == snap
    assert find_model("llama3.1", models) is None  # means llama3.1:latest, which is not there


def test_ids_past_the_models_embedding_are_refused_in_every_route(tokenizer: object) -> None:
    """A model whose embedding has fewer rows than its tokenizer has ids (a malformed export): a prompt holding such
    an id, whether given as ids, as an Ollama context or as text that encodes to it, gets a 400 naming the limit,
    and never reaches the scheduler (the first node would refuse the whole step, and the requests beside it)."""
    from dataclasses import replace

    limit = 200  # ids 200.. are past this model's embedding; SmolLM2's tokenizer has 49152
    executor = SlowExecutor()
    backend = Backend(replace(INFO, vocab_size=limit), tokenizer, 128, Scheduler(executor, max_queue=0))  # type: ignore[arg-type]
    text = "hello world"  # SmolLM2 encodes it to ids past 200
    assert max(tokenizer.encode(text)) >= limit  # type: ignore[attr-defined]
    bodies = [
        ("/v1/completions", {"model": "tiny", "prompt": [1, 2, limit]}),
        ("/v1/completions", {"model": "tiny", "prompt": text}),
        ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": text}]}),
        ("/api/generate", {"model": "tiny", "prompt": "x", "context": [5, limit + 7], "stream": False}),
        ("/api/generate", {"model": "tiny", "prompt": text, "raw": True, "stream": False}),
    ]
    with TestClient(create_app(backend)) as c:
        for path, body in bodies:
            r = c.post(path, json=body)
            assert r.status_code == 400, (path, body, r.text)
            assert f"outside the vocabulary of {limit}" in r.text, r.text
        assert backend.scheduler is not None and backend.scheduler.stats()["steps"] == 0
        # ids within the embedding still run
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": [1, 2, limit - 1], "max_tokens": 1})
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("include_usage", [False, True])
def test_delta_events_are_the_bytes_of_the_encoded_chunk(include_usage: bool) -> None:
    """Each token's SSE event, made from a chunk encoded once, is byte for byte the chunk encoded anew (both routes'
    chunk shapes, deltas JSON must escape); a chunk where a field mimics the mark is encoded anew."""
    from coordinator.api.openai_routes import _MARK, _delta_events, _sse

    def completion(delta: str | None, finish: str | None) -> dict[str, object]:
        return {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
                "choices": [{"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}]}  # fmt: skip

    def chat(delta: str | None, finish: str | None) -> dict[str, object]:
        choice = {"index": 0, "delta": {"content": delta}, "finish_reason": finish}
        return {"id": "c", "model": 'x"\\é', "choices": [choice]}

    def mimic(delta: str | None, finish: str | None) -> dict[str, object]:
        return {"model": _MARK, "text": delta}

    deltas = ["Hello", " world", 'quote " and \\ back', "é中🙂", "\n\t\r", "\u2028\u0000", " </s>", "{}"]
    for chunk in (completion, chat, mimic):
        event = _delta_events(chunk, include_usage)
        for delta in deltas:
            obj = chunk(delta, None)
            if include_usage:
                obj["usage"] = None
            assert event(delta) == _sse(obj), (chunk.__name__, delta)


def test_ollama_delta_lines_are_the_bytes_of_the_encoded_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each token's NDJSON line, made from a chunk encoded once, is byte for byte the chunk encoded anew with its own
    ``created_at`` (both routes' chunk shapes, deltas and model names JSON must escape); a chunk where a field mimics
    a mark, or that holds the delta before ``created_at``, is encoded anew."""
    from coordinator.api import ollama_routes
    from coordinator.api.ollama_routes import _CREATED, _DELTA, _delta_lines

    stamps = iter(f"2026-11-24T00:00:{s:02d}.{s:06d}Z" for s in range(10_000))
    monkeypatch.setattr(ollama_routes, "_now", lambda: next(stamps))

    def generate(created: str, delta: str) -> dict[str, object]:
        return {"model": 'x"\\é', "created_at": created, "response": delta, "done": False}

    def chat(created: str, delta: str) -> dict[str, object]:
        return {"model": "tiny", "created_at": created, "message": {"role": "assistant", "content": delta},
                "done": False}  # fmt: skip

    def mimic(created: str, delta: str) -> dict[str, object]:
        return {"model": _DELTA, "created_at": created, "response": delta}

    def reversed_(created: str, delta: str) -> dict[str, object]:
        return {"response": delta, "created_at": created}

    deltas = ["Hello", " world", 'quote " and \\ back', "é中🙂", "\n\t\r", "\u2028\u0000", " </s>", "{}", _CREATED]
    for piece in (generate, chat, mimic, reversed_):
        line = _delta_lines(piece)
        for delta in deltas:
            got = line(delta)
            created = json.loads(got)["created_at"]
            assert got == (json.dumps(piece(created, delta)) + "\n").encode(), (piece.__name__, delta)
        assert len({json.loads(line(d))["created_at"] for d in deltas}) == len(deltas)  # each line its own time


@pytest.mark.parametrize("path", ["/api/generate", "/api/chat"])
def test_ollama_stream_lines_are_their_objects_encoded(client: TestClient, path: str) -> None:
    """The routes' streamed lines read back and encoded anew give the same bytes, and carry the delta."""
    body = {"model": "tiny", "options": {"num_predict": 3, "temperature": 0}}
    body |= {"prompt": "hi"} if path == "/api/generate" else {"messages": [{"role": "user", "content": "hi"}]}
    lines = client.post(path, json=body, headers=AUTH).content.splitlines(keepends=True)
    assert len(lines) == 4, lines
    for raw in lines[:-1]:
        obj = json.loads(raw)
        assert raw == (json.dumps(obj) + "\n").encode()
        assert obj["done"] is False and (obj.get("response") or obj["message"]["content"])
    assert json.loads(lines[-1])["done"] is True
