"""Quantized weights in the engine's packed layout: read from GGUF blocks, quantized from float weights at load, and
dequantized again (the portable path, and the reference the kernels are tested against).

A matrix [N, K] is stored in blocks of 32 output features, each in steps of 32 inputs, in the order the kernel
(engine.kernels.quant_gemm) reads them, both for its bf16 tiles and its int16 dot products: per step two tiles of 16 features, each 16 rows of 32 values,
row r holding inputs 2r and 2r + 1 of every feature (value e = 2 * feature + input). A row's 32 values take
4 * bits bytes: at 8 bits one byte each; at 4 bits byte i holds value i in its low nibble and value i + 16 in its
high one; at 6 bits the low four bits as at 4, then 8 bytes whose byte i holds the top two bits of values
i, i + 8, i + 16 and i + 24, lowest first. Scales follow per block, feature-minor: [blocks, groups, 32].
The values decode as engine.model.weight_formats says; every format there reads GGUF's blocks exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.model.weight_formats import FORMATS, SUPER_BLOCK, WeightFormat

FEATURES, STEP = 32, 32  # output features per block, inputs per step


@dataclass(slots=True)
class QuantizedWeight:
    fmt: WeightFormat
    out_features: int
    in_features: int
    quants: torch.Tensor  # uint8 [blocks, steps, 2, 16, 4 * bits]
    d: torch.Tensor  # fp16 [blocks, groups (super-blocks, the last maybe partial, for K-quants), 32]
    dmin: torch.Tensor | None  # fp16, as d
    sc: torch.Tensor | None  # int8 [blocks, groups, 32], K-quants only
    mn: torch.Tensor | None  # int8, as sc

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.quants, self.d, self.dmin, self.sc, self.mn)
                   if t is not None)

    def to(self, device: torch.device) -> QuantizedWeight:
        return self._map(lambda t: t.to(device))

    def clone(self) -> QuantizedWeight:
        return self._map(torch.clone)

    def _map(self, fn) -> QuantizedWeight:
        each = (lambda t: fn(t) if t is not None else None)
        return QuantizedWeight(self.fmt, self.out_features, self.in_features, each(self.quants), each(self.d),
                               each(self.dmin), each(self.sc), each(self.mn))


@dataclass(slots=True)
class Codes:
    """A matrix's quantized values and scales row by row, before packing: what GGUF blocks decode to."""

    fmt: WeightFormat
    q: np.ndarray  # uint8 [N, K]
    d: np.ndarray  # fp16 [N, groups or super-blocks]
    dmin: np.ndarray | None
    sc: np.ndarray | None  # int8 [N, groups]
    mn: np.ndarray | None

    def rows(self, index: np.ndarray) -> Codes:
        pick = (lambda a: a[index] if a is not None else None)
        return Codes(self.fmt, self.q[index], self.d[index], pick(self.dmin), pick(self.sc), pick(self.mn))

    @staticmethod
    def stack(parts: list[Codes]) -> Codes:
        """Matrices of one format stacked along their outputs (a fused q/k/v or gate/up product)."""
        cat = (lambda name: None if getattr(parts[0], name) is None
               else np.concatenate([getattr(p, name) for p in parts]))
        return Codes(parts[0].fmt, cat("q"), cat("d"), cat("dmin"), cat("sc"), cat("mn"))


# ---- GGUF blocks -> codes ---------------------------------------------------------------------------------------

