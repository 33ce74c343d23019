"""Tool calls in chat models' output, in the formats OpenAI-compatible servers implement function calling with.

Three formats (`FORMATS`, or `format_for_template` to pick one from a chat template):

- ``hermes`` (Qwen2/2.5, Hermes, SmolLM-style ChatML): text, then calls, each
  ``<tool_call>\\n{"name": "fn", "arguments": {...}}\\n</tool_call>``, separated by newlines.
- ``llama3_json`` (Llama 3.1/3.2): ``{"name": "fn", "parameters": {...}}`` ("arguments" is accepted too), optionally
  after ``<|python_tag|>``; several calls are separated by ``; `` or newlines.
- ``mistral``: ``[TOOL_CALLS]`` then a JSON array ``[{"name": "fn", "arguments": {...}}, ...]``.

Each format parses a whole output (`parse`), follows one as it is generated (`stream`), and writes the llguidance
grammar that admits only well-formed calls of given tools (`grammar`, for ``tool_choice`` "required" or a named
function). Markers that are special tokens (``<|python_tag|>``, ``[TOOL_CALLS]``) usually never reach the text,
because detokenizing skips special tokens, so calls are recognised with or without them; without its marker, a
llama3_json call is recognised only at the very start of the output and a mistral array likewise. Text that looks
like a call but is not a well-formed one is content, never an error.

The default tool prompt
-----------------------
A chat template that renders the ``tools`` variable itself (`template_takes_tools`) gets the tools and the
conversation as they are, except that the JSON text of each assistant tool call's arguments is parsed into an object
(`template_tool_messages`; templates write ``tool_call.arguments | tojson``). A template that knows only system, user
and assistant messages gets the conversation rewritten by `default_tool_messages`:

- a system message in the Hermes style goes first, ahead of the conversation's own system prompt (joined to it by a
  blank line when there is one)::

      # Tools

      You may call one or more functions to assist with the user query.

      You are provided with function signatures within <tools></tools> XML tags:
      <tools>
      {"type": "function", "function": {"name": "get_weather", "description": ..., "parameters": {...}}}
      </tools>

      For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
      <tool_call>
      {"name": <function-name>, "arguments": <args-json-object>}
      </tool_call>

  (one line per tool inside ``<tools>``);
- an assistant message's tool calls are written into its content after its text, in the hermes format;
- tool results become user messages of ``<tool_response>\\n...\\n</tool_response>`` blocks, consecutive results
  sharing one message.

The model's answer is then read with the hermes format, whatever the template.
"""
from __future__ import annotations

import contextlib
import functools
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jinja2

from tokenization.chat_template import join_text_parts

__all__ = [
    "FORMATS", "HERMES", "LLAMA3_JSON", "MISTRAL", "ArgumentsDelta", "CallStarted", "Event", "TextDelta", "ToolCall",
    "ToolCallStream", "ToolFormat", "default_tool_messages", "format_for_template", "special_token_id",
    "template_takes_tools", "template_tool_messages",
]


@dataclass(frozen=True, slots=True)
class ToolCall:
    name: str
    # The arguments object's JSON text as generated, so that streamed fragments add up to exactly this.
    arguments: str


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str


@dataclass(frozen=True, slots=True)
class CallStarted:
    index: int
    name: str


@dataclass(frozen=True, slots=True)
class ArgumentsDelta:
    index: int
    fragment: str


Event = TextDelta | CallStarted | ArgumentsDelta

_WS = " \t\r\n"
# Where a JSON string's plain run ends, and where the next bracket or string begins.
_STRING_STOP = re.compile(r'["\\]')
_NESTED_STOP = re.compile(r'["{}\[\]]')
_SCALAR = re.compile(r'[^,}\]\s]*')


# -- one call object, as it arrives ------------------------------------------------------------------------------

