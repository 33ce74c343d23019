"""tokenization/tool_calls.py: parsing, streaming and constraining the tool calls of chat models."""
from __future__ import annotations

import itertools
import json
import random
import subprocess
import sys

import pytest

from tokenization.chat_template import compile_template, render
from tokenization.tool_calls import (
    FORMATS,
    HERMES,
    LLAMA3_JSON,
    MISTRAL,
    ArgumentsDelta,
    CallStarted,
    TextDelta,
    ToolCall,
    ToolFormat,
    default_tool_messages,
    format_for_template,
    special_token_id,
    template_takes_tools,
    template_tool_messages,
)


def hermes_call(name: str, args: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {args}}}\n</tool_call>'


# (text, content, calls as (name, arguments)); every text here streams to exactly what parse() says.
HERMES_CASES = [
    ("", "", []),
    ("Just text, no calls.", "Just text, no calls.", []),
    ("a < b, <tool but not a call, and <tool_cal", "a < b, <tool but not a call, and <tool_cal", []),
    ("  \n padded \n ", "padded", []),
    (hermes_call("get_weather", '{"city": "Paris"}'), "", [("get_weather", '{"city": "Paris"}')]),
    ("Let me check.\n" + hermes_call("get_weather", '{"city": "Paris", "unit": "celsius"}'),
     "Let me check.", [("get_weather", '{"city": "Paris", "unit": "celsius"}')]),
    (hermes_call("a", "{}") + "\n" + hermes_call("b", '{"x": [1, {"y": null}]}'), "",
     [("a", "{}"), ("b", '{"x": [1, {"y": null}]}')]),
    ("Intro\n" + hermes_call("a", "{}") + "\nBetween\n" + hermes_call("b", "{}") + "\nDone.",
     "Intro\n\nBetween\n\nDone.", [("a", "{}"), ("b", "{}")]),
    # Braces, quotes, escapes and tags inside strings do not end anything.
    (hermes_call("echo", r'{"s": "}{]\"\\", "t": "</tool_call><tool_call>", "u": "héllo ✓ 🎉 \u00e9"}'), "",
     [("echo", r'{"s": "}{]\"\\", "t": "</tool_call><tool_call>", "u": "héllo ✓ 🎉 \u00e9"}')]),
    # Not the shortest spacing, and keys in another order: still calls, arguments kept as written.
    ('<tool_call>{ "name" : "f" ,"arguments":{ "a" :1 } }</tool_call>', "", [("f", '{ "a" :1 }')]),
    ('<tool_call>\n{"arguments": {"a": "}"}, "name": "g"}\n</tool_call>', "", [("g", '{"a": "}"}')]),
    (('<tool_call>\n{"id": "c1", "name": "g", "type": "function", "arguments": {}, "more": [1, "]"], "n": -1.5e3}'
      "\n</tool_call>"), "", [("g", "{}")]),
    (r'<tool_call>{"n\u0061me": "esc\"aped", "arguments": {}}</tool_call>', "", [('esc"aped', "{}")]),
    # Not calls: left as content, block and all.
    ('Hello <tool_call>\n{"name": 5, "arguments": {}}\n</tool_call> bye',
     'Hello <tool_call>\n{"name": 5, "arguments": {}}\n</tool_call> bye', []),
    ('<tool_call>\n{"name": "f", "arguments": "{}"}\n</tool_call>',
     '<tool_call>\n{"name": "f", "arguments": "{}"}\n</tool_call>', []),
    ('<tool_call>\n{"name": "f", "arguments": [1]}\n</tool_call>',
     '<tool_call>\n{"name": "f", "arguments": [1]}\n</tool_call>', []),
    ('<tool_call>\n{"name": "f"}\n</tool_call>', '<tool_call>\n{"name": "f"}\n</tool_call>', []),
    ('<tool_call>\n{"name": ""}\n</tool_call>', '<tool_call>\n{"name": ""}\n</tool_call>', []),
    ('<tool_call>\n{"nam": "f", "arguments": {}}\n</tool_call>',
     '<tool_call>\n{"nam": "f", "arguments": {}}\n</tool_call>', []),
    ('<tool_call>\n{"arguments": {"a": tru}, "name": "f"}\n</tool_call>',
     '<tool_call>\n{"arguments": {"a": tru}, "name": "f"}\n</tool_call>', []),
    ("<tool_call> I changed my mind.", "<tool_call> I changed my mind.", []),
    ("<tool_call>", "<tool_call>", []),
    # A failed block does not hide the call after it.
    ("<tool_call> oops " + hermes_call("f", "{}") + " ok", "<tool_call> oops  ok", [("f", "{}")]),
    # Cut short before the call was certain: text. Cut in (or without) the closing tag: still a call.
    ('<tool_call>\n{"name": "get_wea', '<tool_call>\n{"name": "get_wea', []),
    ('<tool_call>\n{"name": "f", "arguments": {}}', "", [("f", "{}")]),
    ('<tool_call>\n{"name": "f", "arguments": {}}\n</tool', "", [("f", "{}")]),
    ('<tool_call>\n{"name": "f", "arguments": {}} and then text',
     "and then text", [("f", "{}")]),
]

