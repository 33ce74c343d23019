"""`strata bench` / `python -m loadtest`: load-test any OpenAI-compatible server.

Flags that mean what they mean in `vllm bench serve` carry its names. Examples:

    strata bench --base-url http://localhost:8000 --model m --num-prompts 200 --max-concurrency 16
    strata bench --base-url http://localhost:8000 --model m --dataset-name random --random-input-len 512 \\
        --request-rate 2,4,8 --goodput ttft:500 tpot:100 --result-dir results/
    strata bench --base-url http://a:8000 --model m --compare http://b:8000 --duration 60
"""
from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import sys
import time
from pathlib import Path

from loadtest import report
from loadtest.client import Target
from loadtest.metrics import parse_goodput, summarize
from loadtest.runner import LoadConfig, LoadResult, run_load
from loadtest.tokens import served_context, server_root, token_counter
from loadtest.workloads import Length, conversations, from_jsonl, random_prompts


def add_arguments(ap: argparse.ArgumentParser) -> None:
    t = ap.add_argument_group("target")
    t.add_argument("--base-url", required=True, help="the server, e.g. http://localhost:8000 (with or without /v1)")
    t.add_argument("--model", required=True, help="the model name the server expects")
    t.add_argument("--endpoint", default="/v1/chat/completions", choices=["/v1/chat/completions", "/v1/completions"])
    t.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="bearer token (default: OPENAI_API_KEY)")
    t.add_argument("--no-stream", action="store_true", help="ask for whole responses (TTFT is then the full latency)")
    t.add_argument("--ignore-eos", action="store_true", help="ask the server to generate max_tokens every time")
    t.add_argument("--request-timeout", type=float, default=300.0, help="seconds before a request counts as timed out")
    t.add_argument("--tokenizer", default=None,
                   help="a tokenizer.json (or the folder holding it) to count prompt tokens with (default: the "
                        "server's /tokenize; without either, --random-input-len counts words)")
    w = ap.add_argument_group("workload")
    w.add_argument("--dataset-name", default="conversation", choices=["conversation", "random", "jsonl"])
    w.add_argument("--dataset-path", help="the JSONL file for --dataset-name jsonl: lines of {\"prompt\": ...}, "
                   "{\"messages\": [...]} or {\"turns\": [...], \"system\": ...}, each with an optional max_tokens")
    w.add_argument("--random-input-len", type=int, default=256, help="prompt tokens (see --tokenizer)")
    w.add_argument("--random-output-len", type=int, default=128, help="max_tokens of each answer")
    w.add_argument("--random-range-ratio", type=float, default=0.0, help="lengths drawn uniformly within +-ratio")
    w.add_argument("--system-prompt-len", type=int, default=200, help="words of the system prompt all sessions share")
    w.add_argument("--turns", default="4:0.5", help="turns per session: N, N:RATIO or lognormal:MEAN:SIGMA")
    w.add_argument("--user-len", default="lognormal:60:0.6", help="words per user message (same forms)")
    w.add_argument("--answer-len", default="lognormal:120:0.5", help="max_tokens per answer (same forms)")
    w.add_argument("--think-time", type=float, default=1.0, help="mean seconds between a session's turns")
    a = ap.add_argument_group("arrivals")
    a.add_argument("--num-prompts", type=int, default=None, help="requests to measure (default 100 without --duration)")
    a.add_argument("--duration", type=float, default=None, help="stop issuing after this many seconds")
    a.add_argument("--request-rate", default="inf",
                   help="sessions per second, Poisson (or gamma with --burstiness); a comma list sweeps the rates")
    a.add_argument("--burstiness", type=float, default=1.0, help="gamma shape: <1 burstier, >1 steadier, 1 Poisson")
    a.add_argument("--max-concurrency", default=None, help="requests in flight at most; a comma list sweeps them")
    a.add_argument("--num-warmups", type=int, default=0, help="requests sent first and left out of the results")
    a.add_argument("--seed", type=int, default=0)
    o = ap.add_argument_group("output")
    o.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS", help="SLOs, e.g. ttft:500 tpot:100 e2el:5000")
    o.add_argument("--metric-percentiles", default="50,90,99")
    o.add_argument("--result-dir", default=None, help="write result JSON and PNG plots here")
    o.add_argument("--result-filename", default=None)
    o.add_argument("--disable-tqdm", action="store_true")
    o.add_argument("--compare", default=None, metavar="URL", help="run the same workload against this server too")
    o.add_argument("--compare-model", default=None, help="its model name (default: --model)")


