"""The tokenizer on a Llama 3 style byte-level BPE (trained here, tiny), as a GGUF and as an HF directory, and the
chat template sandbox, against transformers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tokenizer_cases import CONVERSATIONS, TEXTS, chat_ids, stream
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from llama_shard.errors import ModelFormatError
from llama_shard.gguf_file import gguf_metadata
from llama_shard.tokenizer import LLAMA3_SPLIT, Tokenizer

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
    assert "".join(stream(llama3_ours, expected)) == llama3_ours.decode(expected)


@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_llama3_gguf_chat_template_matches_transformers(
    llama3_ours: Tokenizer, llama3_hf_gguf: Any, conversation: list[dict[str, str]]
) -> None:
    expected = chat_ids(llama3_hf_gguf.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True))
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
            expected_ids = chat_ids(hf.apply_chat_template(conversation, add_generation_prompt=gen, tokenize=True))
            assert ours.apply_chat_template(conversation, add_generation_prompt=gen) == expected_ids


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
