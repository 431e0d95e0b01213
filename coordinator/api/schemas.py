"""Request bodies of the OpenAI- and Ollama-compatible routes, validated by pydantic.

Unknown fields are accepted and ignored (clients send fields of newer API versions); a known field with a bad value
is a 400 naming the field. Floats must be finite. Text must be Unicode that UTF-8 can carry: JSON's ``"\\ud800"``
escapes decode to lone surrogates, which the tokenizer (and any UTF-8 encoder) refuses, so they are a 400 here.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Finite = Annotated[float, Field(allow_inf_nan=False)]
# seeds beyond 64 bits mean nothing to the sampler; bounding them keeps the arithmetic cheap
Seed = Annotated[int, Field(ge=-(2**63), le=2**64 - 1)]


def _lone_surrogate(value: object, where: str) -> str | None:
    """The path of the first string holding a lone surrogate in ``value`` (a decoded JSON document), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _lone_surrogate(key, where) or _lone_surrogate(item, f"{where}.{key}" if where else str(key))
        if found is not None:
            return found
    return None


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _utf8(cls, data: Any) -> Any:
        where = _lone_surrogate(data, "")
        if where is not None:
            raise ValueError(f"{where or 'a field name'}: text with a lone UTF-16 surrogate is not valid Unicode")
        return data


# ---------------------------------------------------------------------------------------------------- OpenAI
class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message's text; image and audio parts are refused."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        texts = []
        for part in self.content:
            if part.type != "text":
                raise ValueError(f"content parts of type {part.type!r} are not supported (text only)")
            if part.text is None:
                raise ValueError("a content part of type 'text' needs a 'text' string")
            texts.append(part.text)
        return "".join(texts)


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str = Field(min_length=1)
    temperature: Finite | None = Field(default=None, ge=0, le=2)
    top_p: Finite | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0, le=1_000_000, description="extension: 0 disables")
    min_p: Finite | None = Field(default=None, ge=0, le=1, description="extension")
    repetition_penalty: Finite | None = Field(default=None, gt=0, le=10, description="extension")
    max_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: Seed | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1, description="only one choice per request")
    frequency_penalty: Finite | None = Field(
        default=None, ge=-2, le=2, description="logit -= count in the generated tokens x this"
    )
    presence_penalty: Finite | None = Field(
        default=None, ge=-2, le=2, description="logit -= this, for a token already generated"
    )
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError(f"at most 4 stop sequences, got {len(v)}")
        return v

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] = Field(description="one prompt: text, [text] or token ids")
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=5)
    suffix: str | None = None


# ---------------------------------------------------------------------------------------------------- Ollama
class OllamaOptions(_Body):
    temperature: Finite | None = Field(default=None, ge=0, le=100)
    top_k: int | None = Field(default=None, ge=0, le=1_000_000)
    top_p: Finite | None = Field(default=None, ge=0, le=1)
    min_p: Finite | None = Field(default=None, ge=0, le=1)
    repeat_penalty: Finite | None = Field(default=None, gt=0, le=10, description="default 1 (off)")
    repeat_last_n: int | None = Field(default=None, ge=-1, description="the penalties' window: 64; 0 off, -1 all")
    presence_penalty: Finite | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: Finite | None = Field(default=None, ge=-2, le=2)
    seed: Seed | None = None
    num_predict: int | None = Field(default=None, ge=-2, description="-1 or -2: up to the context")
    stop: list[str] | None = None
    num_ctx: int | None = Field(default=None, description="ignored: the context is fixed when the server starts")


class OllamaMessage(_Body):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None


class _OllamaBody(_Body):
    model: str = Field(min_length=1)
    stream: bool = True
    options: OllamaOptions | None = None
    format: str | dict[str, Any] | None = None
    keep_alive: str | int | float | None = Field(default=None, description="ignored: the model stays loaded")


class GenerateRequest(_OllamaBody):
    prompt: str = ""
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    raw: bool = False
    context: list[Annotated[int, Field(ge=0)]] | None = None
    images: list[str] | None = None


class ChatRequest(_OllamaBody):
    messages: list[OllamaMessage] = Field(default_factory=list)


class ShowRequest(_Body):
    model: str | None = None
    name: str | None = Field(default=None, description="older clients' spelling of model")
    verbose: bool = False

    def model_name(self) -> str:
        return self.model or self.name or ""
