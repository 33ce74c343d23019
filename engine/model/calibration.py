"""What each layer loses at each weight format: the quality cost the planner weighs when it chooses a layer's
precision (engine.placement.precision).

A layer's error at a format is measured on calibration text, one layer at a time, with every layer before it at the
checkpoint's own weights: the layer runs on the reference hidden states twice, once as the checkpoint stores it and
once with its matrix products at the format, on the engine's own kernels, and

    error = |y_format - y|^2 / |y - x|^2

where x is the residual stream entering the layer and y what leaves it: the squared error of the layer's update to
the residual stream, relative to the update itself. 0 is exact; 0.01 is an update 1% off in energy. Layers are read
one at a time, so a model far larger than memory is measured in the memory of one layer. The figures are cached
per checkpoint (its files' sizes and times), formats and text, under the cache root's quality/ folder.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import torch

from engine.model.attention import build_metadata
from engine.model.checkpoint import checkpoint_tokenizer, resolve_formats
from engine.model.config import ModelConfig
from engine.model.weight_formats import AUTO
from engine.paths import cache_root

log = logging.getLogger("strata.calibration")

TOKENS = 256  # tokens of calibration text each layer runs on
BLOCK = 16
METRIC_VERSION = 1  # bumped when the measurement changes, so cached figures are measured afresh
# Prose and code-flavoured English the engine ships with: the docstrings of these standard modules. Not the text the
# perplexity benchmark scores on (pydoc_data's help topics).
_TEXT_MODULES = ("argparse", "collections", "json", "logging", "subprocess", "threading", "asyncio", "pathlib")


def calibration_text() -> str:
    import importlib

    return "\n\n".join(importlib.import_module(m).__doc__ or "" for m in _TEXT_MODULES)


def calibration_ids(model_dir: Path, cfg: ModelConfig, tokens: int = TOKENS) -> list[int]:
    """The text as the checkpoint's tokenizer reads it; without a tokenizer, its bytes taken as token ids."""
    text = calibration_text()
    tok = checkpoint_tokenizer(model_dir)
    ids = tok.encode(text, add_special_tokens=False) if tok is not None else list(text.encode())
    return [i % cfg.vocab_size for i in ids[:tokens]]


def layer_errors(model_dir: str | Path, cfg: ModelConfig, source, choices: tuple[str, ...], *,
                 tokens: int = TOKENS, say=None) -> dict[str, list[float]]:
    """{format: per layer, its error} for each of choices (AUTO, the checkpoint's own, is 0 everywhere), from the
    cache or measured (say: told a line before a measurement starts)."""
    model_dir = Path(model_dir)
    key = _cache_key(model_dir, choices, tokens)
    path = cache_root() / "quality" / f"{key}.json"
    try:
        cached = json.loads(path.read_text())
        if all(len(cached.get(f, ())) == cfg.num_layers for f in choices):
            return {f: [float(e) for e in cached[f]] for f in choices}
    except (OSError, ValueError):
        pass
    if say is not None:
        say(f"measuring each layer's error at {', '.join(f for f in choices if f != AUTO)} on {tokens} tokens of "
            "calibration text (once per checkpoint; cached)")
    started = time.perf_counter()
    errors = measure_layer_errors(model_dir, cfg, source, choices, tokens)
    log.info("layer errors measured in %.1f s", time.perf_counter() - started)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(errors))
        tmp.replace(path)
    except OSError:
        pass  # a read-only home measures again next time
    return errors


def measure_layer_errors(model_dir: Path, cfg: ModelConfig, source, choices: tuple[str, ...],
                         tokens: int = TOKENS) -> dict[str, list[float]]:
    from engine.model.stage_model import StageModel
    from engine.placement.local_device import TORCH_DTYPES, resolve_dtypes

    cpu = torch.device("cpu")
    ids = calibration_ids(model_dir, cfg, tokens)
    n = len(ids)
    _, weights = resolve_dtypes("auto", cfg.checkpoint_dtype, cpu)
    weight_dtype = TORCH_DTYPES[weights]
    blocks = -(-n // BLOCK)
    kv = torch.zeros((1, 2, blocks, BLOCK, cfg.num_kv_heads, cfg.head_dim), dtype=torch.float32)
    meta = build_metadata(BLOCK, list(range(n)), [], [], [(0, n, 0, list(range(blocks)))], cpu)
    positions = torch.arange(n)
    base = resolve_formats(source, cfg, AUTO, {})
    out: dict[str, list[float]] = {f: [] for f in choices}

    def run(i: int, formats: dict[str, str], x: torch.Tensor) -> torch.Tensor:
        model = StageModel(cfg, source, range(i, i + 1), False, False, torch.float32, cpu, n, weight_dtype,
                           wide_copy=False, formats=formats)
        return model.forward(x, positions, meta, kv)

    with torch.inference_mode():
        embed = StageModel(cfg, source, range(0, 0), True, False, torch.float32, cpu, n, weight_dtype,
                           wide_copy=False, formats=base)
        x = embed.forward(torch.tensor(ids), positions, meta, kv)
        del embed
        for i in range(cfg.num_layers):
            y = run(i, base, x)
            update = float((y - x).double().pow(2).sum())
            for f in choices:
                if f == AUTO:
                    out[f].append(0.0)
                    continue
                y_f = run(i, resolve_formats(source, cfg, AUTO, {i: f}), x)
                out[f].append(float((y_f - y).double().pow(2).sum()) / max(update, 1e-30))
            x = y
    return out


def _cache_key(model_dir: Path, choices: tuple[str, ...], tokens: int) -> str:
    """Names the checkpoint by its files' names, sizes and modification times, with the formats, text and
    metric."""
    root = model_dir.resolve()
    files = [root] if root.is_file() else sorted(p for p in root.iterdir() if p.is_file())
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    h.update(f"{','.join(choices)}|{tokens}|v{METRIC_VERSION}|{torch.__version__}\n".encode())
    h.update(calibration_text().encode())
    return h.hexdigest()[:32]
