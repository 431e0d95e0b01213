"""Packed slices: a stage's tensors exactly as a GGUF file stores them (``LoadShardRequest.quantize == "gguf"``).

A packed manifest lists each tensor of the slice (``slice_tensor_names``, native names) with its ggml type as the
dtype (``gguf:Q4_1``, ``gguf:F32``...), its logical shape (``[rows, cols]``, or ``[n]`` for a vector), and the sha256
of its raw bytes in the file (Q/K rows in llama.cpp's order: nothing is decoded, so hashing is cheap).

A node with its own copy of the GGUF verifies those bytes and loads the file with ``load_stage(quantize=gguf)``. A
node that gets the slice pushed receives the same bytes concatenated (the ``PartialSlice`` machinery: per-tensor
sha256, resume), then writes them with the model's config as metadata into a *slice GGUF* in its cache
(``<sha256>.gguf``), which it loads the same way as a local copy: the packed kernels read the same blocks either way.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import IO

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter

from llama_shard.config import ModelConfig
from llama_shard.errors import ModelFormatError
from llama_shard.gguf_file import GGUF_TO_NATIVE, GGUFFile
from llama_shard.loading import GGUFSource
from llama_shard.shard import ShardSpec
from node.slices import SliceManifest, SliceMismatchError, TensorDigest, build_manifest, slice_tensor_names

log = logging.getLogger(__name__)

#: dtype prefix of a tensor held as raw GGUF blocks (``gguf:Q4_1``)
RAW_PREFIX = "gguf:"

#: native name template -> GGUF name template, each as (regex over native names, GGUF template)
_TO_GGUF = [(re.compile("^" + re.escape(v).replace(r"\{i\}", r"(\d+)") + "$"), k) for k, v in GGUF_TO_NATIVE.items()]


def is_raw(t: TensorDigest) -> bool:
    return t.dtype.startswith(RAW_PREFIX)


def is_packed(manifest: SliceManifest) -> bool:
    """A manifest of raw GGUF blocks (every tensor); a float manifest has none."""
    return bool(manifest.tensors) and all(is_raw(t) for t in manifest.tensors)


def raw_type(t: TensorDigest) -> GGMLQuantizationType:
    try:
        return GGMLQuantizationType[t.dtype.removeprefix(RAW_PREFIX)]
    except KeyError:
        raise SliceMismatchError(f"tensor {t.name!r}: unknown ggml type {t.dtype!r}") from None


def gguf_name(native: str) -> str:
    """The GGUF name of a native tensor name (``layers.3.attention.wq.weight`` -> ``blk.3.attn_q.weight``)."""
    for pattern, template in _TO_GGUF:
        m = pattern.match(native)
        if m:
            return template.format(i=m.group(1)) if m.groups() else template
    raise ModelFormatError(f"no GGUF name for tensor {native!r}")


def _raw(source: GGUFSource, name: str) -> tuple[np.ndarray, GGMLQuantizationType, tuple[int, ...]]:
    """A tensor's bytes as stored (a read-only view of the file mapping), its type and its logical shape."""
    raw, qtype, cols = source.blocks(name)
    rows = int(raw.shape[0])
    shape = (cols,) if rows == 1 else (rows, cols)  # no llama matrix has one row: a single row is a vector
    return raw.reshape(-1).numpy(), qtype, shape


def digest_raw(source: GGUFSource, name: str) -> tuple[TensorDigest, np.ndarray]:
    data, qtype, shape = _raw(source, name)
    digest = TensorDigest(name, RAW_PREFIX + qtype.name, shape, data.nbytes, hashlib.sha256(data.data).digest())
    return digest, data


def build_packed_manifest(
    source: GGUFSource,
    spec: ShardSpec,
    blob: IO[bytes] | None = None,
    known: dict[str, TensorDigest] | None = None,
) -> SliceManifest:
    """The packed manifest of ``spec``'s slice; with ``blob``, also write its bytes there (see ``build_manifest``)."""
    manifest = build_manifest(source, spec, blob, known, digest_of=lambda name: digest_raw(source, name))
    source.gguf.release_pages()
    return manifest


def verify_packed(
    source: GGUFSource, spec: ShardSpec, manifest: SliceManifest, on_tensor: Callable[[int], None] | None = None
) -> None:
    """Check that ``source`` holds exactly the manifest's bytes for every tensor the stage reads.

    Raises:
        SliceMismatchError: a tensor is missing from the manifest, or its type, shape or bytes differ.
    """
    digests = {t.name: t for t in manifest.tensors}
    for name in slice_tensor_names(source, spec):
        want = digests.get(name)
        if want is None:
            raise SliceMismatchError(f"tensor {name!r} of stage {spec} is not in the manifest")
        got, _ = digest_raw(source, name)
        if got != want:
            raise SliceMismatchError(
                f"tensor {name!r} ({got.dtype.removeprefix(RAW_PREFIX)} {list(got.shape)}) does not match the "
                f"coordinator's digest ({want.dtype.removeprefix(RAW_PREFIX)} {list(want.shape)}, sha256 "
                f"{want.sha256.hex()[:16]}…): a different or corrupt copy"
            )
        if on_tensor is not None:
            on_tensor(got.nbytes)
    source.gguf.release_pages()  # the hashed pages are read again (from the page cache) when the stage packs them


def write_slice_gguf(blob: Path, manifest: SliceManifest, config: ModelConfig, out: Path) -> Path:
    """Write the raw tensors of a received packed slice (``blob``: their bytes in manifest order) as a GGUF file
    with the model's config as metadata; atomically, so ``out`` is whole or absent."""
    if not is_packed(manifest):
        raise ValueError("write_slice_gguf takes a packed manifest")
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    writer = GGUFWriter(str(tmp), config.arch)
    writer.add_block_count(config.n_layers)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.dim)
    writer.add_feed_forward_length(config.ffn_dim)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_vocab_size(config.vocab_size)
    writer.add_string("llama_node.slice_sha256", manifest.hex)
    data = np.memmap(blob, dtype=np.uint8, mode="r")
    try:
        for name, (offset, t) in manifest.offsets().items():
            lead = t.shape[:-1]
            rows = int(np.prod(lead)) if lead else 1
            byte_shape = (*lead, t.nbytes // rows)  # uint8 [rows, bytes per row]: the writer derives the shape
            array = data[offset : offset + t.nbytes].reshape(byte_shape)
            writer.add_tensor(gguf_name(name), array, raw_dtype=raw_type(t))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    finally:
        del data
    os.replace(tmp, out)
    log.info("wrote slice GGUF %s (%d tensors, %.1f MB)", out.name, len(manifest.tensors), manifest.nbytes / 1e6)
    return out


class SliceGGUFSource(GGUFSource):
    """A slice GGUF as a weight source, with the coordinator's model config (the file's metadata describes the
    model, but a slice lacks tensors that ``from_gguf_metadata`` infers settings from, such as an untied head)."""

    def __init__(self, path: Path, config: ModelConfig) -> None:
        super().__init__(GGUFFile(path))
        self.config = config
