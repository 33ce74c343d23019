"""Pipelines of several stage processes: same tokens as one stage, workers on other "hosts", faults."""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from openai import AsyncOpenAI

from server_process import ServerProcess, free_port, running_server, strata_command
from tiny_models import write_checkpoint

MODEL = "tiny"
NUM_LAYERS = 6
IGNORE_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
def six_layers(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("six"), "llama", layers=NUM_LAYERS)


def prompts() -> list[list[int]]:
    # Different lengths, some sharing a prefix (prefix-cache hits), one longer than the step budget below.
    base = [(7 * i) % 500 + 3 for i in range(200)]
    return [base[:n] for n in (1, 5, 17, 33, 48, 64, 90, 130)] + [[(11 * i + j) % 500 + 3 for i in range(n)]
                                                                  for j, n in enumerate((3, 9, 21, 40, 70, 100, 150, 180))]


async def greedy_outputs(url: str) -> list[tuple[str, int]]:
    """Every prompt at once, greedy, through the OpenAI client: (text, completion tokens) per prompt."""
    async with AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120) as client:
        async def one(i: int, p: list[int]) -> tuple[str, int]:
            r = await client.completions.create(model=MODEL, prompt=p, max_tokens=12 + i % 5 * 4, temperature=0.0,
                                                extra_body=IGNORE_EOS)
            return r.choices[0].text, r.usage.completion_tokens

        return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts()))))


SERVER_FLAGS = ("--served-model-name", MODEL, "--max-model-len", "256", "--num-kv-blocks", "96",
                "--max-num-batched-tokens", "128", "--threads-per-stage", "1")


@pytest.fixture(scope="module")
def single_stage(six_layers):
    with running_server(six_layers, *SERVER_FLAGS) as s:
        return asyncio.run(greedy_outputs(s.url))


@pytest.mark.parametrize("devices,layers", [
    ("cpu,cpu", None),
    ("cpu,cpu", "5,1"),
    ("cpu,cpu,cpu", None),
    ("cpu,cpu,cpu", "1,4,1"),
])
def test_pipeline_output_equals_single_stage(six_layers, single_stage, devices, layers):
    flags = ["--devices", devices] + (["--layers", layers] if layers else [])
    with running_server(six_layers, *SERVER_FLAGS, *flags) as s:
        out = asyncio.run(greedy_outputs(s.url))
        startup = s.output()
        check_only_compute_preempts(s.proc.pid, devices.count(",") + 1)
    stages = devices.count(",") + 1
    assert f"{stages} stage(s)" in startup
    if layers:
        counts = [int(n) for n in layers.split(",")]
        bounds = [sum(counts[:i]) for i in range(stages + 1)]
        for a, b in zip(bounds, bounds[1:]):
            assert f"layers {a}-{b - 1}" in startup
    assert out == single_stage


async def sampled_outputs(url: str) -> list[tuple[str, str]]:
    """Every prompt at once, seeded sampling with many stop tokens, so that most requests stop early: each stop
    reaches the server a step after the stages have started the next one. (text, finish reason) per prompt."""
    async with AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120) as client:
        async def one(i: int, p: list[int]) -> tuple[str, str]:
            r = await client.completions.create(model=MODEL, prompt=p, max_tokens=24, temperature=1.0, seed=i,
                                                extra_body={"stop_token_ids": list(range(3, 80))})
            return r.choices[0].text, r.choices[0].finish_reason

        return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts()))))


def kv_usage(url: str) -> float:
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    return float(re.search(r"^strata:kv_cache_usage_perc\{[^}]*\} (\S+)$", text, re.M).group(1))


def test_stops_and_seeded_sampling_equal_single_stage_and_free_every_block(six_layers):
    outputs = []
    for flags in ((), ("--devices", "cpu,cpu")):
        with running_server(six_layers, *SERVER_FLAGS, *flags) as s:
            outputs.append(asyncio.run(sampled_outputs(s.url)))
            deadline = time.monotonic() + 10
            while kv_usage(s.url) != 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert kv_usage(s.url) == 0
    single, pipeline = outputs
    assert pipeline == single
    assert sum(reason == "stop" for _, reason in single) >= len(single) // 2


