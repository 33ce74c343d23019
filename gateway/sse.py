"""Server-sent events as OpenAI frames them: `data: {json}\n\n`, ending with `data: [DONE]\n\n`."""
from __future__ import annotations

import json

from aiohttp import web

DONE = b"data: [DONE]\n\n"


async def open_stream(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={
        "Content-Type": "text/event-stream; charset=utf-8",
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",  # proxies must not hold tokens back
    })
    await resp.prepare(request)
    return resp


def event(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def typed_event(kind: str, payload: dict) -> bytes:
    """An event with its type named, as the Responses API streams them (and no [DONE] after the last)."""
    return b"event: " + kind.encode() + b"\n" + event(payload)
