"""``llama_shard.gguf_meta``, the project's GGUF parser, against gguf-py's ``GGUFReader``.

Every key and value of the packaged SmolLM2 file and of small files covering every value type must equal what
``GGUFReader`` gives (nested arrays: ours keep their nesting, gguf-py flattens them); truncated and garbage files
must give a one-sentence ``GGUFMetaError`` and nothing else.
"""

from __future__ import annotations

import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

from llama_shard.embedded import smollm2_gguf_path
from llama_shard.errors import ModelFormatError
from llama_shard.gguf_file import GGUFFile, gguf_metadata
from llama_shard.gguf_meta import ArrayInfo, GGUFMeta, GGUFMetaError, parse_gguf, read_gguf

V = GGUFValueType

#: (key, value, type, array element type) of every GGUF value type; strings include non-ASCII text.
VALUES: list[tuple[str, Any, GGUFValueType, GGUFValueType | None]] = [
    ("t.u8", 255, V.UINT8, None),
    ("t.i8", -128, V.INT8, None),
    ("t.u16", 65535, V.UINT16, None),
    ("t.i16", -32768, V.INT16, None),
    ("t.u32", 2**32 - 1, V.UINT32, None),
    ("t.i32", -(2**31), V.INT32, None),
    ("t.u64", 2**64 - 1, V.UINT64, None),
    ("t.i64", -(2**63), V.INT64, None),
    ("t.f32", 0.1, V.FLOAT32, None),
    ("t.f64", 0.1, V.FLOAT64, None),
    ("t.bool_true", True, V.BOOL, None),
    ("t.bool_false", False, V.BOOL, None),
    ("t.str", "Grüße, 世界 🦙 \n\t\"'", V.STRING, None),
    ("t.str_empty", "", V.STRING, None),
    ("t.arr_u8", [0, 1, 255], V.ARRAY, V.UINT8),
    ("t.arr_i8", [-1, 0, 127], V.ARRAY, V.INT8),
    ("t.arr_u16", [0, 65535], V.ARRAY, V.UINT16),
    ("t.arr_i16", [-32768, 7], V.ARRAY, V.INT16),
    ("t.arr_u32", [1, 2**32 - 1], V.ARRAY, V.UINT32),
    ("t.arr_i32", [-5, 2**31 - 1], V.ARRAY, V.INT32),
    ("t.arr_u64", [0, 2**64 - 1], V.ARRAY, V.UINT64),
    ("t.arr_i64", [-(2**63), 3], V.ARRAY, V.INT64),
    ("t.arr_f32", [0.1, -2.5, float("inf")], V.ARRAY, V.FLOAT32),
    ("t.arr_f64", [0.1, 1e300], V.ARRAY, V.FLOAT64),
    ("t.arr_bool", [True, False, True], V.ARRAY, V.BOOL),
    ("t.arr_str", ["Ġthe", "", "é", "日本語", "<|im_start|>", "a b"], V.ARRAY, V.STRING),
    ("t.nested_int", [[1, 2], [3], [4, 5, 6]], V.ARRAY, None),
    ("t.nested_str", [["a", "ü"], ["🦙"]], V.ARRAY, None),
]


