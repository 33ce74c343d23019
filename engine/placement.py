"""Where each layer runs: device order and contiguous layer split for the pipeline.

Every device a user lists becomes one stage. The planner predicts each stage's decode-step
time from the device's measured rates (engine.probe) and the model's per-layer costs, then
picks the device order and split that minimise the slowest stage (compute plus the
transfer into it), with every device holding its weights plus KV for a reserve of tokens.

Layers are identical, so a stage's cost depends only on how many layers it holds, its
device, its neighbours and whether it is first or last. The split is an exact dynamic
program over (stage, layers placed so far); orders are enumerated, identical devices
counted once. This module imports no torch, so `strata plan` and its tests start fast.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

GiB = 1 << 30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# ---- what the engine's code does (counted from engine/model.py, engine/linear.py, engine/stage.py) ----------------
# Up to this many rows, a product with half-precision weights and fp32 activations multiplies in half precision
# (engine.linear reads it from here).
THIN_ROWS = 2
# Host cost of one decoder layer in units of the probe's per-op cost. StageModel.forward dispatches 48 ops per layer
# (22 kernels, 26 views), but norms, SDPA and rotary are composites that dispatch more inside: at batch 1, with
# the products timed apart, a layer's remaining host time measured 145-155x the probe's op (torch 2.13, AVX2 CPU).
OPS_PER_LAYER = 150
# Where the elementwise steps run fused (engine.kernels.layer_ops: fp32 on x86-64 CPUs), measured the same way: 54x.
FUSED_OPS_PER_LAYER = 55
# The thin path adds a cast before and after each of the four products.
THIN_OPS_PER_LAYER = 8
# Per step, outside the layers: attention metadata tensors, the rotary table lookup and its slices.
STEP_OPS = 14
EMBED_OPS = 2  # embedding gather and the cast to the compute dtype
HEAD_OPS = 6  # row gather, final norm, LM head, cast to fp32, sampler set-up and the host copy
# Sampling as the engine's sampler does it: greedy is one argmax over the logits; random sampling runs a
# counter-based hash over [rows, vocab] (~76 kernels that write ~116 bytes per logit and read about 1.5x that).
# "random" is the OpenAI API's default, temperature alone: on one core, 5.7-7.3 ns per logit (32 rows of 8192 and
# of 49152 logits), which is ~110 bytes at the ~16 GB/s the probe streams weights at. top_p costs 3-8x that where
# the nucleus outgrows the sampler's candidates and whole rows are sorted; a plan is not made for it.
SAMPLING = {"greedy": (1, 4), "random": (80, 110)}  # kind -> (ops, bytes of traffic per logit)
# The stage's Python bookkeeping per sequence and step (block tables, slots, positions, sampling rows).
HOST_SECONDS_PER_SEQUENCE = 3e-6
# Decode attention on torch's kernels gathers every context block into a buffer (read + write) and SDPA reads it
# again: three passes over the KV bytes, used when the device's attention rate was not measured (the probe times
# whichever path the device runs; the engine's CPU kernel reads the blocks in place).
ATTENTION_KV_PASSES = 3

# ---- links (bytes/s and seconds per hop; a hop sends the pickled batch over gloo, then the activations) -----------
# NCCL between two GPUs of one host over PCIe 4.0 x16, as achieved (NVLink is faster; pass link_bandwidth to say so).
CUDA_CUDA_BANDWIDTH = 20e9
# Device-to-host copy over PCIe 4.0 without pinned buffers.
CUDA_HOST_COPY_BANDWIDTH = 12e9
# gloo over loopback TCP between two processes: 2.7 GB/s for 2.4 MB messages, measured on a 2-core VM.
GLOO_LOOPBACK_BANDWIDTH = 2.5e9
# Between hosts: 10 Gigabit Ethernet.
CROSS_HOST_BANDWIDTH = 1.25e9
# One gloo message over loopback: ~160 us measured (ping-pong on a 2-core VM), most of it wake-ups.
SAME_HOST_LATENCY_S = 150e-6
CROSS_HOST_LATENCY_S = 300e-6

# The two batch sizes the probe times multi-row products at; between them the time is interpolated.
SMALL_GEMM_ROWS = 8
GEMM_ROWS = 64

# Orders beyond this many distinct ones are not enumerated: the devices go fastest first.
MAX_ORDERS = 5040
# Among plans this close to the best bottleneck, prefer the one whose smallest stage KV capacity is largest.
TIE_TOLERANCE = 0.02

_INF = math.inf


class PlacementError(ValueError):
    """The model cannot be placed on the devices as asked."""


# ---- devices ---------------------------------------------------------------------------------------------------


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
            # Imported only here: engine.device imports torch.
            from engine.device import parse_size

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

    def interchangeable(self) -> tuple:
        """Devices equal in everything but name are interchangeable in a plan."""
        return tuple(v for k, v in asdict(self).items() if k != "name")


class LinkSpeed(NamedTuple):
    bandwidth: float  # bytes/s
    latency_s: float


def link_between(src: DeviceInfo | None, dst: DeviceInfo, overrides: float | dict | None = None) -> LinkSpeed:
    """The link into `dst` from `src` (None: the driver, which sends only a small message)."""
    if src is None:
        return LinkSpeed(_INF, SAME_HOST_LATENCY_S)
    same_host = src.host == dst.host
    latency = SAME_HOST_LATENCY_S if same_host else CROSS_HOST_LATENCY_S
    if isinstance(overrides, (int, float)):
        return LinkSpeed(float(overrides), latency)
    if overrides:
        for key in ((src.name, dst.name), (dst.name, src.name)):
            if key in overrides:
                return LinkSpeed(float(overrides[key]), latency)
    if not same_host:
        return LinkSpeed(CROSS_HOST_BANDWIDTH, latency)
    if src.kind == "cuda" and dst.kind == "cuda":
        return LinkSpeed(CUDA_CUDA_BANDWIDTH, latency)
    # A link with a CPU end travels over gloo; from or to a GPU it also crosses PCIe, in series.
    copies = [GLOO_LOOPBACK_BANDWIDTH] + [CUDA_HOST_COPY_BANDWIDTH] * ((src.kind == "cuda") + (dst.kind == "cuda"))
    return LinkSpeed(1.0 / sum(1.0 / b for b in copies), latency)


# ---- the model's costs ----------------------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class ModelCost:
    """What a model costs per layer and per stage, counted in elements (bytes follow from the dtypes: a device
    may compute at another dtype than the model's default, see DeviceInfo.dtype)."""

    num_layers: int
    hidden_size: int
    vocab_size: int
    layer_params: int  # one decoder layer's weights
    layer_out_features: int  # summed over the layer's four products (qkv, o, gate_up, down)
    kv_elems_per_token: int  # one layer's K and V for one token
    elementwise_elems_per_token: int  # read + written by one layer's non-matmul kernels, per token
    fused_elementwise_elems_per_token: int  # the same where they run fused (DeviceInfo.fused_layer_ops)
    embed_params: int
    head_params: int  # final norm plus LM head
    tied_embeddings: bool  # then the first and the last stage each hold the matrix
    compute_dtype: str
    weight_dtype: str
    sampling: str = "random"  # what the last stage's sampler is assumed to do: "greedy" or "random"

    @staticmethod
    def from_config(cfg, compute_dtype: str, weight_dtype: str, sampling: str = "random") -> ModelCost:
        """cfg: engine.config.ModelConfig."""
        for d in (compute_dtype, weight_dtype):
            if d not in DTYPE_BYTES:
                raise ValueError(f"dtype {d!r} is not one of {', '.join(DTYPE_BYTES)}")
        if sampling not in SAMPLING:
            raise ValueError(f"sampling must be one of {', '.join(SAMPLING)}, got {sampling!r}")
        h, i, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size
        # Counted from StageModel.forward: two RMS norms (~7 passes over h each), rotary over q and k (neg, cat, two
        # muls and an add: ~10 passes), the new K and V into the cache, the attention output copy, two residual adds
        # (3 passes each), SiLU (2 passes over i) and the gate product (3 passes).
        elementwise = 20 * h + 10 * (q + kv) + 4 * kv + 2 * q + 5 * i
        # Fused: two residual adds with their norms (~4 passes over h each), rotary with the cache write (q and
        # two k read and written, v read and written), the gate (3 passes over i), the query and output copies.
        fused = 8 * h + 2 * (q + kv) + 3 * kv + 4 * q + 3 * i
        head = cfg.vocab_size * h + h
        return ModelCost(
            num_layers=cfg.num_layers, hidden_size=h, vocab_size=cfg.vocab_size,
            layer_params=cfg.layer_weight_bytes(1), layer_out_features=(q + 2 * kv) + h + 2 * i + h,
            kv_elems_per_token=cfg.kv_bytes_per_token_per_layer(1), elementwise_elems_per_token=elementwise,
            fused_elementwise_elems_per_token=fused,
            embed_params=cfg.vocab_size * h, head_params=head,
            tied_embeddings=cfg.tie_word_embeddings, compute_dtype=compute_dtype, weight_dtype=weight_dtype,
            sampling=sampling,
        )

    # The figures at the model's own dtypes.
    @property
    def layer_weight_bytes(self) -> int:
        return self.layer_params * DTYPE_BYTES[self.weight_dtype]

    @property
    def kv_bytes_per_token(self) -> int:
        """One layer, one token, at the KV cache's dtype."""
        return self.kv_elems_per_token * DTYPE_BYTES[kv_cache_dtype(self.compute_dtype, self.weight_dtype)]

    @property
    def flops_per_token(self) -> int:
        """One layer's products, per token."""
        return 2 * self.layer_params

    @property
    def activation_bytes(self) -> int:
        """What crosses a link per token."""
        return self.hidden_size * DTYPE_BYTES[self.compute_dtype]

    @property
    def embed_bytes(self) -> int:
        return self.embed_params * DTYPE_BYTES[self.weight_dtype]

    @property
    def head_bytes(self) -> int:
        return self.head_params * DTYPE_BYTES[self.weight_dtype]

    @property
    def head_flops(self) -> int:
        """Per token."""
        return 2 * self.head_params


def kv_cache_dtype(compute_dtype: str, weight_dtype: str) -> str:
    """The KV cache's dtype: the compute dtype, but bf16 under fp32 activations over bf16 weights (`auto` on a
    CPU), as a bf16 model keeps its cache: half the bytes for decode attention to read, twice the tokens per
    byte. The engine's CPU kernels widen it in registers."""
    return "bfloat16" if (compute_dtype, weight_dtype) == ("float32", "bfloat16") else compute_dtype


def _compute_bytes(cost: ModelCost, device: DeviceInfo) -> int:
    return DTYPE_BYTES[device.dtype or cost.compute_dtype]


def _kv_bytes(cost: ModelCost, device: DeviceInfo) -> int:
    return DTYPE_BYTES[kv_cache_dtype(device.dtype or cost.compute_dtype, cost.weight_dtype)]


def stage_weight_bytes(cost: ModelCost, n_layers: int, first: bool, last: bool) -> int:
    """Weights a stage holds: its layers, the embedding on the first, final norm and LM head on the last."""
    params = n_layers * cost.layer_params
    if first:
        params += cost.embed_params
    if last:
        # Tied embeddings: the head is the embedding matrix, held once when one stage is both first and last.
        params += cost.head_params - (cost.embed_params if cost.tied_embeddings and first else 0)
    return params * DTYPE_BYTES[cost.weight_dtype]


def stage_kv_bytes_per_token(cost: ModelCost, device: DeviceInfo, n_layers: int) -> int:
    return n_layers * cost.kv_elems_per_token * _kv_bytes(cost, device)


def kv_capacity_tokens(cost: ModelCost, device: DeviceInfo, n_layers: int, first: bool, last: bool) -> int:
    """Tokens of KV the stage's memory holds beside its weights (negative: the weights alone do not fit)."""
    left = device.memory - stage_weight_bytes(cost, n_layers, first, last)
    return left // max(stage_kv_bytes_per_token(cost, device, n_layers), 1)


def _matmul_seconds(cost: ModelCost, device: DeviceInfo, params: int, out_features: int, rows: int) -> float:
    """Products over `params` weights for `rows` rows: whichever binds, arithmetic or streaming the weights; one-row
    products (GEMVs) also pay per output feature."""
    compute = device.dtype or cost.compute_dtype
    upcast = cost.weight_dtype != compute
    flops = 2 * params * rows
    if rows <= THIN_ROWS:
        rate = (device.thin_matmul_flops or device.matmul_flops) if upcast else device.matmul_flops
        read = params * DTYPE_BYTES[cost.weight_dtype]
        return max(flops / rate, read / device.mem_bandwidth) + rows * out_features * device.row_overhead_s
    # Wide steps with half-precision weights read them at fp32 size on torch's kernels (engine.linear keeps an fp32
    # copy) and at half size on the engine's own (engine.kernels.half_gemm); arithmetic binds them either way, and the
    # probe timed whichever product this device runs.
    read = params * DTYPE_BYTES[compute if upcast else cost.weight_dtype]
    compute_s = flops / device.matmul_flops
    if rows < GEMM_ROWS and device.small_gemm_flops:
        # Up to 8 rows a product costs about what 8 do; from 8 to 64 rows the time grows linearly.
        small = 2 * params * SMALL_GEMM_ROWS / device.small_gemm_flops
        full = 2 * params * GEMM_ROWS / device.matmul_flops
        compute_s = small + max(rows - SMALL_GEMM_ROWS, 0) * (full - small) / (GEMM_ROWS - SMALL_GEMM_ROWS)
    return max(compute_s, read / device.mem_bandwidth)


def layer_seconds(cost: ModelCost, device: DeviceInfo, batch: int, context_len: int, block_size: int = 16) -> float:
    """One decoder layer's decode step for `batch` sequences that each attend to `context_len` tokens."""
    cb = _compute_bytes(cost, device)
    products = _matmul_seconds(cost, device, cost.layer_params, cost.layer_out_features, batch)
    # The gather reads whole blocks, padded to the longest context of the batch.
    keys = -(-context_len // block_size) * block_size
    kv = batch * keys * cost.kv_elems_per_token * _kv_bytes(cost, device)
    attention_rate = device.attention_bandwidth or device.mem_bandwidth / ATTENTION_KV_PASSES
    fused = device.fused_layer_ops
    elementwise_elems = cost.fused_elementwise_elems_per_token if fused else cost.elementwise_elems_per_token
    elementwise = batch * elementwise_elems * cb / device.mem_bandwidth
    work = products + kv / attention_rate + elementwise
    ops = (FUSED_OPS_PER_LAYER if fused else OPS_PER_LAYER) + (THIN_OPS_PER_LAYER if _thin(cost, device, batch) else 0)
    host = ops * device.op_overhead_s
    # A GPU runs kernels while the host launches the next ones; a CPU does one after the other.
    return max(host, work) if device.kind == "cuda" else host + work


def _thin(cost: ModelCost, device: DeviceInfo, batch: int) -> bool:
    return batch <= THIN_ROWS and cost.weight_dtype != (device.dtype or cost.compute_dtype)


class StageTime(NamedTuple):
    compute_s: float
    transfer_s: float  # into the stage

    @property
    def total_s(self) -> float:
        return self.compute_s + self.transfer_s


def stage_seconds(cost: ModelCost, device: DeviceInfo, n_layers: int, *, first: bool, last: bool, batch: int,
                  context_len: int, link: LinkSpeed | None, block_size: int = 16) -> StageTime:
    """One decode step of a stage holding `n_layers` layers; the one cost every plan and test uses."""
    cb = _compute_bytes(cost, device)
    bw = device.mem_bandwidth
    ops = STEP_OPS
    work = n_layers * layer_seconds(cost, device, batch, context_len, block_size)
    extra = batch * HOST_SECONDS_PER_SEQUENCE
    if first:
        ops += EMBED_OPS
        extra += batch * cost.hidden_size * (DTYPE_BYTES[cost.weight_dtype] + cb) / bw
    if last:
        sample_ops, sample_bytes = SAMPLING[cost.sampling]
        ops += HEAD_OPS + sample_ops + (2 if _thin(cost, device, batch) else 0)
        extra += _matmul_seconds(cost, device, cost.head_params, cost.vocab_size, batch)
        extra += batch * 7 * cost.hidden_size * cb / bw  # the final norm
        extra += batch * cost.vocab_size * sample_bytes / bw
    host = ops * device.op_overhead_s
    compute = work + extra + host
    transfer = 0.0
    if link is not None:
        size = 0 if first else batch * cost.hidden_size * cb  # the previous stage sends at its own dtype; close enough
        transfer = link.latency_s + (size / link.bandwidth if size else 0.0)
    return StageTime(compute, transfer)


def stage_fits(cost: ModelCost, device: DeviceInfo, n_layers: int, first: bool, last: bool,
               kv_reserve_tokens: int) -> bool:
    need = stage_weight_bytes(cost, n_layers, first, last)
    need += kv_reserve_tokens * stage_kv_bytes_per_token(cost, device, n_layers)
    return need <= device.memory


def predict_stage_seconds(cost: ModelCost, device: DeviceInfo, layers: int | tuple[int, int], first: bool, last: bool,
                          batch: int, context_len: int, link_bw: float | None = None,
                          link_latency_s: float = 0.0, block_size: int = 16) -> float:
    """Predicted seconds of one decode step of a stage; link_bw None: compute only (no transfer in)."""
    n = layers if isinstance(layers, int) else layers[1] - layers[0]
    link = None if link_bw is None else LinkSpeed(link_bw, link_latency_s)
    return stage_seconds(cost, device, n, first=first, last=last, batch=batch, context_len=context_len,
                         link=link, block_size=block_size).total_s


# ---- plans ----------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class StagePlan:
    device: DeviceInfo
    device_index: int  # into the list given to plan()
    layers: tuple[int, int]  # [start, end)
    weight_bytes: int
    kv_bytes_per_token: int  # of its layers
    kv_capacity_tokens: int  # what its memory holds beside the weights
    predicted_s: dict[int, float]  # batch size -> seconds per step, compute plus the transfer in
    compute_s: dict[int, float] = field(default_factory=dict)
    transfer_s: dict[int, float] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return self.layers[1] - self.layers[0]


@dataclass(slots=True)
class Plan:
    stages: list[StagePlan]
    batch_size: int
    context_len: int
    bottleneck_s: float  # the slowest stage's predicted step at batch_size
    block_size: int = 16
    kv_reserve_tokens: int = 0

    def kv_blocks(self, block_size: int | None = None) -> list[int]:
        bs = block_size or self.block_size
        return [max(s.kv_capacity_tokens, 0) // bs for s in self.stages]

    def table(self, block_size: int | None = None) -> str:
        bs = block_size or self.block_size
        b = self.batch_size
        batches = sorted({1, b})
        head = ["stage", "device", "layers", "weights GiB", f"KV blocks ({bs} tok)", *(f"ms/step @{n}" for n in batches)]
        rows = []
        for k, (s, blocks) in enumerate(zip(self.stages, self.kv_blocks(bs))):
            dev = f"{s.device.name} ({s.device.label})"
            if s.device.host and len({x.device.host for x in self.stages}) > 1:
                dev = f"{s.device.host}/{dev}"
            rows.append([str(k), dev, f"{s.layers[0]}-{s.layers[1] - 1}", f"{s.weight_bytes / GiB:.2f}", str(blocks),
                         *(f"{s.predicted_s[n] * 1e3:.2f}" for n in batches)])
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        right = {0, *range(3, len(head))}

        def line(cells: list[str]) -> str:
            return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

        slowest = max(range(len(self.stages)), key=lambda k: self.stages[k].predicted_s[b])
        out = [line(head), *(line(r) for r in rows)]
        out.append(f"bottleneck: stage {slowest}, {self.bottleneck_s * 1e3:.2f} ms/step at batch {b} and context "
                   f"{self.context_len} (about {b / self.bottleneck_s:.0f} tokens/s with the pipeline full)")
        return "\n".join(out)

    def to_json(self) -> dict:
        b = self.batch_size
        return {
            "batch_size": b, "context_len": self.context_len, "block_size": self.block_size,
            "kv_reserve_tokens": self.kv_reserve_tokens, "bottleneck_s": self.bottleneck_s,
            "stages": [
                {
                    "stage": k, "device": s.device.name, "device_index": s.device_index, "label": s.device.label,
                    "host": s.device.host, "layers": list(s.layers), "weight_bytes": s.weight_bytes,
                    "kv_bytes_per_token": s.kv_bytes_per_token, "kv_capacity_tokens": s.kv_capacity_tokens,
                    "kv_blocks": blocks,
                    "predicted_s": {str(n): v for n, v in s.predicted_s.items()},
                    "compute_s": {str(n): v for n, v in s.compute_s.items()},
                    "transfer_s": {str(n): v for n, v in s.transfer_s.items()},
                    "device_info": asdict(s.device),
                }
                for k, (s, blocks) in enumerate(zip(self.stages, self.kv_blocks()))
            ],
        }


def _gib(n: float) -> str:
    """A size people can read: GiB, MiB or KiB, whichever keeps a digit that matters."""
    if abs(n) >= 0.05 * GiB:
        return f"{n / GiB:.1f} GiB"
    if abs(n) >= 2**20:
        return f"{n / 2**20:.0f} MiB"
    return f"{n / 2**10:.0f} KiB"


def plan(cost: ModelCost, devices: list[DeviceInfo], *, batch_size: int = 64, context_len: int = 512,
         kv_reserve_tokens: int, layers: list[int] | None = None, link_bandwidth: float | dict | None = None,
         block_size: int = 16, tolerance: float = TIE_TOLERANCE) -> Plan:
    """Order the devices and split the layers so the slowest stage is as fast as it can be.

    layers: counts per stage in the devices' given order (no search). tolerance: among plans within this
    fraction of the best bottleneck, the one whose smallest KV capacity is largest wins.
    """
    L, P = cost.num_layers, len(devices)
    if P == 0:
        raise PlacementError("no devices to place the model on")
    if batch_size < 1 or context_len < 1 or block_size < 1 or kv_reserve_tokens < 0:
        raise ValueError("batch_size, context_len and block_size must be positive, kv_reserve_tokens not negative")
    if P > L:
        raise PlacementError(f"{P} devices but the model has only {L} layers; every device needs at least one layer")
    ctx = _Context(cost, devices, batch_size, context_len, kv_reserve_tokens, link_bandwidth, block_size)
    if layers is not None:
        return ctx.evaluate(list(range(P)), _check_layers(layers, P, L), check=True)
    order, split = _search(ctx, tolerance)
    return ctx.evaluate(order, split)


def _check_layers(layers: list[int], P: int, L: int) -> list[int]:
    if len(layers) != P:
        raise PlacementError(f"--layers gives {len(layers)} counts for {P} devices; give one count per device")
    if any(n < 1 for n in layers):
        raise PlacementError(f"--layers {','.join(map(str, layers))}: every device needs at least one layer")
    if sum(layers) != L:
        raise PlacementError(f"--layers {','.join(map(str, layers))} adds up to {sum(layers)}, "
                             f"but the model has {L} layers")
    return list(layers)


class _Context:
    """Everything a search needs, with each stage's cost per layer count computed once."""

    def __init__(self, cost: ModelCost, devices: list[DeviceInfo], batch: int, context_len: int, reserve: int,
                 links, block_size: int) -> None:
        self.cost, self.devices, self.batch, self.context_len = cost, devices, batch, context_len
        self.reserve, self.links, self.block_size = reserve, links, block_size
        self._cache: dict[tuple, tuple[list[float], list[int]]] = {}

    def link(self, prev: int | None, dev: int) -> LinkSpeed:
        return link_between(None if prev is None else self.devices[prev], self.devices[dev], self.links)

    def time(self, dev: int, n: int, first: bool, last: bool, prev: int | None, batch: int) -> StageTime:
        return stage_seconds(self.cost, self.devices[dev], n, first=first, last=last, batch=batch,
                             context_len=self.context_len, link=self.link(prev, dev), block_size=self.block_size)

    def columns(self, dev: int, first: bool, last: bool, prev: int | None) -> tuple[list[float], list[int]]:
        """Per layer count n (index 0 unused): predicted seconds at the planning batch (inf where the stage does
        not fit), and KV capacity in blocks."""
        key = (dev, first, last, prev)
        if key not in self._cache:
            L, d = self.cost.num_layers, self.devices[dev]
            times, blocks = [_INF] * (L + 1), [-1] * (L + 1)
            for n in range(1, L + 1):
                if not stage_fits(self.cost, d, n, first, last, self.reserve):
                    break  # more layers need more memory
                times[n] = self.time(dev, n, first, last, prev, self.batch).total_s
                blocks[n] = kv_capacity_tokens(self.cost, d, n, first, last) // self.block_size
            self._cache[key] = (times, blocks)
        return self._cache[key]

    def evaluate(self, order: list[int], split: list[int], check: bool = False) -> Plan:
        cost, P = self.cost, len(order)
        stages, start = [], 0
        for k, (dev, n) in enumerate(zip(order, split)):
            d = self.devices[dev]
            first, last = k == 0, k == P - 1
            prev = order[k - 1] if k else None
            weights = stage_weight_bytes(cost, n, first, last)
            kv_per_token = stage_kv_bytes_per_token(cost, d, n)
            if check and not stage_fits(cost, d, n, first, last, self.reserve):
                need = weights + self.reserve * kv_per_token
                raise PlacementError(
                    f"stage {k} ({d.name}) does not fit: layers {start}-{start + n - 1} need {_gib(weights)} "
                    f"of weights "
                    f"plus {_gib(self.reserve * kv_per_token)} of KV for {self.reserve} tokens, and {d.name} holds "
                    f"{_gib(d.memory)} ({_gib(need - d.memory)} short)")
            times = {b: self.time(dev, n, first, last, prev, b) for b in sorted({1, self.batch})}
            stages.append(StagePlan(
                device=d, device_index=dev, layers=(start, start + n), weight_bytes=weights,
                kv_bytes_per_token=kv_per_token, kv_capacity_tokens=kv_capacity_tokens(cost, d, n, first, last),
                predicted_s={b: t.total_s for b, t in times.items()},
                compute_s={b: t.compute_s for b, t in times.items()},
                transfer_s={b: t.transfer_s for b, t in times.items()},
            ))
            start += n
        bottleneck = max(s.predicted_s[self.batch] for s in stages)
        return Plan(stages, self.batch, self.context_len, bottleneck, self.block_size, self.reserve)


# ---- the search -----------------------------------------------------------------------------------------------


def min_max_split(columns: list[list[float]], total: int) -> tuple[float, list[int]]:
    """The exact dynamic program: split `total` layers over the stages, each at least one, minimising the largest
    columns[k][n] (stage k's score with n layers; each column non-decreasing in n, inf where not allowed).
    Returns (that minimum, layers per stage); (inf, []) if no split is allowed."""
    P = len(columns)
    row = _first_row(columns[0])  # row[j]: best score with j layers on the stages so far
    choices: list[list[int]] = [list(range(total + 1))]
    for k in range(1, P):
        row, choice = _next_row(row, columns[k], k, total, only_last=k == P - 1)
        choices.append(choice)
    if row[total] == _INF:
        return _INF, []
    split, j = [], total
    for k in range(P - 1, -1, -1):
        n = choices[k][j]
        split.append(n)
        j -= n
    return row[total], split[::-1]


def _first_row(col: list[float]) -> list[float]:
    row = list(col)
    row[0] = _INF
    return row


def _next_row(prev: list[float], col: list[float], k: int, total: int,
              only_last: bool) -> tuple[list[float], list[int]]:
    """Add stage k (0-based) to a row over k stages. For j layers the stage takes n of them; prev[j - n] falls and
    col[n] rises with n, so the best n sits where they cross, and that crossing only moves right as j grows."""
    row, choice = [_INF] * (total + 1), [0] * (total + 1)
    n = 1
    for j in (total,) if only_last else range(k + 1, total + 1):
        while n < j - k and col[n] < prev[j - n]:  # the stages before keep at least one layer each
            n += 1
        a, b = prev[j - n], col[n]  # max() written out: this loop is the planner's hot spot
        best, pick = (a if a > b else b), n
        if n > 1:
            a, b = prev[j - n + 1], col[n - 1]
            if (a if a > b else b) <= best:
                best, pick = (a if a > b else b), n - 1
        row[j], choice[j] = best, pick
    return row, choice


def _best_per_order(orders: list[list[int]], column, total: int, tolerance: float) -> list[tuple[float, list[int]]]:
    """min_max_split's value for each order that could come within tolerance of the best (column(order, k): stage
    k's column). Orders are walked in lexicographic order so that those sharing their first stages share the DP's
    rows for them, and a prefix whose cheapest entry already exceeds the best so far (plus tolerance) stops there."""
    results: list[tuple[float, list[int]]] = []
    best = _INF
    rows: list[list[float]] = []
    prefix: tuple[int, ...] = ()
    for order in sorted(tuple(o) for o in orders):
        P = len(order)
        keep = 0
        while keep < min(len(rows), P - 1) and order[keep] == prefix[keep]:
            keep += 1
        del rows[keep:]
        prefix = order
        limit = best + abs(best) * tolerance
        for k in range(P):
            if k == len(rows):
                col = column(order, k)
                rows.append(_first_row(col) if k == 0 else _next_row(rows[-1], col, k, total, k == P - 1)[0])
            # A row over k + 1 stages is smallest at k + 1 layers (one each): no completion can beat that.
            if rows[k][total if k == P - 1 else k + 1] > limit:
                break
        else:
            results.append((rows[-1][total], list(order)))
            best = min(best, rows[-1][total])
    return results


def distinct_orders(devices: list[DeviceInfo]) -> list[list[int]] | None:
    """Every order of the devices up to swapping interchangeable ones (each class takes its devices in list order);
    None when there are more than MAX_ORDERS."""
    classes: dict[tuple, list[int]] = {}
    for i, d in enumerate(devices):
        classes.setdefault(d.interchangeable(), []).append(i)
    groups = list(classes.values())
    count = math.factorial(len(devices))
    for g in groups:
        count //= math.factorial(len(g))
    if count > MAX_ORDERS:
        return None
    orders: list[list[int]] = []
    remaining = [len(g) for g in groups]

    def extend(prefix: list[int]) -> None:
        if len(prefix) == len(devices):
            taken = [0] * len(groups)
            order = []
            for c in prefix:
                order.append(groups[c][taken[c]])
                taken[c] += 1
            orders.append(order)
            return
        for c in range(len(groups)):
            if remaining[c]:
                remaining[c] -= 1
                extend(prefix + [c])
                remaining[c] += 1

    extend([])
    return orders


def _fastest_first(ctx: _Context) -> list[int]:
    per_layer = [layer_seconds(ctx.cost, d, ctx.batch, ctx.context_len, ctx.block_size) for d in ctx.devices]
    return sorted(range(len(ctx.devices)), key=lambda i: per_layer[i])


def _search(ctx: _Context, tolerance: float) -> tuple[list[int], list[int]]:
    orders = distinct_orders(ctx.devices) or [_fastest_first(ctx)]
    L, P = ctx.cost.num_layers, len(ctx.devices)

    def stage_columns(order, k: int) -> tuple[list[float], list[int]]:
        return ctx.columns(order[k], k == 0, k == P - 1, order[k - 1] if k else None)

    # First pass: the best bottleneck over every order.
    results = _best_per_order(orders, lambda order, k: stage_columns(order, k)[0], L, tolerance)
    best = min((t for t, _ in results), default=_INF)
    if best == _INF:
        _explain_no_fit(ctx)
    # Second pass: among plans within tolerance of it, the largest smallest KV capacity: a min-max over -blocks,
    # with stages that would be too slow not allowed.
    limit = best * (1 + tolerance)
    capped: dict[tuple, list[float]] = {}

    def blocks_column(order, k: int) -> list[float]:
        key = (order[k], k == 0, k == P - 1, order[k - 1] if k else None)
        if key not in capped:
            times, blocks = stage_columns(order, k)
            capped[key] = [-blocks[n] if times[n] <= limit else _INF for n in range(L + 1)]
        return capped[key]

    near = {tuple(order): t for t, order in results if t <= limit}
    by_blocks = _best_per_order(list(near), blocks_column, L, 0.0)
    most = min(v for v, _ in by_blocks)
    # Equal capacity: the order with the faster best plan.
    order = min((near[tuple(o)], o) for v, o in by_blocks if v == most)[1]
    return order, min_max_split([blocks_column(order, k) for k in range(P)], L)[1]


def _explain_no_fit(ctx: _Context) -> None:
    """Raise a PlacementError that says what is missing."""
    cost, devices, reserve = ctx.cost, ctx.devices, ctx.reserve
    L, P = cost.num_layers, len(devices)
    for d in devices:
        one = stage_weight_bytes(cost, 1, False, False) + reserve * stage_kv_bytes_per_token(cost, d, 1)
        if one > d.memory:
            raise PlacementError(
                f"{d.name} ({d.label}) holds {_gib(d.memory)}, less than one layer needs ({_gib(one)} with KV for "
                f"{reserve} tokens); give it more memory, lower --max-model-len, or leave it out")
    # Weights and KV at the model's dtypes; tied embeddings count twice when the first and last stages differ.
    weights = stage_weight_bytes(cost, L, True, True)
    if cost.tied_embeddings and P > 1:
        weights += cost.embed_params * DTYPE_BYTES[cost.weight_dtype]
    kv = reserve * L * cost.kv_bytes_per_token
    held = sum(d.memory for d in devices)
    if weights + kv > held:
        raise PlacementError(
            f"the model does not fit: {L} layers need {_gib(weights)} of weights plus {_gib(kv)} of KV for {reserve} "
            f"tokens, and the devices hold {_gib(held)} in all ({_gib(weights + kv - held)} short)")
    raise PlacementError(
        f"the model does not fit: it needs {_gib(weights + kv)} with KV for {reserve} tokens and the devices hold "
        f"{_gib(held)} in all, but not in whole layers per device (each layer needs "
        f"{_gib(cost.layer_weight_bytes + reserve * cost.kv_bytes_per_token)}, the embedding and LM head more); "
        f"give the devices more memory or lower --max-model-len")


__all__ = [
    "DeviceInfo", "DeviceRequest", "LinkSpeed", "ModelCost", "PlacementError", "Plan", "StagePlan", "StageTime",
    "distinct_orders", "kv_cache_dtype", "kv_capacity_tokens", "layer_seconds", "link_between", "min_max_split",
    "parse_devices", "plan", "predict_stage_seconds", "stage_fits", "stage_kv_bytes_per_token", "stage_seconds",
    "stage_weight_bytes",
]


def parse_layers(text: str | None) -> list[int] | None:
    """--layers: counts per stage in --devices order, "20,8,4"; None or "" for the planner's split."""
    if not text:
        return None
    try:
        return [int(n) for n in text.split(",")]
    except ValueError:
        raise ValueError(f"layers must be comma-separated counts such as 20,8,4, got {text!r}") from None


def share_host_memory(infos: list[DeviceInfo]) -> None:
    """CPU stages on one host without a budget each measured the same free memory; split it between them."""
    shared: dict[str, list[DeviceInfo]] = {}
    for info in infos:
        if info.kind == "cpu" and not info.budgeted:
            shared.setdefault(info.host, []).append(info)
    for group in shared.values():
        for info in group:
            info.memory //= len(group)
