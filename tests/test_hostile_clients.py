"""What a client may send and cost: every finding of an attacker's afternoon against `strata serve`, each as a test.

Bad numbers, lists and strings get 4xx OpenAI errors and cost no one else anything; tokenizing is off the
event loop and bounded before it starts; slow or greedy connections are cut; nothing a client sends is a 5xx.
"""
from __future__ import annotations

import json
import socket
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from http_calls import assert_openai_error, call, events, metrics_text, open_stream, wait_for_metrics
from server_process import running_server
from tiny_models import write_checkpoint

MODEL = "tiny-llama"
CMPL, CHAT = "/v1/completions", "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]
CONTEXT = 131072  # a long context lets a prompt of megabytes through the character cap, to be tokenized


@pytest.fixture(scope="module")
def long_dir(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("long"), "llama", max_position_embeddings=CONTEXT)


@pytest.fixture(scope="module")
def server(long_dir):
    with running_server(long_dir, "--num-kv-blocks", str(CONTEXT // 16), "--max-model-len", str(CONTEXT),
                        "--served-model-name", MODEL, "--max-queue", "64", "--api-key", "sk-hostile") as s:
        yield s


AUTH = {"Authorization": "Bearer sk-hostile"}


def request(server, path: str, body, headers: dict | None = None, timeout: float = 120):
    status, h, raw = call("POST", server.url + path, body, {**AUTH, **(headers or {})}, timeout=timeout)
    return status, h, json.loads(raw)


def healthy(server) -> None:
    status, _, raw = call("GET", server.url + "/health")
    assert status == 200, raw
    status, _, out = request(server, CMPL, {"model": MODEL, "prompt": "hi", "max_tokens": 2, "ignore_eos": True})
    assert status == 200 and out["usage"]["completion_tokens"] == 2, out


# ---- 1: numbers the engine cannot hold are refused at the gateway ----------------------------------------
OUT_OF_RANGE = [
    ("top_k", 2**63), ("top_k", 2**64), ("top_k", -2), ("n", 2**63), ("n", 17), ("seed", 2**64), ("seed", -(2**63) - 1),
    ("max_tokens", 2**63), ("max_tokens", 0), ("min_tokens", 2**63), ("min_tokens", -1), ("logprobs", 21),
    ("logprobs", 2**63), ("stop_token_ids", [2**63]), ("stop_token_ids", [-1]), ("stop_token_ids", [5000]),
    ("stop_token_ids", list(range(300))), ("logit_bias", {str(2**63): 1}), ("logit_bias", {"5": 2**70}),
    ("logit_bias", {"5": 101}), ("logit_bias", {"x": 1}), ("logit_bias", {"9" * 5000: 1}),
    ("prompt", [2**63]), ("prompt", [[1, 2], [2**64]]), ("prompt", [-1]), ("temperature", 1e308 * 10),
]


@pytest.mark.parametrize("field,value", OUT_OF_RANGE, ids=[f"{f}={str(v)[:20]}" for f, v in OUT_OF_RANGE])
def test_numbers_out_of_range_get_a_400_naming_the_field(server, field, value):
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2, field: value}
    raw = json.dumps(body).replace("Infinity", "1e999").encode()  # JSON has no infinity; a huge literal is one
    status, _, out = request(server, CMPL, raw, {"Content-Type": "application/json"})
    assert_openai_error(status, out, 400, param=field)


def test_the_top_k_that_killed_the_server(server):
    status, _, out = request(server, CMPL, {"model": MODEL, "prompt": "hi", "max_tokens": 4,
                                            "top_k": 9223372036854775808})
    assert_openai_error(status, out, 400, "top_k")
    healthy(server)


def test_a_request_the_sampler_cannot_take_fails_alone(llama_dir):
    """Past the gateway's checks (here: parameters changed after they were checked), a failure inside the last
    stage fails its own sequence only; the other sequences of its step, and the pipeline, carry on."""
    from batching import SamplingParams
    from engine import LLM

    with LLM(llama_dir, num_kv_blocks=64, max_model_len=256) as llm:
        good = SamplingParams(max_tokens=8, temperature=0.8, seed=3, ignore_eos=True)
        bad = SamplingParams(max_tokens=8, temperature=0.8, seed=4, ignore_eos=True)
        bad.top_k = 2**63  # overflows int64 where the sampler packs its parameters
        alone = llm.generate(["The quick brown fox"], good)[0]
        out = llm.generate(["The quick brown fox", "Pack my box"], [good, bad])
        assert out[0].text == alone.text and out[0].finish_reason == "length" and out[0].error is None
        assert out[1].finish_reason == "abort" and "sampling failed" in out[1].error and not out[1].token_ids
        again = llm.generate(["The quick brown fox"], good)[0]
        assert again.text == alone.text


