"""Strata's plan against how Accelerate, exo, llama.cpp and vLLM split a 70B-shaped dense model over three clusters.

    python -m bench.clusters [--max-model-len 4096] [--max-num-seqs 256]

The clusters are the TOML files in bench/clusters/ (engine/placement/cluster.py reads them); the model is
Llama-3-70B's shape (a config alone, no weights), at bf16 where the cluster holds it and quantized at load where it
does not. Every split is priced by the same cost model (engine.placement.cost); nothing runs. Prints each cluster's
plan, the others' splits with their predicted tokens/s, and Strata's ratio to the best of them.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench.checkpoints import LLAMA3_70B_SHAPE, config_only
from engine.placement import peer_table, plan_table, throughput
from engine.placement.planning import plan_here

CLUSTERS = Path(__file__).with_name("clusters")
# The format each cluster holds the 70B model at: bf16 (140 GB) where it fits, else what does.
FORMATS = {"a100_3090s_cpu": "auto", "t4s_a10": "q4_k", "4090s_3090s": "q8_0"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = config_only(LLAMA3_70B_SHAPE, Path(tmp) / "llama-3-70b-shape")
        summary = []
        for name, fmt in FORMATS.items():
            here = plan_here(model, "", cluster=CLUSTERS / f"{name}.toml", quantization=fmt,
                             max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs)
            print(f"== {name} ({fmt if fmt != 'auto' else 'bf16'} weights)")
            print(plan_table(here.plan))
            peers = here.peer_plans()
            print(peer_table(here.plan, here.devices, peers))
            best = max((throughput(p) for _, _, p in peers if p is not None), default=None)
            ratio = throughput(here.plan) / best if best else float("inf")
            summary.append((name, throughput(here.plan), best, ratio))
            print()
    print("cluster            Strata tok/s   best other tok/s   ratio")
    for name, ours, best, ratio in summary:
        print(f"{name:<18} {ours:12.0f}   {best or 0:16.0f}   {ratio:5.2f}")
    print("rerun: python -m bench.clusters")


if __name__ == "__main__":
    main()