LLAMA3_CASES = [
    ("", "", []),
    ("The set {1, 2} is small.", "The set {1, 2} is small.", []),
    ('{"a": 1}', '{"a": 1}', []),
    ('{"name": "John", "age": 30}', '{"name": "John", "age": 30}', []),
    ('{"name": "f", "parameters": {"x": 1}}', "", [("f", '{"x": 1}')]),
    ('  \n{"name": "f", "arguments": {"x": 1}}\n', "", [("f", '{"x": 1}')]),
    ('<|python_tag|>{"name": "f", "parameters": {"x": "}"}}', "", [("f", '{"x": "}"}')]),
    ('<|python_tag|> {"parameters": {}, "name": "late"}', "", [("late", "{}")]),
    ('{"name": "f", "parameters": {}}; {"name": "g", "parameters": {"y": [true]}}\n{"name": "h", "parameters": {}}',
     "", [("f", "{}"), ("g", '{"y": [true]}'), ("h", "{}")]),
    ("I'll look that up.<|python_tag|>{\"name\": \"f\", \"parameters\": {}}", "I'll look that up.", [("f", "{}")]),
    ('{"name": "f", "parameters": {}}; and some words', "; and some words", [("f", "{}")]),
    ('{"name": "f", "parameters": {}} {"oops": 1}', '{"oops": 1}', [("f", "{}")]),
    ("<|python_tag|>print(1)", "<|python_tag|>print(1)", []),
    ("<|python_ta", "<|python_ta", []),
    ('Text first {"name": "f", "parameters": {}}', 'Text first {"name": "f", "parameters": {}}', []),
    ('{"name": "f", "parameters": 3}', '{"name": "f", "parameters": 3}', []),
    ('{"name": "f", "parameters": {}};', "", [("f", "{}")]),
]

MISTRAL_CASES = [
    ("", "", []),
    ("[1, 2, 3]", "[1, 2, 3]", []),
    ("[link](https://example.com) text", "[link](https://example.com) text", []),
    ('[TOOL_CALLS] [{"name": "f", "arguments": {"x": "a]"}}]', "", [("f", '{"x": "a]"}')]),
    ('[TOOL_CALLS][{"name": "f", "arguments": {}}, {"name": "g", "arguments": {"y": 2}}]', "",
     [("f", "{}"), ("g", '{"y": 2}')]),
    ('[{"name": "f", "arguments": {}}]', "", [("f", "{}")]),
    (' \n[ {"name": "f", "arguments": {}} ]', "", [("f", "{}")]),
    ('Calling now. [TOOL_CALLS][{"name": "f", "arguments": {}}]', "Calling now.", [("f", "{}")]),
    ('[TOOL_CALLS][{"name": "f", "arguments": {}, "id": "abc123def"}]', "", [("f", "{}")]),
    ('[{"name": "f", "arguments": {}}] and some text', "and some text", [("f", "{}")]),
    ('[{"name": "f", "arguments": {}}, oops]', ", oops]", [("f", "{}")]),
    ("[TOOL_CALLS] not json", "[TOOL_CALLS] not json", []),
    ("[TOOL_CALLS", "[TOOL_CALLS", []),
    ('[TOOL_CALLS][{"name": "f", "arguments": {}}', "", [("f", "{}")]),
    ('[TOOL_CALLS][{"name": "f", "arguments": {}}, ', "", [("f", "{}")]),
    # What follows the last complete call goes back from the separator on.
    ('[TOOL_CALLS][{"name": "f", "arguments": {}}, {"name": "g"', ', {"name": "g"', [("f", "{}")]),
]

CASES = [(HERMES, *c) for c in HERMES_CASES] + [(LLAMA3_JSON, *c) for c in LLAMA3_CASES] + \
        [(MISTRAL, *c) for c in MISTRAL_CASES]


@pytest.mark.parametrize(("fmt", "text", "content", "calls"), CASES)
def test_parse(fmt: ToolFormat, text: str, content: str, calls: list[tuple[str, str]]) -> None:
    assert fmt.parse(text) == (content, [ToolCall(n, a) for n, a in calls])


