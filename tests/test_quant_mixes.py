"""llama.cpp's own quant mixes (Q2_K ... Q8_0) of SmolLM2-135M, made by llama.cpp's quantiser from an F16 source
(``bench/quant_mixes.py``), run by llama-node on every path: the native kernels (``--dtype auto``), torch's int4
kernel (``LLAMA_NODE_KERNELS=0``) and the exact fp32 path.

These files hold what the test-built GGUFs of ``test_fused_mixed`` / ``test_quant`` imitate: per-tensor types
chosen by llama.cpp (Q6_K / Q8_0 head, attn_v and ffn_down raised in some layers) and, because SmolLM2's rows of
576 are not a multiple of 256, the fallbacks of its K-quants (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0,
Q2_K/Q3_K -> Q4_0) next to real K-quant ffn_down rows of 1536.

- the packed load keeps every linear in its file type (no bf16 copy) and decodes through the fused step;
- the mean per-token log-likelihood of a text, fed one token at a time, is within ``LL_BOUND`` of llama.cpp's on
  the same file, the bound ``test_quant_smollm2`` holds the packaged Q4_1 to. Measured (2 threads, 115 tokens,
  ``bench/quant_mixes.py``): |diff| ≤ 0.027 nats on every mix and path (float32 ≤ 0.019, Q2_K's 0.0004); single
  tokens differ by up to 0.7 nats, the 8-bit activation rounding of either engine (greedy decoding parts from
  llama.cpp's at near-ties: Q2_K's second token, whose top three logits lie within 0.2 in both engines).

Slow (6 minutes on 2 cores at load average 3): run with ``pytest -m slow``. Skipped where llama-cpp-python is not
installed (CI does not install it).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("llama_cpp")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import quant_mixes  # noqa: E402
from decode import LlamaCppEngine  # noqa: E402

from llama_shard import fused, kernels  # noqa: E402
from llama_shard.ggml_linear import GGMLLinear, GGMLStack  # noqa: E402
from llama_shard.gguf_file import GGUFFile  # noqa: E402
from llama_shard.loading import load_stage, load_tokenizer, open_source  # noqa: E402
from llama_shard.quant import QuantLinear, QuantMode  # noqa: E402
from llama_shard.shard import ShardSpec  # noqa: E402

pytestmark = pytest.mark.slow

LL_BOUND = 0.05
THREADS = 2


@pytest.fixture(scope="module")
def mixes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return quant_mixes.make_mixes(tmp_path_factory.mktemp("mixes"), quant_mixes.MIXES, THREADS)


@pytest.fixture(scope="module")
def llama_cpp_ll(mixes: dict[str, Path]) -> dict[str, tuple[list[int], list[float]]]:
    out = {}
    for mix, path in mixes.items():
        ids = load_tokenizer(open_source(path)).encode(quant_mixes.TEXT)
        out[mix] = (ids, LlamaCppEngine(path, THREADS, n_ctx=512).log_likelihoods(ids))
    return out


@pytest.mark.parametrize("mix", quant_mixes.MIXES)
def test_the_packed_load_keeps_the_files_types_and_the_fused_step(mixes: dict[str, Path], mix: str) -> None:
    if not kernels.available():
        pytest.skip("the native kernels could not be built")
    path = mixes[mix]
    stage = load_stage(open_source(path), ShardSpec.whole(30), quantize=QuantMode.gguf)
    linears = [m for m in stage.modules() if isinstance(m, torch.nn.Linear | QuantLinear)]
    assert linears == [], linears[:3]  # nothing dequantised
    held = {p.qtype.name for m in stage.modules() if isinstance(m, GGMLStack) for p in m.linears}
    held |= {m.qtype.name for m in stage.modules() if isinstance(m, GGMLLinear)}
    gguf = GGUFFile(path)
    assert held == {gguf.tensor_type(n).name for n in gguf.tensor_names if n.endswith("weight")} - {"F32"}
    assert fused.decoder(stage, stage.new_cache(1, 64)) is not None


@pytest.mark.parametrize("path_kind", ["auto", "auto-nokernels", "float32"])
@pytest.mark.parametrize("mix", quant_mixes.MIXES)
def test_log_likelihood_is_llama_cpps(
    mixes: dict[str, Path],
    llama_cpp_ll: dict[str, tuple[list[int], list[float]]],
    mix: str,
    path_kind: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if path_kind == "auto-nokernels":
        monkeypatch.setattr(kernels, "available", lambda: False)
    elif path_kind == "auto" and not kernels.available():
        pytest.skip("the native kernels could not be built")
    ids, ref = llama_cpp_ll[mix]
    ours = quant_mixes.node_log_likelihoods(mixes[mix], path_kind, ids, THREADS)
    diff = sum(ours) / len(ours) - sum(ref) / len(ref)
    assert abs(diff) < LL_BOUND, (mix, path_kind, diff)
