"""The OpenAI surface agents use, through the real `openai` SDK against a real `strata serve` of the trained default
model (SmolLM2-135M-Instruct, GGUF): structured outputs under constrained decoding, function calling, and the
Responses API; and the same answers from a two-stage pipeline as from one stage."""
from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from pydantic import BaseModel

from engine.errors import CheckpointError
from engine.model.default_model import default_model
from tests.http_calls import assert_openai_error, call, post
from tests.server_process import ServerProcess

MODEL = "SmolLM2-135M-Instruct.Q4_1"
FLAGS = ("--threads-per-stage", "1", "--max-model-len", "1024", "--num-kv-blocks", "256")
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "mood": {"enum": ["happy", "sad", "calm"]},
    "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 3},
}, "required": ["name", "age", "mood", "hobbies"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 24}},
                   "required": ["zone"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]


def start(*args: str) -> ServerProcess:
    try:
        default_model()
    except CheckpointError as e:
        pytest.skip(str(e))
    server = ServerProcess(None, *FLAGS, *args)
    try:
        server.wait_ready(180)
    except BaseException:
        server.cleanup()
        raise
    return server


@pytest.fixture(scope="module")
def server():
    s = start()
    yield s
    s.stop()
    s.cleanup()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def person_format(name: str = "person") -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": PERSON, "strict": True}}


def assert_serves(url: str) -> None:
    status, _, body = post(url + "/v1/chat/completions", {"model": MODEL, "messages": ASK, "max_tokens": 3})
    assert status == 200, body
    status, _, _ = call("GET", url + "/health")
    assert status == 200


# ---- structured outputs ------------------------------------------------------------------
def test_json_schema_answers_validate_at_temperature_one_for_every_seed(client):
    for seed in range(4):
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Describe a person."}],
                                           response_format=person_format(), temperature=1.0, seed=seed, n=4,
                                           max_tokens=200)
        for choice in r.choices:
            assert choice.finish_reason == "stop", choice
            jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_json_object_answers_are_json_objects(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Give me a JSON object."}],
                                       response_format={"type": "json_object"}, temperature=0.7, seed=1,
                                       max_tokens=200, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in r if c.choices)
    assert isinstance(json.loads(text), dict)


def test_structured_output_composes_with_penalties_bias_top_k_and_logprobs(client):
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Describe a person."}], response_format=person_format(),
        temperature=1.2, top_p=0.9, seed=7, presence_penalty=1.0, frequency_penalty=0.5,
        logit_bias={"90": 100}, logprobs=True, top_logprobs=2, max_tokens=200,
        extra_body={"top_k": 40, "repetition_penalty": 1.1})  # no bias takes a token past the grammar
    choice = r.choices[0]
    jsonschema.validate(json.loads(choice.message.content), PERSON)
    assert len(choice.logprobs.content) == r.usage.completion_tokens


class Person(BaseModel):
    name: str
    age: int


def test_parse_returns_the_pydantic_object(client):
    r = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "Name a person and age."}],
                                      response_format=Person, max_tokens=100, temperature=0)
    assert isinstance(r.choices[0].message.parsed, Person)


# ---- tools -------------------------------------------------------------------------------
def assert_call(call_, tool: dict) -> dict:
    assert call_.type == "function" and call_.id.startswith("call_")
    assert call_.function.name == tool["function"]["name"]
    args = json.loads(call_.function.arguments)
    jsonschema.validate(args, tool["function"]["parameters"])
    return args


def test_required_tool_choice_returns_a_parseable_call(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                                       parallel_tool_calls=False, temperature=1.0, seed=3, max_tokens=100)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    assert_call(choice.message.tool_calls[0], WEATHER if choice.message.tool_calls[0].function.name == "get_weather"
                else TIME)


def test_named_tool_choice_streams_the_id_and_name_first_then_the_arguments(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER, TIME], stream=True, max_tokens=100,
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    deltas, reasons = [], []
    for chunk in stream:
        for c in chunk.choices:
            deltas.extend(c.delta.tool_calls or [])
            reasons.append(c.finish_reason)
    assert reasons[-1] == "tool_calls"
    first, rest = deltas[0], deltas[1:]
    assert first.index == 0 and first.id.startswith("call_") and first.type == "function"
    assert first.function.name == "get_time"
    assert all(d.index == 0 and d.id is None and d.function.name is None for d in rest)
    arguments = (first.function.arguments or "") + "".join(d.function.arguments for d in rest)
    jsonschema.validate(json.loads(arguments), TIME["function"]["parameters"])


