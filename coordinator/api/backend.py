"""What the routes need from the engine: the served model, its tokenizer, and text generation over the scheduler.

``TextRun`` turns the scheduler's token ids into text deltas with the tokenizer's incremental decoder (UTF-8 split
across tokens is held back) and ``StopStrings`` (a stop string split across tokens is never shown), so the streamed
deltas always add up to the non-streamed text.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from coordinator.api.errors import ApiError

if TYPE_CHECKING:
    from coordinator.scheduler import Request, Scheduler
    from llama_shard.sampling import SamplingParams
    from llama_shard.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """How the served model is named and described in ``/v1/models``, ``/api/tags``, ``/api/show``."""

    name: str
    aliases: frozenset[str]
    path: str
    format: str  # "gguf" or "safetensors"
    family: str
    parameter_count: int
    size_bytes: int
    quantization: str
    context_length: int
    modified_at: float
    digest: str = ""
    vocab_size: int = 0  # rows of the model's embedding (0: unknown); its tokenizer may list more ids

    def matches(self, requested: str) -> bool:
        want = _norm(requested)
        return want == _norm(self.name) or want in {_norm(a) for a in self.aliases}

    @property
    def parameter_size(self) -> str:
        n = self.parameter_count
        return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def _norm(name: str) -> str:
    name = name.strip().lower()
    return name.removesuffix(":latest")


@dataclass
class Backend:
    """The served model. ``scheduler`` is None while the server waits for nodes (requests get 503)."""

    info: ModelInfo
    tokenizer: Tokenizer
    max_len: int
    scheduler: Scheduler | None = None
    started: float = field(default_factory=time.time)
    waiting_reason: str = "no node has joined yet"

    def check_model(self, requested: str, *, ollama: bool = False) -> None:
        if not self.info.matches(requested):
            msg = (
                f"model {requested!r} is not loaded; this server serves {self.info.name!r} "
                f"(start `llama-node serve {requested}` to serve another one)"
            )
            raise ApiError(404, msg, code="model_not_found", param="model")

    def ready_scheduler(self) -> Scheduler:
        if self.scheduler is None:
            raise ApiError(503, f"the model is not ready: {self.waiting_reason}", retry_after_s=5)
        return self.scheduler

    def room(self, n_prompt: int) -> int:
        """Tokens left to generate after a prompt of ``n_prompt``; 400 when the prompt does not fit."""
        if n_prompt == 0:
            raise ApiError(400, "the prompt is empty", param="prompt")
        if n_prompt >= self.max_len:
            raise ApiError(
                400,
                f"the prompt has {n_prompt} tokens but the context holds {self.max_len} "
                "(it must leave room for at least one generated token)",
                code="context_length_exceeded",
            )
        return self.max_len - n_prompt

    def check_ids(self, ids: Sequence[int], param: str | None = "prompt") -> None:
        """400 for a token id that the tokenizer or the model's embedding lacks: a prompt given as ids, an Ollama
        ``context``, or text a tokenizer with more ids than the embedding encoded (a malformed model) would
        otherwise reach the first node, which refuses the whole step it is in."""
        vocab = self.tokenizer.vocab_size
        if self.info.vocab_size:
            vocab = min(vocab, self.info.vocab_size)
        bad = next((i for i in ids if not 0 <= i < vocab), None)
        if bad is not None:
            raise ApiError(400, f"token id {bad} is outside the vocabulary of {vocab}", param=param)

    def chat_ids(self, messages: Sequence[dict[str, str]]) -> list[int]:
        from llama_shard.errors import LlamaShardError

        try:
            return self.tokenizer.apply_chat_template(messages)
        except (ValueError, LlamaShardError) as e:
            raise ApiError(400, f"the chat template rejects these messages: {e}", param="messages") from None
        except Exception as e:  # jinja2 raises its own TemplateError subclasses for malformed conversations
            raise ApiError(400, f"the chat template rejects these messages: {e}", param="messages") from None


def sampling_params(
    *,
    temperature: float,
    top_p: float | None,
    top_k: int | None,
    min_p: float | None,
    repetition_penalty: float | None,
    seed: int | None,
    frequency_penalty: float | None = None,
    presence_penalty: float | None = None,
    penalty_last_n: int = 0,
    penalty_start: int = 0,
) -> SamplingParams:
    """The sampler's parameters from a request's; None means the default (off, for the penalties).

    ``penalty_last_n`` is the window of the history the penalties look at (0: all of it) and ``penalty_start`` the
    first position frequency and presence count (OpenAI: the prompt's length, so only generated tokens count).
    """
    from llama_shard.errors import LlamaShardError
    from llama_shard.sampling import SamplingParams

    if top_p == 0:  # "only the most likely token", which is greedy
        temperature, top_p = 0.0, 1.0
    try:
        return SamplingParams(
            temperature=temperature,
            top_k=top_k or 0,
            top_p=1.0 if top_p is None else top_p,
            min_p=min_p or 0.0,
            repetition_penalty=repetition_penalty or 1.0,
            seed=SamplingParams.random_seed() if seed is None else seed % 2**63,
            frequency_penalty=frequency_penalty or 0.0,
            presence_penalty=presence_penalty or 0.0,
            penalty_last_n=min(penalty_last_n, 2**32 - 1),  # the wire's uint32; a window past any context is all
            penalty_start=penalty_start,
        )
    except LlamaShardError as e:  # the schemas bound every field; this is the sampler's own last word
        raise ApiError(400, str(e)) from None


class TextRun:
    """One generation: ``async for delta in run.deltas()``, then ``text``, ``finish_reason`` and the counts."""

    def __init__(
        self,
        backend: Backend,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        max_tokens: int,
        stop: Sequence[str] = (),
    ) -> None:
        from coordinator.scheduler import SchedulerError

        self.backend = backend
        self.scheduler = backend.ready_scheduler()
        self.prompt_ids = list(prompt_ids)
        self.stop = [s for s in stop if s]
        self.t_start = time.perf_counter()
        # grows by concatenation, quadratic but small: a 4096-token answer's copies take 1.1 ms in all (0.27 us a
        # token, 32768 tokens: 1.7 us) against ~280 us of coordinator CPU a streamed token (bench/api_overhead.py)
        self.text = ""
        self.finish_reason = "length"
        self.completion_ids: list[int] = []
        backend.check_ids(self.prompt_ids)
        try:
            self.request: Request = self.scheduler.submit(
                self.prompt_ids, params, max_tokens, backend.tokenizer.eos_ids
            )
        except SchedulerError as e:
            raise ApiError(e.status, str(e), retry_after_s=e.retry_after_s or 1) from None
        except ValueError as e:
            raise ApiError(400, str(e)) from None

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.completion_ids)

    async def deltas(self) -> AsyncIterator[str]:
        """Text as it becomes final. Raises ``ApiError`` when the request fails mid-way: ``Finished.status`` (400 for a
        row a node refused for what it carries, else 500)."""
        from llama_shard.generate import StopStrings

        tok = self.backend.tokenizer
        decoder = tok.incremental_decoder()
        stops = StopStrings(self.stop)
        try:
            async for token in self.request.tokens():
                self.completion_ids.append(token)
                if token in tok.eos_ids:
                    break
                visible, stopped = stops.push(decoder.push(token))
                if visible:
                    self.text += visible
                    yield visible
                if stopped:
                    self.finish_reason = "stop"
                    return
            finish = self.request.finish
            if finish is not None and finish.reason in ("error", "cancelled"):
                status = finish.status if finish.reason == "error" else 500
                raise ApiError(status, finish.error or "the request was cancelled by the server")
            self.finish_reason = "stop" if finish is None or finish.reason == "stop" else "length"
            visible, stopped = stops.push(decoder.flush())
            tail = visible + ("" if stopped else stops.flush())
            if stopped:
                self.finish_reason = "stop"
            if tail:
                self.text += tail
                yield tail
        finally:
            self.scheduler.cancel(self.request)  # a no-op when it already ended; frees the slot otherwise

    async def complete(self) -> str:
        async for _ in self.deltas():
            pass
        return self.text

    def cancel(self) -> None:
        self.scheduler.cancel(self.request)

    def timings_ns(self) -> dict[str, int]:
        """Ollama's timing fields, in nanoseconds."""
        r = self.request
        end = r.t_end or time.perf_counter()
        first = r.t_first or end
        admit = r.t_admit or first
        return {
            "total_duration": int((end - self.t_start) * 1e9),
            "load_duration": int((admit - self.t_start) * 1e9),  # the model is resident: this is queueing
            "prompt_eval_count": self.prompt_tokens,
            "prompt_eval_duration": int((first - admit) * 1e9),
            "eval_count": self.completion_tokens,
            "eval_duration": int((end - first) * 1e9),
        }


async def until_disconnected(is_disconnected: object, run: TextRun, interval_s: float = 0.25) -> None:
    """Cancel ``run`` when the client goes away (for non-streaming responses, where nothing else notices)."""
    check = is_disconnected
    assert callable(check)
    while not run.request.done:
        if await check():
            log.info("client went away; cancelling request %d", run.request.id)
            run.cancel()
            return
        await asyncio.sleep(interval_s)
