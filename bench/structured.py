"""What structured output costs: decode throughput with every sequence under a JSON schema, against none.

    python -m bench.structured [--seqs 32] [--output-len 128] [--devices cpu] [--repeats 5]

On the trained default model (SmolLM2-135M-Instruct, GGUF), in this one run on this machine: `--seqs` chat
prompts sampled at temperature 1, each decoding exactly `--output-len` tokens, first free (ignore_eos), then with
every row under a JSON schema whose shortest valid answer is longer than that (so neither run ends early and both
decode the same number of tokens). The two take turns for `--repeats` rounds; prints output tokens/s of the decode
steps (prefill excluded) of each, their median, and the median of the rounds' paired ratios (robust to a machine
whose speed drifts) as the slowdown.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from batching import SamplingParams
from engine import LLM, default_model
from engine.model.grammar import json_schema_grammar

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "city": {"type": "string", "maxLength": 40},
    "languages": {"type": "array", "items": {"type": "string", "maxLength": 20}, "minItems": 1, "maxItems": 3},
}, "required": ["name", "age", "city", "languages"], "additionalProperties": False}
# Twelve people: more tokens than --output-len, so every row decodes exactly that many.
SCHEMA = {"type": "object", "properties": {"people": {"type": "array", "items": PERSON, "minItems": 12,
                                                      "maxItems": 12}},
          "required": ["people"], "additionalProperties": False}
TOPICS = ["scientists", "painters", "athletes", "chefs", "pilots", "writers", "engineers", "musicians"]


def decode_rate(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> float:
    """Output tokens per second over the steps after every sequence's first token (decode only)."""
    eng = llm.engine
    for p, sp in zip(prompts, params):
        eng.add_request(p, sp)
    produced = 0
    started = None
    while eng.has_unfinished():
        deltas = eng.step()
        if started is None:
            if eng.scheduler.num_waiting == 0 and all(s.output_token_ids for s in eng.scheduler.running):
                started = time.perf_counter()
            continue
        produced += sum(len(d.token_ids) for d in deltas)
    return produced / (time.perf_counter() - started)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqs", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--devices", default="cpu")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    grammar = json_schema_grammar(SCHEMA)
    with LLM(str(default_model()), devices=args.devices, threads=args.threads, max_num_seqs=args.seqs,
             max_model_len=512) as llm:
        tok = llm.engine.tokenizer
        prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": (
            f"List twelve famous {TOPICS[i % len(TOPICS)]} as JSON, with name, age, city and languages.")}]),
            add_special_tokens=False) for i in range(args.seqs)]
        free = [SamplingParams(max_tokens=args.output_len, temperature=1.0, seed=i, ignore_eos=True)
                for i in range(args.seqs)]
        constrained = [SamplingParams(max_tokens=args.output_len, temperature=1.0, seed=i, grammar=grammar)
                       for i in range(args.seqs)]
        decode_rate(llm, prompts[:4], constrained[:4])  # warm: kernels, the grammar's first compile
        rounds = []
        for _ in range(args.repeats):
            rounds.append((decode_rate(llm, prompts, free), decode_rate(llm, prompts, constrained)))
    ratio = statistics.median(c / f for f, c in rounds)
    print(f"decode at {args.seqs} sequences, {args.output_len} tokens each, devices {args.devices}, "
          f"{args.threads} threads, {args.repeats} rounds:")
    print(f"  free:               {statistics.median(f for f, _ in rounds):8.1f} tokens/s (median)")
    print(f"  every row a schema: {statistics.median(c for _, c in rounds):8.1f} tokens/s (median)")
    print(f"  rounds' ratios: {' '.join(f'{c / f:.3f}' for f, c in rounds)}")
    print(f"  median ratio {ratio:.3f} (structured / free): {100 * (1 - ratio):.1f}% slower")
    print(f"rerun: python -m bench.structured --seqs {args.seqs} --output-len {args.output_len} "
          f"--devices {args.devices} --repeats {args.repeats}")


if __name__ == "__main__":
    main()