def test_a_tool_result_goes_back_for_the_next_turn(client, server):
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required",
                                       parallel_tool_calls=False, max_tokens=100, temperature=0)
    message = r.choices[0].message
    call_ = message.tool_calls[0]
    turn = [*ASK, message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call_.id, "content": "sunny and 21 degrees"}]
    after = client.chat.completions.create(model=MODEL, messages=turn, tools=[WEATHER], max_tokens=30, temperature=0)
    assert after.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # The call and its result are in the prompt: it is longer than the question with its tools alone.
    alone = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], max_tokens=1)
    assert after.usage.prompt_tokens > alone.usage.prompt_tokens + 10


def test_auto_with_a_response_format_answers_in_calls_or_in_that_format(client):
    for seed in range(3):
        r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], response_format=person_format(),
                                           temperature=1.0, seed=seed, max_tokens=200)
        message = r.choices[0].message
        if message.tool_calls:
            assert r.choices[0].finish_reason == "tool_calls"
            assert_call(message.tool_calls[0], WEATHER)
        else:
            jsonschema.validate(json.loads(message.content), PERSON)


def test_tokenize_renders_a_chat_with_tools_as_the_chat_route_does(client, server):
    status, _, body = post(server.url + "/tokenize", {"messages": ASK, "tools": [WEATHER]})
    assert status == 200, body
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], max_tokens=1)
    assert body["count"] == r.usage.prompt_tokens
    status, _, plain = post(server.url + "/tokenize", {"messages": ASK})
    assert plain["count"] < body["count"]  # the default prompt describes the tool


def test_tool_choice_none_answers_in_text(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="none", max_tokens=20,
                                       temperature=0)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content


# ---- the Responses API ---------------------------------------------------------------------
def test_responses_create_answers(client):
    r = client.responses.create(model=MODEL, input="What is the capital of France?", max_output_tokens=40,
                                temperature=0)
    assert r.status in ("completed", "incomplete") and r.output[0].type == "message"
    assert "Paris" in r.output_text
    assert r.usage.output_tokens > 0 and r.usage.input_tokens > 0
    # Instructions are the system message, in place of the template's default one.
    told = client.responses.create(model=MODEL, input="What is the capital of France?", max_output_tokens=1,
                                   instructions="You are a geography teacher. Answer in one short sentence.")
    assert told.usage.input_tokens != r.usage.input_tokens


def test_responses_create_calls_a_function_and_takes_its_output(client):
    tool = {"type": "function", **WEATHER["function"]}
    r = client.responses.create(model=MODEL, input="Weather in Paris?", tools=[tool], tool_choice="required",
                                parallel_tool_calls=False, max_output_tokens=100)
    calls = [o for o in r.output if o.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].call_id.startswith("call_")
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER["function"]["parameters"])
    after = client.responses.create(model=MODEL, input=[{"role": "user", "content": "Weather in Paris?"}, *r.output,
                                                        {"type": "function_call_output", "call_id": calls[0].call_id,
                                                         "output": "sunny"}],
                                    tools=[tool], max_output_tokens=20)
    assert after.usage.input_tokens > r.usage.input_tokens


def test_responses_stream_streams_text(client):
    with client.responses.stream(model=MODEL, input="What is the capital of France?", max_output_tokens=60,
                                 temperature=0) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert "response.output_item.added" in kinds and "response.content_part.added" in kinds
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text and text == final.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_responses_stream_streams_a_function_call(client):
    tool = {"type": "function", **WEATHER["function"]}
    with client.responses.stream(model=MODEL, input="Weather in Paris?", tools=[tool], tool_choice="required",
                                 parallel_tool_calls=False, max_output_tokens=100) as stream:
        events = list(stream)
        final = stream.get_final_response()
    arguments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    (item,) = [o for o in final.output if o.type == "function_call"]
    assert item.arguments == arguments and item.name == "get_weather"
    jsonschema.validate(json.loads(arguments), WEATHER["function"]["parameters"])


class Answer(BaseModel):
    city: str


def test_responses_parse_returns_the_pydantic_object(client):
    r = client.responses.parse(model=MODEL, input="Which city is the capital of France?", text_format=Answer,
                               max_output_tokens=60, temperature=0)
    assert isinstance(r.output_parsed, Answer)


