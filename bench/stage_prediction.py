"""The planner's predicted stage step beside the measured one, in one process.

Builds the stages of a two-stage split of a SmolLM2-135M-shaped checkpoint on the CPU,
times decode steps at batch 1 and a wide batch, and prints each next to what
engine.placement predicts from a fresh probe of this machine. Each round probes again,
so a busy machine shows up as rounds that disagree.

    python -m bench.stage_prediction [--threads 1] [--context 96] [--batch 64] [--rounds 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from batching import SamplingParams
from bench.checkpoints import smollm2_135m_shaped
from engine.model.attention import build_metadata
from engine.model.checkpoint import tensor_source
from engine.model.config import ModelConfig
from engine.model.sampler import Sampler, SamplingRow
from engine.model.stage_model import StageModel
from engine.placement import DeviceRequest, ModelCost, predict_stage_seconds

BLOCK = 16


def step_fn(cfg: ModelConfig, model: StageModel, kv: torch.Tensor, sampler, batch: int, context: int):
    """One decode step of `batch` sequences at position `context` (each attends to context + 1 tokens)."""
    blocks = -(-(context + 1) // BLOCK)
    tables = [list(range(i * blocks, (i + 1) * blocks)) for i in range(batch)]
    slots = [t[context // BLOCK] * BLOCK + context % BLOCK for t in tables]
    x = torch.full((batch,), 5) if model.first else torch.randn(batch, cfg.hidden_size)
    pos = torch.full((batch,), context)
    rows = [SamplingRow(SamplingParams(max_tokens=8, temperature=0.0), [1], [], 0) for _ in range(batch)]

    def step() -> None:
        meta = build_metadata(BLOCK, slots, tables, [context + 1] * batch, [], torch.device("cpu"))
        with torch.inference_mode():
            hidden = model.forward(x, pos, meta, kv)
            if model.last:
                sampler(model.logits(hidden), rows).to_host()

    return step


def fastest(step, reps: int) -> float:
    step()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--context", type=int, default=96)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from engine.placement import probe

    model_dir = smollm2_135m_shaped("bfloat16")
    cfg = ModelConfig.from_dir(model_dir)
    half = cfg.num_layers // 2
    cost = ModelCost.from_config(cfg, "float32", "bfloat16", sampling="greedy")
    need_blocks = args.batch * -(-(args.context + 1) // BLOCK) + 1
    stages = []
    for first, last, layers in ((True, False, (0, half)), (False, True, (half, cfg.num_layers))):
        model = StageModel(cfg, tensor_source(model_dir, cfg), range(*layers), first, last, torch.float32,
                           torch.device("cpu"), args.context + 2, torch.bfloat16)
        kv = torch.zeros((layers[1] - layers[0], 2, need_blocks, BLOCK, cfg.num_kv_heads, cfg.head_dim))
        stages.append((layers, model, kv, Sampler(cfg.vocab_size, cfg.eos_token_ids) if last else None))
    print(f"{model_dir.name}: float32 compute, bfloat16 weights, {args.threads} thread(s), context {args.context}")
    ratios: dict[tuple, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            os.environ["STRATA_CACHE"] = os.path.join(tmp, str(r))  # a fresh probe each round
            dev = probe.describe_device(DeviceRequest("cpu"), "float32", args.threads, weight_dtype="bfloat16")
            print(f"round {r}: GEMM {dev.matmul_flops / 1e9:.1f} GFLOP/s, weights {dev.mem_bandwidth / 1e9:.1f} GB/s, "
                  f"thin {dev.thin_matmul_flops / 1e9:.1f} GFLOP/s + {dev.row_overhead_s * 1e9:.0f} ns/row, "
                  f"attention {dev.attention_bandwidth / 1e9:.2f} GB/s, op {dev.op_overhead_s * 1e6:.2f} us")
            for layers, model, kv, sampler in stages:
                for batch in (1, args.batch):
                    step = step_fn(cfg, model, kv, sampler, batch, args.context)
                    measured = fastest(step, 25 if batch == 1 else 7)
                    predicted = predict_stage_seconds(cost, dev, layers, model.first, model.last, batch,
                                                      args.context + 1)
                    ratios.setdefault((layers, batch), []).append(predicted / measured)
                    print(f"  layers {layers[0]:2d}-{layers[1] - 1:2d} batch {batch:3d}: "
                          f"predicted {predicted * 1e3:7.2f} ms  measured {measured * 1e3:7.2f} ms  "
                          f"predicted/measured {predicted / measured:.2f}")
    print("median predicted/measured: " + ", ".join(
        f"layers {k[0][0]}-{k[0][1] - 1} batch {k[1]}: {statistics.median(v):.2f}" for k, v in ratios.items()))


if __name__ == "__main__":
    main()