def build_sessions(args: argparse.Namespace) -> list:
    rng = random.Random(args.seed)
    n = args.num_prompts or 100
    if args.dataset_name == "random":
        counter = token_counter(args.tokenizer, args.base_url, args.api_key)
        if counter is None:
            print(f"{_prog()}: no --tokenizer and no /tokenize on the server: --random-input-len counts words",
                  file=sys.stderr)
        return random_prompts(n if args.duration is None else max(n, 1000), rng,
                              Length(args.random_input_len, args.random_range_ratio),
                              Length(args.random_output_len, args.random_range_ratio), counter)
    if args.dataset_name == "jsonl":
        if not args.dataset_path:
            raise ValueError("--dataset-name jsonl needs --dataset-path")
        return from_jsonl(args.dataset_path, args.random_output_len)
    turns = Length.parse(args.turns)
    # Enough sessions for the requests asked for (a session is several requests).
    count = max(1, -(-n // max(turns.mean, 1))) if args.duration is None else max(n, 1000)
    return conversations(count, rng, args.system_prompt_len, turns, Length.parse(args.user_len),
                         Length.parse(args.answer_len), args.think_time)


def _list(text: str | None, kind) -> list:
    if text is None:
        return [None]
    return [kind(x) for x in str(text).split(",")]


def _target(args, base_url: str, model: str) -> Target:
    return Target(server_root(base_url) + "/v1", model, args.endpoint[3:], args.api_key, not args.no_stream, args.ignore_eos,
                  args.request_timeout)


def run_one(args, target: Target, sessions: list, rate: float, concurrency: int | None, label: str,
            percentiles: list[float], slos: dict) -> dict:
    """One run's summary; its "interrupted" is true where Ctrl-C stopped it, the summary then of what it measured."""
    cfg = LoadConfig(rate, args.burstiness, concurrency, args.num_prompts if args.num_prompts or args.duration else 100,
                     args.duration, args.num_warmups, args.seed,
                     served_context(target.base_url, target.model, target.api_key))
    bar = _progress(cfg, label, args.disable_tqdm)
    result = LoadResult([], 0.0, cfg)
    try:
        asyncio.run(run_load(target, sessions, cfg, bar.update if bar else None, into=result))
    except KeyboardInterrupt:
        result.cut_short()
    finally:
        if bar:
            bar.close()
    summary = summarize(result, slos, percentiles)
    summary.update(base_url=target.base_url, model=target.model, endpoint=target.endpoint, label=label,
                   date=time.strftime("%Y-%m-%dT%H:%M:%S"), interrupted=result.interrupted,
                   max_model_len=cfg.max_model_len)
    title = f"Result: {label}" + (" (interrupted: what it measured until Ctrl-C)" if result.interrupted else "")
    print(report.table(summary, title, percentiles), flush=True)
    return summary


def _prog() -> str:
    return sys.argv[0].split("/")[-1]


class _Bar:
    def __init__(self, bar) -> None:
        self.bar = bar

    def update(self, r) -> None:
        self.bar.update(1)
        if not r.ok:
            self.bar.set_postfix_str(f"last error: {r.error}", refresh=False)

    def close(self) -> None:
        self.bar.close()


def _progress(cfg: LoadConfig, label: str, disabled: bool):
    if disabled:
        return None
    from tqdm import tqdm

    return _Bar(tqdm(total=cfg.num_prompts if cfg.duration_s is None else None, desc=label, unit="req",
                     file=sys.stderr, dynamic_ncols=True))


def main(argv: list[str] | None = None, prog: str = "strata bench") -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    add_arguments(ap)
    return run(ap.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    try:
        slos = parse_goodput(args.goodput)
        percentiles = [float(p) for p in args.metric_percentiles.split(",")]
        rates = [math.inf if r in ("inf", None) else float(r) for r in _list(args.request_rate, str)]
        concurrencies = _list(args.max_concurrency, int)
        sessions = build_sessions(args)
    except ValueError as e:
        print(f"{_prog()}: {e}", file=sys.stderr)
        return 2
    targets = [("main", _target(args, args.base_url, args.model))]
    if args.compare:
        targets.append(("compare", _target(args, args.compare, args.compare_model or args.model)))
    sweep = [(r, c) for r in rates for c in concurrencies]
    all_runs: dict[str, list[dict]] = {}
    interrupted = False
    for name, target in targets:
        runs = []
        for rate, conc in sweep:
            label = f"{target.base_url} rate={rate:g}" + (f" concurrency={conc}" if conc else "")
            s = run_one(args, target, sessions, rate, conc, label, percentiles, slos)
            s["sweep_point"] = f"{rate:g}/s" if len(rates) > 1 else (f"c={conc}" if conc else "")
            runs.append(s)
            interrupted = s["interrupted"]
            if interrupted:
                break
        all_runs[name] = runs
        if interrupted:
            break
    if args.compare and not interrupted:
        for a, b in zip(all_runs["main"], all_runs["compare"]):
            print(f"\n{args.base_url} against {args.compare} ({a['label'].split(' ', 1)[1]}):")
            print(report.compare_table(a, b, "main", "compare", percentiles))
    if args.result_dir:
        out = Path(args.result_dir)
        stem = args.result_filename or f"bench-{time.strftime('%Y%m%d-%H%M%S')}"
        report.save_json(out / f"{stem}.json", [s for runs in all_runs.values() for s in runs])
        report.plot_cdfs(out / f"{stem}-latency-cdf.png", [(s["label"], s) for runs in all_runs.values() for s in runs])
        if len(sweep) > 1:
            for name, runs in all_runs.items():
                report.plot_sweep(out / f"{stem}-sweep-{name}.png", name, runs, percentiles)
        print(f"\nresults: {out / stem}.json and plots beside it")
    if interrupted:
        return 130  # as a shell reports a command Ctrl-C ended
    failed = sum(s["completed"] == 0 for runs in all_runs.values() for s in runs)
    return 1 if failed else 0