def run_stream(fmt: ToolFormat, chunks: list[str]) -> tuple[list, str, list[ToolCall]]:
    stream = fmt.stream()
    events = []
    for chunk in chunks:
        events += stream.feed(chunk)
    events += stream.finish()
    assert stream.finish() == []
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    names: dict[int, str] = {}
    args: dict[int, str] = {}
    for e in events:
        if isinstance(e, CallStarted):
            assert e.index == len(names) and e.index not in names, "calls start once, in order"
            names[e.index] = e.name
            args[e.index] = ""
        elif isinstance(e, ArgumentsDelta):
            assert e.index == len(names) - 1, "arguments belong to the call started last"
            assert e.fragment
            args[e.index] += e.fragment
    return events, text, [ToolCall(names[i], args[i]) for i in sorted(names)]


def random_chunks(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, min(len(text) - 1, 12)))) if len(text) > 1 else []
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


@pytest.mark.parametrize(("fmt", "text", "content", "calls"), CASES)
def test_stream_agrees_with_parse_at_any_split(fmt: ToolFormat, text: str, content: str, calls: list) -> None:
    expected = fmt.parse(text)
    rng = random.Random(text)
    splits = [[text], list(text)] + [random_chunks(text, rng) for _ in range(25)]
    for chunks in splits:
        _, streamed_text, streamed_calls = run_stream(fmt, chunks)
        assert (streamed_text.strip(), streamed_calls) == expected, chunks
        assert streamed_text == expected[0], "whitespace at the ends is not even streamed"


def random_json(rng: random.Random, depth: int = 0) -> object:
    kind = rng.randrange(7 if depth < 3 else 4)
    if kind == 0:
        return rng.choice([None, True, False, 0, -12, 3.5e-3])
    if kind in (1, 2, 3):
        return "".join(rng.choice(['a', ' ', '"', '\\', '{', '}', '[', ']', ',', ':', 'é', '🎉', '\n', '<tool_call>',
                                   '</tool_call>', '[TOOL_CALLS]', ';']) for _ in range(rng.randrange(6)))
    if kind in (4, 5):
        return {f"k{i}": random_json(rng, depth + 1) for i in range(rng.randrange(4))}
    return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]


def random_object(rng: random.Random, members: list[tuple[str, object]]) -> str:
    sep, colon = rng.choice([(", ", ": "), (",", ":"), (" ,\n ", " : ")])
    ascii_only = rng.random() < 0.5
    return "{" + sep.join(f"{json.dumps(k)}{colon}{json.dumps(v, ensure_ascii=ascii_only, separators=(sep, colon))}"
                          for k, v in members) + "}"


def random_call(rng: random.Random, args_key: str) -> tuple[str, tuple[str, str] | None]:
    """A call object's text and the call it is; None for one that is malformed before its arguments begin, or
    whose arguments come first (so that even a stream reports nothing before the object is whole)."""
    name = rng.choice(["f", "get_weather", "a b", 'q"uote', "ünï"])
    args = {f"p{i}": random_json(rng) for i in range(rng.randrange(3))}
    extra = [("id", random_json(rng))] if rng.random() < 0.2 else []
    kind = rng.randrange(8)
    if kind == 0:  # no string name
        return random_object(rng, [("name", rng.choice([5, None, [name]])), (args_key, args)]), None
    if kind == 1:  # arguments not an object
        return random_object(rng, [("name", name), (args_key, rng.choice([[1], "x", 2, None]))]), None
    if kind == 2:  # no name at all
        return random_object(rng, [*extra, (args_key, args)]), None
    text = random_object(rng, [("name", name), (args_key, args)][:: -1 if kind == 3 else 1] + extra)
    key = json.dumps(args_key)
    start = text.index(key) + len(key)
    start = text.index("{", start)
    end = start + len(random_object(rng, [])) if not args else None
    decoded = json.loads(text)
    arguments = text[start:end] if end else None
    if arguments is None:  # find the extent of the arguments as written: the shortest prefix that parses as them
        arguments = next(text[start:i] for i in range(start + 2, len(text) + 1)
                         if _parses_to(text[start:i], decoded[args_key]))
    return text, (name, arguments)


def _parses_to(text: str, value: object) -> bool:
    try:
        return json.loads(text) == value
    except ValueError:
        return False


PROSE = ["Sure.", "a < b", "x > y", "{set}", "[1, 2]", "Done!", "héllo 🎉", "<tool", "tool_call>", "<|python",
         "TOOL_CALLS]", "\n", " ", "; "]


