"""Products of fp32 activations with bf16/fp16 weights on x86-64 CPUs (half_gemm.c).

A CPU without native half precision emulates half-precision GEMMs several times slower than
fp32, and an fp32 BLAS needs the weights in fp32: twice the memory, twice the bytes read per
step, and a weight packing pass on every call that small batches cannot amortise. This
kernel reads the half-precision weights in a layout packed once at load time and widens
them in registers.
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from engine.kernels import build

SOURCE = Path(__file__).with_name("half_gemm.c")
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]
BLOCK = 16  # output features per packed block
CPU_FEATURES = ("avx2", "fma", "f16c")


@functools.cache
def _library() -> ctypes.CDLL | None:
    c_long, ptr = ctypes.c_long, ctypes.c_void_p
    return build.load_kernel(SOURCE, FLAGS, CPU_FEATURES, {
        "half_gemm": ([ptr, c_long, c_long, ptr, c_long, ptr, ptr, ctypes.c_int, ctypes.c_int], None),
    })


def available(device: torch.device, weight_dtype: torch.dtype, compute_dtype: torch.dtype) -> bool:
    return (device.type == "cpu" and compute_dtype == torch.float32
            and weight_dtype in (torch.bfloat16, torch.float16) and _library() is not None)


def pack(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [ceil(N / 16), K, 16], zero-padded: 16 consecutive output features per input column. bf16
    features are interleaved within a block (0, 8, 1, 9, ..., 7, 15), the order in which the kernel widens them."""
    n, k = weight.shape
    padded = -(-n // BLOCK) * BLOCK
    if padded != n:
        weight = torch.cat([weight, weight.new_zeros(padded - n, k)])
    blocks = weight.view(padded // BLOCK, BLOCK, k).transpose(1, 2)
    if weight.dtype == torch.bfloat16:
        blocks = blocks.reshape(padded // BLOCK, k, 2, BLOCK // 2).transpose(2, 3)
    return blocks.reshape(padded // BLOCK, k, BLOCK).contiguous()


def unpack_rows(packed: torch.Tensor, n: int, rows: torch.Tensor) -> torch.Tensor:
    """Rows of the original [n, K] weight (an embedding lookup from a packed tied LM head)."""
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= n):
        raise IndexError(f"row ids must lie in [0, {n}): got {int(rows.min())}..{int(rows.max())}")
    within = rows % BLOCK
    if packed.dtype == torch.bfloat16:
        within = within % (BLOCK // 2) * 2 + within // (BLOCK // 2)
    return packed[rows // BLOCK, :, within]


def half_gemm(x: torch.Tensor, packed: torch.Tensor, n: int, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] fp32 @ W^T -> [M, n] fp32, W given packed."""
    x = x.contiguous()
    m, k = x.shape
    if x.dtype != torch.float32 or k != packed.shape[1]:
        raise ValueError(f"half_gemm takes fp32 [M, {packed.shape[1]}] inputs, got {x.dtype} {list(x.shape)}")
    out = torch.empty((m, n), dtype=torch.float32)
    if m:
        _library().half_gemm(
            x.data_ptr(), m, k, packed.data_ptr(), n, bias.data_ptr() if bias is not None else None, out.data_ptr(),
            int(packed.dtype == torch.float16), torch.get_num_threads(),
        )
    return out