def test_workers_on_other_hosts_join_by_the_rendezvous_variables(six_layers, single_stage):
    """One local stage plus two `strata worker` processes started as another host would start them."""
    port = free_port()
    server = ServerProcess(six_layers, *SERVER_FLAGS, "--workers", "2", "--rendezvous", f"127.0.0.1:{port}")
    workers = []
    try:
        for rank in (2, 3):
            env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="4")
            workers.append(subprocess.Popen([*strata_command(), "worker", "--device", "cpu", "--threads", "1"], env=env,
                                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        server.wait_ready(120)
        assert "3 stage(s)" in server.output()
        assert asyncio.run(greedy_outputs(server.url)) == single_stage
        assert server.stop() == 0
        for w in workers:
            assert w.wait(30) == 0, w.stdout.read()
    finally:
        server.stop()
        server.cleanup()
        for w in workers:
            if w.poll() is None:
                w.kill()


def test_a_worker_of_another_release_is_refused_in_words_on_both_sides(six_layers):
    """A worker whose messages differ (here: one protocol version on) fails start-up clearly, not on a message."""
    port = free_port()
    server = ServerProcess(six_layers, *SERVER_FLAGS, "--workers", "1", "--rendezvous", f"127.0.0.1:{port}")
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="2", WORLD_SIZE="3")
    newer = ("import sys, engine.pipeline.messages as m, engine.pipeline.worker as w\n"
             "m.WIRE_VERSION = w.WIRE_VERSION = m.WIRE_VERSION + 1\n"
             "sys.exit(w.run_worker(w.worker_args(['--threads', '1'])))")
    try:
        worker = subprocess.run([sys.executable, "-c", newer], env=env, capture_output=True, text=True, timeout=120)
        assert worker.returncode == 2, worker.stderr
        assert "the server speaks pipeline protocol" in worker.stderr and "same Strata release" in worker.stderr
        assert server.proc.wait(60) != 0
        assert "rank 2 speaks pipeline protocol" in server.output()
    finally:
        server.stop()
        server.cleanup()


def test_worker_that_cannot_reach_the_rendezvous_fails_clearly_and_in_time():
    port = free_port()  # nobody listens there
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="1", WORLD_SIZE="2")
    start = time.monotonic()
    r = subprocess.run([*strata_command(), "worker", "--rendezvous-timeout", "3"], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2
    assert f"cannot join the pipeline at 127.0.0.1:{port} within 3s as rank 1 of 2" in r.stderr
    assert time.monotonic() - start < 30


def test_worker_without_rendezvous_variables_says_which_are_missing():
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    r = subprocess.run([*strata_command(), "worker"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE" in r.stderr


def test_a_plan_that_cannot_fit_is_refused_at_start_up_with_the_missing_amount(six_layers):
    server = ServerProcess(six_layers, *SERVER_FLAGS, "--devices", "cpu=500KiB,cpu=500KiB")
    try:
        code = server.proc.wait(120)
        assert code == 2, server.output()
        assert "short" in server.output()
    finally:
        server.stop()
        server.cleanup()


SCHED_OTHER, SCHED_BATCH = 0, 3


def thread_policies(pid: int) -> list[tuple[int, str, int]]:
    """(thread id, name, scheduling policy) of each thread of a process."""
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            stat = f.read()
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        out.append((int(tid), name, int(stat[stat.rindex(")") + 2 :].split()[38])))  # field 41: policy
    return out


def check_only_compute_preempts(server_pid: int, stages: int) -> None:
    """In the server and every stage, the threads that move messages run under SCHED_BATCH (their wake-ups do
    not preempt a stage's compute), and each stage's compute thread under the default policy."""
    stage_pids = child_pids(server_pid)
    assert len(stage_pids) == stages
    for pid in [server_pid, *stage_pids]:
        threads = thread_policies(pid)
        gloo = [p for _, name, p in threads if name.startswith(("gloo_tcp_loop", "pt_gloo_runloop"))]
        assert gloo and set(gloo) == {SCHED_BATCH}, (pid, threads)
        ours = [p for tid, name, p in threads if tid != pid and not name.startswith(("gloo", "pt_"))]
        assert SCHED_BATCH in ours, (pid, threads)  # the engine loop, or a stage's receivers
    for pid in stage_pids:
        assert dict((tid, p) for tid, _, p in thread_policies(pid))[pid] == SCHED_OTHER


def child_pids(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


async def stream_until_error(url: str, i: int, started: asyncio.Event, counter: list[int]) -> str:
    """Stream a long completion; return how it ended: 'error' (an SSE error event or a broken stream) or 'done'."""
    import aiohttp

    body = {"model": MODEL, "prompt": [5 + i, 6, 7], "max_tokens": 200, "stream": True, **IGNORE_EOS}
    try:
        async with aiohttp.ClientSession() as session, session.post(url + "/v1/completions", json=body) as resp:
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    return "done"
                if "error" in json.loads(data):
                    return "error"
                counter[0] += 1
                if counter[0] >= 16:
                    started.set()
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return "error"
    return "error"  # the stream ended without [DONE]


def signal_a_stage_mid_stream(server: ServerProcess, sig: int, streams: int,
                              timeout_s: float) -> tuple[list[int], list[str]]:
    """Stream `streams` long completions, send `sig` to stage 1 once tokens flow, and return the stage pids and how
    each stream ended."""
    server.wait_ready(120)
    stages = child_pids(server.proc.pid)
    assert len(stages) == 2

    async def run() -> list[str]:
        started, counter = asyncio.Event(), [0]
        tasks = [asyncio.create_task(stream_until_error(server.url, i, started, counter)) for i in range(streams)]
        await asyncio.wait_for(started.wait(), 60)
        os.kill(stages[1], sig)
        return await asyncio.wait_for(asyncio.gather(*tasks), timeout_s)

    return stages, asyncio.run(run())


def test_killing_a_stage_mid_stream_ends_every_request_with_an_error(six_layers):
    server = ServerProcess(six_layers, *SERVER_FLAGS, "--devices", "cpu,cpu")
    try:
        stages, endings = signal_a_stage_mid_stream(server, signal.SIGKILL, 6, 30)
        assert endings == ["error"] * 6
        # The server tells its supervisor: unhealthy, then a non-zero exit, with nothing left behind.
        assert server.proc.wait(30) == 1
        assert "engine failed" in server.output()
        assert not [p for p in stages if os.path.exists(f"/proc/{p}") and _alive(p)]
    finally:
        server.stop()
        server.cleanup()


def test_a_stage_that_hangs_mid_stream_fails_every_request_and_is_named(six_layers):
    """A stage that stops (SIGSTOP: alive, silent, as a hung host looks) is noticed once the step in flight outlives
    its bound: every request gets an OpenAI error, /health turns 503, and the server says which stage stalled."""
    server = ServerProcess(six_layers, *SERVER_FLAGS, "--devices", "cpu,cpu", "--stall-timeout", "3")
    try:
        stages, endings = signal_a_stage_mid_stream(server, signal.SIGSTOP, 4, 120)
        assert endings == ["error"] * 4
        assert server.proc.wait(60) == 1
        out = server.output()
        assert "returned no step" in out and f"pid {stages[1]}) is stopped" in out, out[-2000:]
    finally:
        server.stop()
        server.cleanup()  # kills the process group of a server that failed, the stopped stage with it


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def test_health_turns_unhealthy_while_the_dead_pipeline_drains(six_layers):
    server = ServerProcess(six_layers, *SERVER_FLAGS, "--devices", "cpu,cpu")
    try:
        server.wait_ready(120)
        os.kill(child_pids(server.proc.pid)[0], signal.SIGKILL)
        deadline = time.monotonic() + 30
        status = 200
        while time.monotonic() < deadline and server.proc.poll() is None:
            try:
                with urllib.request.urlopen(server.url + "/health", timeout=2) as r:
                    status = r.status
            except urllib.error.HTTPError as e:
                status = e.code
                break
            except OSError:
                break
            time.sleep(0.05)
        assert server.proc.wait(30) == 1
        assert status == 503
    finally:
        server.stop()
        server.cleanup()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
