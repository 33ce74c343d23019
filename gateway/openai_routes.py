"""POST /v1/completions and /v1/chat/completions: requests in, choices out, streamed or whole."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field

from aiohttp import web
from batching.sampling_params import ParamError, SamplingParams, check_context, check_token_ids
from engine import SeqDelta, TokenLogprob
from gateway import sse
from gateway.engine_client import EngineError
from gateway.errors import APIError, bad_request
from gateway.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from gateway.request_tracing import GenAISpan
from tokenization import TokenizerError, normalize_messages

log = logging.getLogger("strata.gateway")


async def off_loop(fn, *args):
    """Run fn in the loop's thread pool: tokenizing megabytes takes seconds, and no other client may wait on it."""
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def chat_messages(messages) -> list[dict]:
    """The messages as the chat template takes them: developer is system, no content is '', and text parts are
    joined by the one rule for that (tokenization.normalize_messages)."""
    try:
        return normalize_messages([{"role": "system" if m.role == "developer" else m.role,
                                    "content": [p.model_dump() for p in m.content] if isinstance(m.content, list)
                                    else m.content or ""} for m in messages])
    except TokenizerError as e:
        raise bad_request(str(e), "messages") from None


@dataclass(slots=True)
class Choice:
    index: int
    prompt_index: int
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    first_at: float | None = None
    last_at: float | None = None
    num_cached_tokens: int = 0
    operation: str = "text_completion"  # the GenAI operation: chat or text_completion


