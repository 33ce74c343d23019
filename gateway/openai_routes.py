"""POST /v1/completions and /v1/chat/completions: requests in, choices out, streamed or whole."""
from __future__ import annotations

import asyncio
import contextlib
import json
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
from gateway.offload import off_loop
from gateway.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from gateway.structured import compiled, format_grammar, format_schema
from gateway.tools import CallsOut, ToolPlan, template_inputs, tool_plan, whole_calls
from gateway.request_tracing import GenAISpan
from tokenization import TokenizerError, normalize_messages
from tokenization import tool_calls as tool_formats

log = logging.getLogger("strata.gateway")


def chat_messages(messages) -> list[dict]:
    """The messages as the chat template takes them: developer is system, no content is '', text parts are joined
    by the one rule for that (tokenization.normalize_messages), earlier tool calls and tool results kept."""
    out = []
    for i, m in enumerate(messages):
        if isinstance(m.content, list):
            other = next((p.type for p in m.content if p.type != "text"), None)
            if other is not None:
                raise bad_request(f"messages[{i}] has a content part of type '{other}': this model reads text only",
                                  "messages", "unsupported_content")
        msg = {"role": "system" if m.role == "developer" else m.role,
               "content": [p.model_dump(include={"type", "text"}) for p in m.content] if isinstance(m.content, list)
               else m.content or ""}
        if m.tool_calls:
            if m.role != "assistant":
                raise bad_request(f"messages[{i}]: only an assistant message carries tool_calls", "messages")
            msg["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        if m.role == "tool":
            if not m.tool_call_id:
                raise bad_request(f"messages[{i}]: a tool message needs the tool_call_id it answers", "messages")
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    try:
        return normalize_messages(out)
    except TokenizerError as e:
        raise bad_request(str(e), "messages") from None


async def chat_prompt(state, messages, plan: ToolPlan | None, add_generation_prompt: bool,
                      continue_final_message: bool = False) -> list[int]:
    """A chat's prompt tokens, as the chat route and /tokenize render them: the template's, with the tools where
    there are any, tokenized off the event loop."""
    tok = state.tokenizer()
    msgs = chat_messages(messages)
    chars = sum(len(m["content"]) + sum(len(c["function"]["arguments"]) for c in m.get("tool_calls", ())) for m in msgs)
    if plan is not None:
        chars += len(json.dumps(plan.functions))
    state.check_chars(chars, "messages")
    add_generation_prompt = add_generation_prompt and not continue_final_message
    msgs, tools = template_inputs(plan, msgs, tok.chat_template)

    def render_and_encode() -> list[int]:
        try:
            text = tok.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt, tools=tools)
        except TokenizerError as e:
            raise bad_request(str(e), "messages") from None
        if continue_final_message and msgs[-1]["role"] == "assistant":
            end = text.rfind(msgs[-1]["content"])
            if end >= 0:
                text = text[: end + len(msgs[-1]["content"])]
        return tok.encode(text, add_special_tokens=False)

    return await off_loop(render_and_encode)