(_OPEN, _FIRST_KEY, _NEXT_KEY, _KEY, _COLON, _VALUE, _NAME, _ARGS, _SKIP_NESTED, _SKIP_STRING, _SKIP_SCALAR,
 _AFTER_VALUE, _END) = range(13)


class _CallScanner:
    """Follows one `{"name": ..., "arguments": {...}}` object as its characters arrive.

    It tracks only what it must (keys, the name string, the extent of each value through strings, escapes and
    nesting); the object as a whole is checked with `json.loads` once it closes. `announced` turns true when the call
    can be reported: eagerly, as soon as the name is known and the arguments object has begun (before that the text
    may still be some other JSON object with a "name"); otherwise, or when the arguments come first, once the whole
    object has closed and checked out.
    """

    __slots__ = ("_args_keys", "_chars", "_depth", "_eager", "_escaped", "_has_args", "_in_string", "_key", "_raw",
                 "_state", "announced", "args", "done", "failed", "name")

    def __init__(self, args_keys: tuple[str, ...], eager: bool) -> None:
        self._args_keys = args_keys
        self._eager = eager
        self._state = _OPEN
        self._raw: list[str] = []
        self._chars: list[str] = []  # the string being read (a key or the name), undecoded
        self._key = ""
        self._depth = 0
        self._in_string = False
        self._escaped = False
        self.name: str | None = None
        self.args: list[str] = []
        self._has_args = False
        self.announced = False
        self.done = False
        self.failed = False

    def feed(self, text: str, pos: int = 0) -> int:
        """Consume text from `pos` until the object ends, the text does, or it turns out not to be a call."""
        start, n = pos, len(text)
        while pos < n and self._state != _END and not self.failed:
            state = self._state
            if state in (_ARGS, _SKIP_NESTED):
                pos = self._nested(text, pos)
            elif state in (_KEY, _NAME, _SKIP_STRING):
                pos = self._string(text, pos)
            elif state == _SKIP_SCALAR:
                pos = _SCALAR.match(text, pos).end()
                if pos < n:
                    self._state = _AFTER_VALUE
            elif text[pos] in _WS:
                pos += 1
            else:
                pos = self._punctuation(text[pos], pos)
        self._raw.append(text[start:pos])
        if self._state == _END and not self.done and not self.failed:
            self._close()
        return pos

    def _punctuation(self, c: str, pos: int) -> int:
        state = self._state
        if state == _OPEN and c == "{":
            self._state = _FIRST_KEY
        elif state in (_FIRST_KEY, _NEXT_KEY) and c == '"':
            self._state, self._chars = _KEY, []
        elif state in (_FIRST_KEY, _AFTER_VALUE) and c == "}":
            self._state = _END
        elif state == _AFTER_VALUE and c == ",":
            self._state = _NEXT_KEY
        elif state == _COLON and c == ":":
            self._state = _VALUE
        elif state == _VALUE:
            return self._value(c, pos)
        else:
            self.failed = True
            return pos
        return pos + 1

    def _value(self, c: str, pos: int) -> int:
        key = self._key
        if key == "name":
            if c != '"' or self.name is not None:
                self.failed = True
                return pos
            self._state, self._chars = _NAME, []
            return pos + 1
        if key in self._args_keys:
            if c != "{" or self._has_args:
                self.failed = True
                return pos
            self._has_args, self._state, self._depth = True, _ARGS, 0
            if self._eager and self.name is not None:
                self.announced = True
            return pos  # the brace is the arguments' first character: _nested takes it
        if c in "{[":
            self._state, self._depth = _SKIP_NESTED, 0
            return pos
        if c == '"':
            self._state = _SKIP_STRING
            return pos + 1
        if c in ",}]:":
            self.failed = True
            return pos
        self._state = _SKIP_SCALAR
        return pos

    def _through_string(self, text: str, pos: int) -> tuple[int, bool]:
        """Past a JSON string's characters from `pos` (an escape may straddle two pieces of text): where the scan
        stopped, and whether it passed the closing quote."""
        n = len(text)
        while pos < n:
            if self._escaped:
                self._escaped = False
                pos += 1
                continue
            m = _STRING_STOP.search(text, pos)
            if m is None:
                return n, False
            pos = m.end()
            if m.group() != "\\":
                return pos, True
            self._escaped = True
        return pos, False

    def _string(self, text: str, pos: int) -> int:
        start = pos
        pos, ended = self._through_string(text, pos)
        if self._state != _SKIP_STRING:
            self._chars.append(text[start:pos - 1] if ended else text[start:pos])
        if ended:
            self._string_ended()
        return pos

    def _string_ended(self) -> None:
        if self._state == _SKIP_STRING:
            self._state = _AFTER_VALUE
            return
        try:
            value = json.loads('"' + "".join(self._chars) + '"')
        except ValueError:
            self.failed = True
            return
        if self._state == _KEY:
            self._key, self._state = value, _COLON
        elif value:
            self.name, self._state = value, _AFTER_VALUE
        else:
            self.failed = True

    def _nested(self, text: str, pos: int) -> int:
        start, n = pos, len(text)
        collecting = self._state == _ARGS
        while pos < n:
            if self._in_string:
                pos, ended = self._through_string(text, pos)
                self._in_string = not ended
                continue
            m = _NESTED_STOP.search(text, pos)
            if m is None:
                pos = n
                break
            pos, c = m.end(), m.group()
            if c == '"':
                self._in_string = True
            elif c in "{[":
                self._depth += 1
            else:
                self._depth -= 1
                if self._depth == 0:
                    self._state = _AFTER_VALUE
                    break
        if collecting:
            self.args.append(text[start:pos])
        return pos

    def _close(self) -> None:
        ok = self.name is not None and self._has_args
        if ok:
            try:
                json.loads("".join(self._raw))
            except ValueError:
                ok = False
        if ok:
            self.done = self.announced = True
        else:
            self.failed = True


