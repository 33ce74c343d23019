"""GET /dashboard: a live page of the server's devices, stages, load and latencies.

A sampler on the event loop takes a snapshot each second: per device its memory and
utilisation (NVML on NVIDIA GPUs; the stage process's and the system's figures on the
CPU), the host's CPU use and load, per stage its busy fraction and measured step time
beside the planner's prediction (flagged where they are far apart), the request, error and
KV figures of /metrics with their rates, the prefix-cache hit rate, token throughput, and
TTFT, inter-token, end-to-end and queue-time percentiles over the last minute. The page
polls GET /dashboard/data and draws it; it needs nothing but this server.
"""
from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from importlib import resources

import numpy as np
from aiohttp import web

from telemetry.host_cpu import cpu_seconds


HISTORY = 300  # seconds of time series kept
WINDOW_S = 60.0  # latency percentiles cover this much
# A stage whose measured step is this many times the planner's prediction, or less than its inverse, is flagged (the
# device's figures or the plan are off: --reprobe, or strata plan, says more).
FAR_FROM_PLAN = 2.0
FAR_FROM_PLAN_MIN_S = 0.005  # steps shorter than this are mostly fixed per-step costs: not flagged
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class LatencyWindow:
    """(time, seconds) samples of the last minute."""

    def __init__(self) -> None:
        self.samples: deque[tuple[float, float]] = deque()

    def add(self, value: float, now: float | None = None) -> None:
        self.samples.append((now if now is not None else time.monotonic(), value))

    def percentiles(self, now: float) -> dict[str, float | None]:
        while self.samples and self.samples[0][0] < now - WINDOW_S:
            self.samples.popleft()
        values = np.asarray([v for _, v in self.samples]) * 1000
        if not values.size:
            return {"p50": None, "p90": None, "p99": None, "count": 0}
        p50, p90, p99 = np.percentile(values, [50, 90, 99])
        return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "count": int(values.size)}


