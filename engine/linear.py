"""Matrix products whose weights may be stored at lower precision than the activations.

On a CPU without native bf16/fp16, activations run in fp32 while weights stay in the
checkpoint's half precision. Where the engine's own kernel builds (x86-64 with AVX2, FMA
and F16C, and a C compiler; engine.kernels.half_gemm), every product goes through it: it
widens the packed half-precision weights in registers. Elsewhere torch does the work: thin
steps multiply in half precision directly (a GEMV is bound by memory bandwidth, where
half-size weights win) and wide steps multiply in fp32, from a resident fp32 copy of the
weight when memory allows (`wide_copy`), else by upcasting each weight into a reused fp32
scratch buffer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.kernels import half_gemm

# Without the kernel: up to this many rows a half-precision product beats upcast + fp32 (measured on AVX2 CPUs).
THIN_ROWS = 2


class Linear:
    __slots__ = ("weight", "bias")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight = weight  # [out, in]
        self.bias = bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class PackedHalfLinear:
    """Half-precision weight packed for engine.kernels.half_gemm; fp32 activations in and out."""

    __slots__ = ("packed", "bias", "out_features")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.out_features = weight.shape[0]
        self.packed = half_gemm.pack(weight)
        self.bias = bias.float().contiguous() if bias is not None else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, in] fp32
        return half_gemm.half_gemm(x, self.packed, self.out_features, self.bias)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of the weight: embedding lookups from a tied LM head, which is then held once."""
        return half_gemm.unpack_rows(self.packed, self.out_features, ids)


class UpcastLinear:
    """Half-precision weight, fp32 activations in and out, on torch's kernels."""

    __slots__ = ("weight", "bias", "scratch", "wide")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, scratch: dict, wide_copy: bool) -> None:
        self.weight = weight  # [out, in] bf16 or fp16
        self.bias = bias.float() if bias is not None else None
        self.scratch = scratch  # shape -> fp32 buffer, shared by every layer of the stage
        self.wide = weight.float() if wide_copy else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, in] fp32
        if x.shape[0] <= THIN_ROWS:
            bias = self.bias.to(self.weight.dtype) if self.bias is not None else None
            return F.linear(x.to(self.weight.dtype), self.weight, bias).float()
        if self.wide is not None:
            return F.linear(x, self.wide, self.bias)
        buf = self.scratch.get(self.weight.shape)
        if buf is None:
            buf = self.scratch[self.weight.shape] = torch.empty(self.weight.shape, dtype=torch.float32, device=self.weight.device)
        buf.copy_(self.weight)
        return F.linear(x, buf, self.bias)


def uses_kernel(device: torch.device, weight_dtype: torch.dtype, compute_dtype: torch.dtype) -> bool:
    """Whether products with these dtypes on this device run on engine.kernels.half_gemm."""
    return half_gemm.available(device, weight_dtype, compute_dtype)


def make_linear(weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype, scratch: dict,
                wide_copy: bool = False):
    if weight.dtype == compute_dtype:
        return Linear(weight, bias.to(compute_dtype) if bias is not None else None)
    if uses_kernel(weight.device, weight.dtype, compute_dtype):
        return PackedHalfLinear(weight, bias)
    return UpcastLinear(weight, bias, scratch, wide_copy)