# -- the incremental parser ----------------------------------------------------------------------------------

class _Text:
    """Text destined for the content: leading whitespace is dropped and trailing whitespace held back until more
    text follows, so that what is emitted is the content stripped, exactly as `parse` returns it."""

    __slots__ = ("_started", "_ws")

    def __init__(self) -> None:
        self._started = False
        self._ws = ""

    def push(self, text: str) -> str:
        if not self._started:
            text = text.lstrip()
        body = text.rstrip()
        if not body:
            if self._started:
                self._ws += text
            return ""
        out = self._ws + body
        self._ws = text[len(body):]
        self._started = True
        return out


_TEXT, _BLOCK, _OBJECT, _SKIP_BROKEN, _DEAD = range(5)


class ToolCallStream:
    """Parses one output as it is generated: `feed` each new piece of text, then `finish` once.

    Text that may begin a call is held back until it is known not to. A call is announced (`CallStarted`) once its
    name is complete and its arguments object has begun, then its arguments stream as `ArgumentsDelta` fragments,
    the outer object's closing brace never among them; a call whose keys come in another order is reported whole
    when it closes. A call that turns out malformed before it was announced is given back as text, like one left
    incomplete at `finish`. Once announced, a call is never taken back: if it then breaks or is cut off, nothing more
    is emitted for it (the caller reports what it got), and in the mistral and llama3_json formats the rest of the
    output is dropped, while hermes resumes after the block's closing tag.
    """

    # Subclasses describe the format: what opens a block of calls, and (in _step_once) what a block is made of.
    _markers: tuple[str, ...] = ()
    _bare: str = ""  # a character that opens a block at the very start of the output (its marker having been skipped)
    _args_keys: tuple[str, ...] = ("arguments",)
    _resume: str = ""  # after a broken call, drop text up to and including this (never resume if empty)

    def __init__(self, *, eager: bool = True) -> None:
        self._eager = eager
        self._pending = ""
        self._events: list[Event] = []
        self._text = _Text()
        self._at_start = True
        self._calls = 0
        self._state = _TEXT
        self._step = ""  # where within a block (subclass-defined)
        self._block: list[str] = []  # the block's text since its opener, or since its last complete call
        self._after_call = False
        self._scanner: _CallScanner | None = None
        self._reported = False  # the current call was announced
        self._sent = 0  # pieces of the current call's arguments already emitted

    def feed(self, text: str) -> list[Event]:
        self._pending += text
        self._advance(final=False)
        return self._take()

    def finish(self) -> list[Event]:
        self._advance(final=True)
        return self._take()

    # -- machinery ---------------------------------------------------------------------------------------------

    def _take(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    def _emit_text(self, text: str) -> None:
        out = self._text.push(text)
        if not out:
            return
        self._at_start = False
        if self._events and isinstance(self._events[-1], TextDelta):
            self._events[-1] = TextDelta(self._events[-1].text + out)
        else:
            self._events.append(TextDelta(out))

    def _advance(self, final: bool) -> None:
        while True:
            if self._state == _TEXT:
                progressed = self._scan_text(final)
            elif self._state == _OBJECT:
                progressed = self._scan_object(final)
            elif self._state == _BLOCK:
                progressed = self._block_step(final)
            elif self._state == _SKIP_BROKEN:
                progressed = self._skip_broken(final)
            else:
                self._pending = ""
                progressed = False
            if not progressed:
                return

    def _scan_text(self, final: bool) -> bool:
        text = self._pending
        if not text:
            return False
        if self._at_start and self._bare:
            body = text.lstrip()
            if not body:
                self._emit_text(text)
                self._pending = ""
                return False
            # "[TOOL_CALLS]" begins with the bare "[": a marker, whole or in part, goes the marker's way.
            if body[0] == self._bare and not any(body.startswith(m) or m.startswith(body) for m in self._markers):
                self._emit_text(text[:len(text) - len(body)])
                self._pending = body
                self._open_block(self._bare_step)
                return True
        found = min(((i, m) for m in self._markers if (i := text.find(m)) >= 0), default=None)
        if found is not None:
            i, marker = found
            self._emit_text(text[:i])
            self._pending = text[i + len(marker):]
            self._open_block(self._marker_step)
            self._block.append(marker)
            return True
        held = 0 if final else _held_prefix(text, self._markers)
        self._emit_text(text[:len(text) - held])
        self._pending = text[len(text) - held:]
        return False

    def _open_block(self, step: str) -> None:
        self._at_start = False
        self._state, self._step = _BLOCK, step
        self._block, self._after_call = [], False

    def _give_back(self) -> None:
        """The block is not (or no longer) calls: its text is content after all, except that a block that opened
        with a marker is read again from just after the marker's first character, so later openers still count."""
        text = "".join(self._block)
        self._block = []
        self._state = _TEXT
        if self._after_call:
            self._pending = text + self._pending
        else:
            self._emit_text(text[:1])
            self._pending = text[1:] + self._pending

    def _skip_ws(self) -> bool:
        """Move leading whitespace into the block; whether anything else is left to look at."""
        body = self._pending.lstrip()
        if len(body) != len(self._pending):
            self._block.append(self._pending[:len(self._pending) - len(body)])
            self._pending = body
        return bool(body)

    def _expect(self, literal: str) -> bool | None:
        """Match `literal` at the start of the pending text: True (consumed), False (cannot match), None (wait)."""
        text = self._pending
        if text.startswith(literal):
            self._block.append(literal)
            self._pending = text[len(literal):]
            return True
        if literal.startswith(text):
            return None
        return False

    def _start_object(self) -> None:
        self._state = _OBJECT
        self._scanner = _CallScanner(self._args_keys, self._eager)
        self._reported, self._sent = False, 0

    def _scan_object(self, final: bool) -> bool:
        scanner = self._scanner
        assert scanner is not None
        text = self._pending
        pos = scanner.feed(text)
        self._block.append(text[:pos])
        self._pending = text[pos:]
        # A call that announced itself and broke within the same piece of text was never reported: it goes back.
        if scanner.announced and (self._reported or not scanner.failed):
            if not self._reported:
                self._events.append(CallStarted(self._calls, scanner.name or ""))
                self._reported = True
            if len(scanner.args) > self._sent:
                fragment = "".join(scanner.args[self._sent:])
                self._sent = len(scanner.args)
                if fragment:
                    self._events.append(ArgumentsDelta(self._calls, fragment))
        if scanner.failed or (final and not scanner.done):
            if not self._reported:
                self._give_back()
            else:  # it cannot be taken back: the caller reports what it got
                self._calls += 1
                self._state = _SKIP_BROKEN if self._resume and not final else _DEAD
            return True
        if scanner.done:
            self._calls += 1
            self._state, self._block, self._after_call = _BLOCK, [], True
            self._step = self._after_object
            return True
        return False

    def _skip_broken(self, final: bool) -> bool:
        text = self._pending
        i = text.find(self._resume)
        if i >= 0:
            self._pending = text[i + len(self._resume):]
            self._state = _TEXT
            return True
        held = _held_prefix(text, (self._resume,))
        self._pending = "" if final else text[len(text) - held:]
        return False

    def _end_block(self) -> None:
        self._state, self._block = _TEXT, []

    def _block_step(self, final: bool) -> bool:
        """Take the next step of a block; False when it must wait for more text."""
        result = self._step_once(self._step)
        if result is None:
            if final:  # the block ends here, cut off
                if self._after_call:  # what is held is separator or closing-tag syntax of the calls before
                    self._end_block()
                    self._pending = ""
                else:
                    self._give_back()
                return True
            return False
        if result is False:
            self._give_back()
        return True

    # Subclasses: the step a block starts with after a marker, after a bare opener, and after each call object.
    _marker_step = ""
    _bare_step = ""
    _after_object = ""

    def _step_once(self, step: str) -> bool | None:
        """Take step `step`: True when it moved on (state or step changed), False when the block is not calls,
        None to wait for more text."""
        raise NotImplementedError


def _held_prefix(text: str, markers: Sequence[str]) -> int:
    """The length of the longest end of `text` that a marker begins with."""
    best = 0
    for marker in markers:
        for k in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:k]):
                best = k
                break
    return best


