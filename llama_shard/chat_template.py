"""Chat templates: Jinja2 text shipped with a model, rendered the way ``transformers`` renders it.

Templates come from the Hub or from a GGUF file, i.e. they are untrusted code, so they run in Jinja's
``ImmutableSandboxedEnvironment``. The environment mirrors ``transformers.utils.chat_template_utils``:
``trim_blocks``/``lstrip_blocks``, the ``loopcontrols`` extension, a ``tojson`` that does not
HTML-escape, and the globals ``raise_exception`` and ``strftime_now``. The ``{% generation %}`` tag
(assistant-mask tracking) is accepted and renders its body unchanged.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llama_shard.errors import ModelFormatError

log = logging.getLogger(__name__)

Message = Mapping[str, Any]


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: transformers tracks assistant spans; we only render."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return str(caller())


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own ``tojson`` escapes <, >, & and ' for HTML; chat templates want the plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _plain(value: Any) -> Any:
    """A copy built only of JSON types, so the sandboxed template never sees the caller's objects."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return f"<{type(value).__name__}>"


class ChatTemplate:
    """A compiled chat template plus the special-token strings it may reference.

    Args:
        source: the Jinja2 text.
        special_tokens: template variables such as ``bos_token`` and ``eos_token`` (token text, not ids).

    Raises:
        ModelFormatError: the template does not parse.
    """

    def __init__(self, source: str, special_tokens: Mapping[str, str] | None = None) -> None:
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        try:
            self._template = _environment().from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise ModelFormatError(f"chat template does not parse: {e.message} (line {e.lineno})") from None

    def render(
        self,
        messages: Sequence[Message],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **extra: Any,
    ) -> str:
        """Render a conversation to prompt text.

        Args:
            messages: ``{"role": ..., "content": ...}`` mappings, oldest first.
            add_generation_prompt: end with the header that opens the assistant's turn.
            tools: JSON schemas of callable tools, for templates that support them.
            **extra: more template variables (they override the special tokens of the same name).

        Returns:
            The prompt text, special tokens written out as text.

        Raises:
            ValueError: a message is not a mapping, or the template itself called ``raise_exception``.
        """
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping):
                raise ValueError(f"chat message {i} is a {type(message).__name__}, not a mapping")
        variables: dict[str, Any] = dict(self.special_tokens)
        variables.update(_plain(extra))
        try:
            return self._template.render(
                messages=_plain(list(messages)),
                tools=_plain(tools),
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(f"chat template refused the conversation: {e}") from None
