"""POST /v1/responses: OpenAI's Responses API, over the chat route's machinery.

A request is read as a chat request (its input items become messages, its function tools the chat's tools, its
text.format the response_format), served by the same engine loop, and answered as a Response object: a message
item for the text and a function_call item per call; streamed, as the typed events client.responses.stream reads
(response.created, response.output_item.added, response.output_text.delta, response.function_call_arguments.delta,
... response.completed). Nothing is stored: store, previous_response_id and background are refused by name.
"""
from __future__ import annotations

import contextlib
import logging
import time
import uuid

from aiohttp import web
from pydantic import ValidationError

from gateway import sse
from gateway.errors import APIError, bad_request
from gateway.openai_routes import Choice, OpenAIRoutes, absorb, refuse_unhonoured
from gateway.protocol import (ChatCompletionRequest, FunctionCallItem, FunctionCallOutputItem, InputMessage,
                              ResponsesRequest, TextJSONSchemaFormat)
from gateway.request_body import validation_error
from gateway.tools import ToolPlan, new_call_id
from tokenization import tool_calls as formats

log = logging.getLogger("strata.gateway")

_TEXT_PARTS = ("input_text", "output_text")


def _content(content, param: str) -> str | list[dict]:
    """A content as the chat route takes it: a string, or its parts as text parts (joined there, by the one rule for
    that); a part of another kind (an image, a file) is refused by name."""
    if isinstance(content, str):
        return content
    other = next((p.type for p in content if p.type not in _TEXT_PARTS), None)
    if other is not None:
        raise bad_request(f"{param} has a content part of type '{other}': this model reads text only", param,
                          "unsupported_content")
    return [{"type": "text", "text": p.text} for p in content]


# Where a chat request's field came from, for the errors a Responses client reads.
_PARAMS = {"messages": "input", "max_completion_tokens": "max_output_tokens", "max_tokens": "max_output_tokens",
           "response_format": "text.format"}


def chat_messages(req: ResponsesRequest) -> list[dict]:
    """The input as chat messages: instructions first, as the system message; an earlier turn's function calls on
    its assistant message; their outputs as tool messages."""
    messages: list[dict] = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    if isinstance(req.input, str):
        return messages + [{"role": "user", "content": req.input}]
    for i, item in enumerate(req.input):
        param = f"input[{i}]"
        if isinstance(item, InputMessage):
            messages.append({"role": item.role, "content": _content(item.content, param)})
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": _content(item.output, param)})
        else:
            raise bad_request(f"{param} is an item of type '{item.type}', which this server does not take", "input",
                              "unsupported_input_item")
    if not messages:
        raise bad_request("input must not be empty", "input")
    return messages


def chat_request(req: ResponsesRequest) -> ChatCompletionRequest:
    """The chat request that serves `req`."""
    tools = None
    if req.tools:
        tools = []
        for i, t in enumerate(req.tools):
            if t.type != "function":
                raise bad_request(f"tools[{i}] is a '{t.type}' tool: this server runs function tools only", "tools",
                                  "unsupported_tool")
            if t.name is None:
                raise bad_request(f"tools[{i}] needs a name", "tools")
            tools.append({"type": "function", "function": t.model_dump(include={"name", "description", "parameters",
                                                                                 "strict"}, exclude_none=True)})
    choice = req.tool_choice
    if choice is not None and not isinstance(choice, str):
        choice = {"type": "function", "function": {"name": choice.name}}
    fmt = req.text.format if req.text is not None else None
    if isinstance(fmt, TextJSONSchemaFormat):
        fmt = {"type": "json_schema", "json_schema": fmt.model_dump(by_alias=True, exclude_none=True, exclude={"type"})}
    elif fmt is not None:
        fmt = fmt.model_dump()
    body = {"model": req.model, "messages": chat_messages(req), "max_completion_tokens": req.max_output_tokens,
            "temperature": req.temperature, "top_p": req.top_p, "tools": tools, "tool_choice": choice,
            "parallel_tool_calls": req.parallel_tool_calls, "response_format": fmt, "stream": req.stream,
            "user": req.user}
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        raise validation_error(e) from None


