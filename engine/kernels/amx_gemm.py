"""Products of fp32 activations with bf16 weights on CPUs with AMX-BF16 tile units (amx_gemm.c).

At decode batch sizes a product is bound by streaming its weights from memory. oneDNN's
bf16 products on the same tile units read prepacked weights at 7-9 GB/s on one core of a
Xeon with AMX; this kernel reads its own layout, one front-to-back stream per product,
prefetched ahead, at 9-12 GB/s on that core.
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from engine.kernels import build

SOURCE = Path(__file__).with_name("amx_gemm.c")
FLAGS = ["-O3", "-mamx-tile", "-mamx-bf16", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp"]
CPU_FEATURES = ("amx_tile", "amx_bf16", "avx512f", "avx512bw", "avx512vl", "avx512_bf16")
FEATURES, STEP = 32, 32  # output features per block, input features per tile step


@functools.cache
def _library() -> ctypes.CDLL | None:
    c_long, ptr = ctypes.c_long, ctypes.c_void_p
    lib = build.load_kernel(SOURCE, FLAGS, CPU_FEATURES, {
        "amx_request": ([], ctypes.c_int),
        "amx_linear": ([ptr, c_long, c_long, c_long, ptr, c_long, ptr, ptr, ptr, ctypes.c_int], None),
    })
    # The kernel (Linux 5.16 and later) must grant the process the tiles' register state.
    return lib if lib is not None and lib.amx_request() == 0 else None


def available(device: torch.device, weight_dtype: torch.dtype, compute_dtype: torch.dtype) -> bool:
    return (device.type == "cpu" and compute_dtype == torch.float32 and weight_dtype == torch.bfloat16
            and _library() is not None)


def pack(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] bf16 -> [ceil(N / 32), ceil(K / 32), 2, 16, 16, 2], zero-padded: for each block of 32 output
    features and each step of 32 inputs, two tiles (features 0-15, 16-31) whose row r holds, for each of
    the 16 features, inputs 2r and 2r + 1 of the step."""
    n, k = weight.shape
    n32, k32 = -(-n // FEATURES) * FEATURES, -(-k // STEP) * STEP
    padded = weight.new_zeros(n32, k32)
    padded[:n, :k] = weight
    # [block, tile, feature, step, r, pair] -> [block, step, tile, r, feature, pair]
    blocks = padded.view(n32 // FEATURES, 2, 16, k32 // STEP, 16, 2)
    return blocks.permute(0, 3, 1, 4, 2, 5).contiguous()


def unpack_rows(packed: torch.Tensor, n: int, k: int, rows: torch.Tensor) -> torch.Tensor:
    """Rows of the original [n, k] weight (an embedding lookup from a packed tied LM head)."""
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= n):
        raise IndexError(f"row ids must lie in [0, {n}): got {int(rows.min())}..{int(rows.max())}")
    within = rows % FEATURES
    picked = packed[rows // FEATURES, :, within // 16, :, within % 16, :]  # [len, steps, 16, 2]
    return picked.reshape(rows.shape[0], -1)[:, :k]


_SCRATCH: dict[tuple[int, int], torch.Tensor] = {}
SCRATCH_ROWS = 64  # inputs of up to this many rows (decode steps) reuse a buffer per shape; larger ones allocate


def _scratch(shape: tuple[int, int]) -> torch.Tensor:
    """The bf16 buffer a product rounds its inputs into: a mixture of experts makes thousands of small products a
    step, and allocating each one's cost more than rounding into it. Shared by every product of the process: a
    stage computes on one thread."""
    if shape[0] > SCRATCH_ROWS:
        return torch.empty(shape, dtype=torch.bfloat16)
    buf = _SCRATCH.get(shape)
    if buf is None:
        buf = _SCRATCH[shape] = torch.empty(shape, dtype=torch.bfloat16)
    return buf


def amx_linear(x: torch.Tensor, packed: torch.Tensor, n: int, k: int, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, k] fp32 @ W^T -> [M, n] fp32, W given packed; inputs rounded to bf16, sums in fp32."""
    if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"amx_linear takes fp32 [M, {k}] inputs, got {x.dtype} {list(x.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    m = x.shape[0]
    out = torch.empty((m, n), dtype=torch.float32)
    scratch = _scratch((-(-m // 16) * 16, packed.shape[1] * STEP))
    _library().amx_linear(x.data_ptr(), m, k, x.stride(0), packed.data_ptr(), n,
                          bias.data_ptr() if bias is not None else None, scratch.data_ptr(), out.data_ptr(),
                          torch.get_num_threads())
    return out
