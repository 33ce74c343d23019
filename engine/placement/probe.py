"""A short start-up probe of what a device can do, cached on disk.

The planner needs a few rates per device: decode-shaped GEMMs, how fast one-row products
stream weights, the host cost of an op, and the engine's own decode attention. Each is
timed on shapes and sizes like a real step's: weights and KV twice the size of the
last-level cache, since a stage's layers and cache do not fit in it either. A CPU takes
~1.5 s; results are cached per device, thread count, dtype and torch version.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path

import torch

from engine.kernels import amx_gemm, build, half_gemm, layer_ops, quant_gemm
from engine.kernels import paged_attention as paged_kernel
from engine.model.attention import build_metadata, paged_attention
from engine.model.experts import grouped_gemm_runs
from engine.model.linear import QuantLinear, make_linear, product_path
from engine.model.quantized import pack, synthetic
from engine.model.weight_formats import FORMATS
from engine.paths import cache_root
from engine.placement import GEMM_ROWS, SMALL_GEMM_ROWS, DeviceInfo, DeviceRequest, kv_cache_dtype
from engine.placement.local_device import TORCH_DTYPES, available_memory
from telemetry.host_cpu import cpu_seconds

PROFILE_ENV = "STRATA_DEVICE_PROFILE"
CACHE_VERSION = 8

# GEMM shapes: 64 rows like a decode batch (and 8, see SMALL_GEMM_ROWS); weights [out, in]. A GPU gets a large
# model's MLP shape, so that the kernel, not its launch, is timed.
_CPU_GEMM = (GEMM_ROWS, 1024, 2816)
_CUDA_GEMM = (GEMM_ROWS, 4096, 14336)
# One-row products: ([out, in] with few long rows, the same size with many short rows).
_CPU_ONE_ROW = ((512, 4096), (4096, 512))
_CUDA_ONE_ROW = ((4096, 16384), (16384, 4096))
# Weights and KV are timed over working sets too large to stay cached between passes, as a stage's are: twice the
# CPU's last-level cache, within these bounds (a large server part reports its whole shared L3, of which one
# process streaming from memory keeps little; 128 MiB already ran at memory speed on a 480 MiB one).
_CPU_WORKING_SET_BYTES = (64 << 20, 256 << 20)
_CUDA_WORKING_SET_BYTES = 512 << 20
# Decode attention: GQA heads like common models, at this context; as many sequences as fill the working set.
_ATTN_HEADS, _ATTN_KV_HEADS, _ATTN_HEAD_DIM, _ATTN_BLOCK = 16, 4, 64, 16
_CPU_ATTN_CONTEXT, _CPU_ATTN_MIN_SEQS = 512, 16
_CUDA_ATTN = (64, 4096)  # sequences, context
_ATTN_OPS = 5  # kernels of one paged_attention call, whose host cost is not attention throughput


def cache_path() -> Path:
    return cache_root() / "probe.json"


def device_label(device: torch.device, threads: int | None) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    n = threads or torch.get_num_threads()
    return f"CPU, {n} thread{'s' if n != 1 else ''}"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


class _Timer:
    """Wall-clock on a CPU; CUDA events on a GPU, so queued kernels are counted when they run."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device

    def __call__(self, fn, reps: int) -> float:
        """Seconds per call: the fastest of `reps` calls after one to warm up. The fastest, because other work on
        the machine only ever adds time."""
        fn()
        best = float("inf")
        for _ in range(reps):
            if self.cuda:
                # On the probed device's stream, whichever device is current (strata plan probes several).
                stream = torch.cuda.current_stream(self.device)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(stream)
                fn()
                end.record(stream)
                end.synchronize()
                best = min(best, start.elapsed_time(end) / 1e3)
            else:
                t = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t)
        return best