class ResponseRender:
    """Renders one answer as a Response object, whole or as the stream of its events."""

    def __init__(self, req: ResponsesRequest, rid: str, plan: ToolPlan | None, prompt_tokens: int) -> None:
        self.req = req
        self.rid = rid
        self.plan = plan
        self.prompt_tokens = prompt_tokens
        self.created = int(time.time())
        self.seq = 0

    # ---- the Response object ---------------------------------------------------------------
    def response(self, status: str, output: list[dict], choice: Choice | None = None) -> dict:
        req = self.req
        fmt = req.text.format.model_dump(by_alias=True, exclude_none=True) if req.text and req.text.format else {
            "type": "text"}
        tool_choice = req.tool_choice.model_dump() if hasattr(req.tool_choice, "model_dump") else (
            req.tool_choice or "auto")
        body = {
            "id": self.rid, "object": "response", "created_at": self.created, "status": status, "model": req.model,
            "output": output, "error": None, "incomplete_details": None, "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens, "metadata": req.metadata or {},
            "parallel_tool_calls": req.parallel_tool_calls, "previous_response_id": None, "store": False,
            "temperature": req.temperature, "top_p": req.top_p, "text": {"format": fmt}, "tool_choice": tool_choice,
            "tools": [t.model_dump(exclude_none=True) for t in req.tools or []], "user": req.user, "usage": None,
        }
        if choice is not None:
            if choice.finish_reason == "length":
                body["status"] = "incomplete"
                body["incomplete_details"] = {"reason": "max_output_tokens"}
            out = len(choice.token_ids)
            body["usage"] = {"input_tokens": self.prompt_tokens,
                             "input_tokens_details": {"cached_tokens": choice.num_cached_tokens},
                             "output_tokens": out, "output_tokens_details": {"reasoning_tokens": 0},
                             "total_tokens": self.prompt_tokens + out}
        return body

    @staticmethod
    def message_item(item_id: str, text: str, status: str) -> dict:
        content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if status != "in_progress" \
            else []
        return {"id": item_id, "type": "message", "role": "assistant", "status": status, "content": content}

    @staticmethod
    def call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict:
        return {"id": item_id, "type": "function_call", "call_id": call_id, "name": name, "arguments": arguments,
                "status": status}

    def whole(self, choices: list[Choice]) -> dict:
        c = choices[0]
        text = "".join(c.text)
        status = "incomplete" if c.finish_reason == "length" else "completed"
        content, calls = self.plan.format.parse(text) if self.plan is not None else (text, [])
        output = []
        if content or not calls:
            output.append(self.message_item(f"msg_{uuid.uuid4().hex}", content, status))
        for call in calls:  # a call that parsed is whole, whatever cut what came after it
            output.append(self.call_item(f"fc_{uuid.uuid4().hex}", new_call_id(), call.name, call.arguments,
                                         "completed"))
        return self.response("completed", output, c)

    # ---- the stream of events ------------------------------------------------------------
    def event(self, kind: str, **fields) -> bytes:
        self.seq += 1
        return sse.typed_event(kind, {"type": kind, "sequence_number": self.seq - 1, **fields})

    async def stream(self, request: web.Request, choices: list[Choice], next_delta, span) -> web.StreamResponse:
        resp = await sse.open_stream(request)
        items: list[dict] = []  # output items so far; the last may be open
        text_parts: list[str] = []
        args_parts: list[str] = []
        reader = self.plan.format.stream() if self.plan is not None else None

        async def send(*frames: bytes) -> None:
            for f in frames:
                await resp.write(f)

        def close_open(status: str) -> list[bytes]:
            if not items or items[-1]["status"] != "in_progress":
                return []
            item, k = items[-1], len(items) - 1
            frames = []
            if item["type"] == "message":
                text = "".join(text_parts)
                part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
                frames += [self.event("response.output_text.done", item_id=item["id"], output_index=k, content_index=0,
                                      text=text, logprobs=[]),
                           self.event("response.content_part.done", item_id=item["id"], output_index=k,
                                      content_index=0, part=part)]
                items[k] = self.message_item(item["id"], text, status)
            else:
                args = "".join(args_parts)
                frames.append(self.event("response.function_call_arguments.done", item_id=item["id"], output_index=k,
                                         name=item["name"], arguments=args))
                items[k] = self.call_item(item["id"], item["call_id"], item["name"], args, status)
            frames.append(self.event("response.output_item.done", output_index=k, item=items[k]))
            return frames

        def on_events(events) -> list[bytes]:
            """An item closes when the next begins: it is whole."""
            status = "completed"
            frames = []
            for e in events:
                if isinstance(e, formats.TextDelta):
                    if not e.text:
                        continue
                    if not items or items[-1]["type"] != "message" or items[-1]["status"] != "in_progress":
                        frames += close_open(status)
                        text_parts.clear()
                        item = self.message_item(f"msg_{uuid.uuid4().hex}", "", "in_progress")
                        items.append(item)
                        k = len(items) - 1
                        frames += [self.event("response.output_item.added", output_index=k, item=item),
                                   self.event("response.content_part.added", item_id=item["id"], output_index=k,
                                              content_index=0,
                                              part={"type": "output_text", "text": "", "annotations": [],
                                                    "logprobs": []})]
                    text_parts.append(e.text)
                    frames.append(self.event("response.output_text.delta", item_id=items[-1]["id"],
                                             output_index=len(items) - 1, content_index=0, delta=e.text, logprobs=[]))
                elif isinstance(e, formats.CallStarted):
                    frames += close_open(status)
                    args_parts.clear()
                    item = self.call_item(f"fc_{uuid.uuid4().hex}", new_call_id(), e.name, "", "in_progress")
                    items.append(item)
                    frames.append(self.event("response.output_item.added", output_index=len(items) - 1, item=item))
                else:
                    args_parts.append(e.fragment)
                    frames.append(self.event("response.function_call_arguments.delta", item_id=items[-1]["id"],
                                             output_index=len(items) - 1, delta=e.fragment))
            return frames

        try:
            start = self.response("in_progress", [])
            await send(self.event("response.created", response=start),
                       self.event("response.in_progress", response=start))
            while True:
                try:
                    c, d = await next_delta()
                except APIError as e:
                    if span is not None:
                        span.stream_error = e.code or "error"
                    await send(self.error_event(e))
                    return resp
                absorb(c, d)
                status = "incomplete" if d.finish_reason == "length" else "completed"
                if reader is not None:
                    events = reader.feed(d.text) if d.text else []
                    if d.finished:
                        events += reader.finish()
                else:
                    events = [formats.TextDelta(d.text)]
                frames = on_events(events)
                if d.finished:
                    if not items:  # an empty answer is still a message
                        item = self.message_item(f"msg_{uuid.uuid4().hex}", "", "in_progress")
                        items.append(item)
                        frames += [self.event("response.output_item.added", output_index=0, item=item),
                                   self.event("response.content_part.added", item_id=item["id"], output_index=0,
                                              content_index=0, part={"type": "output_text", "text": "",
                                                                     "annotations": [], "logprobs": []})]
                    frames += close_open(status)
                    final = self.response("completed", items, c)
                    kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
                    frames.append(self.event(kind, response=final))
                await send(*frames)
                if d.finished:
                    return resp
        except (ConnectionResetError, ConnectionError):
            return resp  # the client went away; the route aborts what is left
        except Exception as e:
            if not isinstance(e, APIError):
                log.exception("response stream %s failed", self.rid)
                e = APIError(500, "the server failed while streaming this answer; the error is in its log",
                             code="internal_error", err_type="server_error")
            if span is not None:
                span.stream_error = e.code or "error"
            with contextlib.suppress(ConnectionError):
                await send(self.error_event(e))
            return resp

    def error_event(self, e: APIError) -> bytes:
        """The error, then the response failed with it: what client.responses.stream reports."""
        body = e.body()["error"]
        failed = self.response("failed", [])
        failed["error"] = {"code": body.get("code") or "server_error", "message": body["message"]}
        return (self.event("error", code=body.get("code"), message=body["message"], param=body.get("param"))
                + self.event("response.failed", response=failed))


class ResponsesRoutes:
    def __init__(self, routes: OpenAIRoutes) -> None:
        self.routes = routes

    async def create(self, request: web.Request) -> web.StreamResponse:
        req: ResponsesRequest = await self.routes.s.parse(request, ResponsesRequest)
        self.routes.s.tokenizer()  # refused before anything else where the checkpoint has none
        refuse_unhonoured(req)
        rid = f"resp_{uuid.uuid4().hex}"
        try:
            chat = chat_request(req)
            return await self.routes.serve_chat(request, chat, rid,
                                                lambda plan, prompt_tokens: ResponseRender(req, rid, plan, prompt_tokens))
        except APIError as e:
            e.param = _PARAMS.get(e.param, e.param)
            raise