class Dashboard:
    def __init__(self, state) -> None:
        self.state = state
        self.ttft = LatencyWindow()
        self.itl = LatencyWindow()
        self.e2e = LatencyWindow()
        self.queue = LatencyWindow()
        self.series: deque[dict] = deque(maxlen=HISTORY)
        self.snapshot: dict = {}
        self._prev: dict | None = None
        self._task: asyncio.Task | None = None

    # ---- sampling -------------------------------------------------------------------------
    async def start(self, app: web.Application) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self, app: web.Application) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        while True:
            try:
                self.sample()
            except Exception as e:  # a figure that cannot be read must not stop the page
                self.snapshot = {**self.snapshot, "error": f"{type(e).__name__}: {e}"}
            await asyncio.sleep(1.0)

    def sample(self) -> None:
        now = time.monotonic()
        engine = self.state.engine
        info, load = engine.info, engine.stats.stages
        m = self.state.metrics
        cur = {
            "t": now, "tokens": m.generation_tokens, "prompt_tokens": m.prompt_tokens,
            "busy": [s.busy_s for s in load], "steps": [s.steps for s in load], "seqs": [s.seqs for s in load],
            "cpu": [_process_cpu_seconds(st.pid) for st in info.stages],
            "experts": engine.stats.expert_tokens, "host": cpu_seconds(),
            "finished": sum(m.success.values()), "errors": sum(m.errors.values()), "rejected": m.rejected,
            "preemptions": m.num_preemptions, "prefix": (m.prefix_queries, m.prefix_hits),
        }
        prev = self._prev or cur
        dt = max(cur["t"] - prev["t"], 1e-9)

        def rate(key: str) -> float:
            return (cur[key] - prev[key]) / dt if self._prev else 0.0
        stages = []
        for k, st in enumerate(info.stages):
            d_steps = cur["steps"][k] - prev["steps"][k]
            d_busy = cur["busy"][k] - prev["busy"][k]
            batch = (cur["seqs"][k] - prev["seqs"][k]) / d_steps if d_steps else 0.0
            predicted = engine.predicted_step_s(k, round(batch)) if d_steps else None
            measured = d_busy / d_steps if d_steps else None
            off = (measured / predicted if measured and predicted and max(measured, predicted) >= FAR_FROM_PLAN_MIN_S
                   else None)
            stages.append({
                "far_from_plan": off is not None and not 1 / FAR_FROM_PLAN <= off <= FAR_FROM_PLAN,
                "stage": k, "device": st.device, "label": st.label, "host": st.host,
                "layers": f"{st.layers[0]}-{st.layers[1] - 1}", "busy": min(1.0, d_busy / dt),
                "tiers": _tiers(st),
                "measured_ms": 1000 * d_busy / d_steps if d_steps else None,
                "predicted_ms": 1000 * predicted if predicted is not None else None,
                "batch": batch,
            })
        devices = self._devices(info, prev["cpu"], cur["cpu"], dt)
        throughput = rate("tokens")
        queries, hits = (c - p for c, p in zip(cur["prefix"], prev["prefix"]))
        host = _host_load(prev["host"], cur["host"])
        e2e, queue = self.e2e.percentiles(now), self.queue.percentiles(now)
        point = {
            "time": time.time(), "running": m.num_running, "waiting": m.num_waiting,
            "kv_cache_usage": m.kv_cache_usage, "tokens_per_s": throughput, "prompt_tokens_per_s": rate("prompt_tokens"),
            "requests_per_s": rate("finished"), "errors_per_s": rate("errors"), "rejected_per_s": rate("rejected"),
            "preemptions_per_s": rate("preemptions"), "prefix_hit_rate": hits / queries if queries else None,
            "ttft_p50_ms": self.ttft.percentiles(now)["p50"], "itl_p50_ms": self.itl.percentiles(now)["p50"],
            "e2e_p50_ms": e2e["p50"], "queue_p50_ms": queue["p50"], "host_cpu": host["cpu_busy"],
            "busy": [s["busy"] for s in stages],
        }
        self.series.append(point)
        self.snapshot = {
            "model": self.state.served_name, "uptime_s": time.time() - self.state.started,
            "engine": "dead: " + self.state.engine.dead if self.state.engine.dead else "running",
            "requests": {"running": m.num_running, "waiting": m.num_waiting,
                         "finished": cur["finished"], "rejected": m.rejected, "errors": cur["errors"],
                         "per_s": point["requests_per_s"], "preemptions": m.num_preemptions},
            "kv_cache": {"usage": m.kv_cache_usage, "blocks": info.num_blocks, "block_size": info.block_size},
            "prefix_cache": {"queried_tokens": m.prefix_queries, "hit_tokens": m.prefix_hits,
                             "hit_rate": m.prefix_hits / m.prefix_queries if m.prefix_queries else None},
            "tokens": {"generated": m.generation_tokens, "prompt": m.prompt_tokens, "per_s": throughput,
                       "prompt_per_s": point["prompt_tokens_per_s"]},
            "host": host,
            "ttft_ms": self.ttft.percentiles(now), "itl_ms": self.itl.percentiles(now), "e2e_ms": e2e,
            "queue_ms": queue,
            "stages": stages, "devices": devices, "series": list(self.series),
            "plan": {"batch_size": info.plan_batch_size, "context_len": info.plan_context_len},
            "experts": _expert_load(prev["experts"], cur["experts"], dt),
        }
        self._prev = cur

    def _devices(self, info, prev_cpu: list[float | None], cur_cpu: list[float | None], dt: float) -> list[dict]:
        out = []
        mem_total, mem_avail = _host_memory()
        for k, st in enumerate(info.stages):
            d = {"stage": k, "device": st.device, "label": st.label, "kind": st.kind}
            if st.kind == "cuda":
                d.update(_nvml(st.device, st.host))
            else:
                rss = _rss_bytes(st.pid) if st.pid is not None else None
                busy = (None if cur_cpu[k] is None or prev_cpu[k] is None
                        else (cur_cpu[k] - prev_cpu[k]) / dt / max(st.threads or 1, 1))
                d.update({"memory_used": rss, "memory_total": mem_total, "system_memory_used": mem_total - mem_avail,
                          "utilization": None if busy is None else min(1.0, max(0.0, busy)),
                          "source": "process" if st.pid is not None else "remote"})
            out.append(d)
        return out

    # ---- routes ---------------------------------------------------------------------------
    async def page(self, request: web.Request) -> web.Response:
        html = resources.files("gateway").joinpath("dashboard.html").read_text()
        return web.Response(text=html, content_type="text/html", headers={"Referrer-Policy": "no-referrer"})

    async def data(self, request: web.Request) -> web.Response:
        if not self.snapshot:
            self.sample()
        return web.json_response(self.snapshot)