def random_output(fmt: ToolFormat, rng: random.Random) -> tuple[str, list[tuple[str, str]] | None]:
    """An output in `fmt` with text, calls and non-calls mixed; the expected calls when they can be told."""
    args_key = "parameters" if fmt is LLAMA3_JSON and rng.random() < 0.7 else "arguments"
    calls = [random_call(rng, args_key) for _ in range(rng.randrange(1, 4))]
    lead = "".join(rng.choice(PROSE) for _ in range(rng.randrange(3))) if rng.random() < 0.5 else ""
    if fmt is HERMES:
        blocks = [f"<tool_call>{rng.choice(['', chr(10)])}{text}{rng.choice(['', chr(10)])}</tool_call>"
                  for text, _ in calls]
        tail = rng.choice(["", "\n", " Done."])
        return lead + "\n".join(blocks) + tail, [c for _, c in calls if c is not None]
    if fmt is LLAMA3_JSON:
        body = rng.choice(["; ", "\n", ";\n"]).join(text for text, _ in calls)
        marker = rng.choice(["<|python_tag|>", ""]) if not lead else "<|python_tag|>"
    else:
        body = "[" + rng.choice([", ", ","]).join(text for text, _ in calls) + "]"
        marker = rng.choice(["[TOOL_CALLS]", "[TOOL_CALLS] ", ""]) if not lead else "[TOOL_CALLS]"
    # Past the first malformed call the JSON formats give the rest back as text: expect calls only up to it.
    expected = []
    for _, call in calls:
        if call is None:
            break
        expected.append(call)
    return lead + marker + body, expected


@pytest.mark.parametrize("fmt", [HERMES, LLAMA3_JSON, MISTRAL], ids=lambda f: f.name)
def test_random_outputs_stream_as_they_parse(fmt: ToolFormat) -> None:
    rng = random.Random(fmt.name)
    for _ in range(150):
        text, expected = random_output(fmt, rng)
        content, calls = fmt.parse(text)
        assert [(c.name, c.arguments) for c in calls] == expected, text
        for chunks in [list(text), *(random_chunks(text, rng) for _ in range(3))]:
            assert run_stream(fmt, chunks)[1:] == (content, calls), (text, chunks)


GARBAGE = ['<tool_call>', '</tool_call>', '<tool', '[TOOL_CALLS]', '[TOOL', '<|python_tag|>', '{', '}', '[', ']',
           '"name"', '"arguments"', '"parameters"', ': ', ':', ', ', ',', '"f"', '"', '\\', ';', '\n', ' ', 'x', '1',
           '{}', '"s"']


@pytest.mark.parametrize("fmt", [HERMES, LLAMA3_JSON, MISTRAL], ids=lambda f: f.name)
def test_garbage_never_breaks_the_parsers(fmt: ToolFormat) -> None:
    rng = random.Random(17)
    for _ in range(400):
        text = "".join(rng.choice(GARBAGE) for _ in range(rng.randrange(1, 30)))
        content, calls = fmt.parse(text)
        for call in calls:
            assert call.name and isinstance(json.loads(call.arguments), dict), text
        # All of it at once: nothing is announced before it is checked, so streaming is parsing.
        assert run_stream(fmt, [text])[1:] == (content, calls), text
        run_stream(fmt, random_chunks(text, rng))  # split anywhere: well-formed events (checked inside), no error


def test_stream_announces_the_name_once_the_arguments_begin() -> None:
    stream = HERMES.stream()
    assert stream.feed("<tool_call>\n") == []
    assert stream.feed('{"name": "get_weather"') == []  # might still be some other object with a name
    assert stream.feed(', "arguments": {') == [CallStarted(0, "get_weather"), ArgumentsDelta(0, "{")]
    assert stream.feed('"city": "Par') == [ArgumentsDelta(0, '"city": "Par')]
    assert stream.feed('is"}') == [ArgumentsDelta(0, 'is"}')]
    assert stream.feed("}") == []  # the call object's own brace is not part of the arguments
    assert stream.feed("\n</tool_call>\n<tool_call>\n") == []
    assert stream.feed('{"name": "now", "arguments": {}}') == [CallStarted(1, "now"), ArgumentsDelta(1, "{}")]
    assert stream.finish() == []


def test_stream_holds_back_what_may_open_a_call() -> None:
    stream = HERMES.stream()
    assert stream.feed("Let me check <tool") == [TextDelta("Let me check")]
    assert stream.feed("box> now") == [TextDelta(" <toolbox> now")]
    assert stream.feed(" <") == []
    assert stream.finish() == [TextDelta(" <")]

    stream = MISTRAL.stream()
    assert stream.feed("[") == []  # could be the array of calls, or [TOOL_CALLS]
    assert stream.feed("TOOL_") == []
    assert stream.feed("CALLS] [{") == []
    assert stream.feed('"name": "f", "arguments": {"a"') == [CallStarted(0, "f"), ArgumentsDelta(0, '{"a"')]

    stream = LLAMA3_JSON.stream()
    assert stream.feed("Sure: {") == [TextDelta("Sure: {")]  # a call without its marker only opens the output


