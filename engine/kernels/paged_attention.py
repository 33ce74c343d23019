"""Decode attention read straight from the paged KV cache on x86-64 CPUs (paged_attention.c).

torch has no paged attention on the CPU: without this kernel, the engine gathers every
sequence's context blocks into a contiguous buffer per layer and runs SDPA over it, which
writes the whole context once and reads it twice.
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from engine.kernels import build

SOURCE = Path(__file__).with_name("paged_attention.c")
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp"]
CPU_FEATURES = ("avx2", "fma")


@functools.cache
def _library() -> ctypes.CDLL | None:
    c_long, ptr = ctypes.c_long, ctypes.c_void_p
    return build.load_kernel(SOURCE, FLAGS, CPU_FEATURES, {
        "paged_decode_attention": [ptr, ptr, ptr, ptr, ptr, c_long, c_long, c_long, c_long, c_long, c_long,
                                   ctypes.c_float, ptr, ctypes.c_int],
    })


def available(k_cache: torch.Tensor) -> bool:
    return k_cache.device.type == "cpu" and k_cache.dtype == torch.float32 and _library() is not None


def paged_decode_attention(
    q: torch.Tensor,  # [n, heads, d] fp32
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, d], contiguous
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [n, max_blocks] int64
    context_lens: torch.Tensor,  # [n] int64
    scale: float,
) -> torch.Tensor:  # [n, heads, d]
    q = q.contiguous()
    n, heads, d = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    out = torch.empty_like(q)
    _library().paged_decode_attention(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(), context_lens.data_ptr(),
        n, heads, kv_heads, d, block_size, block_tables.shape[1], scale, out.data_ptr(), torch.get_num_threads(),
    )
    return out
