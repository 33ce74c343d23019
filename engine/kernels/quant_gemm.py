"""Products of fp32 activations with quantized weights (engine.model.quantized) on CPUs with AMX-BF16 tile units
(quant_gemm.c): each block of weights is expanded to bf16 in registers and multiplied on the tiles, so a step
reads the weights at their quantized size."""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from engine.kernels import amx_gemm, build

SOURCE = Path(__file__).with_name("quant_gemm.c")
FLAGS = amx_gemm.FLAGS
CPU_FEATURES = amx_gemm.CPU_FEATURES


@functools.cache
def _library() -> ctypes.CDLL | None:
    c_long, c_int, ptr = ctypes.c_long, ctypes.c_int, ctypes.c_void_p
    lib = build.load_kernel(SOURCE, FLAGS, CPU_FEATURES, {
        "quant_linear": ([ptr, c_long, c_long, c_long, ptr, ptr, ptr, ptr, ptr, c_int, c_int, c_int, c_int, c_long,
                          ptr, ptr, ptr, ptr, c_int], None),
    })
    # The tiles' register state is granted per process; amx_gemm's library asks for it.
    return lib if lib is not None and amx_gemm.available(torch.device("cpu"), torch.bfloat16, torch.float32) else None


def available(device: torch.device) -> bool:
    return device.type == "cpu" and _library() is not None


def _ptr(t: torch.Tensor | None):
    return t.data_ptr() if t is not None else None


def quant_linear(x: torch.Tensor, w, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] fp32 @ W^T -> [M, N] fp32, W an engine.model.quantized.QuantizedWeight; inputs and weights rounded
    to bf16, sums in fp32."""
    k, n, fmt = w.in_features, w.out_features, w.fmt
    if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"quant_linear takes fp32 [M, {k}] inputs, got {x.dtype} {list(x.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    m, threads = x.shape[0], torch.get_num_threads()
    out = torch.empty((m, n), dtype=torch.float32)
    rounded = torch.empty((-(-m // 16) * 16, k), dtype=torch.bfloat16)
    tiles = torch.empty((threads, k // 32, 1024), dtype=torch.bfloat16)
    _library().quant_linear(x.data_ptr(), m, k, x.stride(0), w.quants.data_ptr(), w.d.data_ptr(), _ptr(w.dmin),
                            _ptr(w.sc), _ptr(w.mn), fmt.bits, fmt.group, fmt.zero, int(fmt.sub_scales), n, _ptr(bias),
                            rounded.data_ptr(), tiles.data_ptr(), out.data_ptr(), threads)
    return out
