"""`strata plan`: how the model's layers would be placed on the devices, and what each stage is predicted to cost.

Probes each device in this process (results are cached, as the stages' own probes are),
then runs the same planner the engine runs at start-up, and prints its plan.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

DTYPE_CHOICES = ["auto", "float32", "bfloat16", "float16"]


def add_plan_parser(subparsers) -> argparse.ArgumentParser:
    env = os.environ.get
    p = subparsers.add_parser(
        "plan", help="show how the layers would be split over the devices",
        description="Probe the devices, place the model's layers on them, and print each stage's device, layers, "
                    "memory and predicted step time.",
    )
    p.add_argument("--model", default=env("STRATA_MODEL"),
                   help="checkpoint directory (default: the built-in demo model)")
    p.add_argument("--devices", default=env("STRATA_DEVICES", "cpu"),
                   help="one stage per device, with optional memory budgets: cuda:0=20GiB,cuda:1,cpu=8GiB")
    p.add_argument("--threads-per-stage", type=int, default=None, help="torch threads of each CPU stage")
    p.add_argument("--layers", default=None, help="layers per stage in --devices order, instead of searching: 20,8,4")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="tokens of KV every stage must hold (default: the model's limit, at most 4096)")
    p.add_argument("--batch-size", type=int, default=64, help="sequences per step the plan is optimised for")
    p.add_argument("--context-len", type=int, default=None, help="tokens each sequence attends to (default: "
                   "max-model-len, at most 512)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", default=env("STRATA_DTYPE", "auto"), choices=DTYPE_CHOICES)
    p.add_argument("--memory-fraction", type=float, default=0.9,
                   help="share of a device's free memory a stage may use when it has no budget")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run_plan)
    return p


def _parse_layers(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(n) for n in text.split(",")]
    except ValueError:
        raise ValueError(f"--layers must be comma-separated counts such as 20,8,4, got {text!r}") from None


def run_plan(args: argparse.Namespace) -> int:
    from engine.config import ModelConfig
    from engine.errors import CheckpointError
    from engine.placement import ModelCost, PlacementError, parse_devices, plan

    try:
        if args.model:
            model_dir = args.model
        else:
            from engine.demo_model import ensure_demo_model

            model_dir = str(ensure_demo_model())
        cfg = ModelConfig.from_dir(model_dir)
        requests = parse_devices(args.devices)
        layers = _parse_layers(args.layers)
        for name in ("batch_size", "block_size"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        max_len = args.max_model_len or min(cfg.max_position_embeddings, 4096)
        context = args.context_len or min(max_len, 512)
        if max_len < 1 or context < 1:
            raise ValueError("--max-model-len and --context-len must be at least 1")
        infos, compute, weights = _describe(requests, cfg, args)
        cost = ModelCost.from_config(cfg, compute, weights)
        result = plan(cost, infos, batch_size=args.batch_size, context_len=context, kv_reserve_tokens=max_len,
                      layers=layers, block_size=args.block_size)
    except PlacementError as e:
        print(f"strata plan: {e}", file=sys.stderr)
        return 1
    except (CheckpointError, ValueError, RuntimeError) as e:
        print(f"strata plan: {e}", file=sys.stderr)
        return 2 if isinstance(e, (CheckpointError, ValueError)) else 1
    if args.json:
        out = {"model": str(model_dir), "compute_dtype": compute, "weight_dtype": weights, **result.to_json()}
        print(json.dumps(out, indent=2))
    else:
        print(f"model: {model_dir} ({cfg.num_layers} layers, {weights} weights, {compute} compute)")
        print(f"planned for {args.batch_size} sequences per step attending to {context} tokens, with KV for "
              f"{max_len} tokens on every stage")
        print(result.table())
    return 0


def _describe(requests, cfg, args):
    """Probe each device as its stage would; CPU stages without a budget share the host's memory."""
    import torch

    from engine.device import resolve_dtypes
    from engine.probe import describe_device

    infos, first = [], None
    unbudgeted_cpus = sum(1 for r in requests if r.name == "cpu" and r.memory is None)
    for req in requests:
        compute, weights = resolve_dtypes(args.dtype, cfg.checkpoint_dtype, torch.device(req.name))
        first = first or (compute, weights)
        info = describe_device(req, compute, args.threads_per_stage, args.memory_fraction, weight_dtype=weights)
        if req.name == "cpu" and req.memory is None and unbudgeted_cpus > 1:
            info.memory //= unbudgeted_cpus
        infos.append(info)
    return infos, first[0], first[1]
