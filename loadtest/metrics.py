"""From per-request results to the figures `vllm bench serve` reports, under its field names."""
from __future__ import annotations

from collections import Counter

import numpy as np

from loadtest.client import RequestResult
from loadtest.runner import LoadResult

METRICS = ("ttft", "tpot", "itl", "e2el")
SLO_KEYS = {"ttft", "tpot", "e2el"}


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """['ttft:200', 'tpot:50'] -> {'ttft': 0.2, 'tpot': 0.05} (milliseconds in, seconds out)."""
    slos = {}
    for item in items or []:
        key, _, ms = item.partition(":")
        if key not in SLO_KEYS or not ms:
            raise ValueError(f"--goodput takes KEY:MS with KEY one of {', '.join(sorted(SLO_KEYS))}, got {item!r}")
        slos[key] = float(ms) / 1000
    return slos


def meets(r: RequestResult, slos: dict[str, float]) -> bool:
    values = {"ttft": r.ttft, "tpot": r.tpot or 0.0, "e2el": r.latency}
    return r.ok and all(values[k] is not None and values[k] <= v for k, v in slos.items())


def summarize(run: LoadResult, slos: dict[str, float], percentiles: list[float]) -> dict:
    ok = [r for r in run.results if r.ok]
    failed = [r for r in run.results if not r.ok]
    duration = run.duration_s
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    cfg = run.config
    summary: dict = {
        "duration": duration,
        "completed": len(ok),
        "failed": len(failed),
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_throughput": out_tokens / duration if duration else 0.0,
        "total_token_throughput": (in_tokens + out_tokens) / duration if duration else 0.0,
        "request_rate": cfg.request_rate if cfg.request_rate != float("inf") else "inf",
        "burstiness": cfg.burstiness,
        "max_concurrency": cfg.max_concurrency,
        "error_rate": len(failed) / len(run.results) if run.results else 0.0,
        "errors_by_kind": dict(Counter(r.error for r in failed)),
    }
    summary["error_rate_by_kind"] = {k: n / len(run.results) for k, n in summary["errors_by_kind"].items()}
    if slos:
        good = sum(1 for r in ok if meets(r, slos))
        summary["request_goodput"] = good / duration if duration else 0.0
        summary["goodput_slos_ms"] = {k: v * 1000 for k, v in slos.items()}
    samples = {
        "ttft": [r.ttft for r in ok if r.ttft is not None],
        "tpot": [t for r in ok if (t := r.tpot) is not None],
        "itl": [x for r in ok for x in r.itls],
        "e2el": [r.latency for r in ok],
    }
    for name, values in samples.items():
        arr = np.asarray(values, dtype=float) * 1000 if values else np.zeros(0)
        summary[f"mean_{name}_ms"] = float(arr.mean()) if arr.size else 0.0
        summary[f"median_{name}_ms"] = float(np.median(arr)) if arr.size else 0.0
        summary[f"std_{name}_ms"] = float(arr.std()) if arr.size else 0.0
        for p in percentiles:
            summary[f"p{p:g}_{name}_ms"] = float(np.percentile(arr, p)) if arr.size else 0.0
    summary["input_lens"] = [r.prompt_tokens for r in ok]
    summary["output_lens"] = [r.output_tokens for r in ok]
    summary["ttfts"] = [r.ttft for r in ok]
    summary["e2els"] = [r.latency for r in ok]
    summary["itls"] = [r.itls for r in ok]
    summary["errors"] = [f"{r.error}: {r.detail}" for r in failed]
    return summary
