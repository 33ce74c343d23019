"""What each layer loses at each weight format: the quality cost the planner weighs when it chooses a layer's
precision (engine.placement.precision).

A layer's error at a format is what running that layer alone at the format does to the model's predictions: the
mean, over the tokens of a calibration text, of the KL divergence (in nats) from the next-token distribution of the
model as the checkpoint stores it to that of the model with this one layer's matrix products at the format, on the
engine's own kernels. Summed over layers it approximates what a mix of formats costs in log-perplexity.

The output error of the layer alone (its update to the residual stream, relative) was tried first and ranked the
layers wrongly: it rated SmolLM2's last layer among the safest to quantize, where quantizing it alone to q4_0
raised perplexity 6%, five times any other layer. What a layer's error does downstream depends on the layers after
it and the LM head, so the measurement carries each perturbed hidden state to the end.

It reads the model one layer at a time: every perturbed residual stream so far runs through each next layer (as
separate sequences, a few at a time), so a model larger than memory is measured in the memory of one layer plus the
streams: (layers x formats) x tokens x hidden floats. Its cost grows with the square of the layer count: about a
minute for SmolLM2-135M and three for a 1.1B model on two CPU cores (2 GB of memory at most for the latter). The
figures are cached per checkpoint (its files' sizes and times), formats and text, under the cache root's quality/
folder.
"""
from __future__ import annotations

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
from engine.paths import cache_root, checkpoint_fingerprint

log = logging.getLogger("strata.calibration")

TOKENS = 1024  # tokens of calibration text each layer runs on
BLOCK = 16
GROUP_ROWS = 8192  # rows (tokens of all streams) run through a layer at once
HEAD_ROWS = 128  # rows of logits computed at once
METRIC_VERSION = 2  # bumped when the measurement changes, so cached figures are measured afresh
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
    base = resolve_formats(source, cfg, AUTO, {})
    lower = [f for f in choices if f != AUTO]

    def stage(layers: range, formats: dict[str, str], first: bool = False, last: bool = False) -> StageModel:
        return StageModel(cfg, source, layers, first, last, torch.float32, cpu, n, weight_dtype, wide_copy=False,
                          formats=formats)

    with torch.inference_mode():
        x = stage(range(0, 0), base, first=True).forward(torch.tensor(ids), torch.arange(n), *_batch(cfg, n, 1))
        streams: list[torch.Tensor] = []  # the residual stream with one earlier layer at a lower format
        labels: list[tuple[int, str]] = []
        for i in range(cfg.num_layers):
            reference = stage(range(i, i + 1), base)
            fresh = [stage(range(i, i + 1), resolve_formats(source, cfg, AUTO, {i: f})).forward(
                x, torch.arange(n), *_batch(cfg, n, 1)) for f in lower]
            # The reference stream and every earlier perturbed one through this layer, a few sequences at a time.
            carried = []
            for group in _groups([x, *streams], n):
                out = reference.forward(torch.cat(group), torch.arange(n).repeat(len(group)),
                                        *_batch(cfg, n, len(group)))
                carried += out.split(n)
            x, streams = carried[0], [*carried[1:], *fresh]
            labels += [(i, f) for f in lower]
            del reference, carried
        head = stage(range(cfg.num_layers, cfg.num_layers), base, last=True)
        out: dict[str, list[float]] = {f: [0.0] * cfg.num_layers for f in choices}
        for rows in range(0, n, HEAD_ROWS):  # a few rows of logits at a time: vocabularies reach 256k
            ref = torch.log_softmax(head.logits(x[rows:rows + HEAD_ROWS]), dim=-1)
            p = ref.exp()
            for (i, f), h in zip(labels, streams):
                logp = torch.log_softmax(head.logits(h[rows:rows + HEAD_ROWS]), dim=-1)
                out[f][i] += float((p * (ref - logp)).sum()) / n
    return {f: [max(e, 0.0) for e in errors] for f, errors in out.items()}


def _groups(streams: list[torch.Tensor], n: int) -> list[list[torch.Tensor]]:
    """The streams in groups of at most GROUP_ROWS rows (one stream at least), so a layer's activations stay small."""
    per = max(1, GROUP_ROWS // n)
    return [streams[k:k + per] for k in range(0, len(streams), per)]


def _batch(cfg: ModelConfig, n: int, count: int) -> tuple:
    """Attention metadata and a KV cache for `count` sequences of n tokens each, side by side."""
    blocks = -(-n // BLOCK)
    prefills = [(k * n, (k + 1) * n, 0, list(range(k * blocks, (k + 1) * blocks))) for k in range(count)]
    slots = [t[s // BLOCK] * BLOCK + s % BLOCK for _, _, _, t in prefills for s in range(n)]
    meta = build_metadata(BLOCK, slots, [], [], prefills, torch.device("cpu"))
    kv = torch.zeros((1, 2, count * blocks, BLOCK, cfg.num_kv_heads, cfg.head_dim), dtype=torch.float32)
    return meta, kv


def _cache_key(model_dir: Path, choices: tuple[str, ...], tokens: int) -> str:
    """Names the checkpoint by its files' names, sizes and modification times, with the formats, text and
    metric."""
    h = checkpoint_fingerprint(model_dir)
    h.update(f"{','.join(sorted(choices))}|{tokens}|v{METRIC_VERSION}|{torch.__version__}\n".encode())
    h.update(calibration_text().encode())
    return h.hexdigest()[:32]
