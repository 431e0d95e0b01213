"""Text <-> token ids through the ``tokenizers`` library, built from a GGUF file or an HF model directory.

A GGUF holds no ``tokenizer.json``; it holds llama.cpp's ``tokenizer.ggml.*`` metadata. For byte-level BPE
(``tokenizer.ggml.model == "gpt2"``: SmolLM2, Llama 3) that is enough to rebuild the exact tokenizer:

* ``tokens`` and ``merges`` -> a ``BPE`` model (tokens are already spelled in the GPT-2 byte alphabet);
* ``pre`` -> the pre-tokenizer, i.e. the regex the merges were learned under (``PRE_TOKENIZERS``);
* ``token_type`` CONTROL (3) -> special added tokens, USER_DEFINED (4) -> plain added tokens, so text such as
  ``<|im_start|>`` parses to its single id instead of being cut into pieces;
* ``bos_token_id``/``eos_token_id``/``eot_token_id``/``eom_token_id`` and ``add_bos_token``/``add_eos_token``.

BOS/EOS are added by ``Tokenizer.encode`` itself (never by a tokenizers post-processor), so one rule
covers both sources: ``add_bos=None`` means the model's own rule.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer

from llama_shard.chat_template import ChatTemplate, Message
from llama_shard.errors import ModelFormatError

log = logging.getLogger(__name__)

# llama.cpp's ``llama_token_type`` values in ``tokenizer.ggml.token_type``.
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# Token texts that end a turn even when the file names another id as EOS (llama.cpp's end-of-generation set).
END_OF_TURN_TEXTS = frozenset(
    {
        "<|eot_id|>",
        "<|eom_id|>",
        "<|im_end|>",
        "<|end|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "<|end_of_text|>",
        "<EOT>",
        "<|return|>",
        "<end_of_utterance>",
    }
)

# Pre-tokenizer regexes, as llama.cpp's ``llm_tokenizer_bpe`` and the models' tokenizer.json define them.
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

#: ``tokenizer.ggml.pre`` -> pre-tokenizer family. ``smollm`` (StarCoder family) splits every digit on
#: its own before the GPT-2 regex; ``llama-bpe`` (Llama 3) splits digits in runs of 1-3 and looks whole
#: words up before merging.
PRE_TOKENIZERS: dict[str, str] = {
    **dict.fromkeys(("gpt2", "gpt-2", "mpt", "olmo", "jais", "trillion"), "gpt2"),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"), "digits"),
    **dict.fromkeys(
        (
            "llama3",
            "llama-v3",
            "llama-bpe",
            "falcon3",
            "falcon-h1",
            "pixtral",
            "midm-2.0",
            "lfm2",
            "dbrx",
            "smaug-bpe",
        ),
        "llama3",
    ),
}


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what ``ByteLevel`` spells bytes with)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _pre_tokenizer(pre: str | None) -> tuple[pre_tokenizers.PreTokenizer, bool]:
    """The pre-tokenizer for ``tokenizer.ggml.pre``, and whether the BPE model should ``ignore_merges``."""
    if pre is None or pre == "default":
        log.warning("GGUF names no usable tokenizer.ggml.pre (%r); using the GPT-2 split", pre)
        family = "gpt2"
    else:
        family = PRE_TOKENIZERS.get(pre, "")
        if not family:
            raise ModelFormatError(
                f"unsupported tokenizer.ggml.pre {pre!r}; supported: {', '.join(sorted(PRE_TOKENIZERS))}"
            )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # regex = GPT2_SPLIT
    if family == "gpt2":
        return byte_level, False
    if family == "digits":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]), False
    split = pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False)
    # Llama 3's tokenizer.json sets ``ignore_merges`` (a pre-token that is itself a vocab entry is taken
    # whole),
    # and llama.cpp does the same for this family.
    return pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), True


def _token_text(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string, an AddedToken dict, or null."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


class IncrementalDecoder:
    """Turns ids arriving one at a time into text deltas, holding back incomplete UTF-8 characters.

    It decodes a short window (from the token before the last emitted boundary to the end) rather than
    the whole sequence, and emits only when the window does not end in U+FFFD, i.e. when a byte-level
    token did not stop in the middle of a multi-byte character.
    ``"".join(deltas) + flush()`` equals ``decode(all ids)``.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special
        self._ids: list[int] = []
        self._prefix = 0  # window start: decoding from here keeps leading-space rules the same as a full decode
        self._read = 0  # everything before this index has been emitted
        self.text = ""

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes (possibly ``""``)."""
        self._ids.append(token_id)
        if self._read - self._prefix == 1:  # the usual window: the last emitted token alone (decoded once per id)
            prefix_text = self._tok.decode_one(self._ids[self._prefix], skip_special=self._skip)
        else:
            prefix_text = self._tok.decode(self._ids[self._prefix : self._read], skip_special=self._skip)
        new_text = self._tok.decode(self._ids[self._prefix :], skip_special=self._skip)
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        delta = new_text[len(prefix_text) :]
        self._prefix, self._read = self._read, len(self._ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """Emit what is held back (an incomplete trailing character decodes as U+FFFD): end of stream."""
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read], skip_special=self._skip)
        new_text = self._tok.decode(self._ids[self._prefix :], skip_special=self._skip)
        delta = new_text[len(prefix_text) :]
        self._prefix = self._read = len(self._ids)
        self.text += delta
        return delta


class Tokenizer:
    """A model's tokenizer and chat template. Build it with ``from_gguf_metadata`` or ``from_hf_dir``.

    Attributes:
        bos_id: the beginning-of-sequence id, or None when the model has none.
        eos_ids: every id that ends a turn (EOS, EOT and the model's other end-of-generation tokens).
        add_bos: whether ``encode`` prepends ``bos_id`` by default.
        add_eos: whether ``encode`` appends the EOS id by default (rare; off for chat models).
        vocab_size: number of ids, added tokens included.
        chat_template: the model's template, or None.
    """

    def __init__(
        self,
        backend: _HFTokenizer,
        *,
        bos_id: int | None,
        eos_id: int | None,
        eos_ids: frozenset[int],
        add_bos: bool,
        add_eos: bool = False,
        chat_template: str | None = None,
        template_tokens: Mapping[str, str] | None = None,
        vocab_size: int | None = None,
    ) -> None:
        self._backend = backend
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.eos_ids = eos_ids
        self.add_bos = add_bos and bos_id is not None
        self.add_eos = add_eos and eos_id is not None
        self.vocab_size = max(vocab_size or 0, backend.get_vocab_size(with_added_tokens=True))
        self._template = ChatTemplate(chat_template, template_tokens) if chat_template else None
        self._one: dict[tuple[int, bool], str] = {}  # decode_one's answers: at most two per id of the vocabulary

    @property
    def backend(self) -> _HFTokenizer:
        """The underlying ``tokenizers.Tokenizer`` (no post-processor: BOS/EOS are added by ``encode``)."""
        return self._backend

    @property
    def chat_template(self) -> str | None:
        return self._template.source if self._template else None

    # ----------------------------------------------------------------------------------------------- building
    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any]) -> Tokenizer:
        """Build the tokenizer a GGUF file describes (``gguf_file.gguf_metadata(path)``).

        Raises:
            ModelFormatError: no tokenizer in the metadata, a tokenizer kind other than byte-level BPE,
                an unknown pre-tokenizer, or inconsistent arrays.
        """
        model = meta.get("tokenizer.ggml.model")
        if model is None:
            raise ModelFormatError("GGUF metadata has no tokenizer (tokenizer.ggml.model is missing)")
        if model != "gpt2":
            raise ModelFormatError(
                f"unsupported tokenizer.ggml.model {model!r}; "
                "only byte-level BPE ('gpt2', as in Llama 3 and SmolLM2) is supported"
            )
        tokens = list(meta.get("tokenizer.ggml.tokens") or [])
        merges = list(meta.get("tokenizer.ggml.merges") or [])
        types = list(meta.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens))
        if not tokens or not merges:
            raise ModelFormatError(
                f"GGUF BPE tokenizer needs tokens and merges, got {len(tokens)} tokens and {len(merges)} merges"
            )
        if len(types) != len(tokens):
            raise ModelFormatError(f"tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")

        alphabet = _byte_alphabet()
        spelled = frozenset(alphabet.values())
        # Every real token is written in the byte alphabet. One that is not (a space, say) is a special
        # token the BPE can never produce; respell it so it keeps its id (as transformers does).
        # (The loops below run over ~50-130K entries on every start: one pass each, in C where possible.)
        misspelled = set() if spelled.issuperset("".join(tokens)) else {t for t in tokens if not spelled.issuperset(t)}
        vocab: dict[str, int] = {}
        for i, tok in enumerate(tokens):
            if tok in misspelled:
                tok = "".join(alphabet[b] for b in tok.encode("utf-8"))
            vocab.setdefault(tok, i)
        bpe_merges = [tuple(merge.split(" ", 1)) for merge in merges]
        for n, pair in enumerate(bpe_merges):
            if len(pair) != 2:
                raise ModelFormatError(f"tokenizer.ggml.merges[{n}] = {merges[n]!r} has no space between its two parts")

        pre_tok, ignore_merges = _pre_tokenizer(meta.get("tokenizer.ggml.pre"))
        backend = _HFTokenizer(models.BPE(vocab=vocab, merges=bpe_merges, ignore_merges=ignore_merges))
        backend.pre_tokenizer = pre_tok
        backend.decoder = decoders.ByteLevel()

        # CONTROL tokens are special (skipped by decode); USER_DEFINED ones are matched whole but are
        # kept in decoded text.
        # A CONTROL token outside the byte alphabet is a llama.cpp mislabel: adding it would mint a new id.
        typed = [(i, ty) for i, ty in enumerate(types) if ty != TOKEN_NORMAL]  # a few hundred of ~50K
        control = [tokens[i] for i, ty in typed if ty == TOKEN_CONTROL]
        backend.add_special_tokens(
            [AddedToken(t, normalized=False, special=True) for t in control if t not in misspelled]
        )
        backend.add_tokens(
            [
                AddedToken(tokens[i], normalized=False, special=False)
                for i, ty in typed
                if ty == TOKEN_USER_DEFINED and tokens[i] not in misspelled
            ]
        )
        if len(vocab) != len(tokens):
            log.warning(
                "GGUF vocab spells %d of its %d tokens twice; the later copies are unreachable",
                len(tokens) - len(vocab),
                len(tokens),
            )

        def token_id(key: str) -> int | None:
            value = meta.get(f"tokenizer.ggml.{key}")
            if value is None:
                return None
            if not 0 <= int(value) < len(tokens):
                raise ModelFormatError(f"tokenizer.ggml.{key} = {value} is outside the {len(tokens)}-token vocab")
            return int(value)

        bos_id, eos_id = token_id("bos_token_id"), token_id("eos_token_id")
        ends = {i for i in (eos_id, token_id("eot_token_id"), token_id("eom_token_id")) if i is not None}
        ends |= {i for i, ty in typed if ty == TOKEN_CONTROL and tokens[i] in END_OF_TURN_TEXTS}
        add_bos = meta.get("tokenizer.ggml.add_bos_token")
        if add_bos is None:  # llama.cpp's default when the key is absent: on for Llama 3, off for other BPE
            add_bos = PRE_TOKENIZERS.get(str(meta.get("tokenizer.ggml.pre")), "") == "llama3"
        template_tokens = {
            name: tokens[i]
            for name, i in (
                ("bos_token", bos_id),
                ("eos_token", eos_id),
                ("unk_token", token_id("unknown_token_id")),
                ("pad_token", token_id("padding_token_id")),
            )
            if i is not None
        }
        log.debug(
            "GGUF tokenizer: %d tokens, pre=%r, bos=%s, eos=%s, ends=%s",
            len(tokens),
            meta.get("tokenizer.ggml.pre"),
            bos_id,
            eos_id,
            sorted(ends),
        )
        return cls(
            backend,
            bos_id=bos_id,
            eos_id=eos_id,
            eos_ids=frozenset(ends),
            add_bos=bool(add_bos),
            add_eos=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
            chat_template=meta.get("tokenizer.chat_template"),
            template_tokens=template_tokens,
            vocab_size=len(tokens),
        )

    @classmethod
    def from_hf_dir(cls, path: Path) -> Tokenizer:
        """Load ``tokenizer.json`` with ``tokenizer_config.json``, ``chat_template.jinja`` and
        ``generation_config.json`` when present.

        Raises:
            ModelFormatError: ``tokenizer.json`` is missing or unreadable, or a config file is not JSON.
        """
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise ModelFormatError(f"{path}: no tokenizer.json")
        try:
            backend = _HFTokenizer.from_file(str(tok_file))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise ModelFormatError(f"{tok_file}: not a readable tokenizer.json ({e})") from None
        config = _read_json(path / "tokenizer_config.json")
        generation = _read_json(path / "generation_config.json")

        def id_of(name: str) -> int | None:
            text = _token_text(config.get(name))
            return backend.token_to_id(text) if text is not None else None

        bos_id, eos_id = id_of("bos_token"), id_of("eos_token")
        # tokenizer.json's post-processor decides whether BOS/EOS are added. transformers 5 does the same for
        # byte-level tokenizers: it ignores ``add_bos_token``/``add_eos_token`` in tokenizer_config.json.
        probe = backend.encode("", add_special_tokens=True).ids
        add_bos = bool(probe) and probe[0] == bos_id
        add_eos = bool(probe) and probe[-1] == eos_id and not (add_bos and len(probe) == 1)
        for key, used in (("add_bos_token", add_bos), ("add_eos_token", add_eos)):
            if isinstance(config.get(key), bool) and config[key] != used:
                log.warning(
                    "%s: tokenizer_config.json says %s=%s but tokenizer.json's post-processor says %s; "
                    "following tokenizer.json, as transformers does",
                    path,
                    key,
                    config[key],
                    used,
                )
        backend.post_processor = None

        ends = {i for i in (eos_id,) if i is not None}
        gen_eos = generation.get("eos_token_id")
        ends |= {int(i) for i in (gen_eos if isinstance(gen_eos, list) else [gen_eos]) if isinstance(i, int)}
        ends |= {
            i for i, t in backend.get_added_tokens_decoder().items() if t.special and t.content in END_OF_TURN_TEXTS
        }

        template = _read_template(path, config)
        template_tokens = {
            name: text
            for name in ("bos_token", "eos_token", "unk_token", "pad_token")
            if (text := _token_text(config.get(name))) is not None
        }
        return cls(
            backend,
            bos_id=bos_id,
            eos_id=eos_id,
            eos_ids=frozenset(ends),
            add_bos=add_bos,
            add_eos=add_eos,
            chat_template=template,
            template_tokens=template_tokens,
        )

    # ------------------------------------------------------------------------------------------------ running
    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Text -> ids. Special-token text (``<|im_start|>``) becomes its single id.

        Args:
            text: the text to tokenize.
            add_bos: prepend ``bos_id``; None follows the model's rule (``self.add_bos``, and
                ``self.add_eos`` with it).
        """
        ids: list[int] = self._backend.encode(text, add_special_tokens=False).ids
        if add_bos is None:
            if self.add_eos and self.eos_id is not None:
                ids.append(self.eos_id)
            add_bos = self.add_bos
        if add_bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        """Ids -> text; with ``skip_special`` control tokens (BOS, ``<|im_end|>``...) are left out."""
        return str(self._backend.decode(list(ids), skip_special_tokens=skip_special))

    def decode_one(self, token_id: int, *, skip_special: bool = True) -> str:
        """``decode([token_id])``, remembered: streaming decoders ask for the same ids again and again."""
        key = (token_id, skip_special)
        text = self._one.get(key)
        if text is None:
            text = self._one[key] = self.decode((token_id,), skip_special=skip_special)
        return text

    def render_chat(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> str:
        """The conversation as prompt text, through the model's chat template.

        Raises:
            ModelFormatError: the model has no chat template.
            ValueError: the template rejects the conversation (e.g. roles that do not alternate).
        """
        if self._template is None:
            raise ModelFormatError("this model has no chat template (tokenizer.chat_template / chat_template)")
        return self._template.render(messages, add_generation_prompt=add_generation_prompt)

    def apply_chat_template(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> list[int]:
        """``render_chat`` then ``encode`` without adding BOS: the template writes it if the model wants it.

        This is what ``transformers`` does (its ``apply_chat_template`` tokenizes with
        ``add_special_tokens=False``).
        """
        return self.encode(self.render_chat(messages, add_generation_prompt=add_generation_prompt), add_bos=False)

    def incremental_decoder(self, *, skip_special: bool = True) -> IncrementalDecoder:
        """A fresh streaming decoder: ``.push(id) -> delta``, ``.flush()`` at the end, ``.text`` so far."""
        return IncrementalDecoder(self, skip_special=skip_special)


def _read_json(file: Path) -> dict[str, Any]:
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"{file}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelFormatError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_template(path: Path, config: Mapping[str, Any]) -> str | None:
    """``chat_template.jinja`` wins over ``tokenizer_config.json``'s ``chat_template``, as in transformers."""
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default")
    return template if isinstance(template, str) else None