def test_stream_reports_calls_with_arguments_first_when_they_close() -> None:
    stream = LLAMA3_JSON.stream()
    assert stream.feed('{"parameters": {"q": "x"}, ') == []
    assert stream.feed('"name": "search"') == []
    assert stream.feed("}") == [CallStarted(0, "search"), ArgumentsDelta(0, '{"q": "x"}')]


def test_cut_off_calls() -> None:
    # Announced: finish adds nothing, the caller reports what it got.
    _, text, calls = run_stream(HERMES, ['<tool_call>\n{"name": "f", "arguments": {"a": "xy', "z"])
    assert (text, calls) == ("", [ToolCall("f", '{"a": "xyz')])
    # Not yet announced: given back as text.
    stream = HERMES.stream()
    assert stream.feed('Hi <tool_call>\n{"name": "f"') == [TextDelta("Hi")]
    assert stream.finish() == [TextDelta(' <tool_call>\n{"name": "f"')]
    stream = MISTRAL.stream()
    assert stream.feed('[TOOL_CALLS] [{"name": "f", "arguments": {}}, {"name": "g", "argu') == \
        [CallStarted(0, "f"), ArgumentsDelta(0, "{}")]
    assert stream.finish() == [TextDelta(', {"name": "g", "argu')]


def test_a_call_that_breaks_after_it_was_announced_is_not_taken_back() -> None:
    text = '<tool_call>\n{"name": "f", "arguments": {"a": 1}, oops}\n</tool_call>\nAfter.'
    # Whole, it is no call; streamed, the call was reported before it broke, and hermes resumes after the block.
    assert HERMES.parse(text) == (text, [])
    _, streamed, calls = run_stream(HERMES, [text[:40], text[40:]])
    assert (streamed, calls) == ("After.", [ToolCall("f", '{"a": 1}')])
    # ... unless the whole of it arrived at once: then it was never reported.
    assert run_stream(HERMES, [text])[1:] == (text, [])
    # The JSON formats have no closing tag to resume after: the rest is dropped.
    text = '{"name": "f", "parameters": {"a": 1}, "parameters": {}} tail'
    assert run_stream(LLAMA3_JSON, [text[:30], text[30:]])[1:] == ("", [ToolCall("f", '{"a": 1}')])
    assert LLAMA3_JSON.parse(text) == (text, [])


def test_long_arguments_stream_in_pieces_without_rescanning() -> None:
    value = "x" * 200_000
    stream = MISTRAL.stream()
    events = stream.feed('[{"name": "w", "arguments": {"data": "')
    for i in range(0, len(value), 1000):
        events += stream.feed(value[i:i + 1000])
    events += stream.feed('"}}]') + stream.finish()
    assert "".join(e.fragment for e in events if isinstance(e, ArgumentsDelta)) == f'{{"data": "{value}"}}'


# -- templates and messages ------------------------------------------------------------------------------------

CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TOOLS_TEMPLATE = (
    "{%- if tools is defined and tools %}<|im_start|>system\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}"
    "<|im_end|>\n{% endif %}"
    "{%- for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content or '' }}"
    "{%- for tc in message.tool_calls or [] %}{%- set tc = tc.function if tc.function is defined else tc %}"
    '<tool_call>\n{"name": "{{ tc.name }}", "arguments": {{ tc.arguments | tojson }}}\n</tool_call>'
    "{%- endfor %}<|im_end|>\n{% endfor %}"
)


def test_format_for_template() -> None:
    assert format_for_template(TOOLS_TEMPLATE) is HERMES
    assert format_for_template("{{ '[TOOL_CALLS] [' }}") is MISTRAL
    assert format_for_template("{{ '<|python_tag|>' }}") is LLAMA3_JSON
    assert format_for_template("{% if message.role == 'ipython' %}") is LLAMA3_JSON
    assert format_for_template(CHATML) is HERMES
    assert format_for_template(None) is HERMES
    assert set(FORMATS) == {"hermes", "llama3_json", "mistral"}
    assert all(FORMATS[name].name == name for name in FORMATS)


def test_template_takes_tools() -> None:
    assert template_takes_tools(TOOLS_TEMPLATE)
    assert template_takes_tools("{{ tools | length }}")
    assert not template_takes_tools(CHATML)
    assert not template_takes_tools(None)
    assert not template_takes_tools("You may use tools. {{ messages[0]['content'] }} {{ 'tools' }}")
    assert not template_takes_tools("{{ message.tools }}")
    assert template_takes_tools("{% if tools %")  # does not even lex: any mention counts