class _HermesStream(ToolCallStream):
    _markers = ("<tool_call>",)
    _resume = "</tool_call>"
    _marker_step = "open"
    _after_object = "close"

    def _step_once(self, step: str) -> bool | None:
        if not self._skip_ws():
            return None
        if step == "open":
            if self._pending[0] != "{":
                return False
            self._start_object()
            return True
        # The closing tag is optional: a complete call still counts when the output ends (or goes on) without it.
        matched = self._expect("</tool_call>")
        if matched is None:
            return None
        if matched:
            self._end_block()
        else:
            self._give_back()
        return True


class _Llama3Stream(ToolCallStream):
    _markers = ("<|python_tag|>",)
    _bare = "{"
    _args_keys = ("parameters", "arguments")
    _marker_step = "open"
    _bare_step = "open"
    _after_object = "separator"

    def _step_once(self, step: str) -> bool | None:
        if not self._skip_ws():
            return None
        c = self._pending[0]
        if step == "separator" and c == ";":
            self._block.append(c)
            self._pending = self._pending[1:]
            self._step = "open"
            return True
        if c != "{":
            return False
        self._start_object()
        return True


class _MistralStream(ToolCallStream):
    _markers = ("[TOOL_CALLS]",)
    _bare = "["
    _marker_step = "array"
    _bare_step = "array"
    _after_object = "next"

    def _step_once(self, step: str) -> bool | None:
        if not self._skip_ws():
            return None
        c = self._pending[0]
        if step == "array":
            if c != "[":
                return False
            self._step = "item"
        elif step == "item":
            if c != "{":
                return False
            self._start_object()
            return True
        elif c == ",":
            self._step = "item"
        elif c == "]":
            self._block.append(c)
            self._pending = self._pending[1:]
            self._end_block()
            return True
        else:
            return False
        self._block.append(c)
        self._pending = self._pending[1:]
        return True


