"""`strata convert`: a checkpoint (a Hugging Face folder or a GGUF file) turned into a package for the devices it will
be served on, which `strata serve --model PKG` starts from by mapping each stage's shard."""
from __future__ import annotations

import argparse
import os
import sys
import time

from gateway.plan_command import add_quantization_args


def add_convert_parser(subparsers) -> argparse.ArgumentParser:
    from engine import add_stage_args

    env = os.environ.get
    p = subparsers.add_parser(
        "convert", help="convert a checkpoint into a package for the devices it will be served on",
        description="Plan the model for the devices as `strata plan` does, then write each stage's weights at their "
                    "formats, packed as its kernels read them, one shard per stage (and one for the layers a stage "
                    "reads from disk each step), with the plan, config, tokenizer and a manifest of checksums. "
                    "`strata serve --model PKG --devices ...` maps the shards and refuses a package whose checksums "
                    "or devices do not match.",
    )
    p.add_argument("source", help="a Hugging Face checkpoint folder or a GGUF file")
    p.add_argument("--out", required=True, help="the package folder to write (new or empty)")
    p.add_argument("--devices", default=env("STRATA_DEVICES", "cpu"),
                   help="the devices it will be served on, with memory budgets: cpu=8GiB,cpu=4GiB; a CPU stage "
                        "whose budget cannot hold its layers keeps the rest in a shard it reads each step")
    add_stage_args(p, rendezvous=False)
    p.add_argument("--dtype", default=env("STRATA_DTYPE", "auto"), choices=["auto", "float32", "bfloat16", "float16"])
    add_quantization_args(p, lambda name, default=None: env(f"STRATA_{name.upper()}", default))
    p.add_argument("--cluster", default=None,
                   help="pack for the devices a TOML file describes (as strata plan --cluster reads it) instead of "
                        "--devices: GPU stages are packed here, as a GPU builds them, and loaded there with one copy")
    p.add_argument("--cpu-offload-gb", type=float, default=env("STRATA_CPU_OFFLOAD_GB", "0"),
                   help="GiB of its layers each GPU stage may keep in host memory (as strata serve's flag)")
    p.add_argument("--max-model-len", type=int, default=env("STRATA_MAX_MODEL_LEN"))
    p.add_argument("--max-num-seqs", type=int, default=env("STRATA_MAX_NUM_SEQS", "256"))
    p.add_argument("--kv-cache-memory", default=env("STRATA_KV_CACHE_MEMORY"), help="KV-cache budget, e.g. 4GiB")
    p.set_defaults(func=run_convert)
    return p


def run_convert(args: argparse.Namespace) -> int:
    from engine import CheckpointError, PlacementError, convert, parse_size, plan_table

    start = time.perf_counter()
    try:
        here = convert(args.source, args.out, args.devices, dtype=args.dtype, threads=args.threads,
                       max_num_seqs=int(args.max_num_seqs),
                       max_model_len=int(args.max_model_len) if args.max_model_len else None,
                       quantization=args.quantization, layer_quantization=args.layer_quantization,
                       precision=args.precision, cluster=args.cluster, cpu_offload_gb=float(args.cpu_offload_gb),
                       max_layer_error=None if args.max_layer_error is None else float(args.max_layer_error),
                       kv_cache_memory=parse_size(args.kv_cache_memory) if args.kv_cache_memory else None,
                       say=lambda line: print(f"strata convert: {line}", flush=True))
    except PlacementError as e:
        print(f"strata convert: {e}", file=sys.stderr)
        return 1
    except (CheckpointError, ValueError) as e:
        print(f"strata convert: {e}", file=sys.stderr)
        return 2
    print(plan_table(here.plan))
    devices = ",".join(s.device.name for s in here.plan.stages) if args.cluster else args.devices
    print(f"strata convert: wrote {args.out} in {time.perf_counter() - start:.1f} s; serve it with "
          f"strata serve --model {args.out} --devices {devices}")
    return 0
