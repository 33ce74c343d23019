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
        "paged_decode_attention": ([ptr, c_long, ptr, ptr, ctypes.c_int, ptr, ptr, ptr, ctypes.c_float, c_long, c_long,
                                    c_long, c_long, c_long, c_long, ctypes.c_float, ptr, ctypes.c_int, ctypes.c_int],
                                   ctypes.c_int),
    })


KV_DTYPES = (torch.float32, torch.bfloat16)  # what the cache may hold; queries and outputs are fp32
# Whether a bf16 cache with heads of 64 or 128 may take the AVX-512 path where the CPU has it (tests turn it off to
# cover the AVX2 path that other CPUs take).
WIDE = True


def available(k_cache: torch.Tensor) -> bool:
    """Whether decode attention over this cache (one layer's keys, or values) runs on the kernel."""
    return (k_cache.device.type == "cpu" and k_cache.dtype in KV_DTYPES and k_cache.is_contiguous()
            and _library() is not None)


_checked: list = [None]  # the last (tables, lens, num_blocks, block_size) found in range: every layer of a step


def _check_ranges(tables: torch.Tensor, lens: torch.Tensor, num_blocks: int, block_size: int) -> None:
    """What torch's indexing would refuse, checked here: out of range, the C code would read other memory. Once
    per step: its layers share the tensors (the reference held here keeps their identity from being reused)."""
    last = _checked[0]
    if last is not None and last[0] is tables and last[1] is lens and last[2:] == (num_blocks, block_size):
        return
    if tables.numel() and (int(tables.min()) < 0 or int(tables.max()) >= num_blocks or int(lens.min()) < 1
                           or int(lens.max()) > tables.shape[1] * block_size):
        raise IndexError("paged_decode_attention: a block table or context length is out of range")
    _checked[0] = (tables, lens, num_blocks, block_size)


def paged_decode_attention(
    q: torch.Tensor,  # [n, heads, d] fp32; rows may be strided (a view of fused qkv rows)
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, d], contiguous, fp32 or bf16
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [n, max_blocks] int64
    context_lens: torch.Tensor,  # [n] int64
    scale: float,
    starts: torch.Tensor | None = None,  # [n] int64: keys of each table left out (a sliding window's first block)
    softcap: float | None = None,  # scores capped to cap * tanh(score / cap) before the softmax (Gemma 2)
) -> torch.Tensor:  # [n, heads, d]
    n, heads, d = q.shape
    if q.stride(2) != 1 or q.stride(1) != d:
        q = q.contiguous()
    num_blocks, block_size, kv_heads, _ = k_cache.shape
    tables = _int64(block_tables)
    lens = _int64(context_lens)
    # The shapes and dtypes the C code assumes.
    if (q.dtype != torch.float32 or k_cache.dtype not in KV_DTYPES or v_cache.dtype != k_cache.dtype
            or v_cache.shape != k_cache.shape or not v_cache.is_contiguous() or not k_cache.is_contiguous()
            or k_cache.shape[3] != d or heads % kv_heads or tables.shape[0] != n or lens.shape != (n,)):
        raise ValueError("paged_decode_attention: inconsistent shapes or dtypes")
    _check_ranges(tables, lens, num_blocks, block_size)
    if starts is not None:
        starts = _int64(starts)
        if starts.shape != (n,) or (n and (int(starts.min()) < 0 or bool((starts >= lens).any()))):
            raise IndexError("paged_decode_attention: a window start is out of range")
    out = q.new_empty((n, heads, d))
    status = _library().paged_decode_attention(
        q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), int(k_cache.dtype == torch.bfloat16),
        tables.data_ptr(), lens.data_ptr(), starts.data_ptr() if starts is not None else None, softcap or 0.0,
        n, heads, kv_heads, d, block_size, tables.shape[1], scale, out.data_ptr(), torch.get_num_threads(), int(WIDE),
    )
    if status:
        raise MemoryError("paged_decode_attention: no memory for the attention's buffers")
    return out


def _int64(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.int64 and t.is_contiguous() else t.to(torch.int64).contiguous()
