"""What a device is and can do: its torch device, compute dtype and free memory."""
from __future__ import annotations

from functools import lru_cache

import torch

from engine.linear import uses_kernel

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_fast_half(dtype: str) -> bool:
    """Whether this CPU multiplies bf16/fp16 natively; without it torch emulates them, several times slower than fp32."""
    flags = cpu_flags()
    if dtype == "bfloat16":
        return bool({"avx512_bf16", "amx_bf16"} & flags)
    if dtype == "float16":
        return bool({"avx512_fp16", "amx_fp16"} & flags)
    return True


def resolve_dtypes(requested: str, checkpoint_dtype: str, device: torch.device) -> tuple[str, str]:
    """(compute dtype, weight dtype). `auto` keeps the checkpoint's dtype on GPUs. On a CPU, a half-precision
    checkpoint runs with fp32 activations over its half-size weights wherever the engine's own kernels run
    (engine.kernels): their decode steps beat torch's native bf16 path even on CPUs that multiply bf16 natively,
    whose attention and elementwise steps have no such kernels; and on any CPU that lacks native bf16/fp16."""
    if requested != "auto":
        return requested, requested
    if device.type == "cpu" and checkpoint_dtype != "float32":
        if uses_kernel(device, TORCH_DTYPES[checkpoint_dtype], torch.float32) or not cpu_has_fast_half(checkpoint_dtype):
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


def parse_size(text: str) -> int:
    """'8GiB', '512MiB', '2G', '1000000' -> bytes."""
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9,
             "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40, "b": 1, "": 1}
    s = text.strip().lower()
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num):].strip()
    if unit not in units or not num:
        raise ValueError(f"cannot read size {text!r}; use a number with an optional unit such as 512MiB or 8GiB")
    return int(float(num) * units[unit])