TOOLS = [
    {"name": "get_weather", "description": "Current weather.",
     "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
    {"type": "function", "function": {"name": "now"}},
]

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and the time?"},
    {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "c2", "type": "function", "function": {"name": "now", "arguments": "{}"}},
    ]},
    {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 21}'},
    {"role": "tool", "tool_call_id": "c2", "content": [{"type": "text", "text": "12:00"}]},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c3", "type": "function", "function": {"name": "now", "arguments": "{}"}}]},
    {"role": "tool", "tool_call_id": "c3", "content": "12:01"},
    {"role": "user", "content": "Thanks"},
]


def test_default_tool_messages() -> None:
    original = json.dumps(CONVERSATION)
    out = default_tool_messages(CONVERSATION, TOOLS)
    assert json.dumps(CONVERSATION) == original, "the input is not modified"
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user", "assistant", "user", "user"]
    system = out[0]["content"]
    assert system.startswith("# Tools\n") and system.endswith("</tool_call>\n\nBe brief.")
    tools_block = system.split("<tools>\n")[1].split("\n</tools>")[0]
    assert [json.loads(line) for line in tools_block.split("\n")] == [
        {"type": "function", "function": TOOLS[0]}, TOOLS[1]]
    assert '{"name": <function-name>, "arguments": <args-json-object>}' in system
    assert out[2] == {"role": "assistant", "content": "Checking.\n" + hermes_call("get_weather", '{"city": "Paris"}')
                      + "\n" + hermes_call("now", "{}")}
    assert out[3] == {"role": "user", "content": '<tool_response>\n{"temp": 21}\n</tool_response>\n'
                                                 "<tool_response>\n12:00\n</tool_response>"}
    assert out[4]["content"] == hermes_call("now", "{}")
    assert out[5]["content"] == "<tool_response>\n12:01\n</tool_response>"
    # What the model is shown is what it is read back with.
    assert HERMES.parse(out[2]["content"]) == ("Checking.", [ToolCall("get_weather", '{"city": "Paris"}'),
                                                             ToolCall("now", "{}")])
    prompt = render(compile_template(CHATML), out, add_generation_prompt=True, special_tokens={})
    assert prompt.startswith("<|im_start|>system\n# Tools") and prompt.endswith("<|im_start|>assistant\n")

    # No system message of its own: one is added. No tools: only the history is rewritten.
    out = default_tool_messages(CONVERSATION[1:], TOOLS)
    assert out[0]["role"] == "system" and out[0]["content"].endswith("</tool_call>")
    assert default_tool_messages(CONVERSATION, [])[0] == CONVERSATION[0]
    # Arguments that are no JSON text (or are an object already) still make a well-formed call.
    odd = [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "not json"}},
                                                {"function": {"name": "g", "arguments": {"k": 1}}}]}]
    content = default_tool_messages(odd, [])[0]["content"]
    assert hermes_call("f", '"not json"') in content
    assert HERMES.parse(content)[1] == [ToolCall("g", '{"k": 1}')]


def test_template_tool_messages() -> None:
    out = template_tool_messages(CONVERSATION)
    assert out[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert out[2]["tool_calls"][0]["id"] == "c1"
    assert CONVERSATION[2]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}', "input untouched"
    kept = template_tool_messages([{"role": "assistant", "tool_calls": [
        {"function": {"name": "f", "arguments": "{oops"}}]}])
    assert kept[0]["tool_calls"][0]["function"]["arguments"] == "{oops"
    prompt = render(compile_template(TOOLS_TEMPLATE), out, add_generation_prompt=False, special_tokens={},
                    tools=[{"type": "function", "function": t} for t in TOOLS[:1]])
    assert hermes_call("get_weather", '{"city": "Paris"}') in prompt  # not a JSON string inside JSON


def test_module_does_not_import_torch() -> None:
    code = "import sys, tokenization.tool_calls; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# -- grammars ---------------------------------------------------------------------------------------------------

WEATHER = {"name": "get_weather", "description": "Current weather in a city.", "parameters": {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12},
                   "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city"], "additionalProperties": False}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object",
    "properties": {"a": {"type": "integer", "minimum": -50, "maximum": 50},
                   "b": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["a", "b"], "additionalProperties": False}}}
NOW = {"name": "now"}
MOVE = {"name": "move", "parameters": {
    "type": "object", "properties": {"to": {"$ref": "#/$defs/Point"}, "again": {"$ref": "#/properties/to"}},
    "required": ["to"], "additionalProperties": False,
    "$defs": {"Point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9}},
                        "required": ["x"], "additionalProperties": False}}}}
GRAMMAR_TOOLS = [WEATHER, ADD, NOW, MOVE]


def no_special(_: str) -> None:
    return None


