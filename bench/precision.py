"""What the planner's per-layer precision buys: perplexity when a memory budget forces some layers to fewer bits.

On the default model's bf16 copy (SmolLM2-135M-Instruct, written once by transformers, as bench.perplexity does),
`strata plan --precision auto,q8_0,q4_0 --devices cpu=BUDGET` chooses each layer's format. Every row below runs the
same number of layers at each format, so the same bytes and the same predicted step; only which layers take which
format differs:

  planner        the planner's choice: the layers whose measured error is smallest take the fewest bits
  reversed       the same counts given to the layers whose error is largest
  by position    the same counts by position, fewest bits first (as `--layer-quantization 0-9=q4_0,...` would)
  all bf16       every layer at the checkpoint's own (the reference; it does not fit the budget)

Perplexity is scored on held-out prose (bench.perplexity: pydoc_data's topics, not the calibration text). The
summed measured layer error of each row is printed beside it, to show how well it predicts the loss.

    python -m bench.precision [--budget 200MiB] [--tokens 8000] [--window 1024]
"""
from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch

from bench.perplexity import bf16_copy, held_out_text, strata_nll, windows
from engine.model.calibration import layer_errors
from engine.model.checkpoint import validate
from engine.model.config import ModelConfig
from engine.model.default_model import default_model
from engine.placement import plan_table
from engine.placement.planning import plan_here
from tokenization import Tokenizer

CHOICES = "auto,q8_0,q4_0"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", default="200MiB", help="the CPU stage's memory budget (default: 200MiB)")
    ap.add_argument("--tokens", type=int, default=8000)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--copy-dir", default=None, help="where to keep the bf16 copy (default: a temporary folder)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        copy = bf16_copy(default_model(), Path(args.copy_dir or tmp) / "bf16")
        run(copy, args)


def run(copy: Path, args) -> None:
    cfg = ModelConfig.from_dir(copy)
    here = plan_here(copy, f"cpu={args.budget}", max_model_len=args.max_model_len, precision=CHOICES,
                     say=lambda line: print(line, flush=True))
    print(plan_table(here.plan))
    chosen = [f for s in here.plan.stages for f in s.formats]
    names = tuple(dict.fromkeys(CHOICES.split(",")))
    errors = layer_errors(copy, cfg, validate(copy, cfg), names)
    L = cfg.num_layers
    counts = {f: chosen.count(f) for f in names}
    print(f"layers per format: {', '.join(f'{n} {f}' for f, n in counts.items())}")

    def assign(order: list[int]) -> list[str]:
        """Layers in `order` take the fewest bits first."""
        out = ["auto"] * L
        k = 0
        for f in reversed(names):
            for i in order[k:k + counts[f]]:
                out[i] = f
            k += counts[f]
        return out

    sensitivity = sorted(range(L), key=lambda i: errors[names[-1]][i])
    rows = {"planner": chosen, "reversed": assign(sensitivity[::-1]), "by position": assign(list(range(L))),
            "all bf16": ["auto"] * L}
    tok = Tokenizer.from_dir(copy)
    chunks = windows(tok.encode(held_out_text(), add_special_tokens=False)[: args.tokens], args.window)
    print(f"perplexity over {sum(len(c) - 1 for c in chunks)} tokens of pydoc_data.topics, {torch.get_num_threads()} "
          "threads")
    results = {}
    for label, formats in rows.items():
        t = time.perf_counter()
        per_layer = {i: f for i, f in enumerate(formats) if f != "auto"}
        total, count, _ = strata_nll(copy, "auto", chunks, per_layer=per_layer)
        results[label] = ppl = math.exp(total / count)
        summed = sum(errors[f][i] for i, f in enumerate(formats))
        print(f"  {label:<12} perplexity {ppl:8.4f}   summed layer error {summed:.4f}   "
              f"({time.perf_counter() - t:4.1f} s)", flush=True)
    base = results["all bf16"]
    print("perplexity over all bf16: " + ", ".join(f"{k} {v / base:.4f}" for k, v in results.items() if k != "all bf16"))
    print(f"rerun: python -m bench.precision --budget {args.budget} --tokens {args.tokens} --window {args.window}")


if __name__ == "__main__":
    main()