def from_ggml(fmt: WeightFormat, data: np.ndarray, shape: tuple[int, int]) -> Codes:
    """GGUF's raw blocks of an [N, K] matrix (uint8, N rows of blocks) as codes."""
    n, k = shape
    block = SUPER_BLOCK if fmt.sub_scales else 32
    blocks = np.ascontiguousarray(data, dtype=np.uint8).reshape(n, k // block, -1)

    def f16(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a).view(np.float16).reshape(n, -1)

    def nibbles(qs: np.ndarray) -> np.ndarray:  # [..., 16] -> [..., 32]: low nibbles, then high ones
        return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)

    if fmt.name == "q8_0":
        q = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return Codes(fmt, q.reshape(n, k), f16(blocks[..., :2]), None, None, None)
    if fmt.name == "q4_0":
        return Codes(fmt, nibbles(blocks[..., 2:]).reshape(n, k), f16(blocks[..., :2]), None, None, None)
    if fmt.name == "q4_1":
        return Codes(fmt, nibbles(blocks[..., 4:]).reshape(n, k), f16(blocks[..., :2]), f16(blocks[..., 2:4]),
                     None, None)
    if fmt.name == "q4_k":
        s = blocks[..., 4:16].reshape(n, -1, 3, 4)
        lo, hi, both = s[..., 0, :], s[..., 1, :], s[..., 2, :]
        sc = np.concatenate([lo & 0x3F, (both & 0x0F) | ((lo >> 2) & 0x30)], axis=-1)
        mins = np.concatenate([hi & 0x3F, (both >> 4) | ((hi >> 2) & 0x30)], axis=-1)
        qs = blocks[..., 16:].reshape(n, -1, 4, 32)  # 32 bytes: sub-block 2c in low nibbles, 2c + 1 in high ones
        q = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(n, k)
        return Codes(fmt, q, f16(blocks[..., :2]), f16(blocks[..., 2:4]), sc.reshape(n, -1).astype(np.int8),
                     (-mins.astype(np.int16)).reshape(n, -1).astype(np.int8))
    if fmt.name == "q6_k":
        ql, qh = blocks[..., :128].reshape(n, -1, 2, 1, 64), blocks[..., 128:192].reshape(n, -1, 2, 1, 32)
        low = (ql >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 1, 2, 1)) & 0x0F
        high = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 1, 4, 1)) & 0x03
        q = low.reshape(n, -1, 8, 32) | (high.reshape(n, -1, 8, 32) << 4)
        return Codes(fmt, q.reshape(n, k), f16(blocks[..., 208:210]), None,
                     blocks[..., 192:208].view(np.int8).reshape(n, -1), None)
    raise ValueError(f"no GGUF reader for {fmt.name}")