# ---- 2: stop strings are bounded -----------------------------------------------------------------------
@pytest.mark.parametrize("stop", [["a", "b", "c", "d", "e"], "x" * 1025, ["ok", "y" * 2000]],
                         ids=["five-stops", "long-stop", "long-stop-in-list"])
def test_stop_strings_are_capped(server, stop):
    status, _, out = request(server, CMPL, {"model": MODEL, "prompt": "hi", "max_tokens": 2, "stop": stop})
    assert_openai_error(status, out, 400, "stop")


def test_four_stops_of_the_longest_length_are_served(server):
    stops = ["\u2603" * 1024, "zz" * 512, "q", "The"]
    status, _, out = request(server, CMPL, {"model": MODEL, "prompt": "hi", "max_tokens": 8, "stop": stops})
    assert status == 200, out


# ---- 3: tokenizing is bounded and off the event loop --------------------------------------------------
def test_text_that_cannot_fit_is_refused_before_it_is_tokenized(server):
    huge = "fox " * (CONTEXT * 5)  # more characters than the context's tokens can spell
    for path, body in [(CMPL, {"model": MODEL, "prompt": huge}),
                       (CMPL, {"model": MODEL, "prompt": ["hi", huge]}),
                       (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": huge}]}),
                       ("/tokenize", {"prompt": huge}),
                       ("/tokenize", {"messages": [{"role": "user", "content": huge}]})]:
        status, _, out = request(server, path, body)
        assert_openai_error(status, out, 400, code="context_length_exceeded", mention="characters")
    status, _, out = request(server, "/detokenize", {"tokens": [1] * (CONTEXT + 1)})
    assert_openai_error(status, out, 400, "tokens", "context_length_exceeded")


def test_health_answers_while_a_long_prompt_is_tokenized(server):
    text = "Sphinx of black quartz, judge my vow. " * 50_000  # 1.9 MB: under the cap, seconds to tokenize
    done = threading.Event()
    result = {}

    def tokenize():
        result["tokenize"] = request(server, "/tokenize", {"prompt": text})
        done.set()

    answered_during = 0
    worst = 0.0
    worker = threading.Thread(target=tokenize)
    worker.start()
    while not done.is_set():
        t0 = time.monotonic()
        status, _, _ = call("GET", server.url + "/health", timeout=60)
        if not done.is_set():
            answered_during += status == 200
            worst = max(worst, time.monotonic() - t0)
    worker.join()
    status, _, out = result["tokenize"]
    assert status == 200 and out["count"] > 100_000
    # Held on the event loop, /health would not answer at all until the tokenizer let go.
    assert answered_during >= 3, f"/health answered {answered_during} times while tokenizing (slowest {worst:.3f} s)"


# ---- 4: what a parser chokes on is a 400 in OpenAI's shape ---------------------------------------------
def test_deep_json_and_lone_surrogates_are_400s(server):
    deep = b'{"model": "m", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    for raw in (deep, b'{"model": "tiny-llama", "prompt": "a\\ud800"}',
                b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "\\udfff"}]}'):
        status, _, out = request(server, CMPL, raw, {"Content-Type": "application/json"})
        assert_openai_error(status, out, 400, code="invalid_json")
    status, _, out = request(server, "/tokenize", b'{"prompt": "x\\ud800y"}', {"Content-Type": "application/json"})
    assert_openai_error(status, out, 400, code="invalid_json", mention="surrogate")
    healthy(server)