def _process_cpu_seconds(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime + stime
    except (OSError, IndexError, ValueError):
        return None


def _rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _host_memory() -> tuple[int, int]:
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":", 1)
            info[key] = int(value.split()[0]) * 1024
    return info["MemTotal"], info["MemAvailable"]


def nvml_device(name: str, visible: str | None) -> tuple[str, int | str]:
    """How NVML names the GPU this process calls `name` (cuda:N): ("index", i) or ("uuid", "GPU-..."/"MIG-...").
    CUDA_VISIBLE_DEVICES renumbers devices, and may list them by index or by UUID (a UUID's prefix is accepted by
    CUDA, not by NVML, which needs it whole)."""
    index = int(name.split(":")[1]) if ":" in name else 0
    if not visible:
        return "index", index
    entries = [e.strip() for e in visible.split(",")]
    if index >= len(entries):
        raise ValueError(f"{name} is not among CUDA_VISIBLE_DEVICES={visible!r}")
    entry = entries[index]
    return ("index", int(entry)) if entry.isdigit() else ("uuid", entry)


def _nvml(name: str, host: str) -> dict:
    """Memory and utilisation of a local NVIDIA GPU by NVML; on another host, or without NVML, unknown."""
    import socket

    if host != socket.gethostname():
        return {"memory_used": None, "memory_total": None, "utilization": None, "source": "remote"}
    try:
        import pynvml

        pynvml.nvmlInit()
        kind, which = nvml_device(name, os.environ.get("CUDA_VISIBLE_DEVICES"))
        if kind == "index":
            handle = pynvml.nvmlDeviceGetHandleByIndex(which)
        else:
            handle = pynvml.nvmlDeviceGetHandleByUUID(which)
        mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
        util = pynvml.nvmlDeviceGetUtilizationRates(handle)
        return {"memory_used": int(mem.used), "memory_total": int(mem.total), "utilization": util.gpu / 100,
                "source": "nvml"}
    except Exception:
        return {"memory_used": None, "memory_total": None, "utilization": None, "source": "unavailable"}


def _tiers(stage) -> str:
    """Where the stage's layers live: "22 in memory", or "3 in memory, 19 read from disk each step"."""
    total = stage.layers[1] - stage.layers[0]
    streamed = len(stage.streamed_layers)
    held = f"{total - streamed} in memory"
    return f"{held}, {streamed} {stage.streamed_from} each step" if streamed else held


def _expert_load(prev, cur, dt: float) -> dict | None:
    """A mixture of experts' load over the last interval: tokens per second routed to each expert of each layer that
    has experts, and each layer's imbalance (its busiest expert's tokens over the mean); None for a dense model."""
    if not len(cur):
        return None
    layers, rates, imbalance = [], [], []
    for layer, row in enumerate(cur.tolist()):
        if not any(row):
            continue  # a dense layer, or no tokens yet
        before = prev[layer].tolist() if len(prev) else (0,) * len(row)
        delta = [n - b for n, b in zip(row, before)]
        layers.append(layer)
        rates.append([d / dt for d in delta])
        mean = sum(delta) / len(delta)
        imbalance.append(max(delta) / mean if mean else None)
    return {"layers": layers, "tokens_per_s": rates, "imbalance": imbalance}


def _host_load(prev, cur) -> dict:
    """The host's CPU use since the last sample (all cores: 1 = every core busy), its load average and cores: what
    explains a CPU stage that is busy while its own process is not."""
    busy = None
    if prev is not None and cur is not None and cur[1] > prev[1]:
        busy = min(1.0, max(0.0, (cur[0] - prev[0]) / (cur[1] - prev[1])))
    try:
        load1 = os.getloadavg()[0]
    except OSError:
        load1 = None
    return {"cpu_busy": busy, "load1": load1, "cores": os.cpu_count()}
