"""Defaults shared by the cluster commands, importable without grpc, zeroconf or cryptography (fast CLI start)."""

from __future__ import annotations

import os
from pathlib import Path

#: The coordinator's join endpoint (Coordinator service: Join, Echo, ListNodes).
DEFAULT_JOIN_PORT = 50050
#: Cluster CA, token, admin certificate, slice catalog.
DEFAULT_STATE_DIR = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "llama-node"
