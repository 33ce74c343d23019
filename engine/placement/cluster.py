"""Devices a user does not have here: a cluster described in a TOML file, for `strata plan --cluster FILE`.

    network = "10GbE"          # between hosts: 1GbE, 10GbE, 25GbE, 100GbE, or bytes per second

    [[host]]
    name = "box1"
    gpus = ["A100-80GB", "RTX 3090", "RTX 3090"]   # from KNOWN_GPUS, or {model = "L4", memory = "20GiB"}
    gpu_link = "PCIe4"         # between this host's GPUs: NVLink, PCIe3, PCIe4, PCIe5
    cpu = {memory = "64GiB", bandwidth = "80GB/s", flops = 1.5e12}   # a CPU stage too (leave out: none)
    # cpu = {..., stage = false}: the host's CPU described but no stage on it; its GPUs may run a mixture's experts
    # there (with --cpu-offload-gb)

A GPU's rates are its datasheet's, derated to what serving kernels reach: products at MATMUL_EFFICIENCY of the dense
tensor-core peak at its half precision, weights streamed at BANDWIDTH_EFFICIENCY of its memory bandwidth. A stage on
it takes the memory fraction of the card's memory, as a stage on a real one takes that share of what is free. It
computes at the requested dtype, or the checkpoint's half precision (fp16 on a GPU without bf16); a CPU stage in fp32.
Links are the named bus's or network's usable bandwidth; a CPU and a GPU of one host talk over that GPU's PCIe.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from engine.placement.devices import DeviceInfo, parse_size

MATMUL_EFFICIENCY = 0.6
BANDWIDTH_EFFICIENCY = 0.85
GPU_OP_OVERHEAD_S = 4e-6  # a kernel launch, most of it hidden behind the previous kernel
CPU_OP_OVERHEAD_S = 2e-6


@dataclass(frozen=True, slots=True)
class GPUModel:
    memory: int  # bytes the driver reports as the card's total (less than its nominal size)
    half_flops: float  # dense tensor-core FLOP/s at bf16 (fp16 where the GPU has no bf16)
    int8_ops: float  # dense int8 tensor-core OP/s
    bandwidth: float  # memory bytes/s
    pcie: str  # the bus it sits on
    bf16: bool = True
    grouped_gemm: bool = False  # torch's grouped GEMM kernel runs on it (Hopper and later): DeviceInfo.grouped_gemm


GB = 1e9
MiB = 1 << 20
KNOWN_GPUS = {  # datasheet figures: dense (no sparsity) tensor-core rates
    "H100-80GB": GPUModel(81559 * MiB, 989e12, 1979e12, 3350 * GB, "PCIe5", grouped_gemm=True),
    "A100-80GB": GPUModel(81920 * MiB, 312e12, 624e12, 2039 * GB, "PCIe4"),
    "A100-40GB": GPUModel(40960 * MiB, 312e12, 624e12, 1555 * GB, "PCIe4"),
    "A10": GPUModel(23028 * MiB, 125e12, 250e12, 600 * GB, "PCIe4"),
    "L4": GPUModel(23034 * MiB, 121e12, 242e12, 300 * GB, "PCIe4"),
    "T4": GPUModel(15360 * MiB, 65e12, 130e12, 320 * GB, "PCIe3", bf16=False),
    "V100-32GB": GPUModel(32768 * MiB, 125e12, 62e12, 900 * GB, "PCIe3", bf16=False),
    "RTX 3090": GPUModel(24576 * MiB, 71e12, 284e12, 936 * GB, "PCIe4"),
    "RTX 4090": GPUModel(24564 * MiB, 165e12, 660e12, 1008 * GB, "PCIe4"),
}
LINKS = {  # usable bytes/s one way
    "NVLink": 250 * GB, "PCIe3": 12 * GB, "PCIe4": 25 * GB, "PCIe5": 50 * GB,
    "1GbE": 0.117 * GB, "10GbE": 1.17 * GB, "25GbE": 2.9 * GB, "100GbE": 11.7 * GB,
}


class ClusterError(ValueError):
    """The cluster file cannot be read as a cluster; the message says where."""


@dataclass(slots=True)
class Cluster:
    devices: list[DeviceInfo]  # in the order the file lists them, each host's GPUs before its CPU
    network: float  # bytes/s between hosts
    gpu_links: dict[str, float]  # host -> bytes/s between its GPUs
    buses: dict[tuple[str, str], float]  # (host, device name) -> bytes/s of its PCIe
    host_cpus: dict[str, DeviceInfo] = field(default_factory=dict)  # host -> its CPU where it holds no stage

    def link_bandwidth(self, src: DeviceInfo, dst: DeviceInfo) -> float:
        """What a step's activations cross from src to dst at (engine.placement.cost.link_between takes this)."""
        if src.host != dst.host:
            return self.network
        if src.kind == "cuda" and dst.kind == "cuda":
            return self.gpu_links[src.host]
        gpu = src if src.kind == "cuda" else dst
        return self.buses.get((gpu.host, gpu.name), LINKS["PCIe4"])