# -- the formats ------------------------------------------------------------------------------------------------

# No whitespace but the conventional ", " and ": ": the shortest form a model writes, and one grammar path per call.
# How generated JSON is written, for calls here and for structured outputs (engine.model.grammar): ", " and ": " and
# no other whitespace, so that a model cannot pad an answer until max_tokens cuts it. A keyword llguidance does not
# implement (uniqueItems, if/then) fails the grammar's check, by name, rather than being ignored: what the grammar
# admitted would otherwise not validate against its schema.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

TokenIdLookup = Callable[[str], int | None]


class ToolFormat:
    """One tool-call format: `parse` a whole output, `stream` one, or constrain generation with `grammar`."""

    name: str = ""
    markers: tuple[str, ...] = ()  # the strings a call is framed by, which a vocabulary may hold as special tokens
    _stream_type: type[ToolCallStream] = ToolCallStream
    _args_key = "arguments"

    def marker_ids(self, token_id: TokenIdLookup) -> frozenset[int]:
        """The markers that are special tokens, whose text the answer must keep to be read."""
        return frozenset(t for m in self.markers if (t := token_id(m)) is not None)

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """The content (text outside calls, stripped; "" if none) and the calls, in order."""
        stream = self._stream_type(eager=False)  # a call reported only once whole and checked: nothing to take back
        content: list[str] = []
        names: dict[int, str] = {}
        args: dict[int, list[str]] = {}
        for event in [*stream.feed(text), *stream.finish()]:
            if isinstance(event, TextDelta):
                content.append(event.text)
            elif isinstance(event, CallStarted):
                names[event.index] = event.name
            else:
                args.setdefault(event.index, []).append(event.fragment)
        return "".join(content), [ToolCall(names[i], "".join(args.get(i, ()))) for i in sorted(names)]

    def stream(self) -> ToolCallStream:
        return self._stream_type()

    def grammar(self, tools: Sequence[Mapping[str, Any]], *, parallel: bool, token_id: TokenIdLookup) -> str:
        """An llguidance (Lark) grammar admitting exactly well-formed calls of `tools`: one, or one or more if
        `parallel`, and no other text.

        `tools` are OpenAI function definitions (``{"name", "description"?, "parameters"?}``, or wrapped as
        ``{"type": "function", "function": {...}}``). `token_id(marker)` gives the id of a marker that is a single
        special token of the vocabulary, else None (`special_token_id` builds one from a tokenizer).
        """
        if not tools:
            raise ValueError("a tool-call grammar needs at least one tool")
        rules = [f"fn_{i}: %json {json.dumps(_call_schema(tool, self._args_key), ensure_ascii=False)}"
                 for i, tool in enumerate(tools)]
        calls = " | ".join(f"fn_{i}" for i in range(len(tools)))
        return "\n".join([*self._grammar_head(parallel, token_id, calls), *rules]) + "\n"

    def _grammar_head(self, parallel: bool, token_id: TokenIdLookup, calls: str) -> list[str]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"ToolFormat({self.name!r})"


