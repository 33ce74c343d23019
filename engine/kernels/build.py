"""Compile a kernel's C source once per machine and load it.

A library is named by a hash of its source, the headers beside it and its flags, so an edit
rebuilds it. It is looked for beside the source (where `python -m engine.kernels.build` puts
it at install time, as the container image does, whose runtime has no compiler), then in the
strata cache directory, where it is otherwise compiled on first use. Stage processes that start together may race to
build it: each compiles to its own temporary file and renames it into place, which is atomic.
Without a C compiler, or when the build fails, callers get None and the engine keeps torch's
own kernels. The libraries link OpenMP dynamically and so share the runtime torch has loaded.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shlex
import shutil
import subprocess
import threading
from pathlib import Path

from engine.paths import cache_root

log = logging.getLogger("strata.kernels")

DISABLE_ENV = "STRATA_CPU_KERNELS"  # 0: never build or use them
_lock = threading.Lock()


def cache_dir() -> Path:
    return cache_root() / "kernels"


def compiler() -> list[str] | None:
    """The compiler's command: $CC (which may carry a wrapper, as in `ccache gcc`), else cc or gcc."""
    cc = os.environ.get("CC")
    if cc:
        return shlex.split(cc)
    found = shutil.which("cc") or shutil.which("gcc")
    return [found] if found else None


def enabled() -> bool:
    return os.environ.get(DISABLE_ENV, "1").lower() not in ("0", "false", "no", "off")


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def load_kernel(source: Path, flags: list[str], features: tuple[str, ...],
                functions: dict[str, tuple[list, object]]) -> ctypes.CDLL | None:
    """The library with its functions' (argument types, result type) set, where enabled and the CPU has
    `features`; else None. Whatever goes wrong on the way (no compiler, a read-only cache, no home directory)
    leaves torch's kernels in charge."""
    if not enabled() or not set(features) <= cpu_flags():
        return None
    with _lock:  # threads of one process build once
        try:
            lib = load(source, flags)
        except Exception as e:  # noqa: BLE001 -- any failure here only costs speed
            log.warning("could not build or load %s: %s; falling back to torch's kernels", source.name, e)
            return None
    if lib is not None:
        for name, (argtypes, restype) in functions.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, restype
    return lib


def library_name(source: Path, flags: list[str]) -> str:
    """Named by the source, the headers beside it (which it may include) and the flags."""
    text = source.read_bytes() + b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))
    key = hashlib.sha256(text + " ".join(flags).encode()).hexdigest()[:16]
    return f"{source.stem}-{key}.so"


def load(source: Path, flags: list[str]) -> ctypes.CDLL | None:
    """The compiled library, or None (logged) when it cannot be built."""
    name = library_name(source, flags)
    target = next((d / name for d in (source.parent, cache_dir()) if (d / name).exists()), None)
    if target is None:
        target = compile_library(source, flags, cache_dir() / name)
        if target is None:
            return None
    try:
        return ctypes.CDLL(str(target))
    except OSError as e:
        log.warning("could not load %s: %s; falling back to torch's kernels", target, e)
        return None


def compile_library(source: Path, flags: list[str], target: Path) -> Path | None:
    cc = compiler()
    if cc is None:
        log.warning("no C compiler (set CC) to build %s: falling back to torch's kernels", source.name)
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{target}.tmp{os.getpid()}"  # the compiler creates it, readable by all like any library
    cmd = [*cc, *flags, "-shared", "-fPIC", "-o", tmp, str(source)]
    try:
        done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        done, err = None, str(e)
    if done is None or done.returncode != 0:
        Path(tmp).unlink(missing_ok=True)
        err = err if done is None else done.stderr.strip()[-2000:]
        log.warning("could not build %s (%s): %s; falling back to torch's kernels", source.name, " ".join(cmd), err)
        return None
    os.replace(tmp, target)
    return target


def main() -> None:
    """Build every kernel beside its source: for installs whose runtime has no compiler."""
    from engine.kernels import amx_gemm, half_gemm, layer_ops, paged_attention, quant_gemm, token_mask

    for kernel in (half_gemm, amx_gemm, quant_gemm, paged_attention, layer_ops, token_mask):
        source, flags = kernel.SOURCE, kernel.FLAGS
        built = compile_library(source, flags, source.parent / library_name(source, flags))
        if built is None:
            raise SystemExit(f"could not build {source.name}")
        print(f"built {built}")


if __name__ == "__main__":
    logging.basicConfig()
    main()