# ---- what is refused -------------------------------------------------------------------------
CHAT = "/v1/chat/completions"
RESPONSES = "/v1/responses"
REFUSED = [
    pytest.param(CHAT, {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}}}},
        "response_format", "invalid_grammar", "uniqueItems", id="schema-keyword-not-enforceable"),
    pytest.param(CHAT, {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}}},
        "response_format", "invalid_grammar", "missing", id="schema-dangling-ref"),
    pytest.param(CHAT, {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "(?=a)b"}}}}}], "tool_choice": "required"},
        "tools", "invalid_grammar", "look-around", id="tool-parameters-not-enforceable"),
    pytest.param(CHAT, {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
                 "tools", None, "object", id="tool-parameters-not-an-object"),
    pytest.param(RESPONSES, {"text": {"format": {"type": "json_schema", "name": "x", "schema": {"not": {}}}}},
                 "text.format", "invalid_grammar", "not", id="responses-schema-named-by-its-own-param"),
    pytest.param(CHAT, {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
                 "tool_choice", None, "nope", id="unknown-named-function"),
    pytest.param(CHAT, {"tool_choice": "required"}, "tool_choice", None, "tools", id="tool-choice-without-tools"),
    pytest.param(CHAT, {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
        "messages", "unsupported_content", "image_url", id="image-part"),
    pytest.param(CHAT, {"store": True}, "store", "unsupported_field", "store", id="store-true"),
    pytest.param(CHAT, {"modalities": ["text", "audio"]}, "modalities", "unsupported_field", "text only",
                 id="audio-modality"),
    pytest.param(CHAT, {"service_tier": "flex"}, "service_tier", "unsupported_field", "tier", id="service-tier"),
    pytest.param(CHAT, {"metadata": {"k" * 65: "v"}}, "metadata", None, "64", id="metadata-key-too-long"),
    pytest.param(RESPONSES, {"metadata": {str(i): "v" for i in range(17)}}, "metadata", None, "16",
                 id="metadata-too-many-pairs"),
    pytest.param(CHAT, {"response_format": {"type": "json_object"}, "ignore_eos": True}, "ignore_eos", None,
                 "structured", id="ignore-eos-with-a-grammar"),
    pytest.param(RESPONSES, {"previous_response_id": "resp_1"}, "previous_response_id", "unsupported_field",
                 "keeps no responses", id="previous-response-id"),
    pytest.param(RESPONSES, {"store": True}, "store", "unsupported_field", "store", id="responses-store-true"),
    pytest.param(RESPONSES, {"background": True}, "background", "unsupported_field", "background", id="background"),
    pytest.param(RESPONSES, {"tools": [{"type": "web_search"}]}, "tools", "unsupported_tool", "web_search",
                 id="web-search-tool"),
    pytest.param(RESPONSES, {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
                 "input[0]", "unsupported_content", "input_image", id="input-image"),
    pytest.param(RESPONSES, {"input": [{"type": "reasoning", "summary": []}]}, "input", "unsupported_input_item",
                 "reasoning", id="reasoning-item"),
]


@pytest.mark.parametrize("path,fields,param,code,mention", REFUSED)
def test_what_cannot_be_honoured_is_refused_by_name_and_the_server_carries_on(server, path, fields, param, code,
                                                                               mention):
    body = ({"model": MODEL, "messages": ASK} if path == CHAT else {"model": MODEL, "input": "hi"}) | fields
    status, _, raw = call("POST", server.url + path, body)
    assert_openai_error(status, json.loads(raw), 400, param, code, mention)
    assert_serves(server.url)


def test_known_fields_that_change_nothing_are_accepted(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2, store=False, metadata={"k": "v"},
                                       user="u1", service_tier="auto", parallel_tool_calls=True)
    assert r.choices[0].message.content is not None


# ---- a pipeline gives the same answers -------------------------------------------------------
def answers(client) -> list:
    schema = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Describe a person."}],
                                            response_format=person_format(), temperature=1.0, seed=11, n=2,
                                            max_tokens=200)
    tool = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                                          temperature=1.0, seed=5, max_tokens=120)
    return ([c.message.content for c in schema.choices]
            + [(c.function.name, c.function.arguments) for c in tool.choices[0].message.tool_calls or []]
            + [tool.choices[0].message.content, tool.choices[0].finish_reason])


def test_a_two_stage_pipeline_answers_as_one_stage_does(client):
    one = answers(client)
    two_stages = start("--devices", "cpu,cpu")
    try:
        two = answers(openai.OpenAI(base_url=two_stages.url + "/v1", api_key="unused", max_retries=0, timeout=120))
    finally:
        two_stages.stop()
        two_stages.cleanup()
    assert two == one
