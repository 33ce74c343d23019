"""Offline decode throughput: the engine against transformers' generate and the matmul-only floor.

    python -m bench.offline [--batch-sizes 1 64] [--prompt-len 64] [--output-len 64] [--quantization q4_1 ...]

Writes a SmolLM2-135M-shaped bf16 checkpoint with random weights (once, under
~/.cache/strata), then, in this one run on this machine, measures output tokens/s of
the engine and of transformers' `generate` (in the checkpoint's bf16, as it loads by
default, and in fp32, the precision the engine computes in on a CPU without native bf16),
and the time of one decode step's matrix products alone at the same batch size. With --quantization, the engine
also runs the checkpoint quantized at load to each format named (`none`: as stored), each against the floor of its
own products (transformers runs the checkpoint as stored).
"""
from __future__ import annotations

import argparse
import random
import time

import torch

from batching import SamplingParams
from bench.checkpoints import smollm2_135m_shaped
from engine import LLM
from engine.model.config import ModelConfig
from engine.model.linear import QuantLinear, make_linear
from engine.model.quantized import pack, synthetic
from engine.model.weight_formats import FORMATS
from engine.placement.local_device import TORCH_DTYPES, resolve_dtypes


def prompts_for(batch: int, prompt_len: int, vocab: int) -> list[list[int]]:
    rng = random.Random(batch)
    return [[rng.randrange(2, vocab) for _ in range(prompt_len)] for _ in range(batch)]


def engine_run(model_dir, batch: int, prompt_len: int, output_len: int, threads: int | None,
               devices: str = "cpu", on_engine=None, quantization: str = "auto", **options) -> tuple[float, float]:
    """(output tokens/s end to end, mean decode step seconds). on_engine(engine), if given, is called after the run,
    before the engine closes; options: more EngineConfig fields."""
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    with LLM(model_dir, devices=devices, threads=threads, max_num_seqs=max(batch, 1),
             max_model_len=prompt_len + output_len + 16, max_num_batched_tokens=max(2048, batch * prompt_len),
             quantization=quantization, **options) as llm:
        cfg = ModelConfig.from_dir(model_dir)
        llm.generate(prompts_for(batch, prompt_len, cfg.vocab_size), SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
        prompts = prompts_for(batch, prompt_len + 1, cfg.vocab_size)
        eng = llm.engine
        for p in prompts:
            eng.add_request(p, params)
        t0 = time.perf_counter()
        step_times = []
        while eng.has_unfinished():
            s = time.perf_counter()
            eng.step()
            step_times.append(time.perf_counter() - s)
        elapsed = time.perf_counter() - t0
        if on_engine is not None:
            on_engine(eng)
    decode = step_times[2:] if len(step_times) > 4 else step_times
    return batch * output_len / elapsed, sum(decode) / len(decode)


def hf_run(model_dir, dtype: torch.dtype, batch: int, prompt_len: int, output_len: int,
           device: str = "cpu") -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    vocab = model.config.vocab_size
    warm = torch.tensor(prompts_for(batch, prompt_len, vocab), device=device)
    ids = torch.tensor(prompts_for(batch, prompt_len + 1, vocab), device=device)
    with torch.inference_mode():
        model.generate(warm, attention_mask=torch.ones_like(warm), max_new_tokens=4, do_sample=False, pad_token_id=0)
        _sync(device)
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_len, min_new_tokens=output_len,
                       do_sample=False, pad_token_id=0)
        _sync(device)
        elapsed = time.perf_counter() - t0
    del model
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return batch * output_len / elapsed


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def matmul_floor(cfg: ModelConfig, compute: torch.dtype, weights: torch.dtype, batch: int, repeats: int = 5,
                 fmt: str | None = None) -> float:
    """Seconds for one decode step's matrix products alone: every projection of every layer and the LM head,
    each layer with its own weights (so memory traffic is real), multiplied as the engine multiplies them; fmt: a
    quantized format every product runs at."""
    h, q, kv, inter = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
    shapes = [(q + 2 * kv, h), (h, q), (2 * inter, h), (h, inter)] * cfg.num_layers + [(cfg.vocab_size, h)]

    def product(shape):
        if fmt is not None:
            return QuantLinear(pack(synthetic(FORMATS[fmt], *shape)), None, compute)
        return make_linear(torch.randn(shape).to(weights), None, compute, {}, wide_copy=True)

    products = [(product(s), s[1]) for s in shapes]
    x = {n: torch.randn(batch, n, dtype=compute) for n in (h, q, inter)}

    def step():
        for product, in_features in products:
            product(x[in_features])

    with torch.inference_mode():
        step()
        t0 = time.perf_counter()
        for _ in range(repeats):
            step()
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--quantization", nargs="+", default=[], help="formats to quantize the checkpoint to at load, "
                    "each run beside it as stored")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = smollm2_135m_shaped("bfloat16")
    cfg = ModelConfig.from_dir(model_dir)
    compute, weights = resolve_dtypes("auto", cfg.checkpoint_dtype, torch.device("cpu"))
    print(f"checkpoint: {model_dir} ({cfg.checkpoint_dtype}); engine: {compute} activations, {weights} weights; threads {args.threads}")
    print(f"workload: {args.prompt_len} prompt tokens, {args.output_len} output tokens per sequence\n")
    print(f"{'batch':>5} | {'weights':>8} | {'engine tok/s':>12} | {'HF bf16 tok/s':>13} | {'x HF bf16':>9} | "
          f"{'HF fp32 tok/s':>13} | {'x HF fp32':>9} | {'step ms':>8} | {'matmul floor ms':>15} | {'% of floor':>10}")
    for b in args.batch_sizes:
        hf_bf16 = hf_run(model_dir, torch.bfloat16, b, args.prompt_len, args.output_len)
        hf_fp32 = hf_run(model_dir, torch.float32, b, args.prompt_len, args.output_len)
        for fmt in ("auto", *args.quantization):
            eng_tps, step_s = engine_run(model_dir, b, args.prompt_len, args.output_len, args.threads,
                                         quantization=fmt)
            quantized = fmt if fmt in FORMATS and FORMATS[fmt].quantized else None
            floor_s = matmul_floor(cfg, TORCH_DTYPES[compute], TORCH_DTYPES[weights], b, fmt=quantized)
            label = quantized or str(weights)
            print(f"{b:>5} | {label:>8} | {eng_tps:>12.1f} | {hf_bf16:>13.1f} | {eng_tps / hf_bf16:>8.2f}x | "
                  f"{hf_fp32:>13.1f} | {eng_tps / hf_fp32:>8.2f}x | {step_s * 1e3:>8.1f} | {floor_s * 1e3:>15.1f} | "
                  f"{100 * floor_s / step_s:>9.0f}%", flush=True)
    print("\nstep ms: the engine's mean decode step; matmul floor: that step's matrix products alone, same weights and "
          "batch.")
    quantization = f" --quantization {' '.join(args.quantization)}" if args.quantization else ""
    print(f"rerun: python -m bench.offline --batch-sizes {' '.join(map(str, args.batch_sizes))}{quantization}")


if __name__ == "__main__":
    main()
