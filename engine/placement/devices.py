"""The devices a user lists and what each reports once probed: parsing of --devices, --layers and sizes, and the
shares of host memory. Imports no torch, so `strata plan` and its tests start fast."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace


@dataclass(slots=True)
class DeviceRequest:
    """One entry of --devices: a device and an optional memory budget."""

    name: str  # "cpu", "cuda:0"
    memory: int | None = None  # bytes for weights plus KV; None: a share of what is free


_DEVICE_RE = re.compile(r"^(cpu|cuda)(?::(\d+))?$")


def parse_devices(text: str) -> list[DeviceRequest]:
    """'cuda:0=20GiB,cuda:1,cpu=8GiB' -> one request per stage, in order; a device may repeat ('cpu,cpu')."""
    if not (text or "").strip():
        raise ValueError("--devices: no devices given; list them such as cuda:0,cuda:1=20GiB,cpu")
    requests = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            raise ValueError(f"--devices: empty entry in {text!r}; list devices such as cuda:0,cuda:1=20GiB,cpu")
        name, _, size = item.partition("=")
        m = _DEVICE_RE.match(name.strip().lower())
        if not m:
            raise ValueError(f"--devices: cannot read {name.strip()!r}; use cpu or cuda:N, optionally =SIZE")
        kind, index = m.groups()
        if kind == "cpu" and index is not None:
            raise ValueError(f"--devices: cannot read {name.strip()!r}; the host CPU is just 'cpu'")
        memory = None
        if size.strip():
            try:
                memory = parse_size(size)
            except ValueError as e:
                raise ValueError(f"--devices: {item!r}: {e}") from None
            if memory <= 0:
                raise ValueError(f"--devices: {item!r}: the memory budget must be positive")
        elif "=" in item:
            raise ValueError(f"--devices: {item!r}: a size must follow '=', e.g. {name.strip()}=8GiB")
        requests.append(DeviceRequest("cpu" if kind == "cpu" else f"cuda:{index or 0}", memory))
    return requests


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


@dataclass(slots=True)
class DeviceInfo:
    """What a stage process reports about its device after probing it."""

    name: str  # "cpu", "cuda:1"
    kind: str  # "cpu" or "cuda"
    host: str
    label: str  # for people: "NVIDIA H200", "CPU, 1 thread"
    memory: int  # bytes usable for weights plus KV
    matmul_flops: float  # FLOP/s of a decode-shaped GEMM at the compute dtype, weights streamed from memory
    mem_bandwidth: float  # bytes/s a one-row product streams weights at
    op_overhead_s: float  # host seconds per dispatched op
    threads: int | None = None
    # FLOP/s of an 8-row product at the compute dtype (SMALL_GEMM_ROWS): a CPU's GEMM kernel packs the weights on
    # every call, which small batches cannot amortise (8 rows ran at a quarter of the 64-row rate); None: matmul_flops.
    small_gemm_flops: float | None = None
    # FLOP/s of a one-row product with half-precision weights, the engine's thin path on CPUs that emulate half
    # precision (several times slower than their fp32 rate); None where weights and compute share a dtype.
    thin_matmul_flops: float | None = None
    # Seconds per output feature of a one-row product beyond its bytes or FLOPs, at the dtype thin steps multiply
    # in: each feature's dot product ends in a reduction, which short rows pay often (a CPU GEMV over 576-wide rows
    # runs ~30% below its rate over 4096-wide ones).
    row_overhead_s: float = 0.0
    # KV bytes per second the engine's decode attention gets through (gather plus SDPA), measured; None: the
    # memory bandwidth over ATTENTION_KV_PASSES.
    attention_bandwidth: float | None = None
    dtype: str | None = None  # compute dtype on this device; None: the ModelCost's
    fused_layer_ops: bool = False  # the elementwise steps of a layer run fused (engine.kernels.layer_ops)
    budgeted: bool = False  # memory is the user's budget, not a share of what was free
    # Bytes/s of direct reads from the folder streamed layers are kept in (--offload-dir), measured; None: this
    # device has no disk tier, every layer it holds stays in its memory.
    disk_bandwidth: float | None = None
    # A GPU's host tier: bytes of its layers it may keep in host memory and copy in every step (--cpu-offload-gb;
    # 0: none), and the bytes/s of those copies (from pinned memory, measured).
    host_tier_bytes: int = 0
    host_bandwidth: float | None = None
    # Per quantized format a layer may be chosen to run at (engine.placement.precision): the rates the probe timed
    # its products at, (matmul_flops, small_gemm_flops); None: no such choice was asked for.
    format_rates: dict[str, tuple[float, float | None]] | None = None
    # A GPU's host CPU, as it runs the routed experts of mixture-of-experts layers whose weights the stage keeps in
    # host memory (within host_tier_bytes); None: the stage keeps every expert in its own memory.
    host_cpu: DeviceInfo | None = None
    # A GPU whose torch runs the grouped GEMM a mixture's plain experts go through at once (engine.model.experts);
    # else each expert a step reaches is one product of its own.
    grouped_gemm: bool = False
    # When the figures were measured (seconds since the epoch) and the share of the host's cores other work kept
    # busy meanwhile; None where they were not measured here (a described cluster, STRATA_DEVICE_PROFILE).
    probed_at: float | None = None
    probe_host_busy: float | None = None

    def interchangeable(self) -> tuple:
        """Devices equal in everything but name are interchangeable in a plan."""
        return tuple(_frozen(v) for k, v in asdict(self).items() if k not in ("name", "probed_at", "probe_host_busy"))


def _frozen(value):
    """A hashable copy of a field as asdict gives it (dicts and lists nested)."""
    if isinstance(value, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


# Where other work kept more than this share of the host's cores busy while a device was probed, its figures may be
# low: `strata plan` and `strata serve` say so, and --reprobe measures again.
BUSY_HOST = 0.25


def probe_note(info: DeviceInfo) -> str | None:
    """When and under what load a device's figures were measured, for people; a warning where the host was busy."""
    if info.probed_at is None:
        return None
    import time

    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(info.probed_at))
    note = f"{info.name} measured {when}"
    if info.probe_host_busy is not None:
        note += f", other work keeping {info.probe_host_busy:.0%} of the host's cores busy"
        if info.probe_host_busy > BUSY_HOST:
            note += ": taken under load, its figures may be low; measure again with --reprobe when the host is quieter"
    return note


