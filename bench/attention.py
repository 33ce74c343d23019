"""Decode attention over the paged KV cache: the engine's CPU kernel against torch's gather + SDPA on the same cache.

    python -m bench.attention [--seqs 64] [--context 97] [--threads 2]

One decode step's attention of the SmolLM2-135M shape (30 layers, 9 query heads and 3 KV heads of 64), each layer
with its own cache and the sequences' blocks shuffled through it, as a step meets them. For a bf16 cache and an
fp32 one it prints the kernel's time on each path it has here (AVX-512 where the CPU has it, AVX2) and torch's,
with ratios, and the bytes of keys and values the step reads.
"""
from __future__ import annotations

import argparse
import time

import torch

from engine.kernels import paged_attention
from engine.model import attention
from engine.model.attention import build_metadata

LAYERS, HEADS, KV_HEADS, HEAD_DIM, BLOCK = 30, 9, 3, 64, 16


def best_of(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, default=64)
    ap.add_argument("--context", type=int, default=97)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    if not paged_attention.available(torch.zeros(1)):
        raise SystemExit("the attention kernel needs an x86-64 CPU with AVX2 and a C compiler")
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    per_seq = -(-args.context // BLOCK)
    num_blocks = args.seqs * per_seq + 1
    tables = (torch.randperm(num_blocks - 1, generator=g)[: args.seqs * per_seq] + 1).view(args.seqs, per_seq)
    lens = [args.context] * args.seqs
    slots = [int(t[(n - 1) // BLOCK]) * BLOCK + (n - 1) % BLOCK for t, n in zip(tables, lens)]
    q = torch.randn(args.seqs, HEADS, HEAD_DIM, generator=g)
    kv = torch.randn(args.seqs, KV_HEADS, HEAD_DIM, generator=g)
    print(f"{LAYERS} layers x {args.seqs} sequences at context {args.context}, {HEADS} heads over {KV_HEADS} of "
          f"{HEAD_DIM}; {args.threads} threads; best of {args.repeats}, ms\n")
    print(f"{'cache':>8} | {'MB read':>7} | {'kernel, AVX-512':>15} | {'kernel, AVX2':>12} | {'torch':>8} | "
          f"{'torch / best kernel':>19}")
    for dtype in (torch.bfloat16, torch.float32):
        caches = [(torch.randn(num_blocks, BLOCK, KV_HEADS, HEAD_DIM, generator=g).to(dtype),
                   torch.randn(num_blocks, BLOCK, KV_HEADS, HEAD_DIM, generator=g).to(dtype)) for _ in range(LAYERS)]
        meta = build_metadata(BLOCK, slots, tables.tolist(), lens, [], torch.device("cpu"))

        def step() -> None:
            meta.decode_kernel = None  # decided anew per run, as each step decides it
            for k_cache, v_cache in caches:
                attention.paged_attention(q, kv, kv, k_cache, v_cache, meta, HEAD_DIM**-0.5)

        times = {}
        for label, wide, kernel in (("wide", True, True), ("avx2", False, True), ("torch", False, False)):
            paged_attention.WIDE = wide
            available = paged_attention.available
            if not kernel:
                paged_attention.available = lambda cache: False
            try:
                times[label] = best_of(step, args.repeats)
            finally:
                paged_attention.available = available
        paged_attention.WIDE = True
        read_mb = 2 * LAYERS * args.seqs * args.context * KV_HEADS * HEAD_DIM * dtype.itemsize / 1e6
        # The AVX-512 path takes bf16 caches only: on fp32 both columns are the AVX2 path.
        best = min(times["wide"], times["avx2"])
        print(f"{str(dtype).removeprefix('torch.'):>8} | {read_mb:>7.0f} | {times['wide'] * 1e3:>15.2f} | "
              f"{times['avx2'] * 1e3:>12.2f} | {times['torch'] * 1e3:>8.2f} | {times['torch'] / best:>18.2f}x")
    print(f"\nrerun: python -m bench.attention --seqs {args.seqs} --context {args.context} --threads {args.threads}")


if __name__ == "__main__":
    main()