def write_gguf(path: Path, *, alignment: int | None = None, tensors: bool = True) -> Path:
    writer = GGUFWriter(path, "llama")
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    for key, value, vtype, sub in VALUES:
        writer.add_key_value(key, value, vtype, sub_type=sub)
    if tensors:
        rng = np.random.default_rng(0)
        writer.add_tensor("a.weight", rng.standard_normal((3, 5)).astype(np.float32))
        writer.add_tensor("b.weight", rng.standard_normal((2, 64)).astype(np.float16))
        q8 = np.zeros((4, 32 // 32 * 34), np.uint8)  # 4 rows of one Q8_0 block
        writer.add_tensor("c.weight", q8, raw_dtype=GGMLQuantizationType.Q8_0)
        writer.add_tensor("d.bias", np.arange(7, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def flatten(value: Any) -> Any:
    """gguf-py's view of a nested array: one flat list."""
    if isinstance(value, list) and value and isinstance(value[0], list):
        return [x for v in value for x in flatten(v)]
    return value


def assert_same_as_gguf_py(ours: GGUFMeta, path: Path) -> None:
    ref = GGUFReader(path)
    assert list(ours.metadata) == list(ref.fields)
    for key, field in ref.fields.items():
        expected, got = field.contents(), flatten(ours.metadata[key])
        assert got == expected, key
        assert type(got) is type(expected), key
        if isinstance(expected, list):
            assert [type(x) for x in got] == [type(x) for x in expected], key
    assert ours.data_offset == ref.data_offset
    assert len(ours.tensors) == len(ref.tensors)
    for t, r in zip(ours.tensors, ref.tensors, strict=True):
        assert (t.name, t.shape, t.ggml_type, t.offset, t.n_elements, t.n_bytes) == (
            r.name,
            tuple(int(d) for d in r.shape),
            int(r.tensor_type),
            int(r.data_offset),
            int(r.n_elements),
            int(r.n_bytes),
        )


@pytest.mark.parametrize("alignment", [None, 64, 4096])
def test_every_value_type_equals_gguf_py(tmp_path: Path, alignment: int | None) -> None:
    path = write_gguf(tmp_path / "all.gguf", alignment=alignment)
    ours = read_gguf(path)
    assert_same_as_gguf_py(ours, path)
    assert ours.alignment == (alignment or 32)
    for key, value, vtype, _ in VALUES:
        if vtype == V.FLOAT32 or key == "t.arr_f32":  # stored as float32
            assert ours.metadata[key] == pytest.approx(value, rel=1e-7), key
        else:
            assert ours.metadata[key] == value, key  # nesting kept, bools as bool, 64-bit ints exact


def test_packaged_smollm2_equals_gguf_py() -> None:
    path = smollm2_gguf_path()
    ours = read_gguf(path)
    assert_same_as_gguf_py(ours, path)
    assert len(ours.metadata["tokenizer.ggml.tokens"]) == 49152
    assert len(ours.metadata["tokenizer.ggml.merges"]) == 48900
    assert GGUFFile(path).metadata == ours.metadata == gguf_metadata(path)


def test_arrays_false_gives_lengths_only(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "all.gguf")
    full, lengths = read_gguf(path), read_gguf(path, arrays=False)
    assert full.tensors == lengths.tensors
    for key, value in full.metadata.items():
        if isinstance(value, list):
            info = lengths.metadata[key]
            assert isinstance(info, ArrayInfo) and info.length == len(value), key
        else:
            assert lengths.metadata[key] == value, key
    assert lengths.metadata["t.arr_str"] == ArrayInfo(V.STRING, 6)
    assert lengths.metadata["t.nested_int"] == ArrayInfo(V.ARRAY, 3)


def test_empty_arrays(tmp_path: Path) -> None:
    # GGUFWriter refuses empty arrays; llama.cpp writes them (e.g. an empty merges list), so build one by hand.
    def kv(key: str, item: int) -> bytes:
        k = key.encode()
        return struct.pack("<Q", len(k)) + k + struct.pack("<IIQ", V.ARRAY, item, 0)

    body = kv("e.str", V.STRING) + kv("e.f32", V.FLOAT32) + kv("e.nested", V.ARRAY)
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 3) + body)
    ours = read_gguf(path)
    assert (ours.metadata["e.str"], ours.metadata["e.f32"], ours.metadata["e.nested"]) == ([], [], [])
    assert_same_as_gguf_py(ours, path)


def test_reader_imports_no_torch() -> None:
    code = "import sys, llama_shard.gguf_meta; assert 'torch' not in sys.modules and 'numpy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------------------ bad files
def assert_one_sentence(err: pytest.ExceptionInfo[Exception]) -> None:
    message = str(err.value)
    assert message and "\n" not in message and message.strip() == message


@pytest.fixture(scope="module")
def small_file(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return write_gguf(tmp_path_factory.mktemp("gguf") / "small.gguf").read_bytes()


def test_every_truncation_is_a_gguf_meta_error(small_file: bytes) -> None:
    # every cut inside the header and the data: a GGUFMetaError (never struct.error, IndexError...); what follows
    # the last tensor is alignment padding
    end = max(t.offset + t.n_bytes for t in parse_gguf(small_file).tensors)
    for cut in range(end):
        with pytest.raises(GGUFMetaError) as err:
            parse_gguf(small_file[:cut])
        assert_one_sentence(err)
    parse_gguf(small_file)


def mutate(data: bytes, needle: bytes, skip: int, new: bytes) -> bytes:
    at = data.index(needle) + len(needle) + skip
    return data[:at] + new + data[at + len(new) :]


def key_bytes(key: str) -> bytes:
    return struct.pack("<Q", len(key)) + key.encode()


@pytest.mark.parametrize(
    ("name", "corrupt", "needle"),
    [
        ("magic", lambda d: b"GGUX" + d[4:], "not a GGUF file"),
        ("version 1", lambda d: d[:4] + struct.pack("<I", 1) + d[8:], "version 1"),
        ("version 4", lambda d: d[:4] + struct.pack("<I", 4) + d[8:], "version 4"),
        ("big-endian", lambda d: d[:4] + struct.pack(">I", 3) + d[8:], "big-endian"),
        ("value type", lambda d: mutate(d, key_bytes("t.u8"), 0, struct.pack("<I", 13)), "value type 13"),
        ("array type", lambda d: mutate(d, key_bytes("t.arr_u8"), 4, struct.pack("<I", 99)), "element type 99"),
        ("string length", lambda d: mutate(d, key_bytes("t.str"), 4, struct.pack("<Q", 2**60)), "truncated"),
        ("array length", lambda d: mutate(d, key_bytes("t.arr_u64"), 8, struct.pack("<Q", 2**62)), "truncated"),
        ("string array", lambda d: mutate(d, key_bytes("t.arr_str"), 8, struct.pack("<Q", 2**40)), "truncated"),
        ("utf-8", lambda d: mutate(d, key_bytes("t.str"), 12, b"\xff\xfe"), "not UTF-8"),
        ("utf-8 in array", lambda d: mutate(d, key_bytes("t.arr_str"), 24, b"\xff"), "not UTF-8"),
        ("duplicate key", lambda d: d.replace(key_bytes("t.i8"), key_bytes("t.u8"), 1), "appears twice"),
        ("duplicate tensor", lambda d: d.replace(key_bytes("b.weight"), key_bytes("a.weight"), 1), "appears twice"),
        ("tensor type", lambda d: mutate(d, key_bytes("d.bias"), 12, struct.pack("<I", 250)), "ggml type 250"),
        ("tensor offset", lambda d: mutate(d, key_bytes("d.bias"), 16, struct.pack("<Q", 2**40)), "truncated"),
        ("tensor dims", lambda d: mutate(d, key_bytes("d.bias"), 0, struct.pack("<I", 2**31)), "truncated"),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_corrupt_headers(small_file: bytes, name: str, corrupt: Callable[[bytes], bytes], needle: str) -> None:
    bad = corrupt(small_file)
    assert len(bad) == len(small_file) and bad != small_file, name
    with pytest.raises(GGUFMetaError) as err:
        parse_gguf(bad)
    assert_one_sentence(err)
    assert needle in str(err.value)


def test_arrays_nested_beyond_the_recursion_limit() -> None:
    key = b"deep"
    body = struct.pack("<Q", len(key)) + key + struct.pack("<I", V.ARRAY)
    body += struct.pack("<IQ", V.ARRAY, 1) * (sys.getrecursionlimit() + 10) + struct.pack("<IQ", V.UINT8, 0)
    with pytest.raises(GGUFMetaError, match="too deeply"):
        parse_gguf(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + body)


def test_bad_alignment(tmp_path: Path) -> None:
    data = write_gguf(tmp_path / "a.gguf", alignment=64).read_bytes()
    bad = mutate(data, key_bytes("general.alignment"), 4, struct.pack("<I", 48))
    with pytest.raises(GGUFMetaError, match="power of two"):
        parse_gguf(bad)


@pytest.mark.parametrize("seed", range(20))
def test_random_bytes_after_a_valid_start(seed: int) -> None:
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, int(rng.integers(0, 4096)), dtype=np.uint8).tobytes()
    with pytest.raises(GGUFMetaError) as err:
        parse_gguf(b"GGUF" + struct.pack("<I", 3) + noise)
    assert_one_sentence(err)


def test_gguf_file_names_the_file_in_one_sentence(tmp_path: Path) -> None:
    for name, content in (("empty.gguf", b""), ("noise.gguf", b"\x00" * 100), ("cut.gguf", b"GGUF\x03\x00")):
        (tmp_path / name).write_bytes(content)
        for open_it in (GGUFFile, gguf_metadata):
            with pytest.raises(ModelFormatError) as err:
                open_it(tmp_path / name)
            assert_one_sentence(err)
            assert name in str(err.value)