def tier_name(kind: str) -> str:
    """Where a stage on a device of this kind keeps the layers its memory cannot hold: a CPU's on disk
    (--offload-dir), a GPU's in host memory (--cpu-offload-gb)."""
    return "disk" if kind == "cpu" else "host"


def parse_layers(text: str | None) -> list[int] | None:
    """--layers: counts per stage in --devices order, "20,8,4"; None or "" for the planner's split."""
    if not text:
        return None
    try:
        return [int(n) for n in text.split(",")]
    except ValueError:
        raise ValueError(f"layers must be comma-separated counts such as 20,8,4, got {text!r}") from None


def share_host_memory(infos: list[DeviceInfo]) -> None:
    """CPU stages on one host without a budget each measured the same free memory; split what is left of it, after
    the host memory its GPU stages may keep layers in (their host tiers), between them."""
    shared: dict[str, list[DeviceInfo]] = {}
    for info in infos:
        if info.kind == "cpu" and not info.budgeted:
            shared.setdefault(info.host, []).append(info)
    for host, group in shared.items():
        tiers = sum(i.host_tier_bytes for i in infos if i.kind == "cuda" and i.host == host)
        for info in group:
            info.memory = max(info.memory - tiers, 0) // len(group)


def share_host_cpus(infos: list[DeviceInfo]) -> None:
    """A GPU runs a mixture's experts on its host's CPU only where no CPU stage runs there (that stage keeps the
    host's cores busy with its own layers), and GPUs of one host that may each run experts there share its rates."""
    staged = {i.host for i in infos if i.kind == "cpu"}
    sharing: dict[str, list[DeviceInfo]] = {}
    for info in infos:
        if info.host in staged:
            info.host_cpu = None
        elif info.host_cpu is not None:
            sharing.setdefault(info.host, []).append(info)
    for group in sharing.values():
        if len(group) > 1:
            for info in group:
                cpu, k = info.host_cpu, len(group)
                info.host_cpu = replace(cpu, matmul_flops=cpu.matmul_flops / k, mem_bandwidth=cpu.mem_bandwidth / k,
                                        **{f: getattr(cpu, f) / k for f in _SHARED_RATES if getattr(cpu, f)})


_SHARED_RATES = ("small_gemm_flops", "thin_matmul_flops", "attention_bandwidth")