def refuse_unhonoured(req) -> None:
    """OpenAI fields this server knows but cannot honour are refused by name, never ignored (a chat request's, or a
    Responses request's: each has some of them)."""
    def given(name: str):
        return getattr(req, name, None)

    refused = [
        ("store", given("store") is True, "this server keeps no responses; send store: false or leave it out"),
        ("previous_response_id", given("previous_response_id") is not None,
         "this server keeps no responses to continue from; send the conversation as input items"),
        ("background", given("background") is True, "this server runs no responses in the background"),
        ("include", bool(given("include")), "this server has no extra output to include"),
        ("reasoning", given("reasoning") is not None, "this model has no reasoning settings"),
        ("audio", given("audio") is not None, "this model answers in text only"),
        ("modalities", any(m != "text" for m in given("modalities") or ()), "this model answers in text only"),
        ("prediction", given("prediction") is not None, "predicted outputs are not supported"),
        ("web_search_options", given("web_search_options") is not None, "this server has no web search"),
        ("service_tier", given("service_tier") not in (None, "auto", "default"),
         "this server has one tier: auto or default"),
    ]
    for param, bad, why in refused:
        if bad:
            raise bad_request(f"unsupported value for '{param}': {why}", param, "unsupported_field")


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

    def _sampling(self, req: SamplingFields, max_tokens: int | None, prompt_len: int, logprobs: int | None,
                  grammar: str | None = None) -> SamplingParams:
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
                grammar=grammar,
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

    def _echoed(self, req: CompletionRequest, prompts: list[list[int]], index: int) -> str:
        """A prompt as echo returns it: the text the client sent, not its tokens rendered back (which would add
        the BOS token the tokenizer put before it); token ids sent as ids, rendered as they are."""
        p = req.prompt
        if isinstance(p, str):
            return p
        if isinstance(p[0], str):
            return p[index]
        return self.s.tokenizer().decode(prompts[index], skip_special_tokens=False)

    async def _chat_prompt(self, req: ChatCompletionRequest, plan: ToolPlan | None) -> list[int]:
        return await chat_prompt(self.s, req.messages, plan, req.add_generation_prompt, req.continue_final_message)

    async def _chat_grammar(self, req: ChatCompletionRequest, plan: ToolPlan | None) -> str | None:
        """The grammar the answer must follow: the forced tool call's; under auto, calls or the response_format's
        schema; else the response_format's."""
        tok = self.s.tokenizer()
        if plan is not None:
            schema = format_schema(req.response_format, "response_format")
            tools = plan.grammar(tool_formats.special_token_id(tok), schema)
            if tools is not None:
                return await compiled(self.s, tools, "tools" if plan.choice != "auto" else "response_format")
        return await compiled(self.s, format_grammar(req.response_format, "response_format"), "response_format")

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
        return await self.serve_chat(request, req, f"chatcmpl-{uuid.uuid4().hex}")

    async def serve_chat(self, request: web.Request, req: ChatCompletionRequest, rid: str,
                         render_for=None) -> web.StreamResponse:
        """A chat request's answer; render_for(tool plan, prompt length) gives the object that renders it where the
        answer is not a chat completion (the Responses API's)."""
        self._check_model(req.model)
        if req.top_logprobs and not req.logprobs:
            raise bad_request("top_logprobs needs logprobs set to true", "top_logprobs")
        refuse_unhonoured(req)
        tok = self.s.tokenizer()  # a chat is rendered to text, and its answer is text
        self.s.check_fits(req.n)
        plan = tool_plan(req.tools, req.tool_choice, req.parallel_tool_calls, tok.chat_template)
        prompt = await self._chat_prompt(req, plan)
        grammar = await self._chat_grammar(req, plan)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = self._sampling(req, max_tokens, len(prompt), (req.top_logprobs or 0) if req.logprobs else None,
                                grammar)
        if plan is not None:
            params.kept_special_token_ids = plan.format.marker_ids(tool_formats.special_token_id(tok))
        render = render_for(plan, len(prompt)) if render_for is not None else None
        return await self._serve(request, req, "chat.completion", [prompt], [params], rid, plan, render)

    # ---- the shared engine loop ----------------------------------------------------------
    async def _serve(self, request, req: SamplingFields, kind: str, prompts, params, rid: str,
                     tools: ToolPlan | None = None, render=None) -> web.StreamResponse:
        """Run the request's sequences and answer, whole or streamed: as `kind`'s chunks, or through `render` (an
        object with whole(choices) -> dict and async stream(request, choices, next_delta) -> StreamResponse, as
        the Responses API renders its answers)."""
        s = self.s
        n = req.n
        num_seqs = len(prompts) * n
        s.admit(num_seqs)
        sink: asyncio.Queue = asyncio.Queue()
        operation = "text_completion" if kind == "text_completion" else "chat"
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
                if render is not None:
                    return await render.stream(request, choices, lambda: self._next(sink, choices, t0, span), span)
                return await self._stream(request, req, kind, rid, model, created, prompts, choices, sink, include_usage,
                                          t0, span, tools)
            await self._collect(choices, sink, t0, span)
            if render is not None:
                return web.json_response(render.whole(choices))
            return web.json_response(self._whole(req, kind, rid, model, created, prompts, choices, tools))
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
            absorb(c, d)
            if d.finished:
                open_ -= 1

    def _whole(self, req, kind, rid, model, created, prompts, choices, tools: ToolPlan | None = None) -> dict:
        out = []
        for c in choices:
            text = "".join(c.text)
            if kind == "text_completion":
                echoed = self._echoed(req, prompts, c.prompt_index) if getattr(req, "echo", False) else ""
                text = echoed + text
                # The answer's text offsets count from the start of the text returned, the echoed prompt included.
                lp = self._completion_logprobs(c.logprobs, len(echoed)) if req.logprobs is not None else None
                out.append({"index": c.index, "text": text, "logprobs": lp, "finish_reason": c.finish_reason})
            else:
                lp = {"content": self._chat_logprobs(c.logprobs)} if req.logprobs else None
                message = {"role": "assistant", "content": text}
                reason = c.finish_reason
                if tools is not None:
                    content, calls = whole_calls(tools, text)
                    if calls:
                        message = {"role": "assistant", "content": content, "tool_calls": calls}
                        reason = _calls_finish(reason)
                out.append({"index": c.index, "message": message, "logprobs": lp, "finish_reason": reason})
        return {"id": rid, "object": kind, "created": created, "model": model, "choices": out,
                "usage": _usage(prompts, choices, req.n)}

    async def _stream(self, request, req, kind, rid, model, created, prompts, choices, sink, include_usage, t0, span,
                      tools: ToolPlan | None = None):
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
            echoed = [0] * len(choices)
            if kind != "chat.completion" and getattr(req, "echo", False):
                for c in choices:
                    text = self._echoed(req, prompts, c.prompt_index)
                    echoed[c.index] = len(text)
                    await resp.write(chunk([{"index": c.index, "text": text, "logprobs": None, "finish_reason": None}]))
            open_ = len(choices)
            offsets = list(echoed)  # text offsets count from the start of the text streamed, echo included
            calls = [CallsOut(tools) for _ in choices] if tools is not None else None
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
                absorb(c, d)
                if d.finished:
                    open_ -= 1
                if not d.text and not d.finished and not (want_logprobs and d.logprobs):
                    continue  # a withheld partial character or stop-string prefix
                reason = d.finish_reason if d.finished else None
                if kind == "chat.completion":
                    lp = {"content": self._chat_logprobs(d.logprobs)} if req.logprobs and d.logprobs else None
                    text, call_deltas = calls[c.index].feed(d.text, d.finished) if calls else (d.text, [])
                    delta = {"content": text} if text else {}
                    if call_deltas:
                        delta["tool_calls"] = call_deltas
                    if reason is not None and calls and calls[c.index].called:
                        reason = _calls_finish(reason)
                    if not delta and not lp and reason is None:
                        continue  # text held back: it may begin a call
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


def _calls_finish(reason: str | None) -> str | None:
    """An answer that called tools and stopped by itself finished to call them; one cut by length did not."""
    return "tool_calls" if reason == "stop" else reason


def absorb(c: Choice, d: SeqDelta) -> None:
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
