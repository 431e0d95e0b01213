"""OpenAI-compatible routes: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``.

Streaming answers are server-sent events ending with ``data: [DONE]``; with ``stream_options.include_usage`` a last
chunk with empty ``choices`` carries ``usage``. ``frequency_penalty`` and ``presence_penalty`` (-2..2) follow OpenAI's
definition over the generated tokens; ``top_k``, ``min_p`` and ``repetition_penalty`` (CTRL, over prompt and answer)
are extensions. A ``model`` other than the served one is a 404: a server holds one model, loaded when it starts.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from coordinator.api.backend import Backend, TextRun, sampling_params, until_disconnected
from coordinator.api.errors import ApiError
from coordinator.api.schemas import ChatCompletionRequest, CompletionRequest, _Sampling
from coordinator.api.splice import cut_at_marks


def _sse(obj: dict[str, Any] | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


#: a delta no model writes, standing for the delta in a chunk encoded once (``_delta_events``, ``cut_at_marks``)
_MARK = "\x00delta\x00"


def _delta_events(
    chunk: Callable[[str | None, str | None], dict[str, Any]], include_usage: bool
) -> Callable[[str], bytes]:
    """``delta -> _sse(chunk(delta, None))`` (with ``"usage": null`` when asked) for non-empty deltas, the same bytes
    for a fraction of the work: a stream's delta chunks differ only in the delta, so the chunk is encoded once around
    a mark and each token's event is that encoding with the delta's JSON string in the mark's place."""

    def slow(delta: str) -> bytes:
        obj = chunk(delta, None)
        if include_usage:
            obj["usage"] = None
        return _sse(obj)

    pieces = cut_at_marks(slow(_MARK), [_MARK])
    if pieces is None:
        return slow
    head, tail = pieces

    def fast(delta: str) -> bytes:
        return head + json.dumps(delta).encode() + tail

    return fast


def _start(backend: Backend, body: _Sampling, prompt_ids: list[int], max_tokens: int | None) -> TextRun:
    room = backend.room(len(prompt_ids))
    if max_tokens is not None and max_tokens > room:
        raise ApiError(
            400,
            f"the context holds {backend.max_len} tokens; the prompt has {len(prompt_ids)} and {max_tokens} were "
            f"asked for (at most {room} can be generated)",
            param="max_tokens",
            code="context_length_exceeded",
        )
    params = sampling_params(
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        min_p=body.min_p,
        repetition_penalty=body.repetition_penalty,
        seed=body.seed,
        frequency_penalty=body.frequency_penalty,
        presence_penalty=body.presence_penalty,
        penalty_start=len(prompt_ids),  # OpenAI's penalties count the generated tokens only
    )
    return TextRun(backend, prompt_ids, params, max_tokens or room, body.stop_list())


def _usage(run: TextRun) -> dict[str, int]:
    return {
        "prompt_tokens": run.prompt_tokens,
        "completion_tokens": run.completion_tokens,
        "total_tokens": run.prompt_tokens + run.completion_tokens,
    }


def _stream(
    run: TextRun, body: _Sampling, chunk: Callable[[str | None, str | None], dict[str, Any]]
) -> StreamingResponse | None:
    """``chunk(delta, finish_reason)`` objects as server-sent events, or None when the body asks for no stream."""
    if not body.stream:
        return None
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def events() -> AsyncIterator[bytes]:
        try:
            first = chunk("", None)
            if include_usage:
                first["usage"] = None
            yield _sse(first)
            event = _delta_events(chunk, include_usage)
            async for delta in run.deltas():
                yield event(delta)
            last = chunk(None, run.finish_reason)
            if include_usage:
                last["usage"] = None
            yield _sse(last)
            if include_usage:
                tail = chunk(None, None)
                tail["choices"], tail["usage"] = [], _usage(run)
                yield _sse(tail)
        except ApiError as e:  # headers are gone: report in band, as OpenAI does
            yield _sse(e.openai_body())
        finally:
            run.cancel()
        yield _sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _complete(request: Request, run: TextRun) -> None:
    watcher = asyncio.ensure_future(until_disconnected(request.is_disconnected, run))
    try:
        await run.complete()
    finally:
        watcher.cancel()


