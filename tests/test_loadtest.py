"""The load-test harness against a real Strata server and against a deliberately faulty one."""
from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from aiohttp import web

from server_process import free_port, running_server, strata_command

MODEL = "tiny"


def metrics(url: str) -> dict[str, float]:
    """Each strata: series, summed over its label sets."""
    text = urllib.request.urlopen(url + "/metrics").read().decode()
    out: dict[str, float] = {}
    for m in re.finditer(r"^strata:(\w+)\{[^}]*\} (\S+)$", text, re.M):
        out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out


def bench(tmp_path: Path, *args: str) -> dict:
    """Run `strata bench` as users do; return its JSON result."""
    r = subprocess.run([*strata_command(), "bench", *args, "--result-dir", str(tmp_path), "--result-filename", "run",
                        "--disable-tqdm"], capture_output=True, text=True, timeout=300)
    assert r.returncode in (0, 1), r.stderr
    return json.loads((tmp_path / "run.json").read_text())


@pytest.fixture(scope="module")
def strata(llama_dir):
    with running_server(llama_dir, "--served-model-name", MODEL, "--max-model-len", "1024",
                        "--num-kv-blocks", "256") as s:
        yield s


def test_random_prompts_counts_and_tokens_match_what_the_server_reports(strata, tmp_path):
    before = metrics(strata.url)
    s = bench(tmp_path, "--base-url", strata.url, "--model", MODEL, "--endpoint", "/v1/completions",
              "--dataset-name", "random", "--random-input-len", "20", "--random-output-len", "8", "--num-prompts", "12",
              "--max-concurrency", "4", "--ignore-eos", "--goodput", "ttft:60000", "e2el:60000")
    after = metrics(strata.url)
    assert s["completed"] == 12 and s["failed"] == 0 and s["errors_by_kind"] == {}
    # --random-input-len counts tokens (the server's /tokenize counts them here): 20, and the BOS token it adds.
    assert all(abs(n - 21) <= 2 for n in s["input_lens"]), s["input_lens"]
    assert s["total_output_tokens"] == 12 * 8 == after["generation_tokens_total"] - before["generation_tokens_total"]
    assert s["total_input_tokens"] == after["prompt_tokens_total"] - before["prompt_tokens_total"]
    assert after["request_success_total"] - before["request_success_total"] == 12
    assert s["request_goodput"] == pytest.approx(s["request_throughput"])
    assert s["output_throughput"] == pytest.approx(s["total_output_tokens"] / s["duration"])
    for m in ("ttft", "tpot", "itl", "e2el"):
        assert 0 < s[f"median_{m}_ms"] <= s[f"p99_{m}_ms"]
    assert (tmp_path / "run-latency-cdf.png").stat().st_size > 10_000


def test_conversations_grow_their_history_and_counts_match(strata, tmp_path):
    before = metrics(strata.url)
    s = bench(tmp_path, "--base-url", strata.url + "/v1", "--model", MODEL, "--num-prompts", "9", "--turns", "3",
              "--user-len", "12", "--answer-len", "6", "--think-time", "0.05", "--system-prompt-len", "40",
              "--ignore-eos", "--request-rate", "20", "--num-warmups", "1")
    after = metrics(strata.url)
    assert s["completed"] == 9 and s["failed"] == 0
    assert s["total_output_tokens"] == 9 * 6
    # the warm-up request is sent but left out of the results
    assert after["request_success_total"] - before["request_success_total"] == 10
    assert after["generation_tokens_total"] - before["generation_tokens_total"] == s["total_output_tokens"] + 6
    # a session's later turns resend its history, so prompts grow turn by turn
    lens = s["input_lens"]
    assert max(lens) > min(lens) + 20


def test_conversations_that_outgrow_the_context_drop_their_oldest_exchanges(strata, tmp_path):
    """Long sessions against a 1024-token context: every turn is answered within it, and each is counted."""
    s = bench(tmp_path, "--base-url", strata.url, "--model", MODEL, "--num-prompts", "8", "--turns", "8",
              "--user-len", "60", "--answer-len", "16", "--think-time", "0", "--system-prompt-len", "20",
              "--max-concurrency", "2")
    assert s["max_model_len"] == 1024
    assert s["completed"] == 8 and s["failed"] == 0, s["errors_by_kind"]
    assert max(s["input_lens"]) + 16 <= 1024 and max(s["input_lens"]) > 400  # they did grow, and were kept within


# ---- a server that fails on purpose ----------------------------------------------------------------
BEHAVIOURS = ("ok", "drop", "500", "429", "malformed", "stall")


