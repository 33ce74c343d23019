"""A plan without a pipeline, for `strata plan`: each device probed in this process as its stage would probe it
(the results are cached, as the stages' own are), host memory shared as the engine shares it, and the same
planner the engine runs at start-up."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.model.checkpoint import resolve_formats, validate
from engine.model.config import ModelConfig
from engine.model.weight_formats import check_requested, dominant_quantized, layer_summary, parse_layer_formats
from engine.placement import ModelCost, Plan, parse_devices, parse_layers, plan, share_host_memory


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


def plan_here(model_dir: str | Path, devices: str, *, dtype: str = "auto", threads: int | None = None,
              memory_fraction: float = 0.9, batch_size: int = 64, context_len: int | None = None,
              max_model_len: int | None = None, layers: str | None = None, block_size: int = 16,
              quantization: str = "auto", layer_quantization: str | None = None) -> PlanHere:
    """Raises ValueError or CheckpointError for what the caller gave, PlacementError when nothing fits."""
    import torch

    from engine.placement.local_device import resolve_dtypes
    from engine.placement.probe import describe_device

    cfg = ModelConfig.from_dir(model_dir)
    # A config alone plans too (its weights taken to be floats); a checkpoint's stored formats count where it has them.
    source = validate(model_dir, cfg) if _has_weights(Path(model_dir)) else None
    formats = resolve_formats(source, cfg, check_requested(quantization),
                              parse_layer_formats(layer_quantization, cfg.num_layers))
    requests = parse_devices(devices)
    split = parse_layers(layers)
    if batch_size < 1 or block_size < 1:
        raise ValueError("batch size and block size must be at least 1")
    max_len = max_model_len or min(cfg.max_position_embeddings, 4096)
    context = context_len or min(max_len, 512)
    if max_len < 1 or context < 1:
        raise ValueError("max model length and context length must be at least 1")
    infos, first = [], None
    for req in requests:
        compute, weights = resolve_dtypes(dtype, cfg.checkpoint_dtype, torch.device(req.name))
        first = first or (compute, weights)
        infos.append(describe_device(req, compute, threads, memory_fraction, weight_dtype=weights,
                                     weight_format=dominant_quantized(formats, cfg.num_layers)))
    share_host_memory(infos)
    compute, weights = first
    result = plan(ModelCost.from_config(cfg, compute, weights, formats=formats), infos, batch_size=batch_size,
                  context_len=context, kv_reserve_tokens=max_len, layers=split, block_size=block_size)
    return PlanHere(Path(model_dir), cfg, compute, weights, max_len, context, result,
                    tuple(layer_summary(cfg.num_layers, formats, weights)))


def _has_weights(model_dir: Path) -> bool:
    return model_dir.suffix == ".gguf" or any(model_dir.glob("*.safetensors")) or any(model_dir.glob("*.gguf"))
