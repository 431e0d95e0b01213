"""Native CPU kernels, built on first use with ``torch.utils.cpp_extension`` and registered as ``torch.ops.llama_node``.

``ggml_mm(x, w, qtype, k)``: ``y = x @ w.T`` with ``w`` the raw GGUF blocks of a Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q2_K/
Q3_K/Q4_K/Q5_K/Q6_K matrix (uint8 ``[N, bytes per row]``; for Q4_0/Q4_1/Q8_0 also repacked 8 rows at a time, type id
``| 0x100``: ``llama_shard.ggml_linear.repack_x8``) and ``x`` fp32 ``[M, K]``, computed as ggml does on AVX2: the
activation rounded to 8 bits per block of 32, integer dot products, fp32 scales (see ``csrc/ggml_mm.cpp``).
``ggml_mm_parts(x, ws, qtypes, k)``: the same over a row-stack of matrices whose types may differ.

The shared library is compiled once (``-O3 -mavx2 -mfma -mf16c``, ~30 s) into
``$LLAMA_NODE_CACHE/kernels/<hash>`` (default ``~/.cache/llama-node``), the hash covering the source, torch's version
and the flags, and loaded from there afterwards. Without a compiler, or with ``LLAMA_NODE_KERNELS=0``,
``available()`` is False (with one warning) and callers use torch's own kernels.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
#: every file of the library: compiled (.cpp) or included (.h); the build's hash covers them all
SOURCES = tuple(sorted(p for p in CSRC.iterdir() if p.suffix in (".cpp", ".h")))
# never -march=native: the cache is shared. -fopenmp: at::parallel_for is inline OpenMP code in ATen's headers; without
# the flag it compiles to a serial loop (measured: 1 and 2 threads took the same time); libgomp.so.1 is torch's own
_X86_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp"]
_OTHER_FLAGS = ["-O3", "-ffp-contract=off", "-fopenmp"]  # the scalar code path
_lock = threading.Lock()
_state: dict[str, bool] = {}


def _flags() -> list[str]:
    return _X86_FLAGS if platform.machine().lower() in ("x86_64", "amd64") else _OTHER_FLAGS


def cache_dir() -> Path:
    """Where built kernels live: ``$LLAMA_NODE_CACHE/kernels`` or ``~/.cache/llama-node/kernels``."""
    root = os.environ.get("LLAMA_NODE_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "llama-node") / "kernels"


def _build_dir() -> Path:
    digest = hashlib.sha256()
    for source in SOURCES:
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    digest.update(f"{torch.__version__}|{' '.join(_flags())}|{platform.machine()}".encode())
    return cache_dir() / digest.hexdigest()[:16]


_NAME = "llama_node_ggml_mm"


def _same(copy: Path, source: Path) -> bool:
    return copy.exists() and copy.read_bytes() == source.read_bytes()


def _load_built(build: Path) -> bool:
    """Load the library a previous run built in ``build``, without ``cpp_extension`` (which imports setuptools and
    runs ninja: ~0.25 s of every start even when nothing is stale). False when there is none for these sources."""
    library = build / f"{_NAME}.so"
    if not (library.exists() and all(_same(build / s.name, s) for s in SOURCES)):
        return False
    try:
        torch.ops.load_library(str(library))
    except OSError as e:  # e.g. half-written by a build running in another process: build (or wait for) it
        log.debug("could not load %s (%s); building", library, e)
        return False
    return hasattr(torch.ops.llama_node, "ggml_mm")


def _build() -> None:
    build = _build_dir()
    if _load_built(build):
        _register_fake()
        return
    from torch.utils import cpp_extension

    build.mkdir(parents=True, exist_ok=True)
    # compile copies inside the build directory: ninja's build file names the source paths, so every checkout or
    # install with the same sources shares one build instead of rebuilding whenever another one used the cache
    for s in SOURCES:
        if not _same(build / s.name, s):
            tmp = build / f".{s.name}.{os.getpid()}"
            tmp.write_bytes(s.read_bytes())
            tmp.replace(build / s.name)
    started = time.perf_counter()
    library = cpp_extension.load(
        name=_NAME,
        sources=[str(build / s.name) for s in SOURCES if s.suffix == ".cpp"],
        extra_cflags=_flags(),
        extra_ldflags=["-fopenmp"],
        build_directory=str(build),
        is_python_module=False,
        verbose=False,
    )
    log.info("llama_node kernels ready in %.1f s (%s)", time.perf_counter() - started, library or build)
    if not hasattr(torch.ops.llama_node, "ggml_mm"):
        raise RuntimeError("the kernel library loaded but registered no llama_node::ggml_mm")
    _register_fake()


def _register_fake() -> None:
    """Shape-only implementation so ``torch.compile`` can trace through the op."""

    @torch.library.register_fake("llama_node::ggml_mm")
    def _(x: Tensor, w: Tensor, qtype: int, k: int, scalar: bool = False) -> Tensor:
        return x.new_empty(x.shape[0], w.shape[0])

    @torch.library.register_fake("llama_node::ggml_mm_parts")
    def _parts(x: Tensor, ws: list[Tensor], qtypes: list[int], k: int, scalar: bool = False) -> Tensor:
        return x.new_empty(x.shape[0], sum(w.shape[0] for w in ws))


def available() -> bool:
    """Whether ``torch.ops.llama_node.ggml_mm`` can be called: builds (or loads) the kernel on the first call.

    False, with one warning, when the build fails; False without building when ``LLAMA_NODE_KERNELS=0``.
    """
    with _lock:
        if "ok" not in _state:
            if os.environ.get("LLAMA_NODE_KERNELS", "1") == "0":
                log.info("LLAMA_NODE_KERNELS=0: using torch's int4 kernel for quantised linears")
                _state["ok"] = False
            else:
                try:
                    _build()
                    _state["ok"] = True
                except Exception as e:  # a missing compiler, ninja or header surfaces as many exception types
                    log.warning("could not build the llama_node kernels (%s); using torch's int4 kernel instead", e)
                    _state["ok"] = False
        return _state["ok"]


def has_avx2() -> bool:
    """Whether the built kernel has its AVX2 code path (else every call runs the scalar one)."""
    return available() and bool(torch.ops.llama_node.ggml_has_avx2())


_op: list[Callable[..., Tensor]] = []  # the resolved op: ``torch.ops.llama_node.ggml_mm`` costs ~3 µs per lookup


def ggml_mm(x: Tensor, w: Tensor, qtype: int, k: int, *, scalar: bool = False) -> Tensor:
    """``x [M, K]`` fp32 times raw GGUF blocks ``w [N, bytes per row]`` of ``qtype`` transposed -> fp32 ``[M, N]``.

    ``scalar`` runs the portable code path even where AVX2 was compiled in (for tests).
    """
    if not _op:
        _op.append(torch.ops.llama_node.ggml_mm.default)
    return _op[0](x, w, qtype, k, scalar)


def ggml_mm_parts(x: Tensor, ws: list[Tensor], qtypes: list[int], k: int, *, scalar: bool = False) -> Tensor:
    """``ggml_mm`` of the row-stack of ``ws`` (``ws[i]`` of type ``qtypes[i]``, the types may differ) -> ``[M, N]``,
    N the rows of all: each output column the bits ``ggml_mm`` of its own matrix gives, the activations rounded once."""
    return torch.ops.llama_node.ggml_mm_parts.default(x, ws, qtypes, k, scalar)


def decode_attention(
    qkv: Tensor,
    k: Tensor,
    v: Tensor,
    slots: list[int],
    positions: list[int],
    heads: int,
    *,
    grouped: bool = True,
    parts: int = 0,
    scalar: bool = False,
) -> Tensor:
    """The fused decode step's attention (``csrc/attention.cpp``), for tests and benches: row ``b`` of ``qkv``
    (fp32 ``[B, (heads + 2K)·E]``, q then k then v heads) writes its key and value at ``positions[b]`` of slot
    ``slots[b]`` of ``k``/``v`` (contiguous fp32 or f16 ``[slots, max_len, K, E]``, in place), then attends over the
    slot's keys ``0..positions[b]``: fp32 ``[B, heads·E]``.

    ``grouped=False`` runs the per-head kernel the grouped one replaced (its reference); ``parts`` splits each KV
    head's query heads into that many units of work (0: the plan's choice). Neither changes a bit of the result.
    """
    out: Tensor = torch.ops.llama_node.decode_attention.default(
        qkv, k, v, slots, positions, heads, grouped, parts, scalar
    )
    return out