def router(backend: Backend) -> APIRouter:
    r = APIRouter(prefix="/v1", tags=["openai"])

    @r.get("/models")
    async def list_models() -> dict[str, Any]:
        from coordinator.models_store import list_local_models

        served = backend.info
        data = [{"id": served.name, "object": "model", "created": int(served.modified_at), "owned_by": "llama-node"}]
        for m in await asyncio.to_thread(list_local_models):
            if not served.matches(m.name):
                data.append({"id": m.name, "object": "model", "created": int(m.modified_at), "owned_by": m.source})
        return {"object": "list", "data": data}

    @r.post("/chat/completions", response_model=None)
    async def chat_completions(request: Request, body: ChatCompletionRequest) -> StreamingResponse | JSONResponse:
        backend.check_model(body.model)
        if body.logprobs:
            raise ApiError(400, "logprobs are not supported", param="logprobs")
        try:
            messages = [
                {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages
            ]
        except ValueError as e:
            raise ApiError(400, str(e), param="messages") from None
        ids = backend.chat_ids(messages)
        run = _start(backend, body, ids, body.max_completion_tokens or body.max_tokens)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(delta: str | None, finish: str | None) -> dict[str, Any]:
            d: dict[str, Any] = {} if delta is None else {"content": delta}
            if delta == "":
                d["role"] = "assistant"
            return {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": body.model,
                "system_fingerprint": "llama-node",
                "choices": [{"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}],
            }

        def final() -> dict[str, Any]:
            return {
                "id": rid,
                "object": "chat.completion",
                "created": created,
                "model": body.model,
                "system_fingerprint": "llama-node",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": run.text, "refusal": None},
                        "logprobs": None,
                        "finish_reason": run.finish_reason,
                    }
                ],
                "usage": _usage(run),
            }

        return await _answer(request, run, body, chunk, final)

    @r.post("/completions", response_model=None)
    async def completions(request: Request, body: CompletionRequest) -> StreamingResponse | JSONResponse:
        backend.check_model(body.model)
        if body.logprobs:
            raise ApiError(400, "logprobs are not supported", param="logprobs")
        if body.suffix:
            raise ApiError(400, "suffix (fill-in-the-middle) is not supported", param="suffix")
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
            ids = [int(p) for p in prompt]
            backend.check_ids(ids)  # before decoding them
            prompt_text = backend.tokenizer.decode(ids)
        else:
            texts = [prompt] if isinstance(prompt, str) else [str(p) for p in prompt]
            if len(texts) != 1:
                raise ApiError(400, f"exactly one prompt per request, got {len(texts)}", param="prompt")
            prompt_text = texts[0]
            ids = backend.tokenizer.encode(prompt_text)
        run = _start(backend, body, ids, body.max_tokens if body.max_tokens is not None else None)
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        echo = prompt_text if body.echo else ""

        def chunk(delta: str | None, finish: str | None) -> dict[str, Any]:
            text = (echo if delta == "" else delta) or ""
            return {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": body.model,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
            }

        def final() -> dict[str, Any]:
            obj = chunk(echo + run.text, run.finish_reason)
            obj["usage"] = _usage(run)
            return obj

        return await _answer(request, run, body, chunk, final)

    return r


async def _answer(
    request: Request,
    run: TextRun,
    body: _Sampling,
    chunk: Callable[[str | None, str | None], dict[str, Any]],
    final: Callable[[], dict[str, Any]],
) -> StreamingResponse | JSONResponse:
    streaming = _stream(run, body, chunk)
    if streaming is not None:
        return streaming
    await _complete(request, run)
    return JSONResponse(final())