def synthetic(fmt: WeightFormat, n: int, k: int, seed: int = 0) -> Codes:
    """An [n, k] matrix of random codes at small scales: weights to time a format's products with, made in
    milliseconds where quantizing a float matrix would take seconds."""
    g = np.random.default_rng(seed)
    groups = k // fmt.group
    scales = -(-k // SUPER_BLOCK) if fmt.sub_scales else groups
    d = np.full((n, scales), 1e-3, dtype=np.float16)
    sc = np.ones((n, groups), dtype=np.int8) if fmt.sub_scales else None
    mn = -sc if fmt.sub_scales and fmt.has_min else None
    return Codes(fmt, g.integers(0, 2**fmt.bits, (n, k), dtype=np.uint8), d, d.copy() if fmt.has_min else None,
                 sc, mn)


# ---- float weights -> codes ---------------------------------------------------------------------------------------

def quantize(weight: torch.Tensor, fmt: WeightFormat) -> Codes:
    """An [N, K] float matrix in `fmt`: q8_0, q4_0 and q4_1 exactly as ggml quantizes them, q4_k by searching
    each group's scale and minimum."""
    n, k = weight.shape
    if k % fmt.input_multiple:
        raise ValueError(f"{fmt.name} stores matrices whose input size is a multiple of {fmt.input_multiple}; "
                         f"this one has {k}")
    x = weight.detach().float().cpu().numpy()
    if fmt.name == "q4_k":
        return _quantize_q4_k(x)
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize as ggml_quantize

    return from_ggml(fmt, ggml_quantize(x, GGMLQuantizationType[fmt.ggml_type]), (n, k))


def _quantize_q4_k(x: np.ndarray) -> Codes:
    """llama.cpp's Q4_K quantization (quantize_row_q4_K_ref): per group of 32, the scale and minimum fitted by
    weighted least squares over a sweep of candidate ranges (make_qkx2_quants), each input weighted by the
    group's RMS plus its own magnitude; then both quantized to 6 bits under fp16 super-block scales, and the
    4-bit codes chosen again against them."""
    fmt = FORMATS["q4_k"]
    n, k = x.shape
    groups = k // 32
    per_super = -(-groups // 8)  # the last super-block may be partial
    scale = np.empty((n, groups), dtype=np.float32)
    minimum = np.empty((n, groups), dtype=np.float32)
    for r0 in range(0, n, Q4_K_ROWS):  # a slice of rows at a time bounds the sweep's temporaries
        xs = torch.from_numpy(np.ascontiguousarray(x[r0 : r0 + Q4_K_ROWS])).view(-1, groups, 32)
        weights = (xs**2).mean(-1, keepdim=True).sqrt() + xs.abs()
        sc, mn = _fit_scale_and_min(xs, weights)
        scale[r0 : r0 + Q4_K_ROWS], minimum[r0 : r0 + Q4_K_ROWS] = sc.numpy(), mn.numpy()

    def six_bits(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        padded = np.zeros((n, per_super * 8), dtype=np.float32)
        padded[:, :groups] = v
        top = padded.reshape(n, per_super, 8).max(axis=-1)
        inv = np.where(top > 0, 63 / np.maximum(top, 1e-30), 0).astype(np.float32)
        codes = np.clip(np.rint(padded.reshape(n, per_super, 8) * inv[..., None]), 0, 63)
        return (top / 63).astype(np.float16), codes.reshape(n, -1)[:, :groups].astype(np.uint8)

    d, sc = six_bits(scale)
    dmin, mins = six_bits(minimum)
    step = np.repeat(d.astype(np.float32), 8, axis=1)[:, :groups] * sc  # [N, groups]
    offset = np.repeat(dmin.astype(np.float32), 8, axis=1)[:, :groups] * mins
    g = x.reshape(n, groups, 32)
    # Divided, as llama.cpp divides (a product by the reciprocal can round a code the other way at a tie); a group
    # whose scale is zero codes zeros.
    shifted = g + offset[..., None]
    q = np.divide(shifted, step[..., None], out=np.zeros_like(shifted), where=step[..., None] > 0)
    q = np.clip(np.rint(q), 0, 15).astype(np.uint8)
    return Codes(fmt, q.reshape(n, k), d, dmin, sc.astype(np.int8), (-mins.astype(np.int16)).astype(np.int8))


Q4_K_ROWS = 512  # rows of a matrix whose groups are fitted at once: their temporaries stay in cache


def _fit_scale_and_min(x: torch.Tensor, w: torch.Tensor, levels: int = 15, steps: int = 20, start: float = -1.0,
                       delta: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's make_qkx2_quants over every group of x [..., 32] at once, weights w alike: the scale s and
    minimum m >= 0 (x ~ s * q - m, q in 0..levels) of least weighted squared error among the range's own fit and
    the least-squares fits to the codes of ranges stretched by start + delta * i levels. As there, each better
    fit's offset becomes the origin of the ranges tried after it."""
    lo, hi = x.amin(-1).clamp(max=0), x.amax(-1)
    flat = hi == lo
    sum_w, sum_x = w.sum(-1), (w * x).sum(-1)

    def codes(levels_over_range: float, origin: torch.Tensor) -> torch.Tensor:
        span = torch.where(flat, torch.ones_like(hi), hi - origin)
        return torch.round((levels_over_range / span)[..., None] * (x - origin[..., None])).clamp_(0, levels)

    sum_xx = (w * x * x).sum(-1)

    def sums(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        wq = w * q
        return wq.sum(-1), (wq * q).sum(-1), (wq * x).sum(-1)

    def error(s, m, sum_l, sum_l2, sum_xl) -> torch.Tensor:  # sum w (s q + m - x)^2, from the sums
        return s * s * sum_l2 + 2 * s * m * sum_l - 2 * s * sum_xl + m * m * sum_w - 2 * m * sum_x + sum_xx

    best_s = 1 / (levels / torch.where(flat, torch.ones_like(hi), hi - lo))
    best_m = lo.clone()
    best_err = error(best_s, best_m, *sums(codes(levels, lo)))
    for i in range(steps + 1):
        sum_l, sum_l2, sum_xl = sums(codes(start + delta * i + levels, best_m))
        det = sum_w * sum_l2 - sum_l * sum_l
        fits = det > 0
        det = torch.where(fits, det, torch.ones_like(det))
        s = (sum_w * sum_xl - sum_x * sum_l) / det
        m = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = m > 0  # a minimum above zero: refit the scale alone, through zero
        s = torch.where(positive, sum_xl / torch.where(sum_l2 > 0, sum_l2, torch.ones_like(sum_l2)), s)
        m = torch.where(positive, torch.zeros_like(m), m)
        err = error(s, m, sum_l, sum_l2, sum_xl)
        better = fits & (err < best_err)
        best_s, best_m = torch.where(better, s, best_s), torch.where(better, m, best_m)
        best_err = torch.where(better, err, best_err)
    return torch.where(flat, torch.zeros_like(best_s), best_s), -torch.where(flat, lo, best_m)


# ---- codes <-> the packed layout ----------------------------------------------------------------------------------

def pack(codes: Codes) -> QuantizedWeight:
    fmt = codes.fmt
    n, k = codes.q.shape
    n32 = -(-n // FEATURES) * FEATURES
    q = torch.zeros(n32, k, dtype=torch.uint8)
    q[:n] = torch.from_numpy(codes.q)
    # [block, tile, feature, step, row, pair] -> [block, step, tile, row, 32 values]
    values = q.view(n32 // FEATURES, 2, 16, k // STEP, 16, 2).permute(0, 3, 1, 4, 2, 5).reshape(
        n32 // FEATURES, k // STEP, 2, 16, 32)
    if fmt.bits == 8:
        quants = values
    else:
        low = values & 0x0F
        quants = low[..., :16] | (low[..., 16:] << 4)
        if fmt.bits == 6:
            top = (values >> 4).view(*values.shape[:-1], 4, 8)  # [..., j, i]: value i + 8j
            high = top[..., 0, :] | (top[..., 1, :] << 2) | (top[..., 2, :] << 4) | (top[..., 3, :] << 6)
            quants = torch.cat([quants, high], dim=-1)

    def scales(a: np.ndarray | None, dtype: torch.dtype) -> torch.Tensor | None:
        if a is None:
            return None
        t = torch.zeros(n32, a.shape[1], dtype=dtype)
        t[:n] = torch.from_numpy(np.ascontiguousarray(a)).view(dtype)
        return t.view(n32 // FEATURES, FEATURES, -1).transpose(1, 2).contiguous()

    return QuantizedWeight(fmt, n, k, quants.contiguous(), scales(codes.d, torch.float16),
                           scales(codes.dmin, torch.float16), scales(codes.sc, torch.int8),
                           scales(codes.mn, torch.int8))


def dequantize(w: QuantizedWeight, dtype: torch.dtype = torch.float32, blocks: torch.Tensor | None = None) -> torch.Tensor:
    """The weights in float, [N, K] (rows of the given 32-feature blocks only, [len(blocks) * 32, K], when given),
    computed in fp32 on the weight's device."""
    fmt, k = w.fmt, w.in_features
    pick = (lambda t: None if t is None else (t if blocks is None else t[blocks]))
    quants = pick(w.quants)
    nb = quants.shape[0]
    if fmt.bits == 8:
        values = quants
    else:
        packed = quants[..., :16]
        values = torch.cat([packed & 0x0F, packed >> 4], dim=-1)
        if fmt.bits == 6:
            high = quants[..., 16:24]
            top = torch.stack([(high >> s) & 0x03 for s in (0, 2, 4, 6)], dim=-2).reshape(values.shape)
            values = values | (top << 4)
    # [block, step, tile, row, feature, pair] -> [block, tile, feature, step, row, pair]
    q = values.view(nb, k // STEP, 2, 16, 16, 2).permute(0, 2, 4, 1, 3, 5).reshape(nb * FEATURES, k).float()

    def per_feature(t: torch.Tensor | None) -> torch.Tensor | None:  # [blocks, groups, 32] -> [blocks * 32, groups]
        return None if t is None else t.transpose(1, 2).reshape(nb * FEATURES, -1).float()

    d, dmin, sc, mn = (per_feature(pick(t)) for t in (w.d, w.dmin, w.sc, w.mn))
    if fmt.sub_scales:
        per, groups = SUPER_BLOCK // fmt.group, sc.shape[1]
        scale = d.repeat_interleave(per, dim=1)[:, :groups] * sc
        offset = dmin.repeat_interleave(per, dim=1)[:, :groups] * mn if dmin is not None else None
    else:
        scale, offset = d, dmin
    out = q.view(nb * FEATURES, -1, fmt.group).sub_(fmt.zero).mul_(scale.unsqueeze(-1))
    if offset is not None:
        out.add_(offset.unsqueeze(-1))
    out = out.view(nb * FEATURES, k)
    if blocks is None:
        out = out[: w.out_features]
    return out.to(dtype)


def dequantize_rows(w: QuantizedWeight, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows of the matrix (an embedding lookup from a quantized table): only the blocks holding them decode."""
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= w.out_features):
        raise IndexError(f"row ids must lie in [0, {w.out_features}): got {int(rows.min())}..{int(rows.max())}")
    blocks, where = torch.unique(rows // FEATURES, return_inverse=True)
    return dequantize(w, dtype, blocks)[where * FEATURES + rows % FEATURES]