class OpenAIRoutes:
    def __init__(self, state) -> None:
        self.s = state  # gateway.app.ServerState

    # ---- request -> prompts + params ------------------------------------------------------
    def _check_model(self, model: str) -> None:
        if model not in self.s.model_names:
            raise APIError(404, f"The model `{model}` does not exist.", "model", "model_not_found")

    def _sampling(self, req: SamplingFields, max_tokens: int | None, prompt_len: int, logprobs: int | None) -> SamplingParams:
        limit = self.s.engine.max_model_len
        try:
            check_context(prompt_len, max_tokens, limit,
                          "messages" if isinstance(req, ChatCompletionRequest) else "prompt")
        except ParamError as e:
            raise bad_request(str(e), e.param, e.code) from None
        bias = None
        if req.logit_bias:
            try:
                bias = {int(k): float(v) for k, v in req.logit_bias.items()}
            except ValueError:
                raise bad_request("logit_bias keys must be token ids", "logit_bias") from None
        try:
            params = SamplingParams(
                max_tokens=max_tokens if max_tokens is not None else limit - prompt_len,
                temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p,
                top_k=req.top_k or 0,
                min_p=req.min_p or 0.0,
                seed=req.seed,
                presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty,
                repetition_penalty=req.repetition_penalty,
                logit_bias=bias,
                logprobs=logprobs,
                stop=[req.stop] if isinstance(req.stop, str) else list(req.stop or []),
                stop_token_ids=list(req.stop_token_ids or []),
                include_stop_str_in_output=req.include_stop_str_in_output,
                ignore_eos=req.ignore_eos,
                min_tokens=req.min_tokens,
                skip_special_tokens=req.skip_special_tokens,
            )
            params.check_vocab(self.s.engine.model_config.vocab_size)
            return params
        except ParamError as e:
            raise bad_request(str(e), e.param) from None

    async def _completion_prompts(self, req: CompletionRequest) -> list[list[int]]:
        p = req.prompt
        if isinstance(p, str):
            p = [p]
        if not p:
            raise bad_request("prompt must not be empty", "prompt")
        self.s.check_fits((1 if isinstance(p[0], int) else len(p)) * req.n)  # a list of ids is one prompt
        if isinstance(p[0], int):
            prompts = [list(p)]
        elif isinstance(p[0], str):
            tok = self.s.tokenizer()
            for text in p:
                self.s.check_chars(len(text), "prompt")
            prompts = await off_loop(tok.encode_batch, p)
        else:
            prompts = [list(x) for x in p]
        vocab = self.s.engine.model_config.vocab_size
        for ids in prompts:
            if not ids:
                raise bad_request("prompt must not be empty", "prompt")
            try:
                check_token_ids(ids, vocab, "prompt", "prompt token id")
            except ParamError as e:
                raise bad_request(str(e), e.param) from None
        return prompts

    async def _chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        tok = self.s.tokenizer()
        messages = chat_messages(req.messages)
        self.s.check_chars(sum(len(m["content"]) for m in messages), "messages")
        add_generation_prompt = req.add_generation_prompt and not req.continue_final_message

        def render_and_encode() -> list[int]:
            try:
                text = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
            except TokenizerError as e:
                raise bad_request(str(e), "messages") from None
            if req.continue_final_message and messages[-1]["role"] == "assistant":
                end = text.rfind(messages[-1]["content"])
                if end >= 0:
                    text = text[: end + len(messages[-1]["content"])]
            return tok.encode(text, add_special_tokens=False)

        return await off_loop(render_and_encode)

    # ---- handlers ------------------------------------------------------------------------
    async def completions(self, request: web.Request) -> web.StreamResponse:
        req: CompletionRequest = await self.s.parse(request, CompletionRequest)
        self._check_model(req.model)
        if req.echo or req.logprobs is not None:
            self.s.tokenizer()  # refused now, before a stream opens, where there is none to render tokens with
        prompts = await self._completion_prompts(req)
        params = [self._sampling(req, req.max_tokens if req.max_tokens is not None else 16, len(p), req.logprobs) for p in prompts]
        return await self._serve(request, req, "text_completion", prompts, params, f"cmpl-{uuid.uuid4().hex}")

    async def chat(self, request: web.Request) -> web.StreamResponse:
        req: ChatCompletionRequest = await self.s.parse(request, ChatCompletionRequest)
        self._check_model(req.model)
        if req.top_logprobs and not req.logprobs:
            raise bad_request("top_logprobs needs logprobs set to true", "top_logprobs")
        self.s.tokenizer()  # a chat is rendered to text, and its answer is text
        self.s.check_fits(req.n)
        prompt = await self._chat_prompt(req)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = self._sampling(req, max_tokens, len(prompt), (req.top_logprobs or 0) if req.logprobs else None)
        return await self._serve(request, req, "chat.completion", [prompt], [params], f"chatcmpl-{uuid.uuid4().hex}")

    # ---- the shared engine loop ----------------------------------------------------------
    async def _serve(self, request, req: SamplingFields, kind: str, prompts, params, rid: str) -> web.StreamResponse:
        s = self.s
        n = req.n
        num_seqs = len(prompts) * n
        s.admit(num_seqs)
        sink: asyncio.Queue = asyncio.Queue()
        operation = "chat" if kind == "chat.completion" else "text_completion"
        choices = [Choice(i * n + j, i, operation=operation) for i in range(len(prompts)) for j in range(n)]
        streams = []
        t0 = time.monotonic()
        tracing = s.engine.tracing
        span = GenAISpan(tracing, request, operation, req, rid) if tracing else None
        s.active += 1
        s.sinks.add(sink)
        model = req.model
        created = int(time.time())
        include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)
        error = None
        try:
            for c in choices:
                p = params[c.prompt_index]
                if n > 1 and p.seed is not None:
                    p = _with_seed(p, p.seed + c.index % n)
                streams.append(s.engine.add(prompts[c.prompt_index], p, sink, c.index, span.ids if span else None))
            if req.stream:
                return await self._stream(request, req, kind, rid, model, created, prompts, choices, sink, include_usage,
                                          t0, span)
            await self._collect(choices, sink, t0, span)
            return web.json_response(self._whole(req, kind, rid, model, created, prompts, choices))
        except APIError as e:
            error = e.code or type(e).__name__
            raise
        except EngineError as e:
            error = "engine_failed"
            raise APIError(503, f"the engine is not available: {e}", code="engine_failed", err_type="server_error") from None
        finally:
            if span is not None:
                usage = _usage(prompts, choices, n)
                span.finish([c.finish_reason or "abort" for c in choices], usage["prompt_tokens"],
                            usage["completion_tokens"], error or span.stream_error)
            s.active -= 1
            s.sinks.discard(sink)
            for c in choices:
                if c.finish_reason is None and streams:  # the client left, or the request failed or was cut
                    s.metrics.success["abort"] += 1
            for st in streams:
                s.engine.abort(st)  # no-op for finished ones; frees the rest at once

    async def _next(self, sink: asyncio.Queue, choices: list[Choice], t0: float, span: GenAISpan | None = None
                    ) -> tuple[Choice, SeqDelta]:
        tag, item = await sink.get()
        if isinstance(item, APIError):  # the server's own word to every open request (ServerState.cut_streams)
            raise item
        if isinstance(item, ValueError):
            raise bad_request(str(item))
        if isinstance(item, Exception):
            raise APIError(503, f"the engine failed: {item}", code="engine_failed", err_type="server_error")
        if item.error is not None:
            raise APIError(500, f"the engine failed on this request: {item.error}", code="engine_error",
                           err_type="server_error")
        c = choices[tag]
        now = time.monotonic()
        self.s.observe(c, item, now, t0)
        if span is not None:
            span.first_token(item.queued_s)
        return c, item

    async def _collect(self, choices: list[Choice], sink: asyncio.Queue, t0: float, span: GenAISpan | None) -> None:
        open_ = len(choices)
        while open_:
            c, d = await self._next(sink, choices, t0, span)
            _absorb(c, d)
            if d.finished:
                open_ -= 1

    def _whole(self, req, kind, rid, model, created, prompts, choices) -> dict:
        out = []
        for c in choices:
            text = "".join(c.text)
            if kind == "text_completion":
                if getattr(req, "echo", False):
                    text = self.s.tokenizer().decode(prompts[c.prompt_index], skip_special_tokens=False) + text
                lp = self._completion_logprobs(c.logprobs, 0) if req.logprobs is not None else None
                out.append({"index": c.index, "text": text, "logprobs": lp, "finish_reason": c.finish_reason})
            else:
                lp = {"content": self._chat_logprobs(c.logprobs)} if req.logprobs else None
                out.append({"index": c.index, "message": {"role": "assistant", "content": text},
                            "logprobs": lp, "finish_reason": c.finish_reason})
        return {"id": rid, "object": kind, "created": created, "model": model, "choices": out,
                "usage": _usage(prompts, choices, req.n)}

    async def _stream(self, request, req, kind, rid, model, created, prompts, choices, sink, include_usage, t0, span):
        chunk_kind = "chat.completion.chunk" if kind == "chat.completion" else "text_completion"
        resp = await sse.open_stream(request)

        def chunk(choice_payloads: list[dict], usage=None) -> bytes:
            body = {"id": rid, "object": chunk_kind, "created": created, "model": model, "choices": choice_payloads}
            if include_usage:
                body["usage"] = usage
            return sse.event(body)

        try:
            if kind == "chat.completion":
                for c in choices:
                    await resp.write(chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}]))
            elif getattr(req, "echo", False):
                for c in choices:
                    text = self.s.tokenizer().decode(prompts[c.prompt_index], skip_special_tokens=False)
                    await resp.write(chunk([{"index": c.index, "text": text, "logprobs": None, "finish_reason": None}]))
            open_ = len(choices)
            offsets = [0] * len(choices)
            # A token whose text is withheld still carries its logprob, which must not be dropped.
            want_logprobs = bool(req.logprobs) if kind == "chat.completion" else req.logprobs is not None
            while open_:
                try:
                    c, d = await self._next(sink, choices, t0, span)
                except APIError as e:
                    if span is not None:
                        span.stream_error = e.code or "error"
                    await resp.write(sse.event(e.body()))
                    break
                _absorb(c, d)
                if d.finished:
                    open_ -= 1
                if not d.text and not d.finished and not (want_logprobs and d.logprobs):
                    continue  # a withheld partial character or stop-string prefix
                reason = d.finish_reason if d.finished else None
                if kind == "chat.completion":
                    lp = {"content": self._chat_logprobs(d.logprobs)} if req.logprobs and d.logprobs else None
                    delta = {"content": d.text} if d.text else {}
                    payload = {"index": c.index, "delta": delta, "logprobs": lp, "finish_reason": reason}
                else:
                    lp = self._completion_logprobs(d.logprobs, offsets[c.index]) if req.logprobs is not None and d.logprobs else None
                    payload = {"index": c.index, "text": d.text, "logprobs": lp, "finish_reason": reason}
                offsets[c.index] += len(d.text)
                await resp.write(chunk([payload]))
            else:
                if include_usage:
                    body = {"id": rid, "object": chunk_kind, "created": created, "model": model, "choices": [],
                            "usage": _usage(prompts, choices, req.n)}
                    await resp.write(sse.event(body))
            await resp.write(sse.DONE)
        except (ConnectionResetError, ConnectionError):
            pass  # the client went away; _serve's finally aborts what is left
        except Exception as e:
            # The response has begun: an error now can only be an event in the stream, never another response.
            if not isinstance(e, APIError):
                log.exception("stream %s failed", rid)
                e = APIError(500, "the server failed while streaming this answer; the error is in its log",
                             code="internal_error", err_type="server_error")
            if span is not None:
                span.stream_error = e.code or "error"
            with contextlib.suppress(ConnectionError):
                await resp.write(sse.event(e.body()))
                await resp.write(sse.DONE)
        return resp

    # ---- logprobs in each endpoint's shape -----------------------------------------------
    def _token_str(self, token_id: int) -> str:
        return self.s.tokenizer().decode([token_id], skip_special_tokens=False)

    def _completion_logprobs(self, lps: list[TokenLogprob], offset: int) -> dict:
        tokens, token_lps, tops, offsets = [], [], [], []
        for lp in lps:
            t = self._token_str(lp.token_id)
            tokens.append(t)
            token_lps.append(lp.logprob)
            tops.append({self._token_str(i): v for i, v in lp.top})
            offsets.append(offset)
            offset += len(t)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    def _chat_logprobs(self, lps: list[TokenLogprob]) -> list[dict]:
        out = []
        for lp in lps:
            t = self._token_str(lp.token_id)
            out.append({"token": t, "logprob": lp.logprob, "bytes": list(t.encode()),
                        "top_logprobs": [{"token": (s := self._token_str(i)), "logprob": v, "bytes": list(s.encode())}
                                         for i, v in lp.top]})
        return out


def _absorb(c: Choice, d: SeqDelta) -> None:
    c.text.append(d.text)
    c.token_ids.extend(d.token_ids)
    if d.logprobs:
        c.logprobs.extend(d.logprobs)
    c.num_cached_tokens = d.num_cached_tokens
    if d.finished:
        c.finish_reason = d.finish_reason


def _usage(prompts: list[list[int]], choices: list[Choice], n: int) -> dict:
    prompt_tokens = sum(len(p) for p in prompts)
    completion = sum(len(c.token_ids) for c in choices)
    cached = sum(c.num_cached_tokens for c in choices if c.index % n == 0)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _with_seed(p: SamplingParams, seed: int) -> SamplingParams:
    from dataclasses import replace

    return replace(p, seed=seed % 2**63)
