"""Mixture-of-experts decode: Strata against transformers' generate and against llama.cpp, on one Qwen3-MoE-shaped
checkpoint (bench.checkpoints.QWEN3_MOE_SHAPE: 64 experts, 8 per token, 1.7B parameters, random weights).

    python -m bench.moe [--batch-sizes 1 32] [--output-len 64] [--quantization q4_k]
        [--llama-cpp DIR] [--threads 2]

Offline, in this one run: output tokens/s of the engine (LLM.generate's engine, greedy) and of transformers'
`generate` in the checkpoint's bf16, at each batch size, with their ratio. With --quantization, the engine also runs
the checkpoint quantized at load to that format (transformers still runs bf16: the row says so).

With --llama-cpp (a llama.cpp source tree with llama-server built under build/bin, as bench.quantized says how), the
checkpoint is converted once by that tree's own convert_hf_to_gguf.py to a bf16 GGUF file, and Strata and
llama-server each serve that file in turn (same threads, continuous batching, as many slots as the highest batch
size), driven with streaming chat over HTTP (bench.serving): single-stream decode tok/s (1 / mean inter-token
latency) and output tok/s at each batch size as concurrent streams.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
from pathlib import Path

import torch

from bench.checkpoints import qwen3_moe_shaped
from bench.offline import engine_run, hf_run
from bench.serving import drive, free_port, start, stop

STAGE_READY_S = 1800  # quantizing 1.7B parameters at load takes minutes on two cores


def converted(model_dir: Path, llama_cpp: Path) -> Path:
    """The checkpoint as a bf16 GGUF file, written by llama.cpp's converter once, beside the checkpoint."""
    out = model_dir.with_name(model_dir.name + ".gguf")
    if not out.is_file():
        env = {**os.environ, "PYTHONPATH": str(llama_cpp / "gguf-py")}
        subprocess.run([sys.executable, str(llama_cpp / "convert_hf_to_gguf.py"), str(model_dir), "--outtype", "bf16",
                        "--outfile", str(out) + ".tmp"], check=True, env=env, stdout=subprocess.DEVNULL)
        os.rename(str(out) + ".tmp", out)
    return out


def served(name: str, cmd: list[str], port: int, levels: list[int], max_tokens: int) -> dict:
    url = f"http://127.0.0.1:{port}"
    with open(f"/tmp/bench-moe-{name}.log", "w") as log:
        proc = start(cmd, port, log)
        try:
            out = {}
            single = asyncio.run(drive(url, "moe", 1, max_tokens))
            out["decode_tok_s"] = 1.0 / single["itl_mean"] if single["itl_mean"] else float("nan")
            for c in levels:
                out[c] = asyncio.run(drive(url, "moe", c, max_tokens))["tok_s"]
            return out
        finally:
            stop(proc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--quantization", nargs="*", default=[], help="also run the engine quantized at load to these")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--llama-cpp", type=Path, help="a llama.cpp source tree with build/bin/llama-server")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = qwen3_moe_shaped()
    sizes = args.batch_sizes
    rows: dict[str, dict[int, float]] = {"transformers bf16": {}, "strata bf16": {}}
    for b in sizes:
        rows["transformers bf16"][b] = hf_run(model_dir, torch.bfloat16, b, args.prompt_len, args.output_len)
        print(f"measured transformers at {b}", flush=True)
    for q in ["auto", *args.quantization]:
        label = "strata bf16" if q == "auto" else f"strata {q}"
        rows[label] = {}
        for b in sizes:
            rows[label][b] = engine_run(model_dir, b, args.prompt_len, args.output_len, args.threads, quantization=q,
                                        rendezvous_timeout_s=STAGE_READY_S)[0]
            print(f"measured {label} at {b}", flush=True)

    print(f"\n{model_dir.name}: offline greedy decode, {args.prompt_len}-token prompts, {args.output_len} tokens each, "
          f"{args.threads} threads; output tok/s\n")
    print(f"{'':>20} | " + " | ".join(f"{'batch ' + str(b):>10}" for b in sizes))
    for label, r in rows.items():
        print(f"{label:>20} | " + " | ".join(f"{r[b]:>10.1f}" for b in sizes))
    base = rows["transformers bf16"]
    for label, r in rows.items():
        if label.startswith("strata"):
            print(f"{label + ' / hf':>20} | " + " | ".join(f"{r[b] / base[b]:>9.2f}x" for b in sizes))
    print("targets against transformers: 3x at 1 sequence, 10x at 32")

    if args.llama_cpp is not None:
        gguf = converted(model_dir, args.llama_cpp)
        slots = max(sizes)
        context = args.prompt_len * 2 + args.output_len + 64
        strata = [sys.executable, "-m", "gateway.cli", "serve", "--model", str(gguf), "--served-model-name", "moe",
                  "--host", "127.0.0.1", "--max-model-len", str(context), "--threads-per-stage", str(args.threads),
                  "--max-num-seqs", str(slots)]
        llama = [str(args.llama_cpp / "build" / "bin" / "llama-server"), "-m", str(gguf), "--alias", "moe",
                 "--host", "127.0.0.1", "-t", str(args.threads), "-tb", str(args.threads), "-np", str(slots), "-cb",
                 "-c", str(slots * context)]
        results = {}
        for label, cmd in (("strata", strata), ("llama.cpp", llama)):
            port = free_port()
            results[label] = served(label, [*cmd, "--port", str(port)], port, sizes, args.output_len)
            print(f"measured {label} serving", flush=True)
        print(f"\n{gguf.name} (bf16), served: streaming chat, greedy, {args.output_len}-token answers\n")
        cols = ["decode tok/s (1 stream)", *(f"out tok/s @{c}" for c in sizes)]
        print(f"{'server':>12} | " + " | ".join(f"{c:>23}" for c in cols))

        def row(r: dict) -> list[float]:
            return [r["decode_tok_s"], *(r[c] for c in sizes)]

        for label, r in results.items():
            print(f"{label:>12} | " + " | ".join(f"{v:>23.1f}" for v in row(r)))
        pairs = zip(row(results["strata"]), row(results["llama.cpp"]))
        print(f"{'ratio':>12} | " + " | ".join(f"{a / b:>22.2f}x" for a, b in pairs))
        print("targets against llama.cpp: 0.8x single-stream, 4x at 32 concurrent streams")
    rerun = f"python -m bench.moe --batch-sizes {' '.join(map(str, sizes))} --output-len {args.output_len}"
    rerun += f" --threads {args.threads}" + (f" --quantization {' '.join(args.quantization)}" if args.quantization else "")
    print("rerun: " + rerun + (f" --llama-cpp {args.llama_cpp}" if args.llama_cpp else ""))


if __name__ == "__main__":
    main()
