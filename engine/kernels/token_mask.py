"""A grammar's token bitmask applied to logits in place (token_mask.c), with a torch fallback."""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from engine.kernels import build

SOURCE = Path(__file__).with_name("token_mask.c")
FLAGS = ["-O3"]


@functools.cache
def _library() -> ctypes.CDLL | None:
    c_long, ptr = ctypes.c_long, ctypes.c_void_p
    return build.load_kernel(SOURCE, FLAGS, (), {
        "apply_token_mask": ([ptr, c_long, c_long, ptr, c_long, ptr, c_long], None),
    })


@functools.cache
def _bias_table(device: torch.device) -> torch.Tensor:
    """[256, 8] float: for each byte of a mask, the bias of its eight tokens (0 allowed, -inf forbidden)."""
    bits = (torch.arange(256)[:, None] >> torch.arange(8)) & 1
    return torch.where(bits.bool(), 0.0, float("-inf")).to(device)


def apply(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> None:
    """logits [B, V] float32: the logits of row rows[g] that bitmask[g] ([G, ceil(V / 32)] int32, on the CPU;
    bit j of word w allows token 32 w + j) forbids become -inf, in place."""
    G, W = bitmask.shape
    B, V = logits.shape
    if bitmask.dtype != torch.int32 or W * 32 < V or rows.shape != (G,) or logits.dtype != torch.float32:
        raise ValueError(f"token mask {list(bitmask.shape)} {bitmask.dtype} does not fit logits {list(logits.shape)}")
    lib = _library() if logits.device.type == "cpu" else None
    if lib is not None and logits.stride(1) == 1 and bitmask.is_contiguous():
        rows = rows.to(torch.int64).contiguous()
        if G and not (0 <= int(rows.min()) and int(rows.max()) < B):
            raise ValueError("token mask rows outside the logits")
        lib.apply_token_mask(logits.data_ptr(), logits.stride(0), V, rows.data_ptr(), G, bitmask.data_ptr(), W)
        return
    # Each byte of the mask holds eight tokens' bits (little-endian words): a table gives their biases.
    dev = logits.device
    table = _bias_table(dev)
    codes = bitmask.to(dev, non_blocking=True).contiguous().view(torch.uint8).view(-1).long()  # [G * 4W]
    bias = table.index_select(0, codes).view(G, -1)[:, :V]  # [G, V]
    rows = rows.to(dev)
    logits.index_copy_(0, rows, logits.index_select(0, rows).add_(bias))
