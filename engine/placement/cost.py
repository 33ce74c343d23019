"""The cost model: what a model's layers cost on a device, in bytes of memory and seconds per step, and what a
link between two devices costs. Imports no torch."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple

from engine.model.weight_formats import EMBEDDING, FORMATS
from engine.placement.devices import DeviceInfo, tier_name

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# ---- what the engine's code does (counted from engine/model/, engine/pipeline/runner.py) ------------
# Up to this many rows, a product with half-precision weights and fp32 activations multiplies in half precision
# (engine.model.linear reads it from here).
THIN_ROWS = 2
# Host cost of one decoder layer in units of the probe's per-op cost. StageModel.forward dispatches 48 ops per layer
# (22 kernels, 26 views), but norms, SDPA and rotary are composites that dispatch more inside: at batch 1, with
# the products timed apart, a layer's remaining host time measured 145-155x the probe's op (torch 2.13, AVX2 CPU).
OPS_PER_LAYER = 150
# Where the elementwise steps run fused (engine.kernels.layer_ops: fp32 on x86-64 CPUs), measured the same way: 54x.
FUSED_OPS_PER_LAYER = 55
# The thin path adds a cast before and after each of the four products.
THIN_OPS_PER_LAYER = 8
# A mixture-of-experts layer (engine.model.experts): the router's product, softmax, top-k, sort, count, gather,
# scale and scatter-add, and per expert a step reaches its block's slice, two products and the activation.
ROUTING_OPS = 14
EXPERT_OPS = 5
# Where a GPU runs the grouped GEMM (DeviceInfo.grouped_gemm), the experts' products are two grouped GEMMs over all
# blocks (engine.model.experts), with the block ends and the activation: a fixed count, however many experts a step
# reaches.
GROUPED_EXPERT_OPS = 6
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

_INF = math.inf


class LinkSpeed(NamedTuple):
    bandwidth: float  # bytes/s
    latency_s: float


def link_between(src: DeviceInfo | None, dst: DeviceInfo, overrides=None) -> LinkSpeed:
    """The link into `dst` from `src` (None: the driver, which sends only a small message). overrides: one bandwidth
    for every link, {(src name, dst name): bandwidth}, or a function of (src, dst) giving it."""
    if src is None:
        return LinkSpeed(_INF, SAME_HOST_LATENCY_S)
    same_host = src.host == dst.host
    latency = SAME_HOST_LATENCY_S if same_host else CROSS_HOST_LATENCY_S
    if isinstance(overrides, (int, float)):
        return LinkSpeed(float(overrides), latency)
    if callable(overrides):  # a described cluster's links (engine.placement.cluster)
        return LinkSpeed(float(overrides(src, dst)), latency)
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


@dataclass(slots=True, frozen=True)
class ModelCost:
    """What a model costs per layer and per stage, counted in elements (bytes follow from the dtypes: a device
    may compute at another dtype than the model's default, see DeviceInfo.dtype)."""

    num_layers: int
    hidden_size: int
    vocab_size: int
    layer_params: int  # one decoder layer's weights
    layer_out_features: int  # summed over the products a token takes (qkv, o, and its MLP's or experts' gate_up, down)
    kv_elems_per_token: int  # one layer's K and V for one token
    elementwise_elems_per_token: int  # read + written by one layer's non-matmul kernels, per token
    fused_elementwise_elems_per_token: int  # the same where they run fused (DeviceInfo.fused_layer_ops)
    embed_params: int
    head_params: int  # final norm plus LM head
    tied_embeddings: bool  # then the first and the last stage each hold the matrix
    compute_dtype: str
    weight_dtype: str
    sampling: str = "random"  # what the last stage's sampler is assumed to do: "greedy" or "random"
    # Bits per weight of a layer's products (the mean over layers where they differ), the embedding's and the LM
    # head's, at their formats (engine.model.weight_formats); None: weight_dtype's.
    layer_bits: float | None = None
    embed_bits: float | None = None
    head_bits: float | None = None
    # Mixture of experts: one expert's weights, how many a layer has and each token takes, and the share of layers
    # that have experts (the others are dense). layer_params counts every expert; a step reads only those reached.
    expert_params: int = 0
    num_experts: int = 0
    experts_per_token: int = 0
    moe_layer_share: float = 0.0
    moe_layers: tuple[int, ...] = ()  # the layers with experts
    # Each expert's share of a layer's routed choices, busiest first, as served (engine.placement.routing); empty:
    # routing taken to be uniform.
    routing: tuple[float, ...] = ()
    # A mixture whose layers are not all alike: (params, out features) of a dense layer and of a mixture-of-experts
    # one, from which a stage's own mean layer is made (ModelCost.over).
    layer_kinds: tuple[tuple[int, int], tuple[int, int]] | None = None

    @staticmethod
    def from_config(cfg, compute_dtype: str, weight_dtype: str, sampling: str = "random",
                    formats: dict[str, str] | None = None, layers: range | None = None,
                    routing: tuple[float, ...] = ()) -> ModelCost:
        """cfg: engine.model.config.ModelConfig; formats: the weights at another format than weight_dtype
        (engine.model.weight_formats.tensor_formats); layers: those whose formats a layer's bits average over (a
        stage's; None: all); routing: the experts' measured shares (ModelCost.routing)."""
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
        moe: dict = {}
        out_features = (q + 2 * kv) + h + 2 * i + h
        if cfg.moe_layers:
            share = len(cfg.moe_layers) / cfg.num_layers
            ie, shared = cfg.expert_intermediate_size, cfg.shared_expert_intermediate_size
            # A token's products: attention, the router, its experts and the shared one.
            moe_mlp = cfg.num_experts + cfg.experts_per_token * (2 * ie + h) + (2 * shared + h if shared else 0)
            moe_out = (q + 2 * kv) + h + moe_mlp
            dense = [j for j in range(cfg.num_layers) if j not in cfg.moe_layers]
            moe = dict(expert_params=3 * h * ie, num_experts=cfg.num_experts, experts_per_token=cfg.experts_per_token,
                       moe_layer_share=share, moe_layers=tuple(sorted(cfg.moe_layers)),
                       routing=routing if len(routing) == cfg.num_experts else (),
                       layer_kinds=((cfg.layer_params(dense[0]), out_features),
                                    (cfg.layer_params(min(cfg.moe_layers)), moe_out)) if dense else None)
            out_features = share * moe_out + (1 - share) * out_features
        return ModelCost(
            num_layers=cfg.num_layers, hidden_size=h, vocab_size=cfg.vocab_size,
            layer_params=cfg.layer_weight_bytes(1), layer_out_features=int(out_features),
            kv_elems_per_token=cfg.kv_bytes_per_token_per_layer(1), elementwise_elems_per_token=elementwise,
            fused_elementwise_elems_per_token=fused,
            embed_params=cfg.vocab_size * h, head_params=head,
            tied_embeddings=cfg.tie_word_embeddings, compute_dtype=compute_dtype, weight_dtype=weight_dtype,
            sampling=sampling, **(_format_bits(cfg, formats, weight_dtype, layers) if formats else {}), **moe,
        )

    def experts_reached(self, rows: int) -> float:
        """Experts of a layer that at least one of `rows` tokens is routed to, expected: each expert is missed by a
        token with the chance it is not among the token's choices (its share of them times the choices a token
        makes; routing uniform where it was not measured)."""
        if not self.num_experts:
            return 0.0
        k = self.experts_per_token
        if self.routing:
            return sum(1.0 - (1.0 - min(1.0, k * p)) ** rows for p in self.routing)
        return self.num_experts * (1.0 - (1.0 - k / self.num_experts) ** rows)

    def step_params(self, rows: int) -> tuple[float, float]:
        """The mean layer's weights a step of `rows` tokens reads (a mixture of experts reads only the experts it
        reaches), and the weights each token multiplies."""
        if not self.num_experts:
            return self.layer_params, self.layer_params
        idle = self.moe_layer_share * self.expert_params
        return (self.layer_params - idle * (self.num_experts - self.experts_reached(rows)),
                self.layer_params - idle * (self.num_experts - self.experts_per_token))

    @property
    def uniform(self) -> bool:
        """Whether every layer costs what the mean layer does (a dense model, or one with experts in every layer)."""
        return self.moe_layer_share in (0.0, 1.0) or self.layer_kinds is None

    def over(self, layers: range) -> ModelCost:
        """The model as a stage holding `layers` sees it: its mean layer is theirs (the mixture-of-experts layers
        among them, and the dense ones). The one rule for a stage's cost where layers differ."""
        if self.uniform or not len(layers):
            return self
        m = sum(1 for i in layers if i in self.moe_layers)
        n = len(layers)
        (dense_params, dense_out), (moe_params, moe_out) = self.layer_kinds
        return dataclasses.replace(self, moe_layer_share=m / n,
                                   layer_params=((n - m) * dense_params + m * moe_params) // n,
                                   layer_out_features=((n - m) * dense_out + m * moe_out) // n)

    def routed_params(self, rows: int) -> tuple[float, float]:
        """The mean layer's routed experts' share of step_params: the weights a step of `rows` tokens reads of them,
        and those each token multiplies."""
        share = self.moe_layer_share * self.expert_params
        return share * self.experts_reached(rows), share * self.experts_per_token

    def host_expert_layers(self, layers: range, count: int) -> tuple[int, ...]:
        """Which of a stage's layers keep their routed experts on the host where `count` of them do: its first
        mixture-of-experts layers."""
        return tuple(i for i in layers if i in self.moe_layers)[:count]

    @property
    def expert_layer_bytes(self) -> int:
        """One mixture-of-experts layer's routed experts (what a GPU stage may keep in host memory, computed by the
        host's CPU), at the layers' format."""
        return int(self.num_experts * self.expert_params * self.bits("layer") / 8)

    def bits(self, part: str) -> float:
        """Bits per weight of "layer", "embed" or "head"."""
        value = {"layer": self.layer_bits, "embed": self.embed_bits, "head": self.head_bits}[part]
        return value if value is not None else 8.0 * DTYPE_BYTES[self.weight_dtype]

    def quantized(self, part: str) -> bool:
        """Whether "layer", "embed" or "head" runs (mostly) at a quantized format: fewer bits than any float."""
        return self.bits(part) < 8 * min(DTYPE_BYTES.values())

    # The figures at the model's own dtypes.
    @property
    def layer_weight_bytes(self) -> int:
        return int(self.layer_params * self.bits("layer") / 8)

    @property
    def kv_bytes_per_token(self) -> int:
        """One layer, one token, at the KV cache's dtype."""
        return self.kv_elems_per_token * DTYPE_BYTES[kv_cache_dtype(self.compute_dtype, self.weight_dtype)]

    @property
    def flops_per_token(self) -> int:
        """One layer's products, per token."""
        return int(2 * self.step_params(1)[1])

    @property
    def activation_bytes(self) -> int:
        """What crosses a link per token."""
        return self.hidden_size * DTYPE_BYTES[self.compute_dtype]

    @property
    def embed_bytes(self) -> int:
        return int(self.embed_params * self.bits("embed") / 8)

    @property
    def head_bytes(self) -> int:
        return int(self.head_params * self.bits("head") / 8)

    @property
    def head_flops(self) -> int:
        """Per token."""
        return 2 * self.head_params


def _format_bits(cfg, formats: dict[str, str], weight_dtype: str, layers: range | None) -> dict[str, float]:
    """layer_bits (over `layers`, or all), embed_bits and head_bits from per-tensor formats."""
    bits = (lambda name: FORMATS[formats.get(name, weight_dtype)].bits_per_weight)
    layers = layers if layers is not None and len(layers) else range(cfg.num_layers)
    total = params = 0.0
    for i in layers:
        for name, shape in cfg.layer_shapes(i).items():
            if name.endswith(".weight") and len(shape) == 2:
                full = f"model.layers.{i}.{name}"
                total += math.prod(shape) * bits(full)
                params += math.prod(shape)
    head = EMBEDDING if cfg.tie_word_embeddings else "lm_head.weight"
    return {"layer_bits": total / params, "head_bits": bits(head), "embed_bits": bits(EMBEDDING)}


def kv_cache_dtype(compute_dtype: str, weight_dtype: str) -> str:
    """The KV cache's dtype: the compute dtype, but bf16 under fp32 activations over bf16 weights (`auto` on a
    CPU), as a bf16 model keeps its cache: half the bytes for decode attention to read, twice the tokens per
    byte. The engine's CPU kernels widen it in registers."""
    return "bfloat16" if (compute_dtype, weight_dtype) == ("float32", "bfloat16") else compute_dtype


def _compute_bytes(cost: ModelCost, device: DeviceInfo) -> int:
    return DTYPE_BYTES[device.dtype or cost.compute_dtype]


def _kv_bytes(cost: ModelCost, device: DeviceInfo) -> int:
    return DTYPE_BYTES[kv_cache_dtype(device.dtype or cost.compute_dtype, cost.weight_dtype)]


class Tier(NamedTuple):
    """Where a stage's streamed layers live between steps."""

    name: str  # "disk" (a CPU stage's, --offload-dir) or "host" (a GPU stage's pinned host memory, --cpu-offload-gb)
    bandwidth: float  # bytes/s a layer is brought in at
    capacity: float  # bytes of layers it holds


def stream_tier(device: DeviceInfo) -> Tier | None:
    """The device's tier, or None where it has none (every layer it holds stays in its memory)."""
    name = tier_name(device.kind)
    if name == "disk":
        return Tier(name, device.disk_bandwidth, math.inf) if device.disk_bandwidth else None
    if device.host_tier_bytes and device.host_bandwidth:
        return Tier(name, device.host_bandwidth, float(device.host_tier_bytes))
    return None


# Layers a streaming stage holds in memory at once, brought in ahead of their compute (the layer and host streams'
# rings: engine.model.layer_stream, engine.model.host_stream).
STREAM_SLOTS = 2


def stage_weight_bytes(cost: ModelCost, n_layers: int, first: bool, last: bool, streamed: int = 0,
                       host_experts: int = 0) -> int:
    """Weights a stage holds in memory: its layers (of those it streams, only the slots they are read into; of the
    host_experts layers whose experts the host keeps, the rest), the embedding on the first, final norm and LM head
    on the last."""
    held = (n_layers - streamed + min(streamed, STREAM_SLOTS)) * cost.layer_weight_bytes
    held -= host_experts * cost.expert_layer_bytes
    if first:
        held += cost.embed_bytes
    if last:
        # Tied embeddings: the head is the embedding matrix, held once when one stage is both first and last.
        held += cost.head_bytes - (cost.embed_bytes if cost.tied_embeddings and first else 0)
    return held


def stage_kv_bytes_per_token(cost: ModelCost, device: DeviceInfo, n_layers: int) -> int:
    return n_layers * cost.kv_elems_per_token * _kv_bytes(cost, device)


# A CPU stage without a budget takes this much host memory for KV at most: the host is shared with everything else.
DEFAULT_CPU_KV_BYTES = 1 << 30


def kv_cache_blocks(budget_bytes: int, bytes_per_block: int, max_kv_tokens: int, block_size: int) -> int:
    """The KV blocks a stage allocates: what its budget holds, and no more than the most tokens it can need. The one
    rule for the stage (engine.pipeline.runner) and the plan it was given."""
    wanted = -(-max_kv_tokens // block_size)
    return max(0, min(budget_bytes // max(bytes_per_block, 1), wanted))


def stage_kv_budget(device: DeviceInfo, weight_bytes: int, kv_cache_memory: int | None) -> int:
    """Bytes a stage gives its KV cache: the user's KV budget, else what its memory leaves beside the weights, on a
    CPU without a budget at most DEFAULT_CPU_KV_BYTES. (A GPU stage also keeps room for its largest step's
    activations, which it measures once loaded: a plan's figure for it is an upper bound.)"""
    if kv_cache_memory is not None:
        return kv_cache_memory
    left = device.memory - weight_bytes
    if device.kind == "cpu" and not device.budgeted:
        left = min(left, DEFAULT_CPU_KV_BYTES)
    return left


def kv_capacity_tokens(cost: ModelCost, device: DeviceInfo, n_layers: int, first: bool, last: bool,
                       streamed: int = 0, host_experts: int = 0) -> int:
    """Tokens of KV the stage's memory holds beside its weights (negative: the weights alone do not fit)."""
    left = device.memory - stage_weight_bytes(cost, n_layers, first, last, streamed, host_experts)
    return left // max(stage_kv_bytes_per_token(cost, device, n_layers), 1)


def _matmul_seconds(cost: ModelCost, device: DeviceInfo, params: float, out_features: int, rows: int,
                    part: str = "layer", row_params: float | None = None) -> float:
    """Products over `params` weights for `rows` rows, each row multiplying `row_params` of them (fewer where rows
    take different experts; None: all): whichever binds, arithmetic or streaming the weights; one-row products
    (GEMVs) also pay per output feature. Quantized weights take the wide path at every row count, read at their
    format's size (expanded in registers, engine.kernels.quant_gemm; the probe timed that product)."""
    compute = device.dtype or cost.compute_dtype
    upcast = cost.weight_dtype != compute
    row_params = params if row_params is None else row_params
    flops = 2 * row_params * rows
    quantized = cost.quantized(part)
    if rows <= THIN_ROWS and not quantized:
        rate = (device.thin_matmul_flops or device.matmul_flops) if upcast else device.matmul_flops
        read = params * DTYPE_BYTES[cost.weight_dtype]
        return max(flops / rate, read / device.mem_bandwidth) + rows * out_features * device.row_overhead_s
    # Wide steps with half-precision weights read them at fp32 size on torch's kernels (engine.model.linear keeps an fp32
    # copy) and at half size on the engine's own (engine.kernels.half_gemm); arithmetic binds them either way, and the
    # probe timed whichever product this device runs.
    read = params * (cost.bits(part) / 8 if quantized else DTYPE_BYTES[compute if upcast else cost.weight_dtype])
    compute_s = flops / device.matmul_flops
    if rows < GEMM_ROWS and device.small_gemm_flops:
        # Up to 8 rows a product costs about what 8 do; from 8 to 64 rows the time grows linearly.
        small = 2 * row_params * SMALL_GEMM_ROWS / device.small_gemm_flops
        full = 2 * row_params * GEMM_ROWS / device.matmul_flops
        compute_s = small + max(rows - SMALL_GEMM_ROWS, 0) * (full - small) / (GEMM_ROWS - SMALL_GEMM_ROWS)
    return max(compute_s, read / device.mem_bandwidth)


def layer_seconds(cost: ModelCost, device: DeviceInfo, batch: int, context_len: int, block_size: int = 16,
                  experts: bool = True) -> float:
    """One decoder layer's decode step for `batch` sequences that each attend to `context_len` tokens; experts
    False: without its routed experts' products (the host's CPU runs them: host_expert_seconds)."""
    cb = _compute_bytes(cost, device)
    read, per_row = cost.step_params(batch)
    if not experts:
        routed_read, routed_row = cost.routed_params(batch)
        read, per_row = read - routed_read, per_row - routed_row
    products = _matmul_seconds(cost, device, read, cost.layer_out_features, batch, row_params=per_row)
    # The gather reads whole blocks, padded to the longest context of the batch.
    keys = -(-context_len // block_size) * block_size
    kv = batch * keys * cost.kv_elems_per_token * _kv_bytes(cost, device)
    attention_rate = device.attention_bandwidth or device.mem_bandwidth / ATTENTION_KV_PASSES
    fused = device.fused_layer_ops
    elementwise_elems = cost.fused_elementwise_elems_per_token if fused else cost.elementwise_elems_per_token
    elementwise = batch * elementwise_elems * cb / device.mem_bandwidth
    work = products + kv / attention_rate + elementwise
    ops = (FUSED_OPS_PER_LAYER if fused else OPS_PER_LAYER) + (THIN_OPS_PER_LAYER if _thin(cost, device, batch) else 0)
    if cost.num_experts:  # routing, and each expert reached: its slice, two products and the activation
        per_expert = GROUPED_EXPERT_OPS if device.grouped_gemm else EXPERT_OPS * cost.experts_reached(batch)
        ops += cost.moe_layer_share * (ROUTING_OPS + (per_expert if experts else 0))
    host = ops * device.op_overhead_s
    # A GPU runs kernels while the host launches the next ones; a CPU does one after the other.
    return max(host, work) if device.kind == "cuda" else host + work


def _thin(cost: ModelCost, device: DeviceInfo, batch: int) -> bool:
    return (batch <= THIN_ROWS and cost.weight_dtype != (device.dtype or cost.compute_dtype)
            and not cost.quantized("layer"))


# A GPU stage's experts on its host: the tokens' rows go to the host and the experts' outputs come back, each copy a
# synchronising one, with its launch and wait (~20 us each through the CUDA runtime).
HOST_EXPERT_SYNC_S = 20e-6


def host_expert_seconds(cost: ModelCost, device: DeviceInfo, batch: int) -> float:
    """One mixture-of-experts layer's routed experts run by the host's CPU (device.host_cpu) for a GPU stage: the
    rows copied out and back, and the products of the experts the step reaches at the CPU's rates."""
    cpu = device.host_cpu
    read, per_row = cost.routed_params(batch)
    share = cost.moe_layer_share or 1.0
    # At the CPU's compute dtype, one MoE layer's experts (routed_params is the mean layer's share of them).
    out_features = cost.experts_per_token * (2 * cost.expert_params // (3 * cost.hidden_size) + cost.hidden_size)
    products = _matmul_seconds(cost, cpu, read / share, out_features, batch, row_params=per_row / share)
    copied = 2 * batch * cost.hidden_size * _compute_bytes(cost, cpu)
    # The rows, the choices and their weights out, the sum back: four copies, each waited for.
    copies = copied / (device.host_bandwidth or CUDA_HOST_COPY_BANDWIDTH) + 4 * HOST_EXPERT_SYNC_S
    ops = EXPERT_OPS * cost.experts_reached(batch) + ROUTING_OPS / 2  # the host half of the routing: sort and scatter
    return products + copies + ops * cpu.op_overhead_s


def expert_layers_to_host(cost: ModelCost, device: DeviceInfo, n_layers: int, first: bool, last: bool,
                          kv_reserve_tokens: int, kv_cache_memory: int | None = None) -> int | None:
    """How many of a GPU stage's mixture-of-experts layers keep their routed experts in host memory, run by the
    host's CPU, for the stage to fit: 0 where it fits as it is or the device cannot (no host CPU described, or no
    host memory given it: --cpu-offload-gb); None where it does not fit even with all of them there. Experts on the
    host come before streamed layers: a step reads only the experts it reaches, in place, where a streamed layer is
    copied in whole."""
    moe_layers = round(n_layers * cost.moe_layer_share)
    if not cost.num_experts or device.host_cpu is None or not device.host_tier_bytes or not moe_layers:
        return 0
    if stage_fits(cost, device, n_layers, first, last, kv_reserve_tokens, kv_cache_memory):
        return 0
    most = min(moe_layers, device.host_tier_bytes // max(cost.expert_layer_bytes, 1))
    for h in range(1, most + 1):
        if stage_fits(cost, device, n_layers, first, last, kv_reserve_tokens, kv_cache_memory, host_experts=h):
            return h
    return None


class StageTime(NamedTuple):
    compute_s: float
    transfer_s: float  # into the stage
    fetch_s: float = 0.0  # reading streamed layers in, overlapped with the compute

    @property
    def total_s(self) -> float:
        return max(self.compute_s, self.fetch_s) + self.transfer_s


def stage_seconds(cost: ModelCost, device: DeviceInfo, n_layers: int, *, first: bool, last: bool, batch: int,
                  context_len: int, link: LinkSpeed | None, block_size: int = 16, streamed: int = 0,
                  host_experts: int = 0) -> StageTime:
    """One decode step of a stage holding `n_layers` layers, `streamed` of them brought in from its device's tier
    (stream_tier) each step, the routed experts of `host_experts` of them run by the host's CPU; the one cost every
    plan and test uses. A streamed layer's read overlaps the compute before it (the layer
    stream reads ahead, and the streamed layers are spread among the resident ones), so the step takes the longer of
    the compute and the reads."""
    cb = _compute_bytes(cost, device)
    bw = device.mem_bandwidth
    ops = STEP_OPS
    work = n_layers * layer_seconds(cost, device, batch, context_len, block_size)
    if host_experts:
        # The mean layer's routed experts are moe_layer_share of one MoE layer's.
        moved = host_experts / (cost.moe_layer_share or 1.0)
        work += moved * (layer_seconds(cost, device, batch, context_len, block_size, experts=False)
                         - layer_seconds(cost, device, batch, context_len, block_size))
        work += host_experts * host_expert_seconds(cost, device, batch)
    extra = batch * HOST_SECONDS_PER_SEQUENCE
    if first:
        ops += EMBED_OPS
        extra += batch * cost.hidden_size * (DTYPE_BYTES[cost.weight_dtype] + cb) / bw
    if last:
        sample_ops, sample_bytes = SAMPLING[cost.sampling]
        ops += HEAD_OPS + sample_ops + (2 if _thin(cost, device, batch) else 0)
        extra += _matmul_seconds(cost, device, cost.head_params, cost.vocab_size, batch, "head")
        extra += batch * 7 * cost.hidden_size * cb / bw  # the final norm
        extra += batch * cost.vocab_size * sample_bytes / bw
    host = ops * device.op_overhead_s
    compute = work + extra + host
    transfer = 0.0
    if link is not None:
        size = 0 if first else batch * cost.hidden_size * cb  # the previous stage sends at its own dtype; close enough
        transfer = link.latency_s + (size / link.bandwidth if size else 0.0)
    fetch = streamed * cost.layer_weight_bytes / stream_tier(device).bandwidth if streamed else 0.0
    return StageTime(compute, transfer, fetch)


def stage_fits(cost: ModelCost, device: DeviceInfo, n_layers: int, first: bool, last: bool,
               kv_reserve_tokens: int, kv_cache_memory: int | None = None, streamed: int = 0,
               host_experts: int = 0) -> bool:
    """Whether the stage's weights fit beside KV for kv_reserve_tokens, and beside the whole KV budget where the user
    set one (the stage allocates all of it)."""
    weights = stage_weight_bytes(cost, n_layers, first, last, streamed, host_experts)
    kv = kv_reserve_tokens * stage_kv_bytes_per_token(cost, device, n_layers)
    return weights + max(kv, kv_cache_memory or 0) <= device.memory


def layers_to_stream(cost: ModelCost, device: DeviceInfo, n_layers: int, first: bool, last: bool,
                     kv_reserve_tokens: int, kv_cache_memory: int | None = None) -> int | None:
    """How many of the stage's layers must be brought in from its device's tier each step for it to fit: 0 where it
    fits as it is, None where it does not fit even streaming them all, the tier cannot hold them, or the device has
    no tier (stream_choice, for layers of one size)."""
    room = (device.memory - stage_weight_bytes(cost, 0, first, last)
            - max(kv_reserve_tokens * stage_kv_bytes_per_token(cost, device, n_layers), kv_cache_memory or 0))
    choice = stream_choice((n_layers,), (cost.layer_weight_bytes,), room, stream_tier(device))
    return None if choice is None else choice[0]


def stream_choice(counts: tuple[int, ...], sizes: tuple[int, ...], room: int,
                  tier: Tier | None) -> tuple[int, ...] | None:
    """Which of a stage's layers live in its tier, brought in every step: per size class j (counts[j] layers of
    sizes[j] bytes each), how many; all 0 where they fit in `room` (the stage's memory less all else it holds); None
    where no choice fits. The one rule for every plan.

    Each streamed byte is read every step, and the slots they are read into hold STREAM_SLOTS of the largest
    streamed layer, so the choice reads the fewest bytes: for each class that could be the largest streamed, one
    layer of it, then the smallest layers no larger than it, one at a time, until the stage fits; the class whose
    choice reads least (then streams fewest layers) wins. Layers of one size: the fewest that fit."""
    resident = sum(c * b for c, b in zip(counts, sizes))
    if resident <= room:
        return (0,) * len(counts)
    if tier is None:
        return None
    best = None
    for top in range(len(counts)):
        if not counts[top]:
            continue
        chosen = [0] * len(counts)
        chosen[top] = 1
        left, taken = resident - sizes[top], 1
        order = sorted((j for j in range(len(counts)) if sizes[j] <= sizes[top]), key=lambda j: (sizes[j], j))
        for j in order:
            while left + min(taken, STREAM_SLOTS) * sizes[top] > room and chosen[j] < counts[j]:
                chosen[j] += 1
                left, taken = left - sizes[j], taken + 1
        if left + min(taken, STREAM_SLOTS) * sizes[top] > room:
            continue
        read = sum(c * b for c, b in zip(chosen, sizes))
        if read <= tier.capacity and (best is None or (read, taken) < best[0]):
            best = ((read, taken), tuple(chosen))
    return None if best is None else best[1]


def streamed_bytes_held(counts: tuple[int, ...], streamed: tuple[int, ...], sizes: tuple[int, ...]) -> int:
    """What a stage's layers hold in its memory: the resident ones, and the slots the streamed ones are read into."""
    resident = sum((c - s) * b for c, s, b in zip(counts, streamed, sizes))
    moved = [b for s, b in zip(streamed, sizes) if s]
    return resident + (min(sum(streamed), STREAM_SLOTS) * max(moved) if moved else 0)


def spread(n_layers: int, n_streamed: int) -> list[int]:
    """Which of a stage's n_layers (0-based within it) stream: spaced evenly, the last one streamed, so that each
    streamed layer's read overlaps the resident layers computed before it."""
    if not 0 <= n_streamed <= n_layers:
        raise ValueError(f"cannot stream {n_streamed} of {n_layers} layers")
    return [((k + 1) * n_layers) // n_streamed - 1 for k in range(n_streamed)]


def predict_stage_seconds(cost: ModelCost, device: DeviceInfo, layers: int | tuple[int, int], first: bool, last: bool,
                          batch: int, context_len: int, link_bw: float | None = None,
                          link_latency_s: float = 0.0, block_size: int = 16) -> float:
    """Predicted seconds of one decode step of a stage; link_bw None: compute only (no transfer in)."""
    n = layers if isinstance(layers, int) else layers[1] - layers[0]
    if not isinstance(layers, int):
        cost = cost.over(range(*layers))
    link = None if link_bw is None else LinkSpeed(link_bw, link_latency_s)
    return stage_seconds(cost, device, n, first=first, last=last, batch=batch, context_len=context_len,
                         link=link, block_size=block_size).total_s
