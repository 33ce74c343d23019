"""How a run is shown: a summary table, a JSON file, latency CDF plots and a sweep plot."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from loadtest.metrics import METRICS

LABELS = {"ttft": "Time to first token", "tpot": "Time per output token", "itl": "Inter-token latency",
          "e2el": "End-to-end latency"}


def table(s: dict, title: str, percentiles: list[float]) -> str:
    w = 50
    lines = [f" {title} ".center(w, "=")]

    def row(name: str, value) -> None:
        text = f"{value:.2f}" if isinstance(value, float) else str(value)
        lines.append(f"{name:<38}{text:>12}")

    row("Successful requests:", s["completed"])
    row("Failed requests:", s["failed"])
    for kind, n in sorted(s["errors_by_kind"].items()):
        row(f"  {kind}:", f"{n} ({100 * s['error_rate_by_kind'][kind]:.1f}%)")
    if s["max_concurrency"]:
        row("Maximum request concurrency:", s["max_concurrency"])
    row("Request rate configured (RPS):", s["request_rate"] if isinstance(s["request_rate"], str) else float(s["request_rate"]))
    row("Benchmark duration (s):", s["duration"])
    row("Total input tokens:", s["total_input_tokens"])
    row("Total generated tokens:", s["total_output_tokens"])
    row("Request throughput (req/s):", s["request_throughput"])
    if "request_goodput" in s:
        row("Request goodput (req/s):", s["request_goodput"])
    row("Output token throughput (tok/s):", s["output_throughput"])
    row("Total token throughput (tok/s):", s["total_token_throughput"])
    for m in METRICS:
        lines.append(f" {LABELS[m]} ".center(w, "-"))
        row(f"Mean {m.upper()} (ms):", s[f"mean_{m}_ms"])
        row(f"Median {m.upper()} (ms):", s[f"median_{m}_ms"])
        for p in percentiles:
            row(f"P{p:g} {m.upper()} (ms):", s[f"p{p:g}_{m}_ms"])
    lines.append("=" * w)
    return "\n".join(lines)


def compare_table(a: dict, b: dict, name_a: str, name_b: str, percentiles: list[float]) -> str:
    keys = ["request_throughput", "output_throughput", "total_token_throughput", "failed"]
    keys += [f"{stat}_{m}_ms" for m in METRICS for stat in ("mean", "median", *(f"p{p:g}" for p in percentiles))]
    width = max(len(k) for k in keys)
    lines = [f"{'metric':<{width}} | {name_a[:14]:>14} | {name_b[:14]:>14} | {'ratio':>7}"]
    for k in keys:
        va, vb = float(a[k]), float(b[k])
        ratio = f"{va / vb:.2f}x" if vb else "-"
        lines.append(f"{k:<{width}} | {va:>14.2f} | {vb:>14.2f} | {ratio:>7}")
    return "\n".join(lines)


def save_json(path: Path, runs: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(runs if len(runs) > 1 else runs[0], indent=1))


LOG_AXIS_TAIL = 10


def plot_cdfs(path: Path, runs: list[tuple[str, dict]]) -> None:
    """One panel per latency, one curve per run; on a log axis where a tail would flatten the rest (its p99 more than
    LOG_AXIS_TAIL times its median)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for ax, m in zip(axes, METRICS):
        tail = False
        for label, s in runs:
            values = {"ttft": s["ttfts"], "e2el": s["e2els"], "itl": [x for r in s["itls"] for x in r],
                      "tpot": _tpots(s)}[m]
            if not values:
                continue
            xs = np.sort(np.asarray(values, dtype=float) * 1000)
            ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs), label=label)
            median = float(np.median(xs))
            tail = tail or (median > 0 and float(np.percentile(xs, 99)) > LOG_AXIS_TAIL * median)
        ax.set_title(LABELS[m])
        if tail:
            ax.set_xscale("log")
        ax.set_xlabel("ms" + (" (log scale: a long tail)" if tail else ""))
        ax.set_ylabel("fraction of requests" if m != "itl" else "fraction of tokens")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _tpots(s: dict) -> list[float]:
    return [(e - t) / (n - 1) for t, e, n in zip(s["ttfts"], s["e2els"], s["output_lens"]) if t is not None and n > 1]


def plot_sweep(path: Path, label: str, runs: list[dict], percentiles: list[float]) -> None:
    """Output throughput against latency, one point per rate or concurrency of the sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    tput = [s["output_throughput"] for s in runs]
    p = max(percentiles) if percentiles else 99
    for ax, m in zip(axes, ("ttft", "e2el")):
        for stat, style in (("median", "o-"), (f"p{p:g}", "s--")):
            ax.plot(tput, [s[f"{stat}_{m}_ms"] for s in runs], style, label=f"{stat} {m.upper()}")
        for s, x in zip(runs, tput):
            ax.annotate(str(s["sweep_point"]), (x, s[f"median_{m}_ms"]), fontsize=7, textcoords="offset points",
                        xytext=(3, 3))
        ax.set_xlabel("output tokens/s")
        ax.set_ylabel("ms")
        ax.set_title(f"{LABELS[m]} against throughput ({label})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
