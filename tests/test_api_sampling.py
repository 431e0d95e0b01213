"""Sampling parameters through the API, with the official ``openai`` client: the app in process, serving a tiny
random Llama on the in-process executor (``serve --local``). Its greedy answer falls into a loop; OpenAI's frequency
and presence penalties and Ollama's repeat/presence/frequency penalties change it, and the answer equals ``generate``
with the same ``SamplingParams`` (so the API passes exactly the penalties, and the window, it claims to). Seeds,
``top_k`` and ``top_p`` reach the sampler in both dialects too."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient

from coordinator.api.app import create_app
from coordinator.api.backend import Backend, ModelInfo
from coordinator.local_executor import LocalExecutor
from coordinator.scheduler import Scheduler
from llama_shard.generate import LocalEngine, generate
from llama_shard.loading import load_stage, load_tokenizer, open_source
from llama_shard.model import Stage
from llama_shard.sampling import SamplingParams
from llama_shard.shard import ShardSpec
from llama_shard.tokenizer import Tokenizer
from tests.tiny_served import serveable_tiny_llama

CONTEXT, N = 64, 24
PROMPT = "The quick brown fox"
INFO = ModelInfo("tiny", frozenset(), "/x/tiny", "safetensors", "llama", 1, 1, "F32", CONTEXT, 0.0)


@pytest.fixture(scope="module")
def served(make_hf_llama: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    source = open_source(serveable_tiny_llama(make_hf_llama(), tmp_path_factory.mktemp("penalties") / "tiny"))
    tokenizer = load_tokenizer(source)
    stage = load_stage(source, ShardSpec.whole(source.config.n_layers))
    backend = Backend(INFO, tokenizer, CONTEXT, Scheduler(LocalExecutor(stage, 2, CONTEXT)))
    with TestClient(create_app(backend)) as client:
        oai = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=client, max_retries=0)
        yield {"client": client, "oai": oai, "tokenizer": tokenizer, "stage": stage}


def _reference(served: dict[str, Any], ids: list[int], params: SamplingParams) -> str:
    stage: Stage = served["stage"]
    tokenizer: Tokenizer = served["tokenizer"]
    return generate(LocalEngine(stage, params, CONTEXT), tokenizer, ids, max_tokens=N).text


@pytest.mark.parametrize(
    ("kwargs", "params"),
    [
        ({"frequency_penalty": 0.7}, {"frequency_penalty": 0.7}),
        ({"presence_penalty": 2.0}, {"presence_penalty": 2.0}),
        ({"frequency_penalty": 0.5, "presence_penalty": -0.25}, {"frequency_penalty": 0.5, "presence_penalty": -0.25}),
    ],
)
def test_openai_penalties_change_greedy_text_as_the_sampler_defines(
    served: dict[str, Any], kwargs: dict[str, float], params: dict[str, float]
) -> None:
    # arrange
    oai: openai.OpenAI = served["oai"]
    ids = served["tokenizer"].encode(PROMPT)
    plain = oai.completions.create(model="tiny", prompt=PROMPT, temperature=0, max_tokens=N).choices[0].text
    assert plain == _reference(served, ids, SamplingParams())
    # act
    penalised = oai.completions.create(model="tiny", prompt=PROMPT, temperature=0, max_tokens=N, **kwargs)
    messages: Any = [{"role": "user", "content": PROMPT}]
    chat = oai.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=N, **kwargs)
    # assert: the text changes, and is what the sampler gives with OpenAI's window (generated tokens only)
    text = penalised.choices[0].text
    assert text != plain
    assert text == _reference(served, ids, SamplingParams(**params, penalty_start=len(ids)))
    chat_ids = served["tokenizer"].apply_chat_template(messages)
    expected_chat = _reference(served, chat_ids, SamplingParams(**params, penalty_start=len(chat_ids)))
    assert chat.choices[0].message.content == expected_chat
    again = oai.completions.create(model="tiny", prompt=PROMPT, temperature=0, max_tokens=N, **kwargs)
    assert again.choices[0].text == text  # deterministic


def test_openai_penalty_out_of_range_is_400(served: dict[str, Any]) -> None:
    oai: openai.OpenAI = served["oai"]
    for field in ("frequency_penalty", "presence_penalty"):
        for value in (2.5, -2.01):
            with pytest.raises(openai.BadRequestError, match=field):
                oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, **{field: value})  # type: ignore[arg-type]


def _ollama(served: dict[str, Any], options: dict[str, Any]) -> Any:
    client: TestClient = served["client"]
    body = {"model": "tiny", "prompt": PROMPT, "raw": True, "stream": False, "options": options}
    return client.post("/api/generate", json=body)


@pytest.mark.parametrize(
    ("options", "params"),
    [
        ({"repeat_penalty": 1.5}, {"repetition_penalty": 1.5, "penalty_last_n": 64}),  # Ollama's default window
        ({"repeat_penalty": 1.5, "repeat_last_n": 4}, {"repetition_penalty": 1.5, "penalty_last_n": 4}),
        ({"presence_penalty": 1.5, "repeat_last_n": -1}, {"presence_penalty": 1.5}),  # -1: the whole context
        ({"frequency_penalty": 0.8}, {"frequency_penalty": 0.8, "penalty_last_n": 64}),
    ],
)
def test_ollama_penalties_over_the_last_n_tokens(
    served: dict[str, Any], options: dict[str, Any], params: dict[str, Any]
) -> None:
    ids = served["tokenizer"].encode(PROMPT)
    base = {"temperature": 0, "num_predict": N}
    plain = _ollama(served, base).json()["response"]
    r = _ollama(served, {**base, **options})
    assert r.status_code == 200, r.text
    assert r.json()["response"] != plain
    assert r.json()["response"] == _reference(served, ids, SamplingParams(**params))  # prompt included: start 0
    assert _ollama(served, {**base, **options, "repeat_last_n": 0}).json()["response"] == plain  # 0: off


@pytest.mark.parametrize("options", [{"repeat_last_n": -2}, {"presence_penalty": 3}, {"repeat_penalty": 0}])
def test_ollama_bad_penalty_is_400(served: dict[str, Any], options: dict[str, Any]) -> None:
    r = _ollama(served, {"num_predict": 2, **options})
    assert r.status_code == 400 and next(iter(options)) in r.json()["error"]


def test_seed_top_k_top_p_reach_the_sampler_in_both_dialects(served: dict[str, Any]) -> None:
    oai: openai.OpenAI = served["oai"]
    ids = served["tokenizer"].encode(PROMPT)

    def openai_text(**kw: Any) -> str:
        return oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=N, **kw).choices[0].text

    def ollama_text(**options: Any) -> str:
        return str(_ollama(served, {"num_predict": N, **options}).json()["response"])

    seeded = openai_text(temperature=1.5, seed=7)
    assert seeded == openai_text(temperature=1.5, seed=7) != openai_text(temperature=1.5, seed=8)
    assert seeded == _reference(served, ids, SamplingParams(temperature=1.5, seed=7))
    assert openai_text(temperature=1.5, seed=7, top_p=0.5) == _reference(
        served, ids, SamplingParams(temperature=1.5, seed=7, top_p=0.5)
    )
    greedy = openai_text(temperature=0)
    assert openai_text(temperature=1.5, seed=7, extra_body={"top_k": 1}) == greedy  # an extension; 1 is greedy
    expected = _reference(served, ids, SamplingParams(temperature=1.2, seed=9, top_k=5, top_p=0.8))
    assert ollama_text(temperature=1.2, seed=9, top_k=5, top_p=0.8) == expected
    # Ollama's defaults (temperature 0.8, top_k 40, top_p 0.9) apply to what options leave out
    assert ollama_text(seed=9) == _reference(served, ids, SamplingParams(temperature=0.8, seed=9, top_k=40, top_p=0.9))
