"""Products of fp32 activations with quantized weights (engine.model.quantized) on CPUs with AMX-BF16 tile units
(quant_gemm.c), reading the weights at their quantized size: up to DOT_ROWS rows as int16 dot products on the
vector units, more by expanding each block of weights to bf16 in registers and multiplying on the tiles."""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from engine.kernels import amx_gemm, build

SOURCE = Path(__file__).with_name("quant_gemm.c")
FLAGS = [*amx_gemm.FLAGS, "-mavx512vnni", "-mf16c"]
CPU_FEATURES = (*amx_gemm.CPU_FEATURES, "avx512_vnni", "f16c")
# Rows up to which the int16 dot products beat expanding the weights for the tiles (measured on a Xeon with AMX:
# python -m bench.quant_products).
DOT_ROWS = 8


@functools.cache
def _library() -> ctypes.CDLL | None:
    c_long, c_int, ptr = ctypes.c_long, ctypes.c_int, ctypes.c_void_p
    lib = build.load_kernel(SOURCE, FLAGS, CPU_FEATURES, {
        "quant_linear": ([ptr, c_long, c_long, ptr, ptr, ptr, c_int, c_long], None),
        "quant_rows": ([ptr, ptr, c_long, ptr, c_int], None),
    })
    # The tiles' register state is granted per process; amx_gemm's library asks for it.
    return lib if lib is not None and amx_gemm.available(torch.device("cpu"), torch.bfloat16, torch.float32) else None


def available(device: torch.device) -> bool:
    return device.type == "cpu" and _library() is not None


class _Weight(ctypes.Structure):
    """quant_gemm.c's qweight: what a call needs of the weight, described once."""

    _fields_ = [("quants", ctypes.c_void_p), ("d", ctypes.c_void_p), ("dmin", ctypes.c_void_p),
                ("sc", ctypes.c_void_p), ("mn", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("n", ctypes.c_long),
                ("k", ctypes.c_long), ("bits", ctypes.c_int), ("group", ctypes.c_int), ("zero", ctypes.c_int),
                ("sub_scales", ctypes.c_int)]


def _ptr(t: torch.Tensor | None):
    return t.data_ptr() if t is not None else None


class Product:
    """x [M, K] fp32 @ W^T (+ bias) -> [M, N] fp32 for one quantized weight (engine.model.quantized.QuantizedWeight)
    and an fp32 bias, which it keeps alive. Up to dot_rows rows, x is quantized to int16 per 32 inputs and the
    weights are exact; above, inputs and weights are rounded to bf16. Sums in fp32 either way."""

    __slots__ = ("weight", "bias", "desc", "ref", "dot_rows")

    def __init__(self, w, bias: torch.Tensor | None, dot_rows: int = DOT_ROWS) -> None:
        fmt = w.fmt
        self.weight, self.bias, self.dot_rows = w, bias, dot_rows
        self.desc = _Weight(_ptr(w.quants), _ptr(w.d), _ptr(w.dmin), _ptr(w.sc), _ptr(w.mn), _ptr(bias),
                            w.out_features, w.in_features, fmt.bits, fmt.group, fmt.zero, int(fmt.sub_scales))
        self.ref = ctypes.byref(self.desc)

    def __reduce__(self):
        # The descriptor holds raw pointers: rebuilt around the tensors wherever the weight is read back.
        return (Product, (self.weight, self.bias, self.dot_rows))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        k, n = self.desc.k, self.desc.n
        if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != k:
            raise ValueError(f"quant_linear takes fp32 [M, {k}] inputs, got {x.dtype} {list(x.shape)}")
        if x.stride(1) != 1:
            x = x.contiguous()
        m, threads = x.shape[0], torch.get_num_threads()
        out = torch.empty((m, n), dtype=torch.float32)
        if m <= self.dot_rows:  # the kernel keeps the dot products' scratch
            _library().quant_linear(x.data_ptr(), m, x.stride(0), self.ref, None, out.data_ptr(), threads,
                                    self.dot_rows)
            return out
        rounded = torch.empty((-(-m // 16) * 16, k), dtype=torch.bfloat16)
        _library().quant_linear(x.data_ptr(), m, x.stride(0), self.ref, rounded.data_ptr(), out.data_ptr(), threads,
                                self.dot_rows)
        return out

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of W, [len(ids), K] fp32, exactly as engine.model.quantized.dequantize gives them: an embedding
        lookup from a quantized table decodes only the rows it is asked for."""
        ids = ids.reshape(-1)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.desc.n):
            raise IndexError(f"row ids must lie in [0, {self.desc.n}): got {int(ids.min())}..{int(ids.max())}")
        ids = ids.to(torch.int64).contiguous()
        out = torch.empty((ids.numel(), self.desc.k), dtype=torch.float32)
        _library().quant_rows(self.ref, ids.data_ptr(), ids.numel(), out.data_ptr(), torch.get_num_threads())
        return out
