"""Models the user already has: Ollama's store and the Hugging Face hub cache, found by name.

* Ollama keeps ``manifests/<registry>/<namespace>/<model>/<tag>`` (JSON, OCI-style) whose layer of media type
  ``application/vnd.ollama.image.model`` names a GGUF blob ``blobs/sha256-<hex>``. The user's store is
  ``~/.ollama/models`` (or ``$OLLAMA_MODELS``), the Linux service's ``/usr/share/ollama/.ollama/models``.
  ``registry.ollama.ai/library/llama3.1/70b`` is named ``llama3.1:70b``, as ``ollama list`` shows it.
* The hub cache ``~/.cache/huggingface/hub`` (or ``$HF_HUB_CACHE``, ``$HF_HOME/hub``) holds
  ``models--<org>--<name>/snapshots/<rev>/``: a directory with ``config.json`` and safetensors is named
  ``org/name``; a ``.gguf`` file in it ``org/name/<file>.gguf``.

Nothing here imports torch; listing reads directory entries and small manifests only.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

OLLAMA_MODEL_MEDIA_TYPE = "application/vnd.ollama.image.model"
OLLAMA_DEFAULT_REGISTRY = "registry.ollama.ai"


@dataclass(frozen=True, slots=True)
class LocalModel:
    name: str
    path: Path
    size_bytes: int
    modified_at: float
    digest: str
    source: str  # "ollama" or "huggingface"


def ollama_roots(env: Mapping[str, str] | None = None, home: Path | None = None) -> list[Path]:
    env = os.environ if env is None else env
    home = Path.home() if home is None else home
    roots = [Path(env["OLLAMA_MODELS"])] if env.get("OLLAMA_MODELS") else []
    roots += [home / ".ollama" / "models", Path("/usr/share/ollama/.ollama/models")]
    return roots


def hf_roots(env: Mapping[str, str] | None = None, home: Path | None = None) -> list[Path]:
    env = os.environ if env is None else env
    home = Path.home() if home is None else home
    roots = []
    if env.get("HF_HUB_CACHE"):
        roots.append(Path(env["HF_HUB_CACHE"]))
    if env.get("HF_HOME"):
        roots.append(Path(env["HF_HOME"]) / "hub")
    roots.append(home / ".cache" / "huggingface" / "hub")
    return roots


def _ollama_name(manifest: Path, manifests: Path) -> str:
    registry, *namespace, model, tag = manifest.relative_to(manifests).parts
    if registry == OLLAMA_DEFAULT_REGISTRY and namespace == ["library"]:
        return f"{model}:{tag}"
    prefix = "/".join(namespace) if registry == OLLAMA_DEFAULT_REGISTRY else "/".join([registry, *namespace])
    return f"{prefix}/{model}:{tag}"


def scan_ollama(root: Path) -> list[LocalModel]:
    manifests, blobs = root / "manifests", root / "blobs"
    found: list[LocalModel] = []
    if not manifests.is_dir():
        return found
    for manifest in sorted(p for p in manifests.rglob("*") if p.is_file()):
        try:
            layers = json.loads(manifest.read_text()).get("layers", [])
            model_layer = next(x for x in layers if x.get("mediaType") == OLLAMA_MODEL_MEDIA_TYPE)
            digest = str(model_layer["digest"])
            blob = blobs / digest.replace(":", "-")
            name = _ollama_name(manifest, manifests)
        except (OSError, ValueError, StopIteration, KeyError, AttributeError, TypeError) as e:
            log.debug("skipping Ollama manifest %s: %s", manifest, e)
            continue
        if not blob.is_file():
            log.debug("Ollama manifest %s names a missing blob %s", manifest, blob)
            continue
        stat = blob.stat()
        found.append(LocalModel(name, blob, stat.st_size, manifest.stat().st_mtime, digest, "ollama"))
    return found


def scan_hf_cache(root: Path) -> list[LocalModel]:
    found: list[LocalModel] = []
    if not root.is_dir():
        return found
    for repo in sorted(root.glob("models--*")):
        repo_id = repo.name.removeprefix("models--").replace("--", "/")
        snapshot = _latest_snapshot(repo)
        if snapshot is None:
            continue
        files = list(snapshot.iterdir())
        if (snapshot / "config.json").is_file() and any(f.suffix == ".safetensors" for f in files):
            size = sum(f.stat().st_size for f in files if f.suffix == ".safetensors" and f.exists())
            found.append(LocalModel(repo_id, snapshot, size, snapshot.stat().st_mtime, snapshot.name, "huggingface"))
        for f in sorted(files):
            if f.suffix == ".gguf" and f.exists():
                stat = f.stat()
                found.append(
                    LocalModel(f"{repo_id}/{f.name}", f, stat.st_size, stat.st_mtime, snapshot.name, "huggingface")
                )
    return found


def _latest_snapshot(repo: Path) -> Path | None:
    ref = repo / "refs" / "main"
    if ref.is_file():
        snapshot = repo / "snapshots" / ref.read_text().strip()
        if snapshot.is_dir():
            return snapshot
    if not (repo / "snapshots").is_dir():
        return None
    snapshots = sorted((repo / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime)
    return snapshots[-1] if snapshots else None


def list_local_models(ollama: Iterable[Path] | None = None, hf: Iterable[Path] | None = None) -> list[LocalModel]:
    """Every model in the Ollama stores and the HF cache, each name once (the first root wins)."""
    seen: dict[str, LocalModel] = {}
    for root in ollama_roots() if ollama is None else ollama:
        for m in scan_ollama(root):
            seen.setdefault(m.name, m)
    for root in hf_roots() if hf is None else hf:
        for m in scan_hf_cache(root):
            seen.setdefault(m.name, m)
    return list(seen.values())


def find_model(name: str, models: Iterable[LocalModel] | None = None) -> LocalModel | None:
    """The local model called ``name`` (``llama3.1`` means ``llama3.1:latest``, as in Ollama)."""
    candidates = list(list_local_models() if models is None else models)
    wanted = {name, name.lower(), f"{name}:latest", f"{name.lower()}:latest"}
    for m in candidates:
        if m.name in wanted or m.name.lower() in wanted:
            return m
    return None
