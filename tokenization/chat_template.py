"""Chat template rendering that mirrors transformers' `apply_chat_template(tokenize=False)`.

Templates come from checkpoint directories, i.e. from strangers, so they run in jinja2's immutable
sandbox with the same globals, filters and extensions transformers provides; a template written for
transformers renders to the same string here.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tokenization.errors import TokenizerError

# The key transformers copies a message's reasoning into; some templates read older names for it.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(TokenizerError):
    """The conversation cannot be rendered (bad message shape, or the template raised)."""


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # jinja's own tojson HTML-escapes '<', '>', '&' and "'", which would corrupt prompts
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    # A callable stand-in for `dict` that exposes no attributes a template could climb through.
    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    # Underscore names on a namespace are the usual first step towards CPython internals.
    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - same trick as jinja's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attribute {name!r}")


class _GenerationTag(jinja2.ext.Extension):
    # Some templates wrap assistant turns in {% generation %} for training masks; for rendering the
    # tag is transparent, but without the extension those templates would not even compile.
    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"chat template does not compile: {exc}") from exc


def join_text_parts(parts: Sequence[Any]) -> str:
    texts = []
    for part in parts:
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, Mapping):
            raise ChatTemplateError(f"message content parts must be objects, got {type(part).__name__}")
        kind = part.get("type", "text")
        if kind != "text":
            raise ChatTemplateError(f"unsupported message content part type {kind!r}; only 'text' is accepted")
        text = part.get("text")
        if not isinstance(text, str):
            raise ChatTemplateError("a 'text' content part needs a string 'text' field")
        texts.append(text)
    # Newline matches how OpenAI-compatible servers flatten multi-part text for text-only templates.
    return "\n".join(texts)


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Plain dicts with None-valued keys dropped (as transformers does) and text parts joined."""
    if not messages:
        raise ChatTemplateError("cannot apply a chat template to an empty conversation")
    out = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"chat messages must be objects, got {type(message).__name__}")
        # APIs send content=None or tool_calls=None; templates handle a missing key but print "None".
        msg = {k: v for k, v in message.items() if v is not None}
        content = msg.get("content")
        if isinstance(content, (list, tuple)):
            msg["content"] = join_text_parts(content)
        reasoning = next((msg[k] for k in _REASONING_FIELDS if msg.get(k) is not None), None)
        if reasoning is not None:
            msg = {"thinking": reasoning, **msg, "reasoning_content": reasoning}
        out.append(msg)
    return out


def render(template: jinja2.Template, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool,
           special_tokens: Mapping[str, str], tools: list[dict] | None = None,
           documents: list[dict] | None = None, **kwargs: Any) -> str:
    variables = {**special_tokens, **kwargs}  # caller kwargs win over special tokens, as in transformers
    try:
        return template.render(
            messages=normalize_messages(messages),
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
    except (jinja2.exceptions.TemplateError, TypeError) as exc:
        # TypeError here is the template choking on a message shape it did not expect (e.g. str + dict)
        raise ChatTemplateError(f"chat template failed: {exc}") from exc
