"""How a mixture of experts' tokens spread over its experts, as served. A server adds the tokens its stages routed
to each expert of each layer to a file per checkpoint (in the cache) when it stops; the planner then prices a step by
the experts that spread reaches (engine.placement.cost.ModelCost.routing) instead of taking routing to be uniform.
Experts are not alike across layers, so what is kept is each layer's experts' shares sorted from the busiest, averaged
over the layers. Imports no torch."""
from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import numpy as np

from engine.paths import cache_root, checkpoint_fingerprint

# Below this many routed choices per expert in a layer, the layer's spread is noise and is not used.
MIN_CHOICES_PER_EXPERT = 8


def routing_path(model_dir: str | Path) -> Path:
    return cache_root() / "routing" / f"{checkpoint_fingerprint(Path(model_dir)).hexdigest()[:32]}.json"


def record_routing(model_dir: str | Path, counts: np.ndarray) -> None:
    """Add counts ([layers, experts]: tokens routed to each expert) to what the checkpoint's file holds."""
    if not counts.size or not counts.any():
        return
    try:
        path = routing_path(model_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Servers of one checkpoint stopping together add to the file one at a time.
        with open(path.with_name(path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            total = _read(path)
            total = counts if total is None or total.shape != counts.shape else total + counts
            tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
            tmp.write_text(json.dumps({"tokens": total.tolist()}))
            tmp.replace(path)
    except OSError:
        pass  # a read-only home, or a checkpoint gone: routing is priced as it was


def measured_routing(model_dir: str | Path, num_layers: int, num_experts: int) -> tuple[tuple[float, ...], int]:
    """(each expert's share of a layer's routed choices, busiest first, averaged over the layers measured enough;
    the choices they were measured over); ((), 0) where nothing was."""
    try:
        counts = _read(routing_path(model_dir))
    except OSError:
        return (), 0
    if counts is None or counts.shape != (num_layers, num_experts):
        return (), 0
    enough = counts[counts.sum(axis=1) >= MIN_CHOICES_PER_EXPERT * num_experts]
    if not len(enough):
        return (), 0
    shares = -np.sort(-enough / enough.sum(axis=1, keepdims=True), axis=1)
    return tuple(float(s) for s in shares.mean(axis=0)), int(enough.sum())


def _read(path: Path) -> np.ndarray | None:
    try:
        tokens = np.asarray(json.loads(path.read_text())["tokens"], dtype=np.int64)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return tokens if tokens.ndim == 2 and (tokens >= 0).all() else None