def raw_exchange(server, data: bytes, timeout: float = 60) -> bytes:
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def split_response(raw: bytes) -> tuple[int, dict, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, json.loads(body)


def test_aiohttps_own_errors_carry_openai_bodies(server):
    status, headers, out = split_response(raw_exchange(server, b"NOT A REQUEST LINE\r\n\r\n"))
    assert_openai_error(status, out, 400)
    assert headers["content-type"].startswith("application/json")
    status, headers, raw = call("DELETE", server.url + CMPL, headers=AUTH)
    assert_openai_error(status, json.loads(raw), 405)
    assert headers["allow"] == "POST"
    status, headers, raw = call("POST", server.url + CMPL, b"{" + b" " * (9 * 2**20) + b"}",
                                {**AUTH, "Content-Type": "application/json"})
    assert_openai_error(status, json.loads(raw), 413)
    healthy(server)


# ---- 5: slow and greedy connections -------------------------------------------------------------------
@pytest.fixture(scope="module")
def strict(llama_dir):
    with running_server(llama_dir, "--num-kv-blocks", "64", "--max-model-len", "256", "--served-model-name", MODEL,
                        "--header-timeout", "1", "--body-timeout", "1", "--write-timeout", "1",
                        "--max-connections", "8") as s:
        yield s


def drip(port: int, first: bytes, byte: bytes, limit_s: float = 60) -> tuple[bytes, float]:
    """Send `first`, then one `byte` every 0.2 s until the server closes; returns what it said, and when."""
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=limit_s) as s:
        s.sendall(first)
        s.settimeout(0.2)
        out = b""
        while time.monotonic() - t0 < limit_s:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                try:
                    s.sendall(byte)
                except OSError:
                    break
                continue
            except OSError:
                break
            if not chunk:
                break
            out += chunk
    return out, time.monotonic() - t0


def test_a_dripping_header_is_cut_off(strict):
    out, took = drip(strict.port, b"GET /health HTTP/1.1\r\nHost: x\r\n", b"a")
    assert took < 60, "the connection was still open after a minute of dripping"
    status, _, body = split_response(out)
    assert_openai_error(status, body, 408, code="request_timeout")


def test_a_dripping_body_is_cut_off(strict):
    head = (f"POST {CMPL} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
            '{"model": "').encode()
    out, took = drip(strict.port, head, b"a")
    assert took < 60
    status, _, body = split_response(out)
    assert_openai_error(status, body, 408, code="request_timeout")


def test_connections_past_the_limit_are_refused_and_the_rest_still_served(strict):
    held = [socket.create_connection(("127.0.0.1", strict.port)) for _ in range(8)]
    try:
        refused = 0
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", strict.port), timeout=30) as s:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                out = b""
                while chunk := s.recv(65536):
                    out += chunk
            if out:
                status, _, body = split_response(out)
                assert_openai_error(status, body, 503, code="too_many_connections")
                refused += 1
        assert refused >= 1
    finally:
        for s in held:
            s.close()
    # the idle ones are cut by the head timeout, and their slots come back
    deadline = time.monotonic() + 60
    while True:
        try:
            if call("GET", strict.url + "/health", timeout=10)[0] == 200:
                break
        except OSError:
            pass
        assert time.monotonic() < deadline, "the server never took connections again"
        time.sleep(0.2)


def test_idle_kept_alive_connections_make_room_for_new_ones(strict):
    import http.client

    idle = []
    for _ in range(8):  # the limit, each having finished a request and kept alive
        conn = http.client.HTTPConnection("127.0.0.1", strict.port, timeout=30)
        conn.request("GET", "/health")
        assert conn.getresponse().read()
        idle.append(conn)
    try:
        assert call("GET", strict.url + "/health")[0] == 200  # one of the idle ones was closed for it
    finally:
        for conn in idle:
            conn.close()


