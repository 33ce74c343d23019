"""Pipeline throughput: P CPU stages of one thread each against one stage of one thread.

    python -m bench.pipeline [--stages 2] [--batch 64] [--prompt-len 64] [--output-len 64] [--rounds 6]

On the SmolLM2-135M-shaped checkpoint (bench.checkpoints), in this one run on this
machine: offline decode throughput of `--devices cpu,cpu --threads-per-stage 1` (the
planner's split) and of `--devices cpu --threads-per-stage 1`, their ratio, each stage's
busy fraction while decoding, and the planner's predicted compute time per micro-batch
step beside the measured one. With P stages each micro-batch holds batch / P sequences.
Both engines stay loaded and take turns; the headline is the median of each round's
ratio, which a machine whose speed drifts between rounds does not skew.

Two ceilings bound the speed-up, and each round measures both: how much of P cores the
machine gives at once (bench.core_scaling), and how the single stage's step time grows
with its rows. P stages pass a whole batch through in the time one stage takes for a
step of batch / P rows, at best, while one stage takes a step of all its rows; where a
step mostly streams weights from memory, whatever its rows, the ratio of the two steps,
and with it the speed-up, stays well below P.
"""
from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import random
import statistics
import time

import torch

from batching import SamplingParams
from bench.checkpoints import smollm2_135m_shaped
from bench.core_scaling import CoreScaling
from engine import LLM
from engine.model.linear import product_path
from engine.placement import ModelCost, kv_cache_dtype, predict_stage_seconds
from engine.placement.local_device import TORCH_DTYPES, resolve_dtypes
from engine.placement.probe import measure_rates


def prompts_for(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab) for _ in range(length)] for _ in range(n)]