def last_level_cache_bytes(cpu: int = 0) -> int | None:
    """The size of the largest cache the CPU reports (sysfs), or None where it reports none."""
    sizes = []
    for index in Path(f"/sys/devices/system/cpu/cpu{cpu}/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
        digits = text.rstrip("KkMmGg")
        if digits.isdigit():
            sizes.append(int(digits) * unit)
    return max(sizes, default=None)


def working_set_bytes(device: torch.device) -> int:
    """Bytes of weights (or KV) a probe cycles through, so that each pass reads them from memory."""
    if device.type == "cuda":
        return _CUDA_WORKING_SET_BYTES
    low, high = _CPU_WORKING_SET_BYTES
    llc = last_level_cache_bytes() or 0
    return min(max(2 * llc, low), high, max(available_memory(device) // 8, low))


def _weight_set(device: torch.device, dtype: torch.dtype, out_f: int, in_f: int) -> list[torch.Tensor]:
    count = max(2, -(-working_set_bytes(device) // (out_f * in_f * dtype.itemsize)))
    # Small non-zero values: zeros or denormals could take a different path in some kernels.
    return [torch.full((out_f, in_f), 0.01, dtype=dtype, device=device) for _ in range(count)]


def _per_matrix(timer: _Timer, device: torch.device, dtype: torch.dtype, rows: int | tuple[int, ...], out_f: int,
                in_f: int, weight_dtype: torch.dtype | None = None) -> float | list[float]:
    """Seconds per product of `rows` rows at `dtype` with an [out_f, in_f] weight at `weight_dtype`, multiplied as
    the engine does (engine.model.linear), over a set too large to stay cached; one figure per row count given."""
    weights = [make_linear(w, None, dtype, {}, wide_copy=True)
               for w in _weight_set(device, weight_dtype or dtype, out_f, in_f)]
    seconds = []
    for n in (rows,) if isinstance(rows, int) else rows:
        x = torch.ones(n, in_f, dtype=dtype, device=device)
        seconds.append(timer(lambda: [product(x) for product in weights], 3) / len(weights))
    return seconds[0] if isinstance(rows, int) else seconds


def _one_row(timer: _Timer, device: torch.device, dtype: torch.dtype,
             weight_dtype: torch.dtype | None = None) -> tuple[float, float]:
    """(seconds per weight, seconds per output feature) of one-row products. Two shapes of one size tell them apart:
    each output feature's dot product ends in a reduction, so short rows cost more than their bytes or FLOPs."""
    (long_out, long_in), (short_out, short_in) = _CUDA_ONE_ROW if device.type == "cuda" else _CPU_ONE_ROW
    t_long = _per_matrix(timer, device, dtype, 1, long_out, long_in, weight_dtype)  # few long rows
    t_short = _per_matrix(timer, device, dtype, 1, short_out, short_in, weight_dtype)  # many short rows
    per_feature = max(0.0, (t_short - t_long) / (short_out - long_out))
    per_weight = max(t_long - long_out * per_feature, 0.5 * t_long) / (long_out * long_in)
    return per_weight, per_feature


def _quantized_products(timer: _Timer, device: torch.device, dtype: torch.dtype, rows: tuple[int, ...], out_f: int,
                        in_f: int, fmt: str) -> list[float]:
    """As _per_matrix, with the weights in a quantized format, multiplied as the engine does (QuantLinear)."""
    packed = pack(synthetic(FORMATS[fmt], out_f, in_f)).to(device)
    count = max(2, -(-working_set_bytes(device) // packed.nbytes))
    products = [QuantLinear(packed if i == 0 else packed.clone(), None, dtype) for i in range(count)]
    seconds = []
    for n in rows:
        x = torch.ones(n, in_f, dtype=dtype, device=device)
        seconds.append(timer(lambda: [product(x) for product in products], 3) / len(products))
    return seconds


def _measure(device: torch.device, dtype: torch.dtype, weight_dtype: torch.dtype | None,
             weight_format: str | None = None) -> dict[str, float | None]:
    timer = _Timer(device)
    # The per-op cost weighs most in a prediction (it is paid ~150 times per layer), so it is sampled between the
    # other measurements too: a passing slow spell of the machine does not then decide it.
    op_overhead = _op_overhead(device)
    rows, in_f, out_f = _CUDA_GEMM if device.type == "cuda" else _CPU_GEMM
    small = SMALL_GEMM_ROWS
    if weight_format is not None:  # the layers' products run at a quantized format: time those
        wide_s, small_s = _quantized_products(timer, device, dtype, (rows, small), out_f, in_f, weight_format)
    else:
        wide_s, small_s = _per_matrix(timer, device, dtype, (rows, small), out_f, in_f, weight_dtype)
    matmul_flops = 2 * rows * in_f * out_f / wide_s
    small_gemm_flops = 2 * small * in_f * out_f / small_s
    op_overhead = min(op_overhead, _op_overhead(device))
    # One-row products stream their weights: what decode at small batches reads them at. fp32, so that a CPU's slow
    # half-precision arithmetic does not pass for slow memory.
    per_weight, per_feature = _one_row(timer, device, torch.float32)
    mem_bandwidth = 4 / per_weight
    thin = None
    if weight_dtype is not None and weight_dtype != dtype:
        op_overhead = min(op_overhead, _op_overhead(device))
        per_weight, per_feature = _one_row(timer, device, dtype, weight_dtype)
        thin = 2 / per_weight
    op_overhead = min(op_overhead, _op_overhead(device))
    names = {v: k for k, v in TORCH_DTYPES.items()}
    kv_dtype = TORCH_DTYPES[kv_cache_dtype(names[dtype], names[weight_dtype or dtype])]
    attention = _attention_bandwidth(device, dtype, kv_dtype, timer, op_overhead)
    return {"matmul_flops": matmul_flops, "small_gemm_flops": small_gemm_flops, "mem_bandwidth": mem_bandwidth,
            "op_overhead_s": op_overhead, "thin_matmul_flops": thin, "row_overhead_s": per_feature,
            "attention_bandwidth": attention}


def _op_overhead(device: torch.device) -> float:
    """Host seconds per op, over a mix like the forward's: a tiny kernel, then a view."""
    x = torch.ones(8, device=device)
    n = 100

    def ops():
        for _ in range(n):
            x.add_(1.0)
            x[1:]

    best = float("inf")
    for _ in range(6):  # short windows: the quietest one is the machine's own speed
        t = time.perf_counter()
        ops()
        best = min(best, time.perf_counter() - t)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return best / (2 * n)


def _attention_bandwidth(device: torch.device, dtype: torch.dtype, kv_dtype: torch.dtype, timer: _Timer,
                         op_overhead: float) -> float:
    """KV bytes per second through the engine's decode attention (the paged kernel on x86-64 CPUs, else block
    gather, then SDPA), over a cache of kv_dtype under queries of dtype."""
    bs, kvh, hd = _ATTN_BLOCK, _ATTN_KV_HEADS, _ATTN_HEAD_DIM
    if device.type == "cuda":
        seqs, context = _CUDA_ATTN
    else:
        context = _CPU_ATTN_CONTEXT
        seqs = max(_CPU_ATTN_MIN_SEQS, working_set_bytes(device) // (2 * context * kvh * hd * kv_dtype.itemsize))
    blocks = -(-context // bs)
    k_cache = torch.full((seqs * blocks + 1, bs, kvh, hd), 0.01, dtype=kv_dtype, device=device)
    v_cache = torch.full_like(k_cache, 0.01)
    tables = [list(range(i * blocks, (i + 1) * blocks)) for i in range(seqs)]
    slots = [t[-1] * bs + (context - 1) % bs for t in tables]
    meta = build_metadata(bs, slots, tables, [context] * seqs, [], device)
    q = torch.full((seqs, _ATTN_HEADS, hd), 0.01, dtype=dtype, device=device)
    k = torch.full((seqs, kvh, hd), 0.01, dtype=dtype, device=device)
    seconds = timer(lambda: paged_attention(q, k, k, k_cache, v_cache, meta, hd**-0.5), 3)
    kv_bytes = 2 * seqs * blocks * bs * kvh * hd * kv_dtype.itemsize
    # The call's fixed host cost is counted per op elsewhere.
    return kv_bytes / max(seconds - _ATTN_OPS * op_overhead, 0.1 * seconds)


def _profile_override(name: str, required=("matmul_flops", "mem_bandwidth", "op_overhead_s")) -> dict | None:
    path = os.environ.get(PROFILE_ENV)
    if not path:
        return None
    try:
        profiles = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{PROFILE_ENV}={path}: cannot read it ({e})") from None
    entry = profiles.get(name) or (profiles.get("cuda") if name.startswith("cuda") else None)
    if entry is None:
        return None
    missing = [k for k in required if k not in entry]
    if missing:
        raise ValueError(f"{PROFILE_ENV}={path}: the entry for {name} lacks {', '.join(missing)}")
    return entry


def probe_rates(name: str, dtype: str, threads: int | None, weight_dtype: str | None = None,
                weight_format: str | None = None, reprobe: bool = False) -> dict[str, float | None]:
    """Every figure the planner uses for the device, from STRATA_DEVICE_PROFILE, the cache, or a fresh probe (always
    with reprobe), with when it was taken ("probed_at", seconds since the epoch) and how busy the host's cores were
    with other work meanwhile ("host_busy", 0 to 1). weight_format: the quantized format most of the layers'
    products run at, whose products are timed instead."""
    override = _profile_override(name)
    if override is not None:
        keys = ("matmul_flops", "small_gemm_flops", "mem_bandwidth", "op_overhead_s", "thin_matmul_flops",
                "row_overhead_s", "attention_bandwidth")
        return {k: (float(override[k]) if override.get(k) is not None else None) for k in keys}
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    thin_dtype = weight_dtype if weight_dtype not in (None, dtype) else None
    where = socket.gethostname() + "/" + (_cpu_model() if device.type == "cpu" else str(device))
    key = "|".join([where, device_label(device, threads), str(threads or torch.get_num_threads()), dtype,
                    thin_dtype or "-", torch.__version__, f"v{CACHE_VERSION}"])
    # Named by the products' path and the kernels' source hashes: a changed kernel is probed afresh.
    if thin_dtype:
        path = product_path(device, TORCH_DTYPES[thin_dtype], TORCH_DTYPES[dtype])
        key += "|" + path
        kernel = {"half-kernel": half_gemm, "amx-bf16": amx_gemm}.get(path)
        if kernel is not None:
            key += "|" + build.library_name(kernel.SOURCE, kernel.FLAGS)
    if dtype == "float32" and paged_kernel.available(torch.empty((1, 1, 1, 1), device=device)):
        key += "|" + build.library_name(paged_kernel.SOURCE, paged_kernel.FLAGS)
    if weight_format is not None:
        key += "|" + weight_format
        if quant_gemm.available(device):
            key += "|" + build.library_name(quant_gemm.SOURCE, quant_gemm.FLAGS)
    path = cache_path()
    cache = _read_cache(path)
    if key in cache and not reprobe and "probed_at" in cache[key]:  # an entry that says when it was taken
        return cache[key]
    before = _host_busy_clock()
    rates = measure_rates(device, dtype, threads, thin_dtype, weight_format)
    rates = {**rates, "probed_at": time.time(), "host_busy": _others_busy(before, _host_busy_clock())}
    cache = _read_cache(path)  # another stage may have written meanwhile
    cache[key] = rates
    _write_cache(path, cache)
    return rates


def measure_rates(device: torch.device, dtype: str, threads: int | None, weight_dtype: str | None,
                  weight_format: str | None = None) -> dict[str, float | None]:
    """A fresh probe (about a second on a CPU), bypassing the cache: weight_dtype is given when it differs from dtype."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    # The probed GPU is the current one while it is probed: kernels launched without a device (the attention
    # metadata, the op-overhead loop) and the allocator's cache emptied below are its own, not cuda:0's.
    current = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    try:
        with current, torch.inference_mode():
            try:
                return _measure(device, TORCH_DTYPES[dtype], TORCH_DTYPES[weight_dtype] if weight_dtype else None,
                                weight_format)
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()  # or the probe's buffers would count against the free memory read next
    finally:
        torch.set_num_threads(previous)


def _host_busy_clock() -> tuple[float, float, float] | None:
    """(busy seconds of every core, this process's CPU seconds, wall seconds) now; None where /proc/stat is not."""
    read = cpu_seconds()
    return None if read is None else (read[0], time.process_time(), time.monotonic())


def _others_busy(before, after) -> float | None:
    """The share of the host's cores that work other than this process kept busy between two readings."""
    if before is None or after is None or after[2] <= before[2]:
        return None
    others = (after[0] - before[0]) - (after[1] - before[1])
    return min(1.0, max(0.0, others / ((after[2] - before[2]) * (os.cpu_count() or 1))))


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _write_cache(path: Path, cache: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
        tmp.replace(path)  # atomic: stages probing at once never read half a file
    except OSError:
        pass  # a read-only home only costs a probe per start


def disk_bandwidth(folder: str | Path) -> float:
    """Bytes/s a layer stream reads from files in `folder` (engine.model.layer_stream), from STRATA_DEVICE_PROFILE's
    "disk" entry, the cache (per file system and folder), or a fresh measurement of about a second."""
    override = _profile_override("disk", ("disk_bandwidth",))
    if override is not None:
        return float(override["disk_bandwidth"])
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    key = f"{socket.gethostname()}|disk|{os.stat(folder).st_dev}|{folder}|v{CACHE_VERSION}"
    path = cache_path()
    cache = _read_cache(path)
    if key not in cache:
        from engine.model.layer_stream import measure_read_bandwidth

        cache = {**_read_cache(path), key: {"disk_bandwidth": measure_read_bandwidth(folder)}}
        _write_cache(path, cache)
    return cache[key]["disk_bandwidth"]


def host_copy_bandwidth(device: torch.device, nbytes: int = 256 << 20) -> float:
    """Bytes/s of copies from pinned host memory to a GPU, as a host tier makes them (engine.model.host_stream): from
    STRATA_DEVICE_PROFILE's entry for the device ("host_bandwidth"), the cache, or the best of three copies."""
    override = _profile_override(str(device), ())
    if override is not None and "host_bandwidth" in override:
        return float(override["host_bandwidth"])
    key = f"{socket.gethostname()}|host-copy|{torch.cuda.get_device_name(device)}|{device}|v{CACHE_VERSION}"
    path = cache_path()
    cache = _read_cache(path)
    if key not in cache:
        from engine.model.host_stream import pin, unpin

        source = torch.empty(nbytes, dtype=torch.uint8)
        pin(source)  # locked as a host tier's layers are, not held by torch's pinned-memory cache afterwards
        target = torch.empty(nbytes, dtype=torch.uint8, device=device)
        best = float("inf")
        for _ in range(3):
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            target.copy_(source, non_blocking=True)
            torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - start)
        unpin(source)
        del source, target
        torch.cuda.empty_cache()
        cache = {**_read_cache(path), key: {"host_bandwidth": nbytes / best}}
        _write_cache(path, cache)
    return cache[key]["host_bandwidth"]


def describe_device(request: DeviceRequest, dtype: str, threads: int | None, memory_fraction: float = 0.9,
                    weight_dtype: str | None = None, weight_format: str | None = None,
                    offload_dir: str | None = None, format_choices: tuple[str, ...] = (),
                    cpu_offload_bytes: int = 0, host_experts: tuple[str, str] | None = None,
                    reprobe: bool = False) -> DeviceInfo:
    """What this process's device is worth to the planner. dtype: the compute dtype; weight_dtype: the weights'
    when they differ (a CPU without native half precision), so the half-precision thin path is timed too.
    offload_dir: where a CPU stage may keep layers it reads each step (its disk tier), whose bandwidth is measured.
    format_choices: quantized formats the planner may choose a layer to run at, whose products are timed too.
    cpu_offload_bytes: on a GPU, how much of its layers it may keep in host memory (its host tier), whose copy
    bandwidth is measured. host_experts: for a mixture of experts on a GPU with a host tier, the (compute, weight)
    dtypes the host's CPU would run routed experts at, whose rates are measured too (DeviceInfo.host_cpu)."""
    device = torch.device(request.name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"{request.name}: CUDA is not available in this process")
        if (device.index or 0) >= torch.cuda.device_count():
            raise RuntimeError(f"{request.name}: only {torch.cuda.device_count()} CUDA device(s) here")
        device = torch.device("cuda", device.index or 0)
    rates = probe_rates(str(device), dtype, threads, weight_dtype, weight_format, reprobe)
    format_rates = {}
    for f in format_choices:
        timed = probe_rates(str(device), dtype, threads, weight_dtype, f, reprobe)
        format_rates[f] = (timed["matmul_flops"], timed.get("small_gemm_flops"))
    memory = request.memory if request.memory is not None else int(available_memory(device) * memory_fraction)
    n_threads = (threads or torch.get_num_threads()) if device.type == "cpu" else None
    host_cpu = None
    if host_experts is not None and cpu_offload_bytes and device.type == "cuda":
        host_cpu = describe_device(DeviceRequest("cpu", cpu_offload_bytes), host_experts[0], threads,
                                   weight_dtype=host_experts[1], weight_format=weight_format, reprobe=reprobe)
    return DeviceInfo(
        name=str(device), kind=device.type, host=socket.gethostname(), label=device_label(device, threads),
        memory=memory, matmul_flops=rates["matmul_flops"], mem_bandwidth=rates["mem_bandwidth"],
        op_overhead_s=rates["op_overhead_s"], threads=n_threads, small_gemm_flops=rates.get("small_gemm_flops"),
        thin_matmul_flops=rates.get("thin_matmul_flops"),
        row_overhead_s=rates.get("row_overhead_s") or 0.0, attention_bandwidth=rates.get("attention_bandwidth"),
        dtype=dtype, budgeted=request.memory is not None,
        disk_bandwidth=disk_bandwidth(offload_dir) if offload_dir and device.type == "cpu" else None,
        fused_layer_ops=layer_ops.available(torch.empty(0, dtype=TORCH_DTYPES[dtype], device=device)),
        format_rates=format_rates or None,
        host_tier_bytes=cpu_offload_bytes if device.type == "cuda" else 0,
        host_bandwidth=host_copy_bandwidth(device) if cpu_offload_bytes and device.type == "cuda" else None,
        host_cpu=host_cpu,
        probed_at=rates.get("probed_at"), probe_host_busy=rates.get("host_busy"),
        # Whether a mixture's plain experts go through one grouped GEMM here (engine.model.experts).
        grouped_gemm=device.type == "cuda" and grouped_gemm_runs(
            torch.zeros(2, 64, 64, dtype=TORCH_DTYPES[dtype], device=device)),
    )