class FaultyServer:
    """Answers /v1/completions streams, misbehaving in turn: request i gets BEHAVIOURS[i % 6]."""

    def __init__(self) -> None:
        self.count = 0
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        behaviour = BEHAVIOURS[self.count % len(BEHAVIOURS)]
        self.count += 1
        await request.json()
        if behaviour in ("500", "429"):
            return web.json_response({"error": {"message": behaviour, "type": "x", "param": None, "code": None}},
                                     status=int(behaviour))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        chunk = {"id": "x", "object": "text_completion", "choices": [{"index": 0, "text": "tok", "finish_reason": None}]}
        await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        if behaviour == "drop":
            request.transport.close()  # the connection dies mid-stream
            return resp
        if behaviour == "malformed":
            await resp.write(b"data: {not json\n\n")
        if behaviour == "stall":
            await asyncio.sleep(3600)
        usage = {"id": "x", "object": "text_completion", "choices": [],
                 "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}
        await resp.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
        return resp

    def __enter__(self) -> FaultyServer:
        self.thread.start()
        app = web.Application()
        app.router.add_post("/v1/completions", self.handle)
        self.runner = web.AppRunner(app, shutdown_timeout=1.0, handler_cancellation=True)

        async def start():
            await self.runner.setup()
            await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

        asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)


def test_each_failure_is_counted_under_its_kind_and_the_run_ends_on_time(tmp_path):
    with FaultyServer() as server:
        start = time.monotonic()
        s = bench(tmp_path, "--base-url", server.url, "--model", MODEL, "--endpoint", "/v1/completions",
                  "--dataset-name", "random", "--random-input-len", "4", "--random-output-len", "4",
                  "--num-prompts", "12", "--max-concurrency", "6", "--request-timeout", "3")
        elapsed = time.monotonic() - start
    assert s["completed"] == 2 and s["failed"] == 10
    assert s["errors_by_kind"] == {"broken_stream": 2, "http_500": 2, "http_429": 2, "malformed_chunk": 2,
                                   "timeout": 2}
    assert s["error_rate"] == pytest.approx(10 / 12)
    assert s["error_rate_by_kind"]["timeout"] == pytest.approx(2 / 12)
    assert elapsed < 60  # the stalled streams were cut off by the request timeout


def test_a_duration_bound_run_against_a_stalling_server_stops_by_itself(tmp_path):
    with FaultyServer() as server:
        start = time.monotonic()
        s = bench(tmp_path, "--base-url", server.url, "--model", MODEL, "--endpoint", "/v1/completions",
                  "--dataset-name", "random", "--random-input-len", "4", "--random-output-len", "4",
                  "--duration", "2", "--request-rate", "10", "--request-timeout", "2")
        elapsed = time.monotonic() - start
    assert s["completed"] + s["failed"] >= 6
    assert set(s["errors_by_kind"]) <= {"broken_stream", "http_500", "http_429", "malformed_chunk", "timeout"}
    assert elapsed < 30


def test_ctrl_c_ends_the_run_with_what_it_measured_counting_what_was_in_flight(tmp_path):
    import signal

    with FaultyServer() as server:
        proc = subprocess.Popen([*strata_command(), "bench", "--base-url", server.url, "--model", MODEL, "--endpoint",
                                 "/v1/completions", "--dataset-name", "random", "--random-input-len", "4",
                                 "--random-output-len", "4", "--num-prompts", "12", "--max-concurrency", "6",
                                 "--request-timeout", "120", "--disable-tqdm", "--result-dir", str(tmp_path),
                                 "--result-filename", "run"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while server.count < 6 and time.monotonic() < deadline:  # the stalling request is among the first six
            time.sleep(0.1)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in out
    s = json.loads((tmp_path / "run.json").read_text())
    assert s["interrupted"] and s["errors_by_kind"].get("cut", 0) >= 1
    assert s["completed"] + s["failed"] == server.count  # every request sent is in the summary


def test_compare_runs_the_same_workload_on_both_servers_and_prints_ratios(strata, tmp_path):
    r = subprocess.run([*strata_command(), "bench", "--base-url", strata.url, "--model", MODEL, "--compare",
                        strata.url + "/v1", "--dataset-name", "random", "--random-input-len", "8",
                        "--random-output-len", "4", "--ignore-eos", "--num-prompts", "4", "--disable-tqdm",
                        "--result-dir", str(tmp_path), "--result-filename", "cmp"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"{strata.url} against {strata.url}/v1" in r.stdout
    ratios = [line for line in r.stdout.splitlines() if line.startswith("output_throughput")]
    assert len(ratios) == 1 and ratios[0].rstrip().endswith("x")
    runs = json.loads((tmp_path / "cmp.json").read_text())
    assert [run["completed"] for run in runs] == [4, 4]


def test_python_dash_m_loadtest_and_bad_flags(tmp_path):
    r = subprocess.run([sys.executable, "-m", "loadtest", "--base-url", "http://127.0.0.1:1", "--model", "m",
                        "--goodput", "latency:5"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--goodput takes KEY:MS" in r.stderr
