"""Rotary position embeddings, with Llama-3, linear and LongRoPE frequency scaling (Llama 3's also as a GGUF file's
per-frequency divisors).

LongRoPE (Phi-3) has two sets of frequencies: a sequence no longer than the model's original context is rotated with
the short ones, a longer one with the long ones, as the reference implementation chooses by the sequence's length.
The table holds both, short then long, and each sequence's rows are chosen by its length (table_offset)."""
from __future__ import annotations

import math

import torch

from engine.model.config import ModelConfig


def inv_frequencies(cfg: ModelConfig, long: bool = False, local: bool = False) -> torch.Tensor:
    """long: LongRoPE's frequencies for sequences beyond the original context; local: the sliding layers' own
    (cfg.local_rope_theta, unscaled)."""
    d = cfg.head_dim
    theta = cfg.local_rope_theta if local else cfg.rope_theta
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))  # [d/2]
    s = cfg.rope_scaling
    if s is None or local:
        return inv
    kind = s.get("rope_type", s.get("type"))
    if kind == "longrope":
        factors = torch.tensor(s["long_factor" if long else "short_factor"], dtype=torch.float32)
        return 1.0 / (factors * cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    if kind == "linear":
        return inv / float(s["factor"])
    if kind == "freq_factors":  # a GGUF's rope_freqs: Llama 3's scaling as llama.cpp applies it
        return inv / torch.tensor(s["factors"], dtype=torch.float32)
    # llama3: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    factor = float(s["factor"])
    low = float(s.get("low_freq_factor", 1.0))
    high = float(s.get("high_freq_factor", 4.0))
    old_len = float(s.get("original_max_position_embeddings", 8192))
    low_wavelen = old_len / low
    high_wavelen = old_len / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def long_rope(cfg: ModelConfig) -> int | None:
    """The original context of a LongRoPE model (longer sequences take the long frequencies), else None."""
    s = cfg.rope_scaling
    return s["original_max_position_embeddings"] if s is not None and s.get("rope_type") == "longrope" else None


def cos_sin_table(cfg: ModelConfig, max_positions: int, dtype: torch.dtype, device: torch.device,
                  local: bool = False) -> torch.Tensor:
    """[max_positions, 2, head_dim]: cos and sin per position, halves repeated (rotate-half layout). For LongRoPE,
    the short frequencies' rows for the positions within the original context (a sequence at the short ones never
    goes past it), then, where a sequence can be longer, the long ones' for every position (table_offset). local: the
    sliding layers' table (cfg.local_rope_theta)."""
    original = long_rope(cfg) if not local else None
    parts = [(False, max_positions)]
    if original is not None:
        parts = [(False, min(original, max_positions))] + ([(True, max_positions)] if max_positions > original else [])
    tables = []
    for long, rows in parts:
        freqs = torch.outer(torch.arange(rows, dtype=torch.int64).float(), inv_frequencies(cfg, long, local))
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, d]
        cos, sin = emb.cos(), emb.sin()
        if original is not None:
            scale = cfg.rope_scaling["attention_factor"]
            cos, sin = cos * scale, sin * scale
        tables.append(torch.stack((cos, sin), dim=1))
    return torch.cat(tables).to(dtype=dtype, device=device)


def table_offset(cfg: ModelConfig, prompt_len: int, end: int) -> int:
    """Where a sequence's rows start in the cos/sin table (cos_sin_table) for a step whose chunk ends at position
    `end`: 0, or for LongRoPE the long rows (after the original context's short ones) once the sequence (its prompt,
    or what it has reached) is longer than the original context. A sequence that grows past it as it decodes keeps
    the keys it cached before at the short frequencies (the reference implementation computes them again at the long
    ones)."""
    original = long_rope(cfg)
    return original if original is not None and max(prompt_len, end) > original else 0


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, d]; cos, sin: [T, 1, d]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
