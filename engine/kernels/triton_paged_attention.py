"""Decode attention read straight from the paged KV cache on GPUs, in Triton.

Each program takes one sequence and one KV head, with the query heads that share it (GQA), and walks that
sequence's own blocks with an online softmax, so nothing is gathered and a step reads each sequence's context once,
whatever the lengths in the batch. The same kernel runs on the CPU under Triton's interpreter (TRITON_INTERPRET=1),
which is how the tests check it where no GPU is.
"""
from __future__ import annotations

import functools
import os

import torch

MIN_TILE = 16  # tl.dot's smallest dimension: query heads are padded to it, and blocks must hold at least this many


@functools.cache
def _kernel():
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def paged_decode(q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, out_ptr, scale,
                     stride_qs, stride_qh, stride_kb, stride_kt, stride_kh, stride_ts, stride_os, stride_oh,
                     GROUP: tl.constexpr, GROUP_TILE: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        heads = kv_head * GROUP + tl.arange(0, GROUP_TILE)  # the query heads of this KV head, padded to the tile
        head_ok = tl.arange(0, GROUP_TILE) < GROUP
        dims = tl.arange(0, HEAD_DIM)
        # Products in fp32, whatever the cache holds: decode attention is bound by reading the cache, not by its
        # arithmetic, and fp32 keeps a GPU's answer that of the CPU's kernels.
        q = tl.load(q_ptr + seq * stride_qs + heads[:, None] * stride_qh + dims[None, :], mask=head_ok[:, None],
                    other=0.0).to(tl.float32)
        length = tl.load(lens_ptr + seq)
        m = tl.full((GROUP_TILE,), float("-inf"), dtype=tl.float32)
        l = tl.zeros((GROUP_TILE,), dtype=tl.float32)
        acc = tl.zeros((GROUP_TILE, HEAD_DIM), dtype=tl.float32)
        slots = tl.arange(0, BLOCK)
        for b in range(0, tl.cdiv(length, BLOCK)):
            block = tl.load(tables_ptr + seq * stride_ts + b)
            at = block * stride_kb + slots[:, None] * stride_kt + kv_head * stride_kh + dims[None, :]
            # Slots past the context hold whatever a freed sequence left there: never read, as 0 * inf is NaN.
            valid = (b * BLOCK + slots) < length
            k = tl.load(k_ptr + at, mask=valid[:, None], other=0.0).to(tl.float32)  # [BLOCK, HEAD_DIM]
            v = tl.load(v_ptr + at, mask=valid[:, None], other=0.0).to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # [GROUP_TILE, BLOCK]
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m - m_new)
            l = l * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            m = m_new
        out = acc / l[:, None]
        tl.store(out_ptr + seq * stride_os + heads[:, None] * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None])

    return paged_decode


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def available(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether decodes of these queries over this cache run on the kernel: a GPU (or the CPU under Triton's
    interpreter), Triton installed, blocks of at least MIN_TILE slots and a power-of-two head size."""
    _, block_size, _, d = k_cache.shape
    on_device = q.device.type == "cuda" or (q.device.type == "cpu" and _interpreted())
    return (on_device and block_size >= MIN_TILE and d >= MIN_TILE and d & (d - 1) == 0
            and q.dtype in (torch.float32, torch.bfloat16, torch.float16) and k_cache.is_contiguous()
            and _kernel() is not None)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                           lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q [n, heads, d]; caches [num_blocks, block_size, kv_heads, d]; tables [n, max_blocks]; lens [n], each
    sequence's context including its new token (already in the cache) -> [n, heads, d] in q's dtype."""
    n, heads, d = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    group = heads // kv_heads
    q = q.contiguous()
    out = torch.empty_like(q)
    tile = max(MIN_TILE, 1 << (group - 1).bit_length())
    _kernel()[(n, kv_heads)](
        q, k_cache, v_cache, tables, lens, out, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, GROUP_TILE=tile, BLOCK=block_size, HEAD_DIM=d,
    )
    return out
