"""The aiohttp application: middleware, state, and the routes that are not completions."""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import time
from importlib import resources
from importlib.metadata import PackageNotFoundError, version as _pkg_version

from aiohttp import web
from pydantic import BaseModel

from batching.sampling_params import ParamError, check_token_ids

from engine import EngineStats, SeqDelta
from gateway.connections import request_started
from gateway.cors import CorsPolicy
from gateway.cors import install as cors_install
from gateway.dashboard import Dashboard
from gateway.engine_client import AsyncEngine
from gateway.errors import APIError, bad_request
from gateway.limits import ServerLimits
from gateway.metrics import Metrics
from gateway.offload import off_loop
from gateway.openai_routes import Choice, OpenAIRoutes, chat_prompt
from gateway.tools import tool_plan
from gateway.responses import ResponsesRoutes
from gateway.openapi import openapi_document
from gateway.protocol import DetokenizeRequest, TokenizeRequest
from gateway.request_body import read_model
from gateway.request_tracing import server_spans
from tokenization import Tokenizer

log = logging.getLogger("strata.gateway")

try:
    VERSION = _pkg_version("strata")
except PackageNotFoundError:  # running from a source tree
    VERSION = "0.1.0"

OPEN_PATHS = {"/health", "/version", "/metrics", "/openapi.json", "/docs"}
DASHBOARD_PATHS = {"/dashboard", "/dashboard/data"}
DASHBOARD_COOKIE = "strata_dashboard"


class ServerState:
    def __init__(self, engine: AsyncEngine, served_name: str, api_key: str | None, max_queue: int,
                 limits: ServerLimits) -> None:
        self.engine = engine
        self.served_name = served_name
        self.model_names = {served_name}
        self.api_key = api_key
        # The dashboard's browser session: the key is checked once, then this token rides in a cookie, so the key
        # never stays in a URL (history, logs, Referer headers).
        self.dashboard_session = secrets.token_urlsafe(32)
        self.max_queue = max_queue
        self.limits = limits
        tok = engine.tokenizer
        # No text longer than this fits the context: each token spells at most max_token_bytes of it. (So where
        # tokens spell the text back, as byte-level BPE's do; text that a normaliser collapses into fewer tokens
        # is refused at this length all the same.)
        self.max_prompt_chars = engine.max_model_len * tok.max_token_bytes if tok is not None else 0
        self.metrics = Metrics(served_name)
        self.dashboard = Dashboard(self)
        self.active = 0
        self.sinks: set[asyncio.Queue] = set()  # one per open completion request
        self.draining = False
        self.started = int(time.time())
        engine.on_step = self._on_step

    # ---- admission and parsing ---------------------------------------------------------
    def tokenizer(self) -> Tokenizer:
        if self.engine.tokenizer is None:
            raise bad_request("this checkpoint has no tokenizer (tokenizer.json): send prompts as token ids",
                              code="no_tokenizer")
        return self.engine.tokenizer

    def check_fits(self, num_seqs: int) -> None:
        """A request the queue could never hold is the client's mistake, not a reason to retry."""
        if num_seqs > self.max_queue:
            raise bad_request(f"this request asks for {num_seqs} sequences (prompts x n), and the server queues "
                              f"at most {self.max_queue}: it can never be admitted; send fewer at a time",
                              code="too_many_sequences")

    def check_chars(self, chars: int, param: str) -> None:
        """Refuse text that cannot fit in the context before any time goes into tokenizing it."""
        if chars > self.max_prompt_chars:
            limit = self.engine.max_model_len
            raise bad_request(f"This model's maximum context length is {limit} tokens of at most "
                              f"{self.max_prompt_chars // limit} bytes each, and the {param} has {chars} characters.",
                              param, "context_length_exceeded")

    def cut_streams(self) -> None:
        """Tell every open request that the server is going away: its stream ends with this error event."""
        err = APIError(503, "the server is shutting down and this request did not finish in time",
                       code="server_shutting_down", err_type="server_error")
        for sink in self.sinks:
            sink.put_nowait((None, err))

    def admit(self, num_seqs: int) -> None:
        self.check_fits(num_seqs)
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
        return await read_model(request, model, self.limits)

    # ---- metrics -----------------------------------------------------------------------
    def _on_step(self, deltas: list[SeqDelta], stats: EngineStats) -> None:
        m = self.metrics
        m.num_running, m.num_waiting, m.kv_cache_usage = stats.num_running, stats.num_waiting, stats.kv_cache_usage
        m.num_preemptions, m.prefix_queries, m.prefix_hits = stats.num_preemptions, stats.prefix_queries, stats.prefix_hits
        m.spans_dropped = stats.spans_dropped
        m.expert_tokens = stats.expert_tokens
        m.stages = stats.stages
        for d in deltas:
            m.generation_tokens += len(d.token_ids)
            if d.num_output_tokens == len(d.token_ids):  # the sequence's first step out
                m.prompt_tokens += d.num_prompt_tokens
                m.queue_time.observe(d.queued_s)
                self.dashboard.queue.add(d.queued_s)

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
            self.dashboard.e2e.add(now - t0, now)
            m.success[d.finish_reason or "stop"] += 1
            genai["request_duration"].observe(now - t0)
            if d.num_output_tokens > 1:
                genai["time_per_output_token"].observe((now - c.first_at) / (d.num_output_tokens - 1))


