"""The torch side of a device on this host: the dtypes it computes in and the memory it has free."""
from __future__ import annotations

import math
import mmap

import torch

from engine.model.linear import cpu_has_fast_half, product_path

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtypes(requested: str, checkpoint_dtype: str, device: torch.device) -> tuple[str, str]:
    """(compute dtype, weight dtype). `auto` keeps the checkpoint's dtype on GPUs. On a CPU, a half-precision
    checkpoint keeps its weights at half size under fp32 activations (engine.model.linear) wherever its products have a
    fast path (oneDNN's native bf16, or the engine's own kernel), and on any CPU that lacks native bf16/fp16:
    torch's half-precision decode step has no paged attention or fused elementwise kernels, and was the slower
    of the two even on a CPU that multiplies bf16 natively."""
    if requested != "auto":
        return requested, requested
    if device.type == "cpu" and checkpoint_dtype != "float32":
        half = TORCH_DTYPES[checkpoint_dtype]
        if product_path(device, half, torch.float32) != "upcast" or not cpu_has_fast_half(half):
            return "float32", checkpoint_dtype
    return checkpoint_dtype, checkpoint_dtype


def available_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on the device."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read MemAvailable from /proc/meminfo")


def zeroed(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of zeros. On a CPU it is anonymous memory, which the OS zero-fills as each page is first touched, so
    a KV cache holds resident only the blocks sequences have written to, as llama.cpp's does, and not its whole
    reservation from the start."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    pages = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(pages, dtype=dtype).view(shape)  # the tensor keeps the mapping alive


class PeakMemory:
    """The most memory the code under `with` allocated beyond what was held when it began: the caching allocator's
    peak on a GPU; on a CPU, the process's peak resident memory (Linux), else 0."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes = 0
        self._before = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
        else:
            try:
                self._before = _proc_status_bytes("VmRSS")
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # the peak counts from here
            except (OSError, RuntimeError):
                self._before = None
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = max(torch.cuda.max_memory_allocated(self.device) - self._before, 0)
        elif self._before is not None:
            self.peak_bytes = max(_proc_status_bytes("VmHWM") - self._before, 0)


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")