def test_a_client_that_stops_reading_is_dropped(strict):
    """Pipelined requests whose answers are never read fill the socket's buffers; the server drops the
    connection once its client has taken nothing for --write-timeout, rather than holding it forever."""
    s = socket.create_connection(("127.0.0.1", strict.port), timeout=30)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        s.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n" * 400)  # ~10 MB of answers
        s.setblocking(False)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            time.sleep(0.5)
            try:
                s.send(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            except BlockingIOError:
                continue
            except OSError:  # reset: the server dropped it
                break
        else:
            raise AssertionError("a client that read nothing kept its connection for a minute")
    finally:
        s.close()
    assert call("GET", strict.url + "/health")[0] == 200


def test_a_body_announced_over_the_limit_is_refused_before_it_is_sent(server):
    head = (f"POST {CMPL} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-hostile\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as s:
        s.sendall(head)  # and no body at all: the answer must not wait for it
        out = b""
        while b"\r\n\r\n" not in out or not out.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
    status, _, body = split_response(out)
    assert_openai_error(status, body, 413, code="request_too_large")


def test_header_bytes_that_are_not_utf8_are_a_401(server):
    for headers in ({"Authorization": "Bearer \udcff\udcfe".encode("utf-8", "surrogateescape")},
                    {"Cookie": b"strata_dashboard=\xff\xfe"}):
        lines = b"".join(k.encode() + b": " + (v if isinstance(v, bytes) else v.encode()) + b"\r\n"
                         for k, v in headers.items())
        for path in (b"/v1/models", b"/dashboard"):
            status, _, body = split_response(raw_exchange(server, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n" + lines
                                                          + b"Connection: close\r\n\r\n"))
            assert_openai_error(status, body, 401, code="invalid_api_key")


def test_a_long_token_id_prompt_is_one_prompt(server):
    status, _, out = request(server, CMPL, {"model": MODEL, "prompt": [5] * 500, "max_tokens": 2, "n": 2})
    assert status == 200 and len(out["choices"]) == 2, out


# ---- a checkpoint without a tokenizer serves token ids and refuses text in words ---------------------------
def test_without_a_tokenizer_text_is_a_400_and_token_ids_are_served(tmp_path):
    d = write_checkpoint(tmp_path, "llama")
    (d / "tokenizer.json").unlink()
    with running_server(d, "--num-kv-blocks", "64", "--max-model-len", "256", "--served-model-name", MODEL) as srv:
        cases = [(CMPL, {"model": MODEL, "prompt": "hi"}), (CMPL, {"model": MODEL, "prompt": ["hi", "ho"]}),
                 (CMPL, {"model": MODEL, "prompt": [5, 6], "logprobs": 1, "stream": True}),
                 (CMPL, {"model": MODEL, "prompt": [5, 6], "echo": True}), (CHAT, {"model": MODEL, "messages": HI}),
                 ("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [5]})]
        for path, body in cases:
            status, _, raw = call("POST", srv.url + path, body)
            assert_openai_error(status, json.loads(raw), 400, code="no_tokenizer")
        status, _, raw = call("POST", srv.url + CMPL, {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 3,
                                                      "ignore_eos": True})
        out = json.loads(raw)
        assert status == 200 and out["usage"]["completion_tokens"] == 3, out


# ---- 7: a request the queue can never hold ---------------------------------------------------------------
def test_a_request_that_can_never_fit_is_a_400_not_a_429(server):
    for path, body in [(CMPL, {"model": MODEL, "prompt": ["hi"] * 65, "max_tokens": 1}),
                       (CMPL, {"model": MODEL, "prompt": ["hi"] * 5, "n": 16, "max_tokens": 1}),
                       (CMPL, {"model": MODEL, "prompt": ["hi"] * 2000, "max_tokens": 1})]:
        status, headers, out = request(server, path, body)
        assert_openai_error(status, out, 400, code="too_many_sequences", mention="64")
        assert "retry-after" not in headers
    status, _, out = request(server, CMPL, {"model": MODEL, "prompt": ["hi"] * 4, "n": 16, "max_tokens": 1})
    assert status == 200 and len(out["choices"]) == 64


# ---- 8: types are OpenAI's, and null is "not given" ------------------------------------------------------
LAX = [(CMPL, "max_tokens", "10"), (CMPL, "stream", "yes"), (CMPL, "echo", 0), (CMPL, "prompt", [True, False]),
       (CMPL, "temperature", "0.5"), (CMPL, "n", 1.0), (CMPL, "logprobs", True), (CHAT, "logprobs", 1),
       ("/detokenize", "tokens", [False])]


@pytest.mark.parametrize("path,field,value", LAX, ids=[f"{p.strip('/')}-{f}={v!r}" for p, f, v in LAX])
def test_values_of_the_wrong_type_are_not_coerced(server, path, field, value):
    body = {"model": MODEL, "messages": HI} if path == CHAT else {"model": MODEL, "prompt": "hi"}
    if path == "/detokenize":
        body = {}
    status, _, out = request(server, path, {**body, field: value})
    assert_openai_error(status, out, 400, param=field)


def test_null_means_not_given(server):
    nulls = dict.fromkeys(["n", "stream", "echo", "frequency_penalty", "presence_penalty", "repetition_penalty",
                           "temperature", "top_p", "top_k", "seed", "stop", "logit_bias", "stream_options", "user",
                           "min_tokens", "logprobs"])
    status, _, out = request(server, CMPL, {"model": MODEL, "prompt": "hi", "max_tokens": 2, **nulls})
    assert status == 200 and len(out["choices"]) == 1, out
    chat = {**nulls, "logprobs": None, "top_logprobs": None, "max_completion_tokens": None, "response_format": None}
    del chat["echo"]
    status, _, out = request(server, CHAT, {"model": MODEL, "messages": HI, "max_tokens": 2, **chat})
    assert status == 200 and out["choices"][0]["logprobs"] is None, out
    status, _, out = request(server, CMPL, {"model": None, "prompt": "hi"})
    assert_openai_error(status, out, 400, "model")


# ---- 9: disconnects count as aborts ------------------------------------------------------------------------
def test_a_client_that_leaves_is_counted_as_an_abort(server):
    def abort_count(text: str) -> float:
        return _labelled(text, "request_success_total", "abort")

    start = abort_count(metrics_text(server.url))
    conn, resp = open_stream(server.url + CMPL, {"model": MODEL, "prompt": "hello", "max_tokens": 2000,
                                                 "ignore_eos": True, "stream": True}, AUTH)
    json.loads(next(events(resp)))
    resp.close()
    conn.close()
    wait_for_metrics(server.url, lambda t: abort_count(t) == start + 1)


def _labelled(text: str, name: str, reason: str) -> float:
    for line in text.splitlines():
        if line.startswith(f"strata:{name}{{") and f'finished_reason="{reason}"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"strata:{name} has no finished_reason={reason!r}")


# ---- what would have caught them: fuzzing the documented API, and sampling parameters at their edges -----
@pytest.fixture(scope="module")
def api_schema(server):
    import schemathesis

    return schemathesis.openapi.from_url(server.url + "/openapi.json")


def test_no_documented_request_gets_a_5xx(server, api_schema):
    """Schemathesis draws requests from /openapi.json, valid ones and ones that break it, for every operation."""
    from schemathesis import GenerationMode

    for result in api_schema.get_all_operations():
        operation = result.ok()
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if operation.method.upper() == "POST" else [])
        for mode in modes:
            @settings(max_examples=25, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case):
                if isinstance(case.body, dict) and case.path in (CMPL, CHAT):
                    case.body["model"] = MODEL  # so that requests reach the engine rather than stopping at a 404
                    limits = ("max_tokens", "max_completion_tokens") if case.path == CHAT else ("max_tokens",)
                    for field in limits:  # short answers: the context is long
                        value = case.body.get(field)
                        case.body[field] = min(value, 16) if type(value) is int else 16
                response = case.call(headers=AUTH, timeout=120)
                assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
                if response.status_code >= 400:
                    assert set(response.json()) == {"error"}, response.text[:500]  # every error in OpenAI's shape

            check()
    assert call("GET", server.url + "/health")[0] == 200


EDGES = [0, 1, -1, 2**31, 2**31 - 1, 2**63, 2**64, -(2**63) - 1, 0.5, -0.0, 1e308, 1e-320, "NaN", "Infinity",
         "-Infinity", "x" * 10_000, "", None, True, [], {}]
FIELDS = ["max_tokens", "temperature", "top_p", "top_k", "min_p", "n", "seed", "presence_penalty",
          "frequency_penalty", "repetition_penalty", "min_tokens", "logprobs", "stop", "stop_token_ids", "logit_bias"]


def _literal(value) -> str:
    """A JSON literal, where NaN and infinities go in bare as a careless client would write them."""
    return value if value in ("NaN", "Infinity", "-Infinity") else json.dumps(value)


@settings(max_examples=80, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(fields=st.dictionaries(st.sampled_from(FIELDS), st.sampled_from(EDGES), min_size=1, max_size=4),
       chat=st.booleans(), stream=st.booleans())
def test_sampling_parameters_at_their_edges_get_a_200_or_a_4xx(server, fields, chat, stream):
    body = {"model": MODEL, "stream": stream}
    body.update({"messages": HI} if chat else {"prompt": "hi"})
    if chat and "logprobs" in fields:
        fields = {**fields, "top_logprobs": fields.pop("logprobs")}
    fields.setdefault("max_tokens", 4)
    parts = [f"{json.dumps(k)}: {_literal(v)}" for k, v in fields.items()]
    raw = ("{" + ", ".join([json.dumps(body)[1:-1], *parts]) + "}").encode()
    status, headers, payload = call("POST", server.url + (CHAT if chat else CMPL), raw,
                                    {**AUTH, "Content-Type": "application/json"}, timeout=120)
    assert status == 200 or 400 <= status < 500, (raw[:300], payload[:300])
    if status == 200 and stream:
        assert payload.rstrip().endswith(b"data: [DONE]"), payload[-300:]
        assert b'"error"' not in payload, payload[-300:]
    elif status != 200:
        err = json.loads(payload)["error"]
        assert err["type"] == "invalid_request_error" and err["message"], err
    assert call("GET", server.url + "/health")[0] == 200


# ---- a handler's own failure is a 500 in OpenAI's shape, with its traceback in the log ------------------
def test_an_unexpected_exception_is_a_json_500_and_logged(caplog):
    import asyncio

    import aiohttp
    from aiohttp import web

    from gateway.app import errors_and_auth
    from gateway.metrics import Metrics

    class State:
        api_key = None
        metrics = Metrics("m")

    async def broken(request):
        raise KeyError("a bug")

    async def main():
        app = web.Application(middlewares=[errors_and_auth])
        app["state"] = State()
        app.router.add_get("/broken", broken)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            async with aiohttp.ClientSession() as s:
                async with s.get(f"http://127.0.0.1:{site.port}/broken") as r:
                    return r.status, await r.json()
        finally:
            await runner.cleanup()

    with caplog.at_level("ERROR", logger="strata.gateway"):
        status, body = asyncio.run(main())
    assert_openai_error(status, body, 500, code="internal_error")
    assert "a bug" not in body["error"]["message"]  # the details stay in the log
    assert State.metrics.errors == {500: 1}  # counted: strata:request_errors_total{status="500"}
    assert any("KeyError" in (r.exc_text or "") or r.exc_info for r in caplog.records)


def test_a_flood_of_refused_connections_is_counted_back_to_zero():
    """Past the limit, up to MAX_LINGERING refused connections get their 503 and linger; more are dropped at once.
    Whatever the mix, the lingering count returns to zero once they are gone, so the flood guard never drifts."""
    import asyncio

    from aiohttp import web

    from gateway.connections import MAX_LINGERING, ConnectionGuard, GuardedRequestHandler
    from gateway.limits import ServerLimits

    class Transport(asyncio.Transport):
        def __init__(self):
            super().__init__()
            self.written, self.aborted = b"", False

        def write(self, data):
            self.written += data

        def can_write_eof(self):
            return True

        def write_eof(self):
            pass

        def abort(self):
            self.aborted = True

        def is_closing(self):
            return self.aborted

    class Busy:  # an admitted connection in the middle of a request: it cannot make room
        idle = False

    async def main():
        loop = asyncio.get_running_loop()
        guard = ConnectionGuard(ServerLimits(max_connections=1))
        guard.admitted.add(Busy())
        manager = web.Server(lambda request: None)
        handlers = [GuardedRequestHandler(manager, guard, loop=loop) for _ in range(MAX_LINGERING + 10)]
        transports = [Transport() for _ in handlers]
        for h, t in zip(handlers, transports):
            h.connection_made(t)
        answered = sum(b" 503 " in t.written for t in transports)
        dropped = sum(t.aborted and not t.written for t in transports)
        lingering = guard.lingering
        for h in handlers:
            h.connection_lost(None)
        return answered, dropped, lingering, guard.lingering

    answered, dropped, lingering, after = asyncio.run(main())
    assert (answered, dropped, lingering) == (MAX_LINGERING, 10, MAX_LINGERING)
    assert after == 0
