"""GGUF files through the ``gguf`` package: metadata as a plain dict, tensors read one at a time.

The file is memory-mapped by ``gguf.GGUFReader``; a tensor's bytes are touched only when ``tensor()`` is called for
it, so a stage that asks for its own layers never pages in the rest of the model.
"""

from __future__ import annotations

import logging
import mmap
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from llama_shard.errors import ModelFormatError

log = logging.getLogger(__name__)

#: Tensor types this loader reads (dequantised to float at load; the speed issue keeps them packed).
SUPPORTED_TYPES = frozenset(
    GGMLQuantizationType[name]
    for name in ("F32", "F16", "BF16", "Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
)

#: GGUF tensor names -> this project's names. ``{i}`` is the global layer index.
GGUF_TO_NATIVE = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
    "rope_freqs.weight": "rope_freqs",
    "blk.{i}.attn_norm.weight": "layers.{i}.attention_norm.weight",
    "blk.{i}.attn_q.weight": "layers.{i}.attention.wq.weight",
    "blk.{i}.attn_k.weight": "layers.{i}.attention.wk.weight",
    "blk.{i}.attn_v.weight": "layers.{i}.attention.wv.weight",
    "blk.{i}.attn_output.weight": "layers.{i}.attention.wo.weight",
    "blk.{i}.ffn_norm.weight": "layers.{i}.ffn_norm.weight",
    "blk.{i}.ffn_gate.weight": "layers.{i}.feed_forward.w1.weight",
    "blk.{i}.ffn_down.weight": "layers.{i}.feed_forward.w2.weight",
    "blk.{i}.ffn_up.weight": "layers.{i}.feed_forward.w3.weight",
}


def _field_value(field: Any) -> Any:
    value = field.contents()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value


class GGUFFile:
    """An open GGUF file: ``metadata`` (key -> Python value) and tensors by name."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFormatError(f"{self.path}: no such file")
        try:
            self._reader = GGUFReader(str(self.path), "r")
        except (ValueError, IndexError, OSError, KeyError) as e:
            raise ModelFormatError(f"{self.path}: not a readable GGUF file ({e})") from None
        self.metadata: dict[str, Any] = {}
        for key, field in self._reader.fields.items():
            try:
                self.metadata[key] = _field_value(field)
            except (ValueError, IndexError, UnicodeDecodeError) as e:
                raise ModelFormatError(f"{self.path}: corrupt metadata field {key!r} ({e})") from None
        self._tensors = {t.name: t for t in self._reader.tensors}
        # The reader's parsed fields (a numpy array per part of every token string: tens of MB of small objects
        # for a 50k vocabulary) are now copied into ``metadata``; drop them, and the tensor list's field views.
        self._reader.fields.clear()
        for t in self._reader.tensors:
            t.field.parts.clear()

    @property
    def tensor_names(self) -> set[str]:
        return set(self._tensors)

    def tensor_type(self, name: str) -> GGMLQuantizationType:
        return GGMLQuantizationType(self._tensors[name].tensor_type)

    def tensor_nbytes(self, name: str) -> int:
        return int(self._tensors[name].n_bytes)

    def tensor(self, name: str) -> torch.Tensor:
        """Read one tensor, dequantised to float32, in PyTorch's ``[rows, cols]`` order."""
        t = self._tensors.get(name)
        if t is None:
            raise ModelFormatError(f"{self.path}: tensor {name!r} is missing")
        qtype = GGMLQuantizationType(t.tensor_type)
        if qtype not in SUPPORTED_TYPES:
            raise ModelFormatError(f"{self.path}: tensor {name!r} has unsupported type {qtype.name}")
        shape = tuple(int(d) for d in reversed(t.shape))  # ggml lists ne0 (the row length) first
        try:
            if qtype == GGMLQuantizationType.F32:
                array = np.array(t.data, dtype=np.float32)  # a copy: the mapped file is read-only
            elif qtype == GGMLQuantizationType.F16:
                array = np.asarray(t.data, dtype=np.float16).astype(np.float32)
            else:
                array = dequantize(t.data, qtype)
            return torch.from_numpy(np.ascontiguousarray(array.reshape(shape), dtype=np.float32))
        except (ValueError, IndexError) as e:
            raise ModelFormatError(f"{self.path}: tensor {name!r} is truncated or corrupt ({e})") from None

    def blocks(self, name: str, *, fresh_map: bool = False) -> tuple[torch.Tensor, GGMLQuantizationType, int]:
        """A tensor's raw blocks without decoding: uint8 ``[rows, bytes per row]``, its type and its row length.

        The bytes are the read-only file mapping (never write to them). ``fresh_map`` maps just this tensor anew,
        so it pins no pages that reading other tensors touched (the token embedding, looked up row by row).
        """
        t = self._tensors.get(name)
        if t is None:
            raise ModelFormatError(f"{self.path}: tensor {name!r} is missing")
        qtype = GGMLQuantizationType(t.tensor_type)
        cols = int(t.shape[0])
        data = t.data.reshape(-1).view(np.uint8)  # F32/F16 come typed; quantised types as uint8 already
        rows = int(np.prod(t.shape[1:])) if len(t.shape) > 1 else 1
        if fresh_map:
            data = np.memmap(self.path, dtype=np.uint8, mode="r", offset=int(t.data_offset), shape=(int(t.n_bytes),))
        with warnings.catch_warnings():  # torch warns that the mapping is read-only; nothing writes to it
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.from_numpy(data).view(rows, -1)
        return raw, qtype, cols

    def release_pages(self) -> None:
        """Drop this process's resident pages of the file mapping (they stay in the page cache and fault back in
        if read again), so tensors already converted stop counting in RSS."""
        mapping = getattr(self._reader.data, "_mmap", None)
        if mapping is not None and hasattr(mapping, "madvise"):
            mapping.madvise(mmap.MADV_DONTNEED)


def gguf_metadata(path: str | Path) -> dict[str, Any]:
    """Only the key/value metadata of a GGUF file (the tensors stay unread)."""
    return GGUFFile(path).metadata