def _authorized(state: ServerState, request: web.Request) -> bool:
    key = state.api_key
    auth = request.headers.get("Authorization", "")
    if hmac.compare_digest(_raw(auth), _raw(f"Bearer {key}")):
        return True
    if request.path in DASHBOARD_PATHS:
        cookie = request.cookies.get(DASHBOARD_COOKIE, "")
        return hmac.compare_digest(_raw(cookie), _raw(state.dashboard_session))
    return False


def _raw(header_value: str) -> bytes:
    """Header bytes as they came: aiohttp decodes what is not UTF-8 with surrogateescape."""
    return header_value.encode("utf-8", "surrogateescape")


def _dashboard_login(state: ServerState, request: web.Request) -> web.Response | None:
    """GET /dashboard?key=K, as a browser opens it: with the right key, a session cookie and a redirect to the
    same page without the key in its URL."""
    key = request.query.get("key")
    if request.path != "/dashboard" or key is None or not state.api_key:
        return None
    if not hmac.compare_digest(_raw(key), _raw(state.api_key)):
        raise APIError(401, "Incorrect API key.", code="invalid_api_key")
    resp = web.HTTPSeeOther("/dashboard", headers={"Referrer-Policy": "no-referrer"})
    resp.set_cookie(DASHBOARD_COOKIE, state.dashboard_session, path="/dashboard", httponly=True, samesite="Strict")
    return resp


def _response_begun(request: web.Request) -> bool:
    return request.writer is not None and request.writer.output_size > 0


@web.middleware
async def errors_and_auth(request: web.Request, handler):
    state: ServerState = request.app["state"]
    try:
        if state.api_key and request.path not in OPEN_PATHS and request.method != "OPTIONS":
            login = _dashboard_login(state, request)
            if login is not None:
                return login
            if not _authorized(state, request):
                raise APIError(401, "Incorrect or missing API key: send `Authorization: Bearer <key>`.",
                               code="invalid_api_key")
        return await handler(request)
    except APIError as e:
        if _response_begun(request):
            raise
        return _refusal(state, e)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        headers = {k: v for k, v in e.headers.items() if k.lower() in ("allow", "retry-after")}
        return _refusal(state, APIError(e.status, e.text if e.text and not e.text.startswith(f"{e.status}:")
                                         else e.reason, headers=headers))
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        if _response_begun(request):
            raise  # aiohttp closes a connection whose response broke off; a second response would corrupt it
        return _refusal(state, APIError(500, "the server failed to handle this request; the error is in its log",
                                        code="internal_error"))


def _refusal(state: ServerState, error: APIError) -> web.Response:
    """An error's response, counted by its status (strata:request_errors_total)."""
    state.metrics.errors[error.status] = state.metrics.errors.get(error.status, 0) + 1
    return error.response()


async def health(request: web.Request) -> web.Response:
    state: ServerState = request.app["state"]
    if state.engine.dead:
        return web.json_response({"status": "unhealthy", "reason": state.engine.dead}, status=503)
    if state.draining:
        return web.json_response({"status": "draining"}, status=503)
    return web.json_response({"status": "ok"})


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": VERSION})


def _model_card(state: ServerState) -> dict:
    info = state.engine.info
    return {"id": state.served_name, "object": "model", "created": state.started, "owned_by": "strata",
            "max_model_len": state.engine.max_model_len,
            "weight_formats": {"layers": list(info.layer_formats), "lm_head": info.head_format}}


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [_model_card(request.app["state"])]})


