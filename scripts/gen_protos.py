"""Generate the Python stubs of ``protos/llama_node/v1/*.proto`` (messages, gRPC, and ``.pyi`` type stubs).

Usage:
    python scripts/gen_protos.py            # write the stubs next to the .proto files
    python scripts/gen_protos.py --check    # exit 1 if the committed stubs differ from fresh ones (CI)

Needs ``grpcio-tools`` and ``mypy-protobuf`` (the ``test`` extra). The ``.proto`` files are compiled with the
repository root as include path, so the generated imports read ``from protos.llama_node.v1 import ...``.
"""

from __future__ import annotations

import argparse
import filecmp
import logging
import shutil
import sys
import tempfile
from pathlib import Path

log = logging.getLogger("gen_protos")

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos" / "llama_node" / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def _plugin(name: str) -> str:
    """A protoc plugin from this interpreter's environment (the venv's bin), else from PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} not found: pip install mypy-protobuf")
    return found


def generate(out_root: Path) -> list[Path]:
    """Compile every ``.proto`` under ``protos/llama_node/v1`` into ``out_root`` (same relative layout)."""
    from grpc_tools import protoc  # imported here: only this script needs grpcio-tools

    protos = sorted(PROTO_DIR.glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT}",
        f"-I{include}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *(str(p.relative_to(ROOT)) for p in protos),
    ]
    code = protoc.main(args)
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")
    rel = PROTO_DIR.relative_to(ROOT)
    return sorted(p for p in (out_root / rel).iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def check() -> bool:
    """True when the committed stubs equal freshly generated ones."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        ok = True
        for path in fresh:
            committed = PROTO_DIR / path.name
            if not committed.exists() or not filecmp.cmp(path, committed, shallow=False):
                log.error("%s is out of date: run python scripts/gen_protos.py", committed.relative_to(ROOT))
                ok = False
        return ok


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed stubs instead")
    args = parser.parse_args()
    if args.check:
        return 0 if check() else 1
    for path in generate(ROOT):
        log.info("wrote %s", path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
