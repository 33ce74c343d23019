"""The GPU benchmarks, each figure beside its peer measured in the same run:

    python -m bench.gpu [--device cuda:0] [--shape llama3-8b] [--prompt-len 128] [--output-len 128]

1. Decode at batch 1 against the memory roofline: a decode step reads every weight once, so the fastest a device
   can decode one sequence is its measured copy bandwidth over the weight bytes.
2. Decode at 64 sequences against transformers' `generate` on the same checkpoint, on the same device.
3. The planner's predicted step time against the measured one (stage clocks: CUDA events on a GPU).

The checkpoint has the shape of a real model and random weights, made on the device and written once to the cache
(`--shape smollm2-135m` with `--device cpu` runs the same script in a minute on a CPU).
"""
from __future__ import annotations

import argparse
import time

import torch

from bench.checkpoints import llama3_8b_shaped, smollm2_135m_shaped
from bench.offline import engine_run, hf_run
from engine.model.config import ModelConfig

SHAPES = {"llama3-8b": llama3_8b_shaped, "smollm2-135m": lambda dtype, device: smollm2_135m_shaped(dtype)}


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Bytes/s the device moves in a large copy (each byte copied is read once and written once)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def weight_bytes(cfg: ModelConfig, dtype_bytes: int) -> int:
    from engine.model.checkpoint import expected_shapes

    shapes = expected_shapes(cfg, range(cfg.num_layers), True, True)
    embed = cfg.vocab_size * cfg.hidden_size
    # The embedding is gathered, not read whole, unless it is also the LM head.
    read = sum(torch.Size(s).numel() for s in shapes.values()) - (0 if cfg.tie_word_embeddings else embed)
    return read * dtype_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--batch", type=int, default=64, help="sequences for the throughput comparison")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    args = ap.parse_args()
    device = torch.device(args.device)
    model_dir = SHAPES[args.shape](args.dtype, str(device))
    cfg = ModelConfig.from_dir(model_dir)
    dtype = getattr(torch, args.dtype)
    threads = None if device.type == "cuda" else torch.get_num_threads()
    print(f"checkpoint: {model_dir} ({args.shape} shape, random {args.dtype} weights); device: {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'})")
    print(f"workload: {args.prompt_len} prompt tokens, {args.output_len} output tokens per sequence\n")

    bandwidth = copy_bandwidth(device)
    roofline = bandwidth / weight_bytes(cfg, dtype.itemsize)
    one_tps, one_step = engine_run(model_dir, 1, args.prompt_len, args.output_len, threads, str(device))
    print(f"batch 1: {1 / one_step:.1f} tok/s decoding ({one_step * 1e3:.2f} ms a step); roofline {roofline:.1f} "
          f"tok/s ({bandwidth / 1e9:.0f} GB/s copy bandwidth over {weight_bytes(cfg, dtype.itemsize) / 1e9:.2f} GB "
          f"of weights): {100 / one_step / roofline:.0f}% of it", flush=True)

    planned: dict[str, float] = {}

    def prediction(eng) -> None:
        load = eng.stats().stages
        for k, stage in enumerate(load):
            if stage.steps:
                planned[f"stage {k} measured"] = stage.busy_s / stage.steps
                planned[f"stage {k} predicted"] = eng.predicted_step_s(k, round(stage.seqs / stage.steps))

    many_tps, many_step = engine_run(model_dir, args.batch, args.prompt_len, args.output_len, threads, str(device),
                                     on_engine=prediction)
    hf_tps = hf_run(model_dir, dtype, args.batch, args.prompt_len, args.output_len, str(device))
    print(f"batch {args.batch}: {many_tps:.1f} tok/s end to end ({many_step * 1e3:.2f} ms a decode step); "
          f"transformers generate {hf_tps:.1f} tok/s: {many_tps / hf_tps:.2f}x", flush=True)
    for k in range(len([key for key in planned if key.endswith("measured")])):
        measured, predicted = planned[f"stage {k} measured"], planned[f"stage {k} predicted"]
        print(f"stage {k}: measured {measured * 1e3:.2f} ms a step, planner predicted {predicted * 1e3:.2f} ms "
              f"(predicted/measured {predicted / measured:.2f})")
    print(f"\nrerun: python -m bench.gpu --device {args.device} --shape {args.shape} --batch {args.batch} "
          f"--prompt-len {args.prompt_len} --output-len {args.output_len}")


if __name__ == "__main__":
    main()