def _marker(marker: str, token_id: TokenIdLookup) -> str:
    # A special token must be named by id: as a string it would have to be spelled out in ordinary tokens.
    tid = token_id(marker)
    return f"<[{tid}]>" if tid is not None else json.dumps(marker)


class _Hermes(ToolFormat):
    name = "hermes"
    markers = ("<tool_call>", "</tool_call>")
    _stream_type = _HermesStream

    def _grammar_head(self, parallel: bool, token_id: TokenIdLookup, calls: str) -> list[str]:
        repeat = ' ("\\n" call)*' if parallel else ""
        open_, close = _marker("<tool_call>", token_id), _marker("</tool_call>", token_id)
        return [f"start: call{repeat}", f'call: {open_} "\\n" ({calls}) "\\n" {close}']


class _Llama3Json(ToolFormat):
    name = "llama3_json"
    markers = ("<|python_tag|>",)
    _stream_type = _Llama3Stream
    _args_key = "parameters"

    def _grammar_head(self, parallel: bool, token_id: TokenIdLookup, calls: str) -> list[str]:
        repeat = ' ("; " call)*' if parallel else ""
        # Llama writes <|python_tag|> before some JSON calls and not before others: let the model choose.
        return [f"start: {_marker('<|python_tag|>', token_id)}? call{repeat}", f"call: {calls}"]


