"""The plan a model runs by, built by one function (place_model) for `strata serve`, over what its stage processes
report of their devices, and for `strata plan`, over the same devices probed in this process as each stage would
probe its own (the results are cached, as the stages' are): the same batch, context, KV reserve, host-memory split
and KV blocks, so that `strata plan` prints the plan `strata serve` runs."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from engine.model import package
from engine.model.checkpoint import resolve_formats, validate
from engine.model.config import ModelConfig
from engine.model.hub import resolve_model
from engine.model.weight_formats import (AUTO, check_requested, dominant_quantized, layer_summary, parse_layer_formats,
                                        parse_precision, product_names)
from engine.placement import ModelCost, Plan, parse_devices, parse_layers, plan, share_host_memory
from engine.placement.devices import share_host_cpus
from engine.placement.precision import Precision
from engine.placement.routing import measured_routing


# The planner balances stages for a step of this many running sequences (fewer if max_num_seqs is lower), each of the
# P micro-batches in flight holding 1/P of them.
PLANNED_SEQS = 64
# Tokens each sequence is taken to attend to in the planned step (fewer if the context is shorter).
PLANNED_CONTEXT = 512


def model_len_limit(cfg: ModelConfig) -> int:
    """The longest context the model supports: its position limit (a sliding window slides within it)."""
    return cfg.max_position_embeddings


def planned_batch(max_num_seqs: int, num_stages: int) -> int:
    """The micro-batch a plan balances: at most PLANNED_SEQS running sequences, one P-th of them per stage."""
    return -(-min(max_num_seqs, PLANNED_SEQS) // num_stages)


@dataclass(frozen=True, slots=True)
class FormatChoices:
    """The formats the planner may choose per layer (--precision), with what it weighs them by."""

    formats: dict[str, dict[str, str]]  # per choice: the tensors' formats with every layer at it (resolve_formats)
    errors: dict[str, list[float]] | None  # per choice, per layer: its measured error (engine.model.calibration)
    max_error: float | None  # --max-layer-error

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.formats)

    @property
    def probed(self) -> tuple[str, ...]:
        """The quantized choices whose products each device times."""
        return tuple(f for f in self.formats if f != AUTO)


def format_choices(model_dir: str | Path, cfg: ModelConfig, source, precision: str | None,
                   max_layer_error: float | None, quantization: str = AUTO, layer_quantization: str | None = None,
                   say=None) -> FormatChoices | None:
    """--precision and --max-layer-error read and checked; each layer's error at each choice measured (or read
    from its cache) where the checkpoint has weights (source not None). None where no choice was asked for."""
    names = parse_precision(precision)
    if max_layer_error is not None and not 0 <= max_layer_error < math.inf:
        raise ValueError(f"--max-layer-error must be a number at least 0, got {max_layer_error}")
    if names is None:
        if max_layer_error is not None:
            raise ValueError("--max-layer-error bounds the formats --precision lets the planner choose; give both")
        return None
    if len(names) == 1 and max_layer_error is not None:
        raise ValueError("--max-layer-error: --precision auto leaves no format to bound; name formats such as "
                         "auto,q8_0,q4_k")
    if check_requested(quantization) != AUTO or layer_quantization:
        raise ValueError("--precision lets the planner choose each layer's format; it does not combine with "
                         "--quantization or --layer-quantization")
    formats = {f: resolve_formats(source, cfg, AUTO, {} if f == AUTO else dict.fromkeys(range(cfg.num_layers), f))
               for f in names}
    errors = None
    if source is not None and len(names) > 1:
        from engine.model.calibration import layer_errors

        errors = layer_errors(model_dir, cfg, source, names, say=say)
    elif max_layer_error is not None:
        raise ValueError("--max-layer-error needs the checkpoint's weights to measure each layer's error on")
    return FormatChoices(formats, errors, max_layer_error)


def chosen_formats(choices: FormatChoices, result: Plan, cfg: ModelConfig) -> dict[str, str]:
    """The tensors' formats with each layer at the format the plan chose for it (the embedding and LM head as the
    checkpoint stores them)."""
    per_layer = {i: f for s in result.stages for i, f in zip(range(*s.layers), s.formats)}
    layer_of = product_names(cfg)
    out = {n: f for n, f in choices.formats[AUTO].items() if layer_of.get(n) is None}
    for name, layer in layer_of.items():
        if layer is not None and name in choices.formats[per_layer.get(layer, AUTO)]:
            out[name] = choices.formats[per_layer.get(layer, AUTO)][name]
    return out


def check_offload_gb(gib: float) -> None:
    """--cpu-offload-gb: a finite number of GiB, at least 0."""
    if not 0 <= gib < math.inf:
        raise ValueError(f"cpu_offload_gb must be a number of GiB at least 0, got {gib}")


def offload_bytes(gib: float) -> int:
    """--cpu-offload-gb in bytes."""
    return int(gib * (1 << 30))


def place_model(cfg: ModelConfig, formats: dict, infos: list, dtype_request: str, *, max_model_len: int,
                max_num_seqs: int, block_size: int, layers: list[int] | None, kv_cache_memory: int | None,
                max_kv_tokens: int, link_bandwidth=None, dtypes: tuple[str, str] | None = None,
                packed=None, choices: FormatChoices | None = None,
                routing: tuple[float, ...] = ()) -> tuple[Plan, str, str]:
    """The plan over devices described as their stages describe them (infos: DeviceInfo, in --devices order; CPU
    stages of one host share its memory here): (plan, compute dtype, weight dtype) of the first stage. dtypes:
    (compute, weights) where the devices are not this machine's (a described cluster), else as the first resolves.
    packed: the package (engine.model.package) the model is served from, whose layers and streamed layers stand.
    choices: the formats the planner may choose per layer (formats is then ignored: chosen_formats gives the
    tensors' formats from the plan). routing: a mixture's experts' measured shares (engine.placement.routing)."""
    share_host_memory(infos)
    share_host_cpus(infos)
    if packed is not None:
        from engine.placement.probe import disk_bandwidth

        layers = [b - a for a, b in (s.layers for s in packed.stages)]
        for info, stage in zip(infos, packed.stages):
            # Its disk shard is priced as the package's folder reads (measured when it was converted).
            info.disk_bandwidth = info.disk_bandwidth or (disk_bandwidth(packed.path) if stage.streamed_layers
                                                          else None)
    if dtypes is None:
        import torch

        from engine.placement.local_device import resolve_dtypes

        dtypes = resolve_dtypes(dtype_request, cfg.checkpoint_dtype, torch.device(infos[0].name))
    compute, weights = dtypes
    precision = None
    if choices is not None:
        formats = choices.formats[AUTO]
        precision = Precision.build({f: ModelCost.from_config(cfg, compute, weights, formats=choices.formats[f],
                                                              routing=routing)
                                     for f in choices.names}, choices.errors, choices.max_error)
    result = plan(ModelCost.from_config(cfg, compute, weights, formats=formats, routing=routing), infos,
                  batch_size=planned_batch(max_num_seqs, len(infos)), context_len=min(max_model_len, PLANNED_CONTEXT),
                  kv_reserve_tokens=max_model_len, layers=layers, block_size=block_size, max_kv_tokens=max_kv_tokens,
                  kv_cache_memory=kv_cache_memory, link_bandwidth=link_bandwidth,
                  streamed=None if packed is None else [s.streamed_layers for s in packed.stages], precision=precision)
    return result, compute, weights


@dataclass(slots=True, frozen=True)
class PlanHere:
    model_dir: Path
    model_config: ModelConfig
    compute_dtype: str
    weight_dtype: str
    max_model_len: int  # tokens of KV every stage holds
    context_len: int  # tokens each sequence attends to in the planned step
    plan: Plan
    layer_formats: tuple[str, ...]  # per layer, what its products run at (engine.model.weight_formats.layer_summary)
    cost: ModelCost
    devices: list  # DeviceInfo, in the order given
    links: object  # the link bandwidths the plan priced (None: the cost model's defaults)
    max_num_seqs: int
    formats: dict[str, str]  # the tensors that run at another format than weight_dtype, as the stages load them
    routed: int = 0  # a mixture's routed choices its experts' shares were measured over (0: taken as uniform)

    def peer_plans(self) -> list[tuple[str, list[int] | None, Plan | None]]:
        """How other systems would split the layers over the same devices, each running its stages in its own order,
        priced by the same cost model: (who, layers per device in the order given, or None where it cannot place the
        model; plan, or None where a stage overflows)."""
        from engine.placement.peers import ORDERS, PEERS, price

        out = []
        for who, split in PEERS.items():
            counts = split(self.cost, self.devices)
            used = sum(1 for n in counts or () if n)
            priced = None if counts is None else price(
                self.cost, self.devices, counts, order=ORDERS[who](self.devices),
                batch_size=planned_batch(self.max_num_seqs, used),
                context_len=self.context_len, kv_reserve_tokens=self.max_model_len, block_size=self.plan.block_size,
                link_bandwidth=self.links)
            out.append((who, counts, priced))
        return out


def plan_here(model_dir: str | Path, devices: str, *, dtype: str = "auto", threads: int | None = None,
              memory_fraction: float = 0.9, max_num_seqs: int = 256, max_model_len: int | None = None,
              layers: str | None = None, block_size: int = 16, quantization: str = "auto",
              layer_quantization: str | None = None, kv_cache_memory: int | None = None,
              num_kv_blocks: int | None = None, cluster: str | Path | None = None,
              offload_dir: str | None = None, precision: str | None = None, max_layer_error: float | None = None,
              cpu_offload_gb: float = 0.0, reprobe: bool = False, say=None) -> PlanHere:
    """The plan `strata serve` with these options would run; with `cluster` (a file engine.placement.cluster reads),
    on the devices it describes instead of this machine's. Raises ValueError or CheckpointError for what the
    caller gave, PlacementError when nothing fits. say: told a line before each layer's error is measured at the
    --precision choices (once per checkpoint)."""
    import torch

    from engine.placement.local_device import resolve_dtypes
    from engine.placement.probe import describe_device

    check_offload_gb(cpu_offload_gb)
    model_dir = resolve_model(model_dir)
    cfg = ModelConfig.from_dir(model_dir)
    packed = package.read_package(model_dir) if package.is_package(model_dir) else None
    if packed is not None:  # its plan is the package's: layers, streamed layers and formats as converted
        if cluster is not None:
            raise ValueError(f"{model_dir} is a package for --devices {','.join(s.device for s in packed.stages)}; "
                             "plan its source checkpoint for a cluster")
        package.check_request(packed, devices, quantization, layer_quantization, layers, precision, max_layer_error)
        formats, choices = packed.formats, None
    else:
        # A config alone plans too (its weights taken to be floats); a checkpoint's stored formats count where it
        # has them.
        source = validate(model_dir, cfg) if _has_weights(Path(model_dir)) else None
        choices = format_choices(model_dir, cfg, source, precision, max_layer_error, quantization, layer_quantization,
                                 say)
        formats = (choices.formats[AUTO] if choices is not None else
                   resolve_formats(source, cfg, check_requested(quantization),
                                   parse_layer_formats(layer_quantization, cfg.num_layers)))
    requests = parse_devices(devices) if cluster is None else []
    split = parse_layers(layers)
    if max_num_seqs < 1 or block_size < 1:
        raise ValueError("max_num_seqs and block size must be at least 1")
    limit = model_len_limit(cfg)
    max_len = max_model_len or limit
    if not 1 <= max_len <= limit:
        raise ValueError(f"max_model_len {max_len} must be between 1 and what the model supports ({limit})")
    dtypes = None
    if cluster is not None:
        from engine.model.config import DTYPES
        from engine.placement.cluster import read_cluster

        # Not this machine's devices: GPU stages compute at the requested dtype, or the checkpoint's where it is
        # half precision (bf16 otherwise); the checkpoint's weights stay as stored.
        half = DTYPES[dtype] if dtype != "auto" else (
            cfg.checkpoint_dtype if cfg.checkpoint_dtype != "float32" else "bfloat16")
        described = read_cluster(cluster, half, memory_fraction)
        infos, links = described.devices, described.link_bandwidth
        for info in infos:  # a GPU's host tier is copied in over its PCIe; its host's CPU may run experts kept there
            if info.kind == "cuda" and cpu_offload_gb:
                info.host_tier_bytes = offload_bytes(cpu_offload_gb)
                info.host_bandwidth = described.buses.get((info.host, info.name))
                if cfg.num_experts and info.host in described.host_cpus:
                    info.host_cpu = dataclasses.replace(described.host_cpus[info.host], memory=info.host_tier_bytes)
        dtypes = (half, cfg.checkpoint_dtype if dtype == "auto" else half)
    else:
        infos, links = [], None
    for req in requests:
        compute, weights = resolve_dtypes(dtype, cfg.checkpoint_dtype, torch.device(req.name))
        host = resolve_dtypes(dtype, cfg.checkpoint_dtype, torch.device("cpu")) if cfg.num_experts else None
        infos.append(describe_device(req, compute, threads, memory_fraction, weight_dtype=weights,
                                     weight_format=dominant_quantized(formats, cfg),
                                     offload_dir=offload_dir, format_choices=choices.probed if choices else (),
                                     cpu_offload_bytes=offload_bytes(cpu_offload_gb), host_experts=host,
                                     reprobe=reprobe))
    max_kv_tokens = max_num_seqs * max_len if num_kv_blocks is None else num_kv_blocks * block_size
    routing, routed = measured_routing(model_dir, cfg.num_layers, cfg.num_experts) if cfg.num_experts else ((), 0)
    result, compute, weights = place_model(cfg, formats, infos, dtype, max_model_len=max_len,
                                           max_num_seqs=max_num_seqs, block_size=block_size, layers=split,
                                           kv_cache_memory=kv_cache_memory, max_kv_tokens=max_kv_tokens,
                                           link_bandwidth=links, dtypes=dtypes, packed=packed, choices=choices,
                                           routing=routing)
    if num_kv_blocks is not None and result.num_kv_blocks < num_kv_blocks:  # as strata serve refuses it
        raise ValueError(f"num_kv_blocks={num_kv_blocks} does not fit the KV memory budget ({result.num_kv_blocks} "
                         "blocks)")
    if choices is not None:
        formats = chosen_formats(choices, result, cfg)
    cost = ModelCost.from_config(cfg, compute, weights, formats=formats, routing=routing)
    return PlanHere(Path(model_dir), cfg, compute, weights, max_len, result.context_len, result,
                    tuple(layer_summary(cfg, formats, weights)), cost, infos, links, max_num_seqs, formats, routed)


def _has_weights(model_dir: Path) -> bool:
    return model_dir.suffix == ".gguf" or any(model_dir.glob("*.safetensors")) or any(model_dir.glob("*.gguf"))