def test_grammar_text() -> None:
    grammar = HERMES.grammar([WEATHER, ADD], parallel=False, token_id=no_special)
    lines = grammar.splitlines()
    assert lines[:2] == ["start: call", 'call: "<tool_call>" "\\n" (fn_0 | fn_1) "\\n" "</tool_call>"']
    fn_0 = json.loads(lines[2].removeprefix("fn_0: %json "))
    assert fn_0["properties"]["name"] == {"const": "get_weather"}
    assert fn_0["properties"]["arguments"] == WEATHER["parameters"]
    assert fn_0["required"] == ["name", "arguments"] and fn_0["additionalProperties"] is False
    assert fn_0["x-guidance"]["item_separator"] == ", " and fn_0["x-guidance"]["key_separator"] == ": "
    assert json.loads(lines[3].removeprefix("fn_1: %json "))["properties"]["name"] == {"const": "add"}
    assert HERMES.grammar([WEATHER], parallel=True, token_id=no_special).startswith('start: call ("\\n" call)*\n')

    ids = {"[TOOL_CALLS]": 5, "<|python_tag|>": 128010}
    assert MISTRAL.grammar([NOW], parallel=True, token_id=ids.get).startswith(
        'start: <[5]> " "? "[" call (", " call)* "]"\ncall: fn_0\n')
    assert MISTRAL.grammar([NOW], parallel=False, token_id=no_special).startswith(
        'start: "[TOOL_CALLS]" " "? "[" call "]"\n')
    llama = LLAMA3_JSON.grammar([NOW], parallel=True, token_id=ids.get)
    assert llama.startswith('start: <[128010]>? call ("; " call)*\n')
    now = json.loads(llama.splitlines()[2].removeprefix("fn_0: %json "))
    assert now["properties"]["parameters"] == {"type": "object", "properties": {}, "additionalProperties": False}
    # Definitions move to the call schema's root; references to the parameters' root follow them down.
    move = json.loads(HERMES.grammar([MOVE], parallel=False, token_id=no_special).splitlines()[2][len("fn_0: %json "):])
    assert move["$defs"] == MOVE["parameters"]["$defs"]
    assert move["properties"]["arguments"]["properties"]["again"] == {"$ref": "#/properties/arguments/properties/to"}
    assert "$defs" not in move["properties"]["arguments"]
    with pytest.raises(ValueError):
        HERMES.grammar([], parallel=False, token_id=no_special)
    with pytest.raises(ValueError):
        HERMES.grammar([{"description": "nameless"}], parallel=False, token_id=no_special)


def test_special_token_id() -> None:
    class Vocab:
        all_special_ids = (5,)

        def token_to_id(self, text: str) -> int | None:
            return {"[TOOL_CALLS]": 5, "<tool_call>": 9}.get(text)

    lookup = special_token_id(Vocab())
    assert lookup("[TOOL_CALLS]") == 5
    assert lookup("<tool_call>") is None  # in the vocabulary, but ordinary text (as in Qwen's)
    assert lookup("<|python_tag|>") is None


@pytest.fixture(scope="module")
def llg():
    llguidance = pytest.importorskip("llguidance")
    from engine.errors import CheckpointError
    from engine.model.checkpoint import checkpoint_tokenizer
    from engine.model.default_model import default_model

    try:
        tok = checkpoint_tokenizer(default_model())
    except CheckpointError as exc:
        pytest.skip(str(exc))
    lltok = llguidance.LLTokenizer(tok._tok.to_str(), n_vocab=tok.vocab_size, eos_token=sorted(tok.eos_token_ids))
    return llguidance, tok, lltok


# In the default model's vocabulary no marker is a token; <|im_start|> (id 1, special) stands in for [TOOL_CALLS]
# so that the by-id reference gets exercised too.
STAND_IN = {"[TOOL_CALLS]": 1}
GRAMMAR_VARIANTS = [(HERMES, no_special), (LLAMA3_JSON, no_special), (MISTRAL, no_special),
                    (MISTRAL, STAND_IN.get)]
VARIANT_IDS = ["hermes", "llama3_json", "mistral", "mistral-special"]


def call_text(fmt: ToolFormat, token_id, calls: list[tuple[str, str]]) -> tuple[list[str], str]:
    """(special token prefix, text) of calls written the way the grammar has them."""
    if fmt is HERMES:
        return [], "\n".join(hermes_call(n, a) for n, a in calls)
    if fmt is LLAMA3_JSON:
        return [], "; ".join(f'{{"name": "{n}", "parameters": {a}}}' for n, a in calls)
    body = "[" + ", ".join(f'{{"name": "{n}", "arguments": {a}}}' for n, a in calls) + "]"
    return (["[TOOL_CALLS]"], " " + body) if token_id("[TOOL_CALLS]") is not None else ([], "[TOOL_CALLS]" + body)