class _Mistral(ToolFormat):
    name = "mistral"
    markers = ("[TOOL_CALLS]",)
    _stream_type = _MistralStream

    def _grammar_head(self, parallel: bool, token_id: TokenIdLookup, calls: str) -> list[str]:
        repeat = ' (", " call)*' if parallel else ""
        # Mistral's template writes "[TOOL_CALLS] [": with SentencePiece the bracket's token carries the space.
        return [f'start: {_marker("[TOOL_CALLS]", token_id)} " "? "[" call{repeat} "]"', f"call: {calls}"]


HERMES: ToolFormat = _Hermes()
LLAMA3_JSON: ToolFormat = _Llama3Json()
MISTRAL: ToolFormat = _Mistral()
FORMATS: dict[str, ToolFormat] = {f.name: f for f in (HERMES, LLAMA3_JSON, MISTRAL)}


def _function(tool: Mapping[str, Any]) -> Mapping[str, Any]:
    inner = tool.get("function")
    return inner if isinstance(inner, Mapping) else tool


def _call_schema(tool: Mapping[str, Any], args_key: str) -> dict[str, Any]:
    fn = _function(tool)
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("every tool needs a non-empty string name")
    params = fn.get("parameters")
    if isinstance(params, Mapping) and params:
        params = dict(params)
        params.setdefault("type", "object")
    else:  # a function declared without parameters takes none: its arguments are {}, not any object at all
        params = {"type": "object", "properties": {}, "additionalProperties": False}
    # The parameters become a subschema: their definitions move to the root, where "#/$defs/..." still finds them.
    defs = {k: params.pop(k) for k in ("$defs", "definitions") if k in params}
    params.pop("$schema", None)
    return {
        "type": "object",
        "properties": {"name": {"const": name}, args_key: _rebase_refs(params, f"#/properties/{args_key}")},
        "required": ["name", args_key],
        "additionalProperties": False,
        **defs,
        "x-guidance": JSON_OPTIONS,
    }


def _rebase_refs(node: Any, base: str) -> Any:
    """Point references to the parameters' own root ("#", "#/properties/...") at where the parameters now sit."""
    if isinstance(node, list):
        return [_rebase_refs(v, base) for v in node]
    if not isinstance(node, Mapping):
        return node
    out = {k: _rebase_refs(v, base) for k, v in node.items()}
    ref = out.get("$ref")
    if isinstance(ref, str) and (ref == "#" or ref.startswith("#/")) \
            and not ref.startswith(("#/$defs/", "#/definitions/")):
        out["$ref"] = base + ref[1:]
    return out


def special_token_id(tokenizer: Any) -> TokenIdLookup:
    """`token_id` for `ToolFormat.grammar` from a `Tokenizer`: a string's id where it is one special token."""
    special = frozenset(tokenizer.all_special_ids)

    def lookup(text: str) -> int | None:
        tid = tokenizer.token_to_id(text)
        return tid if tid in special else None

    return lookup


# -- chat templates ---------------------------------------------------------------------------------------------

