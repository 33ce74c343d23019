"""Where Strata keeps what it makes once and reuses: the demo model, the device probe's figures, built kernels."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """STRATA_CACHE where set (and not empty), else ~/.cache/strata."""
    root = os.environ.get("STRATA_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "strata"
