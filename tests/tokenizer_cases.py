"""Texts and conversations the tokenizer tests compare against transformers, and small helpers they share."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from llama_shard.tokenizer import Tokenizer

TEXTS = [
    "Hello, world!", "The quick brown fox jumps over the lazy dog.",
    "日本語のテキストと中文字符、한국어 텍스트", "emoji 🎉🚀 family 👩‍👩‍👧‍👦 flag 🇫🇷 skin 👍🏽",
    "café naïve résumé Ångström façade", "مرحبا بالعالم - שלום עולם", "Ελληνικά ΑΒΓ αβγ, Русский текст",
    "def f(x):\n    return x ** 2  # square\n", "for (int i = 0; i < 10; ++i) { sum += a[i]; }",
    '<div class="x">&amp;</div>', "3.14159265358979 and 1234567890123", "year 2024, $1,000,000.00, 007, 1e-9",
    "  1  22   333\t4444\n55555", "\n\n3 items", "   leading spaces", "trailing   ", "tabs\tand\t\ttabs",
    "\n\n\nnewlines\r\nwindows\r\n", "mixed \t \n whitespace  ", "I'm sure you're right, they'll see it's WE'VE DONE",
    "<|im_start|>user\nhi<|im_end|>\n", "<|endoftext|>", "text<|im_end|>more<|im_start|>",
    "<|im_start no <|special|> here", "", " ", "a" * 60, "Zürich: 25°C ½ ² Ⅳ", "zero\u200bwidth e\u0301 ﬁ",
]  # fmt: skip

CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Count: 1, 2, 3."}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Write 日本語 and an emoji 🎉.\n\nThanks"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"},
     {"role": "assistant", "content": "b"}, {"role": "user", "content": "code:\n\tx = 1\n"}],
]  # fmt: skip


def chat_ids(result: Any) -> list[int]:
    """``apply_chat_template(tokenize=True)`` returns a BatchEncoding in transformers 5, a list in 4."""
    return list(result["input_ids"] if isinstance(result, Mapping) else result)


def stream(tok: Tokenizer, ids: Sequence[int], skip_special: bool = True) -> list[str]:
    """Decode ``ids`` one at a time; the deltas, with the flush last."""
    decoder = tok.incremental_decoder(skip_special=skip_special)
    deltas = [decoder.push(i) for i in ids]
    deltas.append(decoder.flush())
    assert decoder.text == "".join(deltas)
    return deltas
