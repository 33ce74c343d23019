"""Raw HTTP for end-to-end tests: one request per fresh connection, SSE events, OpenAI error bodies, /metrics."""
from __future__ import annotations

import http.client
import json
import re
import time
import urllib.parse

JSON_HEADERS = {"Content-Type": "application/json"}


def call(method: str, url: str, body=None, headers: dict | None = None, timeout: float = 60):
    """One request on a fresh connection: (status, lower-cased headers, body bytes)."""
    u = urllib.parse.urlsplit(url)
    headers = dict(headers or {})
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
        headers = {**JSON_HEADERS, **headers}
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.request(method, u.path + (f"?{u.query}" if u.query else ""), body=body, headers=headers)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def post(url: str, body, headers: dict | None = None):
    status, h, raw = call("POST", url, body, headers)
    return status, h, json.loads(raw)


def open_stream(url: str, body: dict, headers: dict | None = None):
    """POST a streaming request and return (connection, response) once the headers are in."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.request("POST", u.path, body=json.dumps(body).encode(), headers={**JSON_HEADERS, **(headers or {})})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    assert resp.getheader("Content-Type").startswith("text/event-stream")
    return conn, resp


def events(resp):
    """The payloads of `data: ...` events as they arrive."""
    while True:
        line = resp.readline()
        if not line:
            return
        if line == b"\n":
            continue
        assert line.startswith(b"data: ") and line.endswith(b"\n"), line
        yield line[len(b"data: "):-1].decode("utf-8")


def assert_openai_error(status: int, body, expected_status: int, param=None, code=None, mention: str | None = None):
    assert status == expected_status, body
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    if mention is not None:
        assert mention.lower() in err["message"].lower(), err


def metrics_text(url: str) -> str:
    status, headers, raw = call("GET", url + "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    return raw.decode()


def metric(text: str, name: str) -> float:
    m = re.search(rf"^strata:{re.escape(name)}\{{[^}}]*\}} (\S+)$", text, re.M)
    assert m, f"strata:{name} missing from /metrics"
    return float(m.group(1))


def wait_for_metrics(url: str, cond, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = metrics_text(url)
        if cond(text):
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"/metrics did not reach the expected state within {timeout}s:\n{text}")
        time.sleep(0.05)


def idle(text: str) -> bool:
    return (metric(text, "num_requests_running") == 0 and metric(text, "num_requests_waiting") == 0
            and metric(text, "kv_cache_usage_perc") == 0)


PROMPTS = [[(7 * i) % 500 + 3 for i in range(n)] for n in (1, 5, 17, 33, 64, 90)]


async def greedy_texts(url: str, model: str, prompts: list[list[int]] = PROMPTS, max_tokens: int = 10) -> list[str]:
    """Every prompt at once through the OpenAI client, greedy, ignoring EOS: the texts, in order."""
    import asyncio

    from openai import AsyncOpenAI

    async with AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120) as client:
        async def one(p):
            r = await client.completions.create(model=model, prompt=p, max_tokens=max_tokens, temperature=0.0,
                                                extra_body={"ignore_eos": True})
            return r.choices[0].text

        return list(await asyncio.gather(*(one(p) for p in prompts)))
