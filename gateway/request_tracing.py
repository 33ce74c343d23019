"""Request spans: one SERVER span per HTTP request, continuing the caller's W3C trace, and a
GenAI span per completion with the OpenTelemetry GenAI attributes and its queue wait."""
from __future__ import annotations

import time

from aiohttp import web
from opentelemetry.trace import SpanKind, Status, StatusCode, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from telemetry.tracing import Tracing

PROVIDER = "strata"
UNTRACED_PATHS = {"/health", "/metrics"}  # probes and scrapes every few seconds would drown the traces
_propagator = TraceContextTextMapPropagator()


@web.middleware
async def server_spans(request: web.Request, handler):
    tracing: Tracing | None = request.app["state"].engine.tracing
    if tracing is None or request.path in UNTRACED_PATHS:
        return await handler(request)
    route = request.match_info.route.resource
    path = route.canonical if route is not None else request.path
    span = tracing.tracer.start_span(
        f"{request.method} {path}", context=_propagator.extract(request.headers), kind=SpanKind.SERVER,
        attributes={"http.request.method": request.method, "url.path": request.path, "http.route": path,
                    "url.scheme": request.scheme, "server.port": request.url.port or 0,
                    "user_agent.original": request.headers.get("User-Agent", "")},
    )
    request["server_span"] = span
    status = 500
    try:
        resp = await handler(request)
        status = resp.status
        return resp
    except web.HTTPException as e:
        status = e.status
        raise
    finally:
        span.set_attribute("http.response.status_code", status)
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR))
        span.end()


class GenAISpan:
    """The span of one completion request (all its choices), from arrival to the last token."""

    def __init__(self, tracing: Tracing, request: web.Request, operation: str, req, rid: str) -> None:
        self.tracing = tracing
        self.arrival_ns = time.time_ns()
        attrs = {
            "gen_ai.operation.name": operation, "gen_ai.provider.name": PROVIDER, "gen_ai.request.model": req.model,
            "gen_ai.request.stream": bool(req.stream), "gen_ai.request.choice.count": req.n, "gen_ai.response.id": rid,
        }
        max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens
        for key, value in (("gen_ai.request.max_tokens", max_tokens), ("gen_ai.request.temperature", req.temperature),
                           ("gen_ai.request.top_p", req.top_p), ("gen_ai.request.seed", req.seed)):
            if value is not None:
                attrs[key] = value
        parent = request.get("server_span")
        self.span = tracing.tracer.start_span(f"{operation} {req.model}", context=set_span_in_context(parent) if parent else None,
                                              attributes=attrs, start_time=self.arrival_ns)
        ctx = self.span.get_span_context()
        self.ids = (ctx.trace_id, ctx.span_id) if ctx.trace_flags.sampled else None
        self.first_token_seen = False
        self.stream_error: str | None = None  # an error sent as an SSE event after the response began

    def first_token(self, queued_s: float) -> None:
        """The first token of the first choice: close the queue span and note time to first token."""
        if self.first_token_seen:
            return
        self.first_token_seen = True
        now = time.time_ns()
        queue_end = self.arrival_ns + int(queued_s * 1e9)
        queue = self.tracing.tracer.start_span("queue", context=set_span_in_context(self.span),
                                               start_time=self.arrival_ns, attributes={"gen_ai.latency.time_in_queue": queued_s})
        queue.end(end_time=min(queue_end, now))
        self.span.set_attribute("gen_ai.latency.time_in_queue", queued_s)
        self.span.set_attribute("gen_ai.latency.time_to_first_token", (now - self.arrival_ns) / 1e9)

    def finish(self, finish_reasons: list[str], input_tokens: int, output_tokens: int, error: str | None = None) -> None:
        self.span.set_attribute("gen_ai.response.finish_reasons", finish_reasons)
        self.span.set_attribute("gen_ai.usage.input_tokens", input_tokens)
        self.span.set_attribute("gen_ai.usage.output_tokens", output_tokens)
        if error:
            self.span.set_status(Status(StatusCode.ERROR, error))
            self.span.set_attribute("error.type", error)
        self.span.end()
