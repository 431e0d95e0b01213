"""Text through the API in process with a scripted executor (every request gets the same token script): streamed text
equals the whole text in both dialects, with characters split across tokens and stop strings split across deltas;
``max_tokens``/``num_predict`` default to the room left in the context; Ollama's ``num_ctx`` and ``keep_alive`` are
accepted and logged."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient

from coordinator.api.app import create_app
from coordinator.api.backend import Backend, ModelInfo
from coordinator.scheduler import RowWork, Scheduler
from llama_shard.tokenizer import Tokenizer

CONTEXT = 64
TEXT = "Snow ❄️ falls on 雪山 🏔️ and then <END> more text"
INFO = ModelInfo("tiny", frozenset(), "/x/tiny.gguf", "gguf", "llama", 1, 1, "Q4_1", CONTEXT, 0.0)


class ScriptExecutor:
    """Answers the k-th sampled row of every request with ``script[k]`` (the last token repeats)."""

    n_slots, max_len, depth = 2, CONTEXT, 1

    def __init__(self, script: Sequence[int]) -> None:
        self.script, self.count = list(script), dict[int, int]()

    async def run(self, rows: Sequence[RowWork]) -> list[int | None]:
        out: list[int | None] = []
        for r in rows:
            if not r.sample:
                out.append(None)
                continue
            k = self.count.get(r.request_id, 0)
            self.count[r.request_id] = k + 1
            out.append(self.script[min(k, len(self.script) - 1)])
        return out

    async def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    from llama_shard.embedded import smollm2_gguf_path
    from llama_shard.loading import load_tokenizer, open_source

    return load_tokenizer(open_source(smollm2_gguf_path()))


def _client(tokenizer: Tokenizer, script: Sequence[int]) -> TestClient:
    return TestClient(create_app(Backend(INFO, tokenizer, CONTEXT, Scheduler(ScriptExecutor(script)))))


@pytest.fixture()
def scripted(tokenizer: Tokenizer) -> Iterator[TestClient]:
    with _client(tokenizer, [*tokenizer.encode(TEXT), min(tokenizer.eos_ids)]) as c:
        yield c


def _ollama(client: TestClient, path: str, stop: list[str], stream: bool) -> tuple[str, str]:
    body: dict[str, Any] = {"model": "tiny", "stream": stream, "options": {"stop": stop}}
    body |= {"prompt": "hi"} if path == "/api/generate" else {"messages": [{"role": "user", "content": "hi"}]}
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    lines = [json.loads(line) for line in r.text.splitlines() if line]
    pieces = [x["response"] if "response" in x else x["message"]["content"] for x in lines]
    assert all("\ufffd" not in p for p in pieces), pieces  # no half character is ever sent
    return "".join(pieces), lines[-1]["done_reason"]


@pytest.mark.parametrize(("stop", "expected"), [([], TEXT), (["<END>"], "Snow ❄️ falls on 雪山 🏔️ and then "),
                                                 (["山 🏔"], "Snow ❄️ falls on 雪")])  # fmt: skip
def test_streamed_text_equals_whole_text(scripted: TestClient, stop: list[str], expected: str) -> None:
    # the script's tokens split ❄, 雪, 山 and 🏔 into bytes, and "<END>" into " <", "END", ">"
    finish = "stop"
    oai = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=scripted, max_retries=0)
    whole = oai.completions.create(model="tiny", prompt="hi", stop=stop or None)
    chunks = [c.choices[0].text for c in oai.completions.create(model="tiny", prompt="hi", stop=stop or None,
                                                                   stream=True)]  # fmt: skip
    assert whole.choices[0].text == "".join(chunks) == expected and whole.choices[0].finish_reason == finish
    assert all("\ufffd" not in c for c in chunks), chunks
    messages: Any = [{"role": "user", "content": "hi"}]
    chat = oai.chat.completions.create(model="tiny", messages=messages, stop=stop or None)
    deltas = [c.choices[0].delta.content or "" for c in oai.chat.completions.create(model="tiny", messages=messages,
              stop=stop or None, stream=True) if c.choices]  # fmt: skip
    assert chat.choices[0].message.content == "".join(deltas) == expected
    for path in ("/api/generate", "/api/chat"):
        assert _ollama(scripted, path, stop, stream=False) == (expected, finish)
        assert _ollama(scripted, path, stop, stream=True) == (expected, finish)


def test_max_tokens_and_num_predict_default_to_the_room_left(tokenizer: Tokenizer) -> None:
    with _client(tokenizer, [tokenizer.encode(" yes")[0]]) as client:  # never an end of turn
        oai = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=client, max_retries=0)
        r = oai.completions.create(model="tiny", prompt="one two three")
        assert r.usage is not None and r.choices[0].finish_reason == "length"
        assert r.usage.completion_tokens == CONTEXT - r.usage.prompt_tokens
        c = oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
        assert c.usage is not None and c.usage.total_tokens == CONTEXT
        for options in ({}, {"num_predict": -1}, {"num_predict": -2}, {"num_predict": 1000}):
            g = client.post(
                "/api/generate", json={"model": "tiny", "prompt": "hi", "stream": False, "options": options}
            )
            assert g.json()["prompt_eval_count"] + g.json()["eval_count"] == CONTEXT, (options, g.text)
        with pytest.raises(openai.BadRequestError, match=f"the context holds {CONTEXT} tokens"):
            oai.completions.create(model="tiny", prompt="one two three", max_tokens=CONTEXT)


def test_ollama_num_ctx_and_keep_alive_are_accepted_and_logged(
    scripted: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    body = {"model": "tiny", "prompt": "hi", "stream": False, "keep_alive": "5m", "options": {"num_ctx": 8192}}
    with caplog.at_level(logging.INFO, logger="coordinator.api.ollama_routes"):
        r = scripted.post("/api/generate", json=body)
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": False, "keep_alive": 0}
        assert scripted.post("/api/chat", json=chat).status_code == 200
    assert r.status_code == 200 and r.json()["response"] == TEXT
    assert "num_ctx=8192 ignored: the context is 64 tokens" in caplog.text
    assert "keep_alive='5m' ignored" in caplog.text and "keep_alive=0 ignored" in caplog.text


def test_sse_wire_format_and_max_completion_tokens(scripted: TestClient) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "max_completion_tokens": 3, "stream_options": {"include_usage": True}}  # fmt: skip
    r = scripted.post("/v1/chat/completions", json=body)
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    whole = scripted.post("/v1/chat/completions", json={**body, "stream": False}).json()
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert whole["choices"][0]["message"]["content"] == text and whole["usage"]["completion_tokens"] == 3
    r = scripted.post("/api/chat", json={"model": "tiny", "messages": body["messages"]})  # Ollama streams by default
    assert r.headers["content-type"].startswith("application/x-ndjson") and json.loads(r.text.splitlines()[-1])["done"]
