"""GGUF files: metadata as a plain dict, tensors read one at a time.

The header is parsed by ``gguf_meta`` (the project's one GGUF parser) over a read-only memory map; a tensor's
bytes are touched only when ``tensor()`` or ``blocks()`` is called for it, so a stage that asks for its own
layers never pages in the rest of the model. Dequantisation is ``gguf.quants``'.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from llama_shard.errors import ModelFormatError
from llama_shard.gguf_meta import GGUFMetaError, TensorInfo, parse_gguf, read_gguf

log = logging.getLogger(__name__)

#: Tensor types this loader reads (dequantised to float at load; the speed issue keeps them packed).
SUPPORTED_TYPES = frozenset(
    GGMLQuantizationType[name]
    for name in ("F32", "F16", "BF16", "Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
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


class GGUFFile:
    """An open GGUF file: ``metadata`` (key -> Python value) and tensors by name."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFormatError(f"{self.path}: no such file")
        try:
            with self.path.open("rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size == 0:
                    raise GGUFMetaError("the file is empty")
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            header = parse_gguf(self._map, size)
        except (GGUFMetaError, OSError) as e:
            raise ModelFormatError(f"{self.path}: not a readable GGUF file ({e})") from None
        self.metadata: dict[str, Any] = header.metadata
        self._tensors = {t.name: t for t in header.tensors}
        self._data = np.frombuffer(self._map, dtype=np.uint8)  # read-only, like the mapping

    @property
    def tensor_names(self) -> set[str]:
        return set(self._tensors)

    def tensor_type(self, name: str) -> GGMLQuantizationType:
        return GGMLQuantizationType(self._tensors[name].ggml_type)

    def tensor_nbytes(self, name: str) -> int:
        return self._tensors[name].n_bytes

    def _bytes(self, t: TensorInfo) -> np.ndarray:
        return self._data[t.offset : t.offset + t.n_bytes]

    def tensor(self, name: str) -> torch.Tensor:
        """Read one tensor, dequantised to float32, in PyTorch's ``[rows, cols]`` order."""
        t = self._tensors.get(name)
        if t is None:
            raise ModelFormatError(f"{self.path}: tensor {name!r} is missing")
        qtype = GGMLQuantizationType(t.ggml_type)
        if qtype not in SUPPORTED_TYPES:
            raise ModelFormatError(f"{self.path}: tensor {name!r} has unsupported type {qtype.name}")
        shape = tuple(int(d) for d in reversed(t.shape))  # ggml lists ne0 (the row length) first
        try:
            data = self._bytes(t)
            if qtype == GGMLQuantizationType.F32:
                array = data.view(np.float32).copy()  # a copy: the mapped file is read-only
            elif qtype == GGMLQuantizationType.F16:
                array = data.view(np.float16).astype(np.float32)
            else:
                array = dequantize(data.reshape(*shape[:-1], -1), qtype)  # [..., bytes per row]
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
        qtype = GGMLQuantizationType(t.ggml_type)
        cols = t.shape[0]
        rows = math.prod(t.shape[1:])
        data = self._bytes(t)
        if fresh_map:
            data = np.memmap(self.path, dtype=np.uint8, mode="r", offset=t.offset, shape=(t.n_bytes,))
        with warnings.catch_warnings():  # torch warns that the mapping is read-only; nothing writes to it
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.from_numpy(data).view(rows, -1)
        return raw, qtype, cols

    def release_pages(self) -> None:
        """Drop this process's resident pages of the file mapping (they stay in the page cache and fault back in
        if read again), so tensors already converted stop counting in RSS."""
        if hasattr(self._map, "madvise"):
            self._map.madvise(mmap.MADV_DONTNEED)


def gguf_metadata(path: str | Path) -> dict[str, Any]:
    """Only the key/value metadata of a GGUF file (the tensors stay unread).

    Raises:
        ModelFormatError: the file is missing, not GGUF, or its header is truncated or corrupt.
    """
    try:
        return read_gguf(path).metadata
    except (GGUFMetaError, OSError) as e:
        raise ModelFormatError(f"{path}: not a readable GGUF file ({e})") from None
