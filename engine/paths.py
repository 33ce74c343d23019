"""Where Strata keeps what it makes once and reuses: the demo model, the device probe's figures, built kernels."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_root() -> Path:
    """STRATA_CACHE where set (and not empty), else ~/.cache/strata."""
    root = os.environ.get("STRATA_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "strata"


def checkpoint_fingerprint(model_dir: Path):
    """A sha256 over a checkpoint's files' names, sizes and modification times (a file, or a folder's files), for
    what is measured once per checkpoint and cached; callers may add what else their figures depend on."""
    root = model_dir.resolve()
    files = [root] if root.is_file() else sorted(p for p in root.iterdir() if p.is_file())
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h
