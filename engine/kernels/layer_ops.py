"""A decoder layer's elementwise work in one call per step of it, on x86-64 CPUs (layer_ops.c).

The callers (engine.model.layer_ops) check shapes and index ranges once per forward pass, and what
every layer of the pass shares (check_rotary); these functions check the rest of what the C
code relies on: dtypes, contiguity and shapes.
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from engine.kernels import build

SOURCE = Path(__file__).with_name("layer_ops.c")
FLAGS = ["-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp"]
CPU_FEATURES = ("avx2", "fma")


@functools.cache
def _library() -> ctypes.CDLL | None:
    c_long, ptr, c_int = ctypes.c_long, ctypes.c_void_p, ctypes.c_int
    return build.load_kernel(SOURCE, FLAGS, CPU_FEATURES, {
        "add_rms_norm": ([ptr, ptr, ptr, ptr, c_long, c_long, ctypes.c_float, c_int], None),
        "head_rms_norm": ([ptr, c_long, c_long, c_long, c_long, ptr, ptr, ctypes.c_float, c_int], None),
        "rotary_into_cache": ([ptr, c_long, c_long, c_long, c_long, ptr, ptr, ptr, ptr, ptr, c_int, c_int], None),
        "silu_mul": ([ptr, ptr, c_long, c_long, c_int], None),
    })


KV_DTYPES = (torch.float32, torch.bfloat16)  # what the KV cache may hold


def available(x: torch.Tensor) -> bool:
    """Whether a layer's activations like x take the kernel."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and _library() is not None


def _fp32(*ts: torch.Tensor | None) -> None:
    for t in ts:
        if t is not None and (t.dtype != torch.float32 or not t.is_contiguous() or t.device.type != "cpu"):
            raise ValueError(f"layer_ops takes contiguous fp32 CPU tensors, got {t.dtype} {list(t.shape)}")


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, D] += delta in place (when given); returns rms_norm(x) * weight."""
    _fp32(x, delta, weight)
    T, D = x.shape
    if weight.shape != (D,) or (delta is not None and delta.shape != x.shape):
        raise ValueError("add_rms_norm: inconsistent shapes")
    h = torch.empty_like(x)
    _library().add_rms_norm(x.data_ptr(), delta.data_ptr() if delta is not None else None, weight.data_ptr(),
                            h.data_ptr(), T, D, eps, torch.get_num_threads())
    return h


def head_rms_norm(qkv: torch.Tensor, heads: int, kv_heads: int, q_weight: torch.Tensor, k_weight: torch.Tensor,
                  eps: float) -> None:
    """qkv [T, (heads + 2 kv_heads) d]: each query head RMS-normalised and scaled by q_weight [d], each key head by
    k_weight [d], in place."""
    _fp32(qkv, q_weight, k_weight)
    d = q_weight.shape[0]
    if qkv.dim() != 2 or qkv.shape[1] != (heads + 2 * kv_heads) * d or k_weight.shape != (d,):
        raise ValueError("head_rms_norm: inconsistent shapes")
    _library().head_rms_norm(qkv.data_ptr(), qkv.shape[0], heads, kv_heads, d, q_weight.data_ptr(),
                             k_weight.data_ptr(), eps, torch.get_num_threads())


def rotary_into_cache(qkv: torch.Tensor, heads: int, kv_heads: int, positions: torch.Tensor, table: torch.Tensor,
                      slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """qkv [T, (heads + 2 kv_heads) d]: q and k rotated in place by position (table [P, 2, d]: cos, sin), then the
    new keys and values written to their cache slots (caches [..., kv_heads, d], slots flat over the leading
    dimensions). Positions and slots must lie within the table and the caches."""
    check_rotary(heads, kv_heads, positions, table, slots, k_cache, v_cache)
    rotary_into_checked_cache(qkv, heads, kv_heads, positions, table, slots, k_cache, v_cache)


def check_rotary(heads: int, kv_heads: int, positions: torch.Tensor, table: torch.Tensor, slots: torch.Tensor,
                 k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """What rotary_into_checked_cache assumes of everything but qkv (index ranges aside): once per forward pass.
    The caches hold fp32, or bf16 (each value rounded to nearest even as it is written)."""
    _fp32(table)
    if (k_cache.dtype not in KV_DTYPES or v_cache.dtype != k_cache.dtype or not k_cache.is_contiguous()
            or not v_cache.is_contiguous() or k_cache.device.type != "cpu" or v_cache.device.type != "cpu"):
        raise ValueError(f"rotary_into_cache: caches must be contiguous fp32 or bf16 CPU tensors alike, got "
                         f"{k_cache.dtype} and {v_cache.dtype}")
    d = table.shape[-1]
    T = positions.shape[0] if positions.dim() == 1 else -1
    if (k_cache.shape != v_cache.shape or k_cache.shape[-1] != d or k_cache.shape[-2] != kv_heads
            or any(t.shape != (T,) or t.dtype != torch.int64 or not t.is_contiguous() or t.device.type != "cpu"
                   for t in (positions, slots))):
        raise ValueError("rotary_into_cache: inconsistent shapes or dtypes")


def rotary_into_checked_cache(qkv: torch.Tensor, heads: int, kv_heads: int, positions: torch.Tensor,
                              table: torch.Tensor, slots: torch.Tensor, k_cache: torch.Tensor,
                              v_cache: torch.Tensor) -> None:
    """rotary_into_cache, for caches, positions, slots and table that check_rotary has passed (and caches alike
    the ones it saw): only qkv is checked here, on every layer."""
    d = table.shape[-1]
    T = positions.shape[0]
    if (qkv.dtype != torch.float32 or not qkv.is_contiguous() or qkv.device.type != "cpu"
            or qkv.shape != (T, (heads + 2 * kv_heads) * d)):
        raise ValueError(f"rotary_into_cache: qkv must be contiguous fp32 [{T}, {(heads + 2 * kv_heads) * d}], "
                         f"got {qkv.dtype} {list(qkv.shape)}")
    _library().rotary_into_cache(qkv.data_ptr(), T, heads, kv_heads, d, positions.data_ptr(), table.data_ptr(),
                                 slots.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                                 int(k_cache.dtype == torch.bfloat16), torch.get_num_threads())


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2I] (gate | up) -> [T, I]: silu(gate) * up."""
    _fp32(gate_up)
    T, two_i = gate_up.shape
    if two_i % 2:
        raise ValueError(f"silu_mul takes [T, 2I] (gate | up), got {list(gate_up.shape)}")
    out = gate_up.new_empty((T, two_i // 2))
    _library().silu_mul(gate_up.data_ptr(), out.data_ptr(), T, two_i // 2, torch.get_num_threads())
    return out
