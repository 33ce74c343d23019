"""Function calling on the chat route: how a request's tools reach the prompt, which grammar forces a call, and how
calls are read back out of the answer, whole or as it streams.

The model's chat template renders the tools where it takes them; else tokenization.tool_calls' default prompt
describes them in a system message. The answer is read in the format the template teaches (Hermes' <tool_call>
tags, Llama 3's JSON, Mistral's [TOOL_CALLS]). tool_choice "required" and a named function are enforced by a
grammar, so the call always parses; under "auto" the model answers in text or calls as it likes; under "none" the
tools are not shown to it at all.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from gateway.errors import bad_request
from gateway.protocol import NamedToolChoice, Tool
from tokenization import tool_calls as formats


@dataclass(slots=True)
class ToolPlan:
    """What a request's tools mean for its prompt, its grammar and its answer."""

    functions: list[dict]  # the tools' function definitions, as given
    format: formats.ToolFormat
    choice: str  # auto | required | named
    parallel: bool
    named: str | None = None

    def grammar(self, token_id, answer_schema: dict | None = None) -> str | None:
        """The Lark grammar of the answer: the forced call(s) where the choice forces one; under auto, with a
        response_format's schema, either calls or an answer in that schema; else None (free)."""
        if self.choice == "required":
            return self.format.grammar(self.functions, parallel=self.parallel, token_id=token_id)
        if self.choice == "named":
            chosen = [f for f in self.functions if f["name"] == self.named]
            return self.format.grammar(chosen, parallel=False, token_id=token_id)
        if answer_schema is None:
            return None
        calls = self.format.grammar(self.functions, parallel=self.parallel, token_id=token_id)
        answer = {**answer_schema, "x-guidance": formats.JSON_OPTIONS}
        return (calls.replace("start:", "calls:", 1)
                + f"start: calls | answer\nanswer: %json {json.dumps(answer, ensure_ascii=False)}\n")


def tool_plan(tools: list[Tool] | None, choice, parallel: bool, template: str | None) -> ToolPlan | None:
    """None where the answer is text only: no tools, or tool_choice "none". Calls are read in the format of the
    template where it renders the tools, else in the default prompt's (hermes)."""
    if choice is not None and not tools and choice != "none":
        raise bad_request("tool_choice needs tools", "tool_choice")
    if not tools or choice == "none":
        return None
    functions = [t.function.model_dump(exclude_none=True) for t in tools]
    names = [f["name"] for f in functions]
    if len(set(names)) != len(names):
        raise bad_request("tools must have distinct names", "tools")
    for i, f in enumerate(functions):
        kind = f.get("parameters", {}).get("type", "object")
        if kind != "object":
            raise bad_request(f"tools[{i}].function.parameters must be a JSON schema of an object (the call's named "
                              f"arguments), got type {kind!r}", "tools")
    named = None
    if isinstance(choice, NamedToolChoice):
        named = choice.function.name
        if named not in names:
            raise bad_request(f"tool_choice names the function '{named}', which is not among the tools", "tool_choice")
    fmt = formats.format_for_template(template) if formats.template_takes_tools(template) else formats.HERMES
    return ToolPlan(functions, fmt, "named" if named else (choice or "auto"), parallel, named)


def template_inputs(plan: ToolPlan | None, messages: list[dict], template: str | None) -> tuple[list[dict], list | None]:
    """The messages and tools the chat template is given. Earlier calls and their results are rendered whether or
    not this request offers tools."""
    takes_tools = formats.template_takes_tools(template)
    if takes_tools:
        return formats.template_tool_messages(messages), (
            [{"type": "function", "function": f} for f in plan.functions] if plan else None)
    return formats.default_tool_messages(messages, plan.functions if plan else []), None


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(slots=True)
class CallsOut:
    """One choice's answer read as it streams: text deltas, and tool calls in OpenAI's delta form."""

    plan: ToolPlan
    stream: formats.ToolCallStream = None
    ids: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.stream = self.plan.format.stream()

    def feed(self, text: str, last: bool) -> tuple[str, list[dict]]:
        """The content to send and the tool_calls deltas, for text newly generated."""
        events = self.stream.feed(text) if text else []
        if last:
            events += self.stream.finish()
        content: list[str] = []
        calls: list[dict] = []
        for e in events:
            if isinstance(e, formats.TextDelta):
                content.append(e.text)
            elif isinstance(e, formats.CallStarted):
                self.ids.append(new_call_id())
                self.names.append(e.name)
                calls.append({"index": e.index, "id": self.ids[e.index], "type": "function",
                              "function": {"name": e.name, "arguments": ""}})
            elif calls and calls[-1]["index"] == e.index:
                calls[-1]["function"]["arguments"] += e.fragment  # one entry per call in a chunk, as OpenAI sends
            else:
                calls.append({"index": e.index, "function": {"arguments": e.fragment}})
        return "".join(content), calls

    @property
    def called(self) -> bool:
        return bool(self.ids)


def whole_calls(plan: ToolPlan, text: str) -> tuple[str | None, list[dict]]:
    """A finished answer's content (None where it is only calls) and its tool_calls, in OpenAI's form."""
    content, calls = plan.format.parse(text)
    out = [{"id": new_call_id(), "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
           for c in calls]
    return (content or None) if out else content, out