def format_for_template(template: str | None) -> ToolFormat:
    """The format a chat template's model writes calls in; hermes where the template does not tell."""
    source = template or ""
    if "<tool_call>" in source:
        return HERMES
    if "[TOOL_CALLS]" in source:
        return MISTRAL
    if "<|python_tag|>" in source or "ipython" in source:
        return LLAMA3_JSON
    return HERMES


@functools.lru_cache(maxsize=16)
def template_takes_tools(template: str | None) -> bool:
    """Whether a chat template reads the `tools` variable (and so renders the tools itself). Lexing a template takes
    a while, and a server asks of its one template on every chat request."""
    if not template:
        return False
    try:
        tokens = [(kind, value) for _, kind, value in jinja2.Environment().lex(template) if kind != "whitespace"]
    except jinja2.TemplateSyntaxError:
        return re.search(r"\btools\b", template) is not None
    # A name token, not text or a string literal that says "tools", nor an attribute such as `message.tools`.
    return any(kind == "name" and value == "tools" and (i == 0 or tokens[i - 1][1] != ".")
               for i, (kind, value) in enumerate(tokens))


def template_tool_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages for a template that takes tools: each assistant tool call's arguments JSON text parsed into the
    object such templates expect (they write ``arguments | tojson``); arguments that are not JSON stay text."""
    out = []
    for message in messages:
        msg = dict(message)
        calls = msg.get("tool_calls")
        if isinstance(calls, list):
            msg["tool_calls"] = [_parsed_call(c) for c in calls]
        out.append(msg)
    return out


def _parsed_call(call: Any) -> Any:
    if not isinstance(call, Mapping) or not isinstance(call.get("function"), Mapping):
        return call
    fn = dict(call["function"])
    if isinstance(fn.get("arguments"), str):
        with contextlib.suppress(ValueError):  # not JSON: the template gets the text
            fn["arguments"] = json.loads(fn["arguments"])
    return {**call, "function": fn}


_TOOLS_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


def default_tool_messages(messages: Sequence[Mapping[str, Any]],
                          tools: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The conversation rewritten for a template that knows only system, user and assistant messages: the tools
    described in a system message, tool calls and tool results written out in the hermes format (see the module
    docstring)."""
    out: list[dict[str, Any]] = []
    results: dict[str, Any] | None = None  # the user message the current run of tool results goes into
    for message in messages:
        msg = dict(message)
        role = msg.get("role")
        if role == "tool":
            block = f"<tool_response>\n{_text(msg.get('content'))}\n</tool_response>"
            if results is not None:
                results["content"] += "\n" + block
            else:
                results = {"role": "user", "content": block}
                out.append(results)
            continue
        results = None
        if role == "assistant" and msg.get("tool_calls"):
            blocks = [_hermes_call(c) for c in msg.pop("tool_calls")]
            text = _text(msg.get("content"))
            msg["content"] = "\n".join([text, *blocks] if text else blocks)
        out.append(msg)
    if tools:
        prompt = _TOOLS_PROMPT.format(tools="\n".join(
            json.dumps({"type": "function", "function": dict(_function(t))}, ensure_ascii=False) for t in tools))
        if out and out[0].get("role") == "system":
            own = _text(out[0].get("content"))
            out[0] = {**out[0], "content": f"{prompt}\n\n{own}" if own else prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, (list, tuple)):  # OpenAI content parts, joined by the one rule for that
        return join_text_parts(content)
    return content if isinstance(content, str) else str(content)


def _hermes_call(call: Mapping[str, Any]) -> str:
    fn = _function(call)
    arguments = fn.get("arguments")
    if isinstance(arguments, str):
        try:
            json.loads(arguments)
        except ValueError:
            arguments = json.dumps(arguments, ensure_ascii=False)  # not JSON: keep the call well-formed
    else:
        arguments = json.dumps(arguments if arguments is not None else {}, ensure_ascii=False)
    name = json.dumps(fn.get("name", ""), ensure_ascii=False)
    return f'<tool_call>\n{{"name": {name}, "arguments": {arguments}}}\n</tool_call>'