def token_ids(tok, fmt, token_id, calls) -> list[int]:
    specials, text = call_text(fmt, token_id, calls)
    return [token_id(s) for s in specials] + tok.encode(text, add_special_tokens=False)


@pytest.mark.parametrize(("fmt", "token_id"), GRAMMAR_VARIANTS, ids=VARIANT_IDS)
def test_grammar_accepts_calls_and_rejects_the_rest(llg, fmt: ToolFormat, token_id) -> None:
    llguidance, tok, lltok = llg
    one = fmt.grammar(GRAMMAR_TOOLS, parallel=False, token_id=token_id)
    many = fmt.grammar(GRAMMAR_TOOLS, parallel=True, token_id=token_id)
    assert llguidance.LLMatcher.validate_grammar(one, lltok) == ""
    assert llguidance.LLMatcher.validate_grammar(many, lltok) == ""

    def accepts(grammar: str, ids: list[int]) -> bool:
        matcher = llguidance.LLMatcher(lltok, grammar, log_level=0)
        return all(matcher.consume_token(i) for i in ids) and matcher.is_accepting()

    def rejects(grammar: str, ids: list[int]) -> bool:
        return llguidance.LLMatcher(lltok, grammar, log_level=0).validate_tokens(ids) < len(ids)

    good = [("get_weather", '{"city": "Paris", "unit": "celsius"}'), ("add", '{"a": -3, "b": 4}'),
            ("now", "{}"), ("move", '{"to": {"x": 1}, "again": {"x": 2}}')]
    for call in good:
        assert accepts(one, token_ids(tok, fmt, token_id, [call])), call
        assert accepts(many, token_ids(tok, fmt, token_id, [call])), call
    assert accepts(many, token_ids(tok, fmt, token_id, good))
    assert rejects(one, token_ids(tok, fmt, token_id, good[:2]))
    bad = [("get_time", "{}"),  # no such tool
           ("add", '{"a": 1}'),  # missing a required argument
           ("get_weather", '{"unit": "celsius", "city": "Paris"}'),  # not in the schema's order
           ("get_weather", '{"city": "Paris", "country": "FR"}'),
           ("now", '{"x": 1}'),
           ("add", '{"a": 1,"b": 2}')]  # spacing other than the grammar's
    for call in bad:
        assert rejects(many, token_ids(tok, fmt, token_id, [call])), call
    leading = tok.encode("Sure! ", add_special_tokens=False) + token_ids(tok, fmt, token_id, good[:1])
    assert rejects(many, leading)


@pytest.mark.parametrize(("fmt", "token_id"), GRAMMAR_VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("parallel", [False, True])
def test_sampled_walks_parse_into_valid_calls(llg, fmt: ToolFormat, token_id, parallel: bool) -> None:
    """Sample random allowed tokens until the grammar stops: whatever comes out is calls parse() reads back."""
    import numpy as np

    jsonschema = pytest.importorskip("jsonschema")
    llguidance, tok, lltok = llg
    grammar = fmt.grammar(GRAMMAR_TOOLS, parallel=parallel, token_id=token_id)
    schemas = {t.get("function", t)["name"]: t.get("function", t).get("parameters") or {
        "type": "object", "maxProperties": 0} for t in GRAMMAR_TOOLS}
    eos = sorted(tok.eos_token_ids)
    seen_names: set[str] = set()
    counts = []
    for seed in range(6):
        rng = random.Random(seed)
        matcher = llguidance.LLMatcher(lltok, grammar, log_level=0)
        ids: list[int] = []
        for _ in range(300):
            if matcher.is_stopped():
                break
            # The same bits llguidance.torch.fill_next_token_bitmask writes, without importing torch for them.
            mask = np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8)
            allowed = np.flatnonzero(np.unpackbits(mask, bitorder="little"))
            allowed = [int(i) for i in allowed if i < lltok.vocab_size]
            ends = [i for i in allowed if i in eos]
            if ends and rng.random() < 0.5:
                break
            token = rng.choice([i for i in allowed if i not in eos] or allowed)
            assert matcher.consume_token(token), matcher.get_error()
            ids.append(token)
        assert matcher.is_accepting(), tok.decode(ids, skip_special_tokens=False)
        text = tok.decode(ids)  # as the server sees it: special tokens skipped
        content, calls = fmt.parse(text)
        assert content == "" and calls, text
        assert len(calls) == 1 or parallel
        assert run_stream(fmt, random_chunks(text, rng))[1:] == ("", calls)
        for call in calls:
            jsonschema.validate(json.loads(call.arguments), schemas[call.name])
            seen_names.add(call.name)
        counts.append(len(calls))
    assert len(seen_names) >= 2, "more than one tool's alternative is reachable"
    if parallel:
        assert max(counts) >= 2
