"""A tiny random Llama that ``llama-node serve`` can serve: ``make_hf_llama``'s weights plus a byte-level BPE trained
to its 320-token vocabulary, a ChatML template and end-of-turn tokens. Random weights answer with random bytes, which
is what the API tests want: invalid UTF-8 split across tokens, odd text, and no early end of turn. That last one is
made so, not left to the seed: the end-of-turn rows of the output head are zeroed, so their logit is exactly 0 while
greedy picks the largest of 315 other random logits (all of them negative is, in practice, never), and tests can ask
that a greedy answer runs to its token limit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]  # ids 0-4: bos 1 and eos 2 as make_hf_llama's
END_OF_TURN = [2, 4]  # </s> and <|im_end|>: generation_config's eos_token_id
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog. What is the capital of France? Paris is the capital.",
    "Hello, how are you today? I am fine, thank you. Name a fruit: an apple, a pear, a plum.",
    "snow ❄️ and 雪 and 🏔️ — unicode text, numbers 0123456789 and symbols {}[]()<>!?\"'",
] * 4


def serveable_tiny_llama(weights: Path, into: Path, vocab_size: int = 320) -> Path:
    """Copy ``weights`` (an HF directory from ``make_hf_llama``) to ``into`` with tokenizer files; returns ``into``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    shutil.copytree(weights, into)
    _silence_end_of_turn(into / "model.safetensors", END_OF_TURN)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[AddedToken(t, normalized=False, special=True) for t in SPECIALS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    assert tok.get_vocab_size() <= vocab_size, tok.get_vocab_size()
    tok.save(str(into / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "<|im_end|>", "chat_template": CHATML}
    (into / "tokenizer_config.json").write_text(json.dumps(config))
    (into / "generation_config.json").write_text(json.dumps({"eos_token_id": END_OF_TURN}))
    return into


def _silence_end_of_turn(weights: Path, ids: list[int]) -> None:
    """Zero the output head's rows ``ids`` (the embedding's when tied): greedy decoding never ends a turn early."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(weights)
    head = "lm_head.weight" if "lm_head.weight" in tensors else "model.embed_tokens.weight"
    tensors[head] = tensors[head].clone()
    tensors[head][ids] = 0
    save_file(tensors, weights, metadata={"format": "pt"})
