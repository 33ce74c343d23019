"""One request against an OpenAI-compatible server, timed token by token, its failure named.

Error kinds: `http_<status>` (the server answered 4xx/5xx), `timeout` (no answer, or no
progress, within the request timeout), `connection` (could not connect), `broken_stream`
(the connection dropped or the stream ended without `[DONE]`), `malformed_chunk` (a chunk
that is not the JSON the API defines), `error_event` (the stream carried an error object).
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import aiohttp


@dataclass(slots=True)
class Target:
    base_url: str  # e.g. http://host:8000/v1
    model: str
    endpoint: str = "/chat/completions"  # or /completions
    api_key: str | None = None
    stream: bool = True
    ignore_eos: bool = False
    timeout_s: float = 300.0

    @property
    def chat(self) -> bool:
        return self.endpoint.endswith("chat/completions")

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + self.endpoint


@dataclass(slots=True)
class RequestResult:
    start: float  # monotonic seconds
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float | None = None
    itls: list[float] = field(default_factory=list)
    latency: float = 0.0
    text: str = ""
    error: str | None = None  # the kind; None on success
    detail: str = ""  # what went wrong, for people
    usage_reported: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


class _Failure(Exception):
    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind, self.detail = kind, detail


def request_body(target: Target, prompt: str | list[dict], max_tokens: int) -> dict:
    body: dict = {"model": target.model, "max_tokens": max_tokens, "stream": target.stream}
    if target.chat:
        body["messages"] = prompt
    else:
        body["prompt"] = prompt
    if target.stream:
        body["stream_options"] = {"include_usage": True}
    if target.ignore_eos:
        body["ignore_eos"] = True
    return body


async def send(session: aiohttp.ClientSession, target: Target, prompt: str | list[dict], max_tokens: int
               ) -> RequestResult:
    r = RequestResult(start=time.monotonic())
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    try:
        timeout = aiohttp.ClientTimeout(total=target.timeout_s)
        async with session.post(target.url, json=request_body(target, prompt, max_tokens), headers=headers,
                                timeout=timeout) as resp:
            if resp.status >= 400:
                text = (await resp.text())[:300]
                raise _Failure(f"http_{resp.status}", text)
            if target.stream:
                await _read_stream(resp, r, target.chat)
            else:
                _read_whole(await _json(resp), r, target.chat)
    except _Failure as e:
        r.error, r.detail = e.kind, e.detail
    except asyncio.TimeoutError:
        r.error, r.detail = "timeout", f"no complete answer within {target.timeout_s:.0f}s"
    except aiohttp.ClientConnectorError as e:
        r.error, r.detail = "connection", str(e)
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError,
            ConnectionResetError) as e:
        r.error, r.detail = "broken_stream", f"{type(e).__name__}: {e}"
    except aiohttp.ClientError as e:
        r.error, r.detail = "connection", f"{type(e).__name__}: {e}"
    except UnicodeDecodeError as e:
        r.error, r.detail = "malformed_chunk", f"not UTF-8: {e}"
    r.latency = time.monotonic() - r.start
    return r


async def _json(resp: aiohttp.ClientResponse) -> dict:
    try:
        body = json.loads(await resp.read())
    except ValueError:
        raise _Failure("malformed_chunk", "the response body is not JSON") from None
    if not isinstance(body, dict):
        raise _Failure("malformed_chunk", "the response body is not a JSON object")
    return body


def _read_whole(body: dict, r: RequestResult, chat: bool) -> None:
    try:
        choice = body["choices"][0]
        r.text = (choice["message"]["content"] or "") if chat else choice["text"]
    except (KeyError, IndexError, TypeError):
        raise _Failure("malformed_chunk", "no choices[0] text in the response") from None
    r.ttft = time.monotonic() - r.start
    _take_usage(body, r)
    if not r.usage_reported:
        r.output_tokens = max(1, len(r.text.split()))


async def _read_stream(resp: aiohttp.ClientResponse, r: RequestResult, chat: bool) -> None:
    last = None
    chunks = 0
    buffer = b""
    async for piece in resp.content.iter_any():
        buffer += piece
        *lines, buffer = buffer.split(b"\n")
        for raw in lines:
            line = raw.strip()
            if not line or line.startswith(b":") or not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                if not r.usage_reported:
                    r.output_tokens = chunks
                return
            try:
                event = json.loads(data)
            except ValueError:
                raise _Failure("malformed_chunk", f"not JSON: {data[:80]!r}") from None
            if not isinstance(event, dict):
                raise _Failure("malformed_chunk", f"not a JSON object: {data[:80]!r}")
            if "error" in event:
                raise _Failure("error_event", str(event["error"])[:300])
            _take_usage(event, r)
            choices = event.get("choices")
            if not isinstance(choices, list):
                raise _Failure("malformed_chunk", "a chunk without a choices list")
            for c in choices:
                try:
                    piece_text = (c["delta"].get("content") or "") if chat else (c.get("text") or "")
                except (KeyError, AttributeError, TypeError):
                    raise _Failure("malformed_chunk", "a choice without delta/text") from None
                if not piece_text:
                    continue
                now = time.monotonic()
                if r.ttft is None:
                    r.ttft = now - r.start
                else:
                    r.itls.append(now - last)
                last = now
                chunks += 1
                r.text += piece_text
    raise _Failure("broken_stream", "the stream ended without [DONE]")


def _take_usage(body: dict, r: RequestResult) -> None:
    usage = body.get("usage")
    if isinstance(usage, dict) and "completion_tokens" in usage:
        r.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        r.output_tokens = int(usage["completion_tokens"])
        r.usage_reported = True
