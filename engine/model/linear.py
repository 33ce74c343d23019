"""Matrix products whose weights may be stored at lower precision than the activations.

On a CPU, activations run in fp32 while weights stay in the checkpoint's half precision
(engine.placement.local_device). Each product takes the fastest path the CPU has, in this order:
- `AmxLinear`: on a CPU with AMX-BF16 tile units, bf16 weights packed once for the
  engine's own tile kernel (engine.kernels.amx_gemm), which streams them 1.3-1.45x faster
  than oneDNN's products on the same units. Each product rounds its input to bf16 and
  accumulates in fp32, as a bf16 model does, while the norms, rotary, attention and
  residual stream around it stay in fp32.
- `NativeHalfLinear`: on a CPU that multiplies bf16 natively without tiles (AVX512-BF16),
  bf16 weights prepacked once in oneDNN's blocked layout, with the same rounding. No
  product re-lays out its weight per call.
- `PackedHalfLinear`: where the engine's own kernel builds (x86-64 with AVX2, FMA and F16C,
  and a C compiler; engine.kernels.half_gemm), it widens the packed half-precision weights
  in registers and multiplies in fp32.
- `QuantLinear`: weights in a quantized format (engine.model.quantized): on a CPU with AMX-BF16, the engine's
  kernel (engine.kernels.quant_gemm) reads them at their quantized size, as int16 dot products on the vector units
  for a few rows and expanded to bf16 in registers for the tiles above; elsewhere (other CPUs, GPUs) the layer's weights are
  dequantized to the compute dtype for each product and multiplied by torch.
- `UpcastLinear`: torch does the work: thin
steps multiply in half precision directly (a GEMV is bound by memory bandwidth, where
half-size weights win) and wide steps multiply in fp32, from a resident fp32 copy of the
weight when memory allows (`wide_copy`), else by upcasting each weight into a reused fp32
scratch buffer.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from engine.kernels import amx_gemm, build, half_gemm, quant_gemm
from engine.model.quantized import QuantizedWeight, dequantize, dequantize_rows
from engine.placement import THIN_ROWS

# Without the kernel: up to THIN_ROWS rows a half-precision product beats upcast + fp32 (measured on AVX2 CPUs);
# the planner prices products by the same rule, so the number lives with it.


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


class AmxLinear:
    """bf16 weight packed for engine.kernels.amx_gemm; fp32 activations in and out."""

    __slots__ = ("packed", "bias", "out_features", "in_features")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.out_features, self.in_features = weight.shape
        self.packed = amx_gemm.pack(weight)
        self.bias = bias.float().contiguous() if bias is not None else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, in] fp32
        return amx_gemm.amx_linear(x, self.packed, self.out_features, self.in_features, self.bias)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of the weight: embedding lookups from a tied LM head, which is then held once."""
        return amx_gemm.unpack_rows(self.packed, self.out_features, self.in_features, ids)


class NativeHalfLinear:
    """bf16 weight prepacked for oneDNN's native bf16 products; fp32 activations in and out."""

    __slots__ = ("packed", "bias")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        # The layout barely depends on the batch it is packed for (measured from 1 to 512 rows).
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), _PACK_ROWS)
        self.bias = bias.float() if bias is not None else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, in] fp32
        x = x.to(torch.bfloat16, memory_format=torch.contiguous_format)
        y = torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "").float()
        return y.add_(self.bias) if self.bias is not None else y


_PACK_ROWS = 64


class QuantLinear:
    """A quantized weight; activations in and out at the compute dtype."""

    __slots__ = ("weight", "bias", "dtype", "kernel")

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None, compute_dtype: torch.dtype) -> None:
        self.weight, self.dtype = weight, compute_dtype
        self.bias = bias.to(compute_dtype).contiguous() if bias is not None else None
        device = weight.quants.device
        fast = compute_dtype == torch.float32 and quant_gemm.available(device)
        self.kernel = quant_gemm.Product(weight, self.bias) if fast else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, in]
        if self.kernel is not None:
            return self.kernel(x)
        return F.linear(x, dequantize(self.weight, x.dtype), self.bias)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of the weight: embedding lookups from a quantized table."""
        if self.kernel is not None:
            return self.kernel.rows(ids)
        return dequantize_rows(self.weight, ids, self.dtype)

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes


class SplitLinear:
    """Products fused in name only: parts whose weights are stored in different formats (a GGUF whose v projection
    has more bits than its q and k), each multiplied on its own path and their outputs joined."""

    __slots__ = ("parts",)

    def __init__(self, parts: list) -> None:
        self.parts = parts

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts], dim=-1)


def cpu_has_fast_half(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies bf16/fp16 natively; without it torch emulates them, several times slower than fp32."""
    flags = build.cpu_flags()
    if dtype == torch.bfloat16:
        return bool({"avx512_bf16", "amx_bf16"} & flags)
    if dtype == torch.float16:
        return bool({"avx512_fp16", "amx_fp16"} & flags)
    return True


@functools.cache
def _native_bf16_products() -> bool:
    """oneDNN's prepacked bf16 products run here, and agree with an fp32 product of bf16-rounded inputs."""
    if not cpu_has_fast_half(torch.bfloat16) or not torch.backends.mkldnn.is_available():
        return False
    g = torch.Generator().manual_seed(0)
    weight, x = torch.randn(24, 40, generator=g).bfloat16(), torch.randn(3, 40, generator=g)
    try:
        got = NativeHalfLinear(weight, None)(x)
    except (RuntimeError, AttributeError):  # an op this torch build lacks
        return False
    want = F.linear(x.bfloat16().float(), weight.float())
    return bool(torch.allclose(got, want, rtol=1e-2, atol=1e-2))


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


def product_path(device: torch.device, weight_dtype: torch.dtype, compute_dtype: torch.dtype) -> str:
    """Which product make_linear builds for these dtypes on this device: "plain" (same dtype), "amx-bf16"
    (AmxLinear), "native-bf16" (NativeHalfLinear), "half-kernel" (PackedHalfLinear) or "upcast" (UpcastLinear)."""
    if weight_dtype == compute_dtype:
        return "plain"
    if amx_gemm.available(device, weight_dtype, compute_dtype):
        return "amx-bf16"
    if (device.type == "cpu" and compute_dtype == torch.float32 and weight_dtype == torch.bfloat16
            and _native_bf16_products()):
        return "native-bf16"
    if half_gemm.available(device, weight_dtype, compute_dtype):
        return "half-kernel"
    return "upcast"


def make_linear(weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype, scratch: dict,
                wide_copy: bool = False):
    path = product_path(weight.device, weight.dtype, compute_dtype)
    if path == "plain":
        return Linear(weight, bias.to(compute_dtype) if bias is not None else None)
    if path == "amx-bf16":
        return AmxLinear(weight, bias)
    if path == "native-bf16":
        return NativeHalfLinear(weight, bias)
    if path != "upcast" and half_gemm.available(weight.device, weight.dtype, compute_dtype):
        return PackedHalfLinear(weight, bias)
    return UpcastLinear(weight, bias, scratch, wide_copy)
