"""Rotary position embeddings, with Llama-3 and linear frequency scaling (Llama 3's also as a GGUF file's
per-frequency divisors)."""
from __future__ import annotations

import math

import torch

from engine.model.config import ModelConfig


def inv_frequencies(cfg: ModelConfig) -> torch.Tensor:
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))  # [d/2]
    s = cfg.rope_scaling
    if s is None:
        return inv
    kind = s.get("rope_type", s.get("type"))
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


def cos_sin_table(cfg: ModelConfig, max_positions: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[max_positions, 2, head_dim]: cos and sin per position, halves repeated (rotate-half layout)."""
    inv = inv_frequencies(cfg)
    t = torch.arange(max_positions, dtype=torch.int64).float()
    freqs = torch.outer(t, inv)  # [P, d/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [P, d]
    return torch.stack((emb.cos(), emb.sin()), dim=1).to(dtype=dtype, device=device)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, d]; cos, sin: [T, 1, d]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