async def model(request: web.Request) -> web.Response:
    """One model, as the OpenAI API's GET /v1/models/{model} answers."""
    state: ServerState = request.app["state"]
    name = request.match_info["model"]
    if name not in state.model_names:
        raise APIError(404, f"The model `{name}` does not exist.", "model", "model_not_found")
    return web.json_response(_model_card(state))


async def tokenize(request: web.Request) -> web.Response:
    state: ServerState = request.app["state"]
    req: TokenizeRequest = await state.parse(request, TokenizeRequest)
    tok = state.tokenizer()
    if (req.prompt is None) == (req.messages is None):
        raise bad_request("give exactly one of prompt or messages", "prompt")
    if req.prompt is not None:
        state.check_chars(len(req.prompt), "prompt")
        ids = await off_loop(tok.encode, req.prompt, req.add_special_tokens)
    else:  # as the chat route renders them, so the count matches its prompt_tokens
        plan = tool_plan(req.tools, None, True, tok.chat_template)
        ids = await chat_prompt(state, req.messages, plan, req.add_generation_prompt)
    body = await off_loop(_tokens_json, ids, state.engine.max_model_len)
    return web.Response(body=body, content_type="application/json")


def _tokens_json(ids: list[int], max_model_len: int) -> bytes:
    """/tokenize's answer, serialised a slice at a time: one json.dumps of a context's worth of ids holds the GIL
    for ~100 ms, every other thread (the event loop's) waiting."""
    parts = [json.dumps(ids[i:i + 16384])[1:-1] for i in range(0, len(ids), 16384)]
    return (f'{{"tokens": [{", ".join(parts)}], "count": {len(ids)}, "max_model_len": {max_model_len}}}').encode()


async def detokenize(request: web.Request) -> web.Response:
    state: ServerState = request.app["state"]
    req: DetokenizeRequest = await state.parse(request, DetokenizeRequest)
    tok = state.tokenizer()
    if len(req.tokens) > state.engine.max_model_len:
        raise bad_request(f"{len(req.tokens)} tokens are more than this model's context ({state.engine.max_model_len})",
                          "tokens", "context_length_exceeded")
    try:
        check_token_ids(req.tokens, state.engine.model_config.vocab_size, "tokens")
    except ParamError as e:
        raise bad_request(str(e), e.param) from None
    return web.json_response({"prompt": tok.decode(req.tokens, skip_special_tokens=False)})


async def metrics(request: web.Request) -> web.Response:
    state: ServerState = request.app["state"]
    return web.Response(text=state.metrics.render(), content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type-Options": "nosniff"})


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(request.app["openapi"])


async def docs(request: web.Request) -> web.Response:
    """/openapi.json rendered for people, by a page that loads nothing but it."""
    html = resources.files("gateway").joinpath("docs.html").read_text()
    return web.Response(text=html, content_type="text/html",
                        headers={"Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; "
                                 "style-src 'unsafe-inline'", "Referrer-Policy": "no-referrer"})


def create_app(engine: AsyncEngine, served_name: str, api_key: str | None = None, max_queue: int = 1024,
               limits: ServerLimits | None = None, cors: CorsPolicy | None = None) -> web.Application:
    limits = limits or ServerLimits()
    app = web.Application(middlewares=[request_started, server_spans, errors_and_auth],
                          client_max_size=limits.max_body_bytes)
    cors_install(app, cors or CorsPolicy())
    state = ServerState(engine, served_name, api_key, max_queue, limits)
    app["state"] = state
    app.router.add_get("/dashboard", state.dashboard.page)
    app.router.add_get("/dashboard/data", state.dashboard.data)
    app.on_startup.append(state.dashboard.start)
    app.on_cleanup.append(state.dashboard.stop)
    app["openapi"] = openapi_document(VERSION)
    routes = OpenAIRoutes(state)
    app.router.add_post("/v1/completions", routes.completions)
    app.router.add_post("/v1/chat/completions", routes.chat)
    app.router.add_post("/v1/responses", ResponsesRoutes(routes).create)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model:.+}", model)  # ids may hold a slash (org/name)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    app.router.add_get("/health", health)
    app.router.add_get("/version", version)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
    app.router.add_get("/docs", docs)
    return app
