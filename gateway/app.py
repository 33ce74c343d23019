"""The aiohttp application: middleware, state, and the routes that are not completions."""
from __future__ import annotations

import json
import time
from importlib.metadata import PackageNotFoundError, version as _pkg_version

from aiohttp import web
from pydantic import BaseModel, ValidationError

from engine.outputs import SeqDelta
from gateway.dashboard import Dashboard
from gateway.engine_client import AsyncEngine, EngineStats
from gateway.errors import APIError, bad_request
from gateway.metrics import Metrics
from gateway.openai_routes import Choice, OpenAIRoutes
from gateway.openapi import openapi_document
from gateway.protocol import DetokenizeRequest, TokenizeRequest
from gateway.request_tracing import server_spans
from tokenization import TokenizerError

try:
    VERSION = _pkg_version("strata")
except PackageNotFoundError:  # running from a source tree
    VERSION = "0.1.0"

OPEN_PATHS = {"/health", "/version", "/metrics", "/openapi.json"}
MAX_BODY = 32 * 2**20


class ServerState:
    def __init__(self, engine: AsyncEngine, served_name: str, api_key: str | None, max_queue: int) -> None:
        self.engine = engine
        self.served_name = served_name
        self.model_names = {served_name}
        self.api_key = api_key
        self.max_queue = max_queue
        self.metrics = Metrics(served_name)
        self.dashboard = Dashboard(self)
        self.active = 0
        self.draining = False
        self.started = int(time.time())
        engine.on_step = self._on_step

    # ---- admission and parsing ---------------------------------------------------------
    def admit(self, num_seqs: int) -> None:
        if self.draining:
            raise APIError(503, "the server is shutting down", code="server_shutting_down", err_type="server_error")
        if self.engine.dead:
            raise APIError(503, f"the engine is not available: {self.engine.dead}", code="engine_failed",
                           err_type="server_error")
        if self.engine.num_waiting + num_seqs > self.max_queue:
            self.metrics.rejected += 1
            raise APIError(429, f"the server is at capacity: {self.engine.num_waiting} requests are already waiting "
                           f"(limit {self.max_queue}); retry later", code="queue_full", headers={"Retry-After": "1"})

    async def parse(self, request: web.Request, model: type[BaseModel]):
        ctype = request.headers.get("Content-Type", "")
        if not ctype.split(";")[0].strip().lower() == "application/json":
            raise APIError(415, f"Content-Type must be application/json, got {ctype or 'none'!r}", code="unsupported_media_type")
        raw = await request.read()
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise bad_request(f"the request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise bad_request("the request body must be a JSON object", code="invalid_json")
        try:
            return model.model_validate(data)
        except ValidationError as e:
            raise validation_error(e) from None

    # ---- metrics -----------------------------------------------------------------------
    def _on_step(self, deltas: list[SeqDelta], stats: EngineStats) -> None:
        m = self.metrics
        m.num_running, m.num_waiting, m.kv_cache_usage = stats.num_running, stats.num_waiting, stats.kv_cache_usage
        m.num_preemptions, m.prefix_queries, m.prefix_hits = stats.num_preemptions, stats.prefix_queries, stats.prefix_hits
        m.spans_dropped = stats.spans_dropped
        for d in deltas:
            m.generation_tokens += len(d.token_ids)
            if d.num_output_tokens == len(d.token_ids):  # the sequence's first step out
                m.prompt_tokens += d.num_prompt_tokens
                m.queue_time.observe(d.queued_s)

    def observe(self, c: Choice, d: SeqDelta, now: float, t0: float) -> None:
        m = self.metrics
        genai = m.genai[c.operation]
        if c.first_at is None:
            c.first_at = now
            m.ttft.observe(now - t0)
            genai["time_to_first_token"].observe(now - t0)
            self.dashboard.ttft.add(now - t0, now)
        elif c.last_at is not None:
            m.itl.observe(now - c.last_at)
            self.dashboard.itl.add(now - c.last_at, now)
        c.last_at = now
        if d.finished:
            m.e2e.observe(now - t0)
            m.success[d.finish_reason or "stop"] += 1
            genai["request_duration"].observe(now - t0)
            if d.num_output_tokens > 1:
                genai["time_per_output_token"].observe((now - c.first_at) / (d.num_output_tokens - 1))


def validation_error(e: ValidationError) -> APIError:
    err = e.errors()[0]
    loc = [str(x) for x in err["loc"] if not isinstance(x, int)] or ["body"]
    param = ".".join(loc)
    if err["type"] == "extra_forbidden":
        return bad_request(f"unsupported field '{param}': this server does not implement it", param, "unsupported_field")
    if param.startswith("response_format"):
        return bad_request("unsupported response_format: only {\"type\": \"text\"} is implemented", "response_format",
                           "unsupported_field")
    return bad_request(f"invalid value for '{param}': {err['msg']}", param)


@web.middleware
async def errors_and_auth(request: web.Request, handler):
    state: ServerState = request.app["state"]
    try:
        if state.api_key and request.path not in OPEN_PATHS and request.method != "OPTIONS":
            auth = request.headers.get("Authorization", "")
            if request.path == "/dashboard" and request.query.get("key"):
                # A browser opening the page cannot send a header; the page then sends it on every poll.
                auth = f"Bearer {request.query['key']}"
            if auth != f"Bearer {state.api_key}":
                raise APIError(401, "Incorrect or missing API key: send `Authorization: Bearer <key>`.",
                               code="invalid_api_key")
        return await handler(request)
    except APIError as e:
        return e.response()
    except web.HTTPException as e:
        if e.status >= 400:
            return APIError(e.status, e.reason or "error").response()
        raise


async def health(request: web.Request) -> web.Response:
    state: ServerState = request.app["state"]
    if state.engine.dead:
        return web.json_response({"status": "unhealthy", "reason": state.engine.dead}, status=503)
    if state.draining:
        return web.json_response({"status": "draining"}, status=503)
    return web.json_response({"status": "ok"})


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": VERSION})


async def models(request: web.Request) -> web.Response:
    state: ServerState = request.app["state"]
    return web.json_response({"object": "list", "data": [
        {"id": state.served_name, "object": "model", "created": state.started, "owned_by": "strata",
         "max_model_len": state.engine.max_model_len}]})


async def tokenize(request: web.Request) -> web.Response:
    state: ServerState = request.app["state"]
    req: TokenizeRequest = await state.parse(request, TokenizeRequest)
    tok = state.engine.tokenizer
    if (req.prompt is None) == (req.messages is None):
        raise bad_request("give exactly one of prompt or messages", "prompt")
    if req.prompt is not None:
        ids = tok.encode(req.prompt, add_special_tokens=req.add_special_tokens)
    else:
        # the same roles the chat route renders, so the count matches its prompt_tokens
        msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.content if isinstance(m.content, str) else
                 "\n".join(p.text for p in (m.content or []))} for m in req.messages]
        try:
            text = tok.apply_chat_template(msgs, add_generation_prompt=req.add_generation_prompt)
        except TokenizerError as e:
            raise bad_request(str(e), "messages") from None
        ids = tok.encode(text, add_special_tokens=False)
    return web.json_response({"tokens": ids, "count": len(ids), "max_model_len": state.engine.max_model_len})