def _number(value, what: str, where: str) -> float:
    """A finite positive number (not a boolean)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ClusterError(f"{where}: {what} must be a positive number, got {value!r}")
    return float(value)


def _size(value, what: str, where: str) -> int:
    try:
        size = parse_size(value) if isinstance(value, str) else None
    except ValueError:
        size = None
    if not size or size <= 0:
        raise ClusterError(f"{where}: {what} must be a size such as \"16GiB\", got {value!r}")
    return size


def _rate(value, what: str, where: str) -> float:
    if isinstance(value, str):
        if value in LINKS:
            return LINKS[value]
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(G|T)B/s\s*", value)
        if m and float(m.group(1)) > 0:
            return float(m.group(1)) * (1e9 if m.group(2) == "G" else 1e12)
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf:
        return float(value)
    raise ClusterError(f"{where}: {what} must be a positive number of bytes per second, '<N>GB/s' or one of "
                       f"{', '.join(LINKS)}; got {value!r}")


def _gpu(entry, index: int, host: str, where: str, half: str, fraction: float) -> tuple[DeviceInfo, str]:
    overrides = {}
    if isinstance(entry, dict):
        overrides = dict(entry)
        entry = overrides.pop("model", None)
    model = KNOWN_GPUS.get(entry) if isinstance(entry, str) else None
    if model is None:
        raise ClusterError(f"{where}: unknown GPU {entry!r}; known: {', '.join(KNOWN_GPUS)}")
    memory = _size(overrides.pop("memory"), "a GPU's memory", where) if "memory" in overrides else model.memory
    if overrides:
        raise ClusterError(f"{where}: a GPU takes model and memory, not {', '.join(sorted(overrides))}")
    dtype = "float16" if half == "bfloat16" and not model.bf16 else half
    info = DeviceInfo(
        name=f"cuda:{index}", kind="cuda", host=host, label=f"NVIDIA {entry}", memory=int(memory * fraction),
        matmul_flops=model.half_flops * MATMUL_EFFICIENCY, mem_bandwidth=model.bandwidth * BANDWIDTH_EFFICIENCY,
        op_overhead_s=GPU_OP_OVERHEAD_S, dtype=dtype, grouped_gemm=model.grouped_gemm)
    return info, model.pcie


def _cpu(entry, host: str, where: str) -> DeviceInfo:
    if not isinstance(entry, dict) or "memory" not in entry:
        raise ClusterError(f"{where}: cpu must be a table with at least memory = \"64GiB\"")
    unknown = set(entry) - {"memory", "bandwidth", "flops", "stage"}
    if unknown:
        raise ClusterError(f"{where}: cpu takes memory, bandwidth, flops and stage, not {', '.join(sorted(unknown))}")
    if not isinstance(entry.get("stage", True), bool):
        raise ClusterError(f"{where}: cpu's stage must be true or false")
    bandwidth = _rate(entry.get("bandwidth", "50GB/s"), "bandwidth", where)
    flops = _number(entry.get("flops", 1e12), "flops", where)
    return DeviceInfo(name="cpu", kind="cpu", host=host, label="CPU", memory=_size(entry["memory"], "memory", where),
                      matmul_flops=flops, mem_bandwidth=bandwidth, op_overhead_s=CPU_OP_OVERHEAD_S,
                      dtype="float32", fused_layer_ops=True, budgeted=True)


def read_cluster(path: str | Path, half: str = "bfloat16", memory_fraction: float = 0.9) -> Cluster:
    """half: the dtype GPU stages compute in (fp16 stands in for bf16 on a GPU without it); memory_fraction: of each
    GPU's memory a stage takes."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ClusterError(f"{path}: {e}") from None
    unknown = set(data) - {"host", "network"}
    if unknown:
        raise ClusterError(f"{path}: unknown keys {', '.join(sorted(unknown))}")
    hosts = data.get("host")
    if not isinstance(hosts, list) or not hosts:
        raise ClusterError(f"{path}: no [[host]] tables")
    network = _rate(data.get("network", "10GbE"), "network", str(path))
    devices: list[DeviceInfo] = []
    gpu_links: dict[str, float] = {}
    buses: dict[tuple[str, str], float] = {}
    host_cpus: dict[str, DeviceInfo] = {}
    for k, host in enumerate(hosts):
        if not isinstance(host, dict):
            raise ClusterError(f"{path}: each [[host]] must be a table, got {host!r}")
        name = host.get("name", f"host{k}")
        if not isinstance(name, str):
            raise ClusterError(f"{path}: a host's name must be a string, got {name!r}")
        where = f"{path}: host {name}"
        unknown = set(host) - {"name", "gpus", "gpu_link", "cpu"}
        if unknown:
            raise ClusterError(f"{where}: unknown keys {', '.join(sorted(unknown))}")
        if name in gpu_links:
            raise ClusterError(f"{where}: two hosts are named {name!r}")
        gpu_links[name] = _rate(host.get("gpu_link", "PCIe4"), "gpu_link", where)
        gpus = host.get("gpus", [])
        if not isinstance(gpus, list):
            raise ClusterError(f"{where}: gpus must be a list")
        for i, entry in enumerate(gpus):
            info, bus = _gpu(entry, i, name, where, half, memory_fraction)
            devices.append(info)
            buses[(name, info.name)] = LINKS[bus]
        if "cpu" in host:
            cpu = _cpu(host["cpu"], name, where)
            if host["cpu"].get("stage", True):
                devices.append(cpu)
            else:
                host_cpus[name] = cpu
    if not devices:
        raise ClusterError(f"{path}: the hosts have no devices")
    return Cluster(devices, network, gpu_links, buses, host_cpus)