def open_engine(model_dir, stages: int, batch: int, prompt_len: int, output_len: int) -> LLM:
    """An offline engine of `stages` CPU stages of one thread each, warmed up."""
    devices = ",".join(["cpu"] * stages)
    llm = LLM(model_dir, devices=devices, threads=1, max_num_seqs=batch, max_model_len=prompt_len + output_len + 16)
    vocab = llm.engine.model_config.vocab_size
    llm.generate(prompts_for(batch, prompt_len, vocab, 0), SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    return llm


def _engine_process(conn, model_dir, stages: int, batch: int, prompt_len: int, output_len: int) -> None:
    """One engine per process (it drives its own process group): measure a round per (seed, sequences) received,
    until None."""
    llm = open_engine(model_dir, stages, batch, prompt_len, output_len)
    try:
        conn.send("ready")
        while (job := conn.recv()) is not None:
            seed, sequences = job
            conn.send(measure(llm, sequences, prompt_len, output_len, seed))
    finally:
        llm.close()


def measure(llm: LLM, batch: int, prompt_len: int, output_len: int, seed: int) -> dict:
    """Decode throughput once every sequence has its first token, and per-stage figures over that phase."""
    eng = llm.engine
    stages = len(eng.plan.stages)
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    for p in prompts_for(batch, prompt_len + 1, eng.model_config.vocab_size, seed):
        eng.add_request(p, params)
    started: set[int] = set()
    decode_start = busy_start = steps_start = None
    decode_tokens = 0
    t0 = time.perf_counter()
    while eng.has_unfinished():
        deltas = eng.step()
        if decode_start is not None:
            decode_tokens += len(deltas)
        started.update(d.seq_id for d in deltas)
        if decode_start is None and len(started) == batch:
            decode_start = time.perf_counter()
            busy_start = [s.busy_s for s in eng.stage_stats]
            steps_start = [s.steps for s in eng.stage_stats]
    end = time.perf_counter()
    wall = end - decode_start
    busy = [s.busy_s - b for s, b in zip(eng.stage_stats, busy_start)]
    steps = [s.steps - n for s, n in zip(eng.stage_stats, steps_start)]
    cost = ModelCost.from_config(eng.model_config, eng.dtype, eng.weight_dtype, sampling="greedy")
    context = prompt_len + output_len // 2
    micro = -(-batch // stages)
    # The plan's device figures come from a probe cached on disk, taken whenever the machine ran at some other
    # speed; the cost model is judged on figures probed now, in this round.
    thin = eng.weight_dtype if eng.weight_dtype != eng.dtype else None
    rates = measure_rates(torch.device("cpu"), eng.dtype, 1, thin)
    predicted = [
        predict_stage_seconds(cost, dataclasses.replace(s.device, **rates), s.layers, k == 0, k == stages - 1, micro,
                              context)
        for k, s in enumerate(eng.plan.stages)
    ]
    return {
        "decode_tps": decode_tokens / wall,
        "e2e_tps": batch * output_len / (end - t0),
        "layers": [s.layers for s in eng.plan.stages],
        "busy": [b / wall for b in busy],
        "measured_s": [b / max(n, 1) for b, n in zip(busy, steps)],
        "predicted_s": predicted,
        "micro_batch": micro,
    }


def run_round(engines: dict, results: dict[int, list[dict]], stages: int, r: int, batch: int) -> None:
    conn = engines[stages][0]
    conn.send((1 + r, batch))
    result = conn.recv()
    results[stages].append(result)
    print(f"round {r}: {stages} stage(s): {result['decode_tps']:.1f} decode tok/s", flush=True)


def row_scaling(conn, batch: int, micro: int, r: int) -> float:
    """The single stage's step at `batch` rows over its step at `micro` rows, measured now: the most a pipeline of
    micro-batches of `micro` rows can gain on it."""
    conn.send((101 + r, micro))
    small = conn.recv()["measured_s"][0]
    conn.send((201 + r, batch))
    return conn.recv()["measured_s"][0] / small


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=6, help="rounds of one run of each setup")
    args = ap.parse_args()
    model_dir = smollm2_135m_shaped("bfloat16")
    print(f"checkpoint: {model_dir}; {args.batch} sequences, {args.prompt_len} prompt + {args.output_len} output tokens")
    cpu = torch.device("cpu")
    compute, weights = resolve_dtypes("auto", "bfloat16", cpu)
    products = {"amx-bf16": "the engine's AMX tile kernel, bf16 weights packed for it",
                "native-bf16": "oneDNN's native bf16, weights prepacked", "half-kernel": "the engine's half-precision kernel",
                "upcast": "torch's, on an fp32 copy of the weights", "plain": f"torch's {compute}"}
    print(f"{compute} activations, {weights} weights, {kv_cache_dtype(compute, weights)} KV cache; matrix products: "
          f"{products[product_path(cpu, TORCH_DTYPES[weights], TORCH_DTYPES[compute])]}")
    # Both engines stay loaded (an idle one costs nothing) and take turns, each round in the other order, so that
    # the two runs of a round see the same spell of a machine whose speed drifts; each round gives a paired ratio.
    ctx = mp.get_context("spawn")
    engines = {}
    for p in (1, args.stages):
        conn, child = ctx.Pipe()
        proc = ctx.Process(target=_engine_process, args=(child, model_dir, p, args.batch, args.prompt_len, args.output_len))
        proc.start()
        engines[p] = (conn, proc)
        conn.recv()  # loaded and warmed up: the next one loads while this one idles
    results: dict[int, list[dict]] = {p: [] for p in engines}
    ceilings: list[float] = []
    row_ceilings: list[float] = []
    micro = -(-args.batch // args.stages)
    scaling = None
    try:
        scaling = CoreScaling(args.stages)
        for r in range(args.rounds):
            first, second = (1, args.stages) if r % 2 == 0 else (args.stages, 1)
            run_round(engines, results, first, r, args.batch)
            ceilings.append(scaling.measure())  # between the two runs: the same spell as both
            row_ceilings.append(row_scaling(engines[1][0], args.batch, micro, r))
            run_round(engines, results, second, r, args.batch)
            ratio = results[args.stages][-1]["decode_tps"] / results[1][-1]["decode_tps"]
            print(f"round {r}: ratio {ratio:.2f}x; this machine's {args.stages}-core scaling {ceilings[-1]:.2f}x; "
                  f"one stage's {args.batch}-row step over its {micro}-row step {row_ceilings[-1]:.2f}x", flush=True)
    finally:
        for conn, proc in engines.values():
            conn.send(None)
            proc.join(60)
        if scaling is not None:
            scaling.close()
    paired = sorted(b["decode_tps"] / a["decode_tps"] for a, b in zip(results[1], results[args.stages]))
    runs = {p: max(rs, key=lambda x: x["decode_tps"]) for p, rs in results.items()}
    base, pipe = runs[1], runs[args.stages]
    print(f"\n{'stages':>6} | {'decode tok/s':>12} | {'end-to-end tok/s':>16} | layers")
    for p, r in runs.items():
        print(f"{p:>6} | {r['decode_tps']:>12.1f} | {r['e2e_tps']:>16.1f} | {r['layers']}")
    median = statistics.median(paired)
    ceiling = statistics.median(ceilings)
    print(f"\nspeed-up of {args.stages} stages over 1 (decode), median of the rounds' paired ratios: {median:.2f}x "
          f"(pipeline efficiency {100 * median / args.stages:.0f}%; rounds {min(paired):.2f}x-{max(paired):.2f}x)")
    print(f"best run against best run: {pipe['decode_tps'] / base['decode_tps']:.2f}x")
    print(f"this machine's {args.stages}-core scaling in the same rounds (bench.core_scaling), the ceiling of any "
          f"{args.stages}-stage speed-up: median {ceiling:.2f}x (rounds {min(ceilings):.2f}x-{max(ceilings):.2f}x); "
          f"speed-up against it: {100 * median / ceiling:.0f}%")
    rows = statistics.median(row_ceilings)
    print(f"the single stage's step at {args.batch} rows over its step at {micro} rows, in the same rounds: median "
          f"{rows:.2f}x (rounds {min(row_ceilings):.2f}x-{max(row_ceilings):.2f}x), the ceiling of a pipeline of "
          f"{micro}-row micro-batches; speed-up against it: {100 * median / rows:.0f}%")
    print(f"\nper stage while decoding (micro-batches of {pipe['micro_batch']} sequences):")
    print(f"{'stage':>5} | {'layers':>7} | {'busy':>5} | {'measured ms':>11} | {'predicted ms':>12} | {'pred/meas':>9}")
    for k, (lay, busy, m, p) in enumerate(zip(pipe["layers"], pipe["busy"], pipe["measured_s"], pipe["predicted_s"])):
        print(f"{k:>5} | {lay[0]:>3}-{lay[1] - 1:<3} | {100 * busy:>4.0f}% | {m * 1e3:>11.1f} | {p * 1e3:>12.1f} | {p / m:>8.2f}x")
    m, p = base["measured_s"][0], base["predicted_s"][0]
    print(f"{'single':>5} | {'all':>7} | {100 * base['busy'][0]:>4.0f}% | {m * 1e3:>11.1f} | {p * 1e3:>12.1f} | {p / m:>8.2f}x")
    print(f"\nrerun: python -m bench.pipeline --stages {args.stages} --batch {args.batch} --rounds {args.rounds}")


if __name__ == "__main__":
    main()
