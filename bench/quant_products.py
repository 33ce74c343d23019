"""Quantized matrix products against bf16 ones, by the number of rows: one decode step's products of the
SmolLM2-135M shape (30 layers of q/k/v, o, gate/up and down, and the 49152-row LM head).

    python -m bench.quant_products [--rows 1 2 4 8 12 16 64] [--threads 2]

For each row count it prints the step's product time for bf16 weights on the engine's tile kernel and for each
quantized format on both of quant_gemm's paths (int16 dot products, bf16 tiles), which is how DOT_ROWS, the
row count up to which the dot products run, was chosen. The weights are random; each product runs many times in
a row, so on a CPU whose cache holds them the figures are those of cached weights.
"""
from __future__ import annotations

import argparse
import time

import torch

from engine.kernels import quant_gemm
from engine.model.linear import AmxLinear
from engine.model.quantized import pack, quantize
from engine.model.weight_formats import FORMATS

# [out, in] of each product; per layer but the head
SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "head": (49152, 576)}
LAYERS = 30
FORMAT_NAMES = ("q8_0", "q4_1", "q4_k")


def seconds(fn, x: torch.Tensor, repeats: int) -> float:
    for _ in range(5):
        fn(x)
    t = time.perf_counter()
    for _ in range(repeats):
        fn(x)
    return (time.perf_counter() - t) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 12, 16, 64])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    if not quant_gemm.available(torch.device("cpu")):
        raise SystemExit("the quantized kernel needs a CPU with AMX-BF16 and a C compiler")
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    weights = {name: torch.randn(shape, generator=gen) * 0.02 for name, shape in SHAPES.items()}
    bf16 = {name: AmxLinear(w.bfloat16(), None) for name, w in weights.items()}
    packed = {(fmt, name): pack(quantize(w, FORMATS[fmt])) for fmt in FORMAT_NAMES for name, w in weights.items()}
    paths = {"dots": 1 << 30, "tiles": 0}  # dot_rows: every row count on one path or the other
    print(f"one decode step's products, SmolLM2-135M shape, {args.threads} threads; ms (ratio to bf16)\n")
    cols = ["bf16", *(f"{fmt} {path}" for fmt in FORMAT_NAMES for path in paths)]
    print(f"{'rows':>4} | " + " | ".join(f"{c:>15}" for c in cols))
    for rows in args.rows:
        def step(product_of) -> float:
            total = 0.0
            for name, (_, k) in SHAPES.items():
                x = torch.randn(rows, k, generator=gen)
                total += seconds(product_of(name), x, args.repeats) * (1 if name == "head" else LAYERS)
            return total

        base = step(lambda name: bf16[name])
        cells = [f"{base * 1e3:>15.2f}"]
        for fmt in FORMAT_NAMES:
            for dot_rows in paths.values():
                t = step(lambda name: quant_gemm.Product(packed[fmt, name], None, dot_rows))
                cells.append(f"{t * 1e3:>7.2f} ({t / base:4.2f}x)")
        print(f"{rows:>4} | " + " | ".join(cells), flush=True)
    print(f"\nquant_gemm.DOT_ROWS = {quant_gemm.DOT_ROWS}")
    print(f"rerun: python -m bench.quant_products --rows {' '.join(map(str, args.rows))} --threads {args.threads}")


if __name__ == "__main__":
    main()