async def detokenize(request: web.Request) -> web.Response:
    state: ServerState = request.app["state"]
    req: DetokenizeRequest = await state.parse(request, DetokenizeRequest)
    vocab = state.engine.model_config.vocab_size
    bad = next((t for t in req.tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise bad_request(f"token id {bad} is outside the vocabulary (0..{vocab - 1})", "tokens")
    return web.json_response({"prompt": state.engine.tokenizer.decode(req.tokens, skip_special_tokens=False)})


async def metrics(request: web.Request) -> web.Response:
    state: ServerState = request.app["state"]
    return web.Response(text=state.metrics.render(), content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type-Options": "nosniff"})


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(request.app["openapi"])


def create_app(engine: AsyncEngine, served_name: str, api_key: str | None = None, max_queue: int = 1024) -> web.Application:
    app = web.Application(middlewares=[server_spans, errors_and_auth], client_max_size=MAX_BODY)
    state = ServerState(engine, served_name, api_key, max_queue)
    app["state"] = state
    app.router.add_get("/dashboard", state.dashboard.page)
    app.router.add_get("/dashboard/data", state.dashboard.data)
    app.on_startup.append(state.dashboard.start)
    app.on_cleanup.append(state.dashboard.stop)
    app["openapi"] = openapi_document(VERSION)
    routes = OpenAIRoutes(state)
    app.router.add_post("/v1/completions", routes.completions)
    app.router.add_post("/v1/chat/completions", routes.chat)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    app.router.add_get("/health", health)
    app.router.add_get("/version", version)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
    return app
