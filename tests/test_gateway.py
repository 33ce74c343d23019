"""`strata serve` end to end: a real server process, the real `openai` client, curl and raw HTTP."""
from __future__ import annotations

import asyncio
import http.client
import json
import re
import shutil
import signal
import subprocess
import time

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from batching import SamplingParams
from http_calls import (JSON_HEADERS, assert_openai_error, call, events, idle, metric, metrics_text, open_stream, post,
                        wait_for_metrics)
from server_process import running_server
from tiny_models import write_checkpoint
from tokenization import Tokenizer

MODEL = "tiny-llama"
APP_ORIGIN = "https://app.example"
KEY = "sk-test-0123456789"
CJK = "東京都は日本の首都です。猫が好きです。"
EMOJI = "Emoji time: 🚀🔥😀👍🏽 and 🇯🇵 flags"
IGNORE_EOS = {"ignore_eos": True}


# ---- servers and clients ------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(llama_dir):
    with running_server(llama_dir, "--num-kv-blocks", "64", "--max-model-len", "256",
                        "--served-model-name", MODEL) as s:
        yield s


@pytest.fixture(scope="module")
def url(server):
    return server.url


@pytest.fixture(scope="module")
def client(url):
    with OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def guarded(llama_dir):
    """An API key, one running sequence at a time and room for one waiting request; one origin's pages may call it."""
    with running_server(llama_dir, "--api-key", KEY, "--max-queue", "1", "--max-num-seqs", "1",
                        "--max-model-len", "1024", "--num-kv-blocks", "80", "--served-model-name", MODEL,
                        "--allowed-origins", f'["{APP_ORIGIN}"]') as s:
        yield s


@pytest.fixture(scope="module")
def offline(llama_dir):
    """The offline engine on the same checkpoint (its own stage process; the server is another process)."""
    from engine import LLM

    with LLM(llama_dir, num_kv_blocks=64, max_model_len=256) as llm:
        yield llm


def assert_serves(url: str, headers: dict | None = None) -> None:
    status, _, body = post(url + "/v1/completions", {"model": MODEL, "prompt": "Pack my box", "max_tokens": 3,
                                                     "ignore_eos": True}, headers)
    assert status == 200, body
    assert body["usage"]["completion_tokens"] == 3 and body["choices"][0]["finish_reason"] == "length"


def tokenize(url: str, body: dict, headers: dict | None = None) -> list[int]:
    status, _, out = post(url + "/tokenize", body, headers)
    assert status == 200, out
    assert out["count"] == len(out["tokens"])
    return out["tokens"]


# ---- discovery and housekeeping routes ------------------------------------------------------
def test_models_health_version(url, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    one = client.models.retrieve(MODEL)
    assert (one.id, one.object, one.owned_by) == (MODEL, "model", "strata")
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("no/such-model")
    assert e.value.code == "model_not_found"
    status, _, raw = call("GET", url + "/v1/models")
    assert json.loads(raw)["data"][0]["max_model_len"] == 256
    status, _, raw = call("GET", url + "/health")
    assert status == 200 and json.loads(raw)["status"] == "ok"
    status, _, raw = call("GET", url + "/version")
    assert status == 200 and re.fullmatch(r"\d+\.\d+\.\d+.*", json.loads(raw)["version"])
    status, _, raw = call("GET", url + "/v1/no-such-route")
    assert_openai_error(status, json.loads(raw), 404)


def test_openapi_document_lists_every_route(url):
    status, _, raw = call("GET", url + "/openapi.json")
    assert status == 200
    doc = json.loads(raw)
    assert doc["openapi"].startswith("3.")
    for path, method in [("/v1/completions", "post"), ("/v1/chat/completions", "post"), ("/v1/responses", "post"),
                         ("/v1/models", "get"), ("/v1/models/{model}", "get"), ("/tokenize", "post"), ("/detokenize", "post"), ("/health", "get"),
                         ("/metrics", "get")]:
        assert method in doc["paths"].get(path, {}), path
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/responses"):
        op = doc["paths"][path]["post"]
        assert {"400", "401", "404", "408", "413", "415", "429", "503"} <= set(op["responses"]), path
        assert "text/event-stream" in op["responses"]["200"]["content"]  # what "stream": true answers with
    schemas = doc["components"]["schemas"]

    def request_fields(path: str) -> set[str]:
        ref = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        return set(schemas[ref.rsplit("/", 1)[1]]["properties"])

    assert {"messages", "tools", "tool_choice", "response_format", "parallel_tool_calls"} <= request_fields(
        "/v1/chat/completions")
    assert {"input", "instructions", "tools", "text", "max_output_tokens"} <= request_fields("/v1/responses")


def test_metrics_are_prometheus_text_and_count_tokens(url, client):
    before = metrics_text(url)
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "generation_tokens_total",
                 "time_to_first_token_seconds_bucket", "e2e_request_latency_seconds_count"):
        assert f"strata:{name}{{" in before, name
    for line in before.splitlines():  # a scraper must be able to read every line
        assert re.fullmatch(r"# (HELP|TYPE) (strata:|gen_ai_)\w+ .+|(strata:|gen_ai_)\w+\{[^}]*\} [-+0-9.e]+(inf)?",
                            line), line
    prompt = "Pack my box with five dozen liquor jugs!"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=7, temperature=0, extra_body=IGNORE_EOS)
    assert r.usage.completion_tokens == 7
    after = metrics_text(url)
    assert metric(after, "generation_tokens_total") == metric(before, "generation_tokens_total") + 7
    assert metric(after, "prompt_tokens_total") == metric(before, "prompt_tokens_total") + r.usage.prompt_tokens
    assert metric(after, "time_to_first_token_seconds_count") == metric(before, "time_to_first_token_seconds_count") + 1
    assert (metric(after, "e2e_request_latency_seconds_count")
            == metric(before, "e2e_request_latency_seconds_count") + 1)
    # The prefix cache counts tokens, as vLLM's does: every prompt token looked up, and those it held.
    n = r.usage.prompt_tokens
    assert n > 16 and metric(after, "prefix_cache_queries_total") == metric(before, "prefix_cache_queries_total") + n
    client.completions.create(model=MODEL, prompt=prompt, max_tokens=1)
    again = metrics_text(url)
    assert metric(again, "prefix_cache_queries_total") == metric(after, "prefix_cache_queries_total") + n
    assert metric(again, "prefix_cache_hits_total") == metric(after, "prefix_cache_hits_total") + (n - 1) // 16 * 16


def test_tokenize_detokenize_round_trip_and_counts_match_billing(url, client):
    text = "Übermäßig schöne Grüße aus Köln; 東京都 🚀 done"
    bare = tokenize(url, {"prompt": text, "add_special_tokens": False})
    status, _, out = post(url + "/detokenize", {"tokens": bare})
    assert status == 200 and out["prompt"] == text
    ids = tokenize(url, {"prompt": text})
    r = client.completions.create(model=MODEL, prompt=text, max_tokens=1)
    assert r.usage.prompt_tokens == len(ids)
    messages = [{"role": "developer", "content": "Answer briefly."}, {"role": "user", "content": text}]
    chat_ids = tokenize(url, {"messages": messages})
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
    assert r.usage.prompt_tokens == len(chat_ids)
    status, _, out = post(url + "/detokenize", {"tokens": [1, 2, 10_000]})
    assert_openai_error(status, out, 400, "tokens", mention="10000")


# ---- the openai client: completions and chat -------------------------------------------------
def test_echo_returns_the_prompt_as_sent(url, client, llama_dir):
    """Not its tokens rendered back, which would put the BOS token's text before it."""
    bos = Tokenizer.from_dir(llama_dir).bos_token_id
    assert tokenize(url, {"prompt": "Hello world"})[0] == bos  # the prompt the model sees starts with it
    r = client.completions.create(model=MODEL, prompt=["Hello world", "Pack my"], max_tokens=3, temperature=0,
                                  echo=True, extra_body=IGNORE_EOS)
    assert r.choices[0].text.startswith("Hello world") and r.choices[1].text.startswith("Pack my")
    assert len(r.choices[0].text) > len("Hello world")
    streamed = client.completions.create(model=MODEL, prompt="Hello world", max_tokens=3, temperature=0, echo=True,
                                         stream=True, extra_body=IGNORE_EOS)
    texts = [c.choices[0].text for c in streamed]
    assert texts[0] == "Hello world" and "".join(texts) == r.choices[0].text
    ids = [bos, *tokenize(url, {"prompt": "Hello", "add_special_tokens": False})]
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=1, echo=True)  # ids: rendered as they are
    assert r.choices[0].text.startswith(Tokenizer.from_dir(llama_dir).decode(ids, skip_special_tokens=False))


def test_completion_text_and_usage(url, client):
    prompt = "The quick brown fox"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0, extra_body=IGNORE_EOS)
    assert r.object == "text_completion" and r.model == MODEL and r.id
    [choice] = r.choices
    assert choice.index == 0 and choice.finish_reason == "length" and choice.text
    n_prompt = len(tokenize(url, {"prompt": prompt}))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n_prompt, 10, n_prompt + 10)


def test_chat_message_and_usage(url, client):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a fox."}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                       extra_body=IGNORE_EOS)
    assert r.object == "chat.completion" and r.model == MODEL
    [choice] = r.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason == "length"
    n_prompt = len(tokenize(url, {"messages": messages}))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n_prompt, 8, n_prompt + 8)


def test_greedy_output_matches_the_offline_engine(url, client, offline):
    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    ids = offline.tokenizer.encode("Sphinx of black quartz, judge my vow.")
    ref = offline.generate(ids, greedy)[0]
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=24, temperature=0, extra_body=IGNORE_EOS)
    assert r.choices[0].text == ref.text
    messages = [{"role": "user", "content": "def add(a, b):"}]
    chat_ref = offline.generate(tokenize(url, {"messages": messages}), greedy)[0]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0,
                                       extra_body=IGNORE_EOS)
    assert r.choices[0].message.content == chat_ref.text


def test_streaming_gives_the_same_text_as_a_whole_response(client):
    kw = dict(model=MODEL, prompt="Pack my box", max_tokens=20, temperature=0, extra_body=IGNORE_EOS)
    whole = client.completions.create(**kw).choices[0]
    chunks = list(client.completions.create(stream=True, **kw))
    assert len(chunks) > 1
    assert "".join(c.choices[0].text for c in chunks) == whole.text
    assert [c.choices[0].finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    assert all(c.usage is None for c in chunks)  # no usage chunk unless asked for

    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Say hi"}], max_tokens=20, temperature=0,
              extra_body=IGNORE_EOS)
    whole = client.chat.completions.create(**kw).choices[0]
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_seed_reproduces_sampled_text(client):
    kw = dict(model=MODEL, prompt="The quick brown fox", max_tokens=24, temperature=1.0, extra_body=IGNORE_EOS)
    first = client.completions.create(seed=1234, **kw).choices[0].text
    assert client.completions.create(seed=1234, **kw).choices[0].text == first
    assert client.completions.create(seed=4321, **kw).choices[0].text != first
    streamed = "".join(c.choices[0].text for c in client.completions.create(seed=1234, stream=True, **kw))
    assert streamed == first
    chat = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me about foxes."}], max_tokens=24,
                temperature=1.0, seed=99, extra_body=IGNORE_EOS)
    assert (client.chat.completions.create(**chat).choices[0].message.content
            == client.chat.completions.create(**chat).choices[0].message.content)


def test_async_client_seeded_requests_are_unaffected_by_concurrent_load(url):
    seeded = dict(model=MODEL, prompt="The quick brown fox", max_tokens=24, temperature=1.0, seed=1234,
                  extra_body=IGNORE_EOS)
    seeded_chat = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me about foxes."}], max_tokens=24,
                       temperature=1.0, seed=99, extra_body=IGNORE_EOS)

    async def main():
        async with AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60) as ac:
            alone = (await ac.completions.create(**seeded)).choices[0].text
            alone_chat = (await ac.chat.completions.create(**seeded_chat)).choices[0].message.content

            async def streamed_chat():
                stream = await ac.chat.completions.create(stream=True, **seeded_chat)
                return "".join([c.choices[0].delta.content or "" async for c in stream])

            async def noise(i):
                r = await ac.completions.create(model=MODEL, prompt=CJK[: 3 + i], max_tokens=10 + 7 * i,
                                                temperature=1.3, extra_body=IGNORE_EOS)
                return r.choices[0].text

            results = await asyncio.gather(noise(0), ac.completions.create(**seeded), noise(1), streamed_chat(),
                                           noise(2), ac.chat.completions.create(**seeded_chat), noise(3))
            return alone, alone_chat, results

    alone, alone_chat, (_, crowded, _, crowded_stream, _, crowded_chat, _) = asyncio.run(main())
    assert crowded.choices[0].text == alone
    assert crowded_chat.choices[0].message.content == alone_chat
    assert crowded_stream == alone_chat


def test_n2_returns_two_indexed_choices_streamed_and_whole(client):
    kw = dict(model=MODEL, prompt="Pack my box", max_tokens=12, temperature=1.0, seed=7, n=2, extra_body=IGNORE_EOS)
    whole = client.completions.create(**kw)
    assert [c.index for c in whole.choices] == [0, 1]
    assert whole.choices[0].text != whole.choices[1].text
    assert whole.usage.completion_tokens == 24
    texts, finish = {0: "", 1: ""}, {}
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert texts == {c.index: c.text for c in whole.choices}
    assert finish == {0: "length", 1: "length"}

    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Two answers, please."}], max_tokens=10,
              temperature=1.0, seed=3, n=2, extra_body=IGNORE_EOS)
    whole = client.chat.completions.create(**kw)
    assert [c.index for c in whole.choices] == [0, 1]
    texts, roles, finish = {0: "", 1: ""}, {}, {}
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.delta.role:
                roles[c.index] = c.delta.role
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert roles == {0: "assistant", 1: "assistant"} and finish == {0: "length", 1: "length"}


def test_completion_logprobs(client):
    r = client.completions.create(model=MODEL, prompt="Pack my box", max_tokens=8, temperature=0, logprobs=2,
                                  extra_body=IGNORE_EOS)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 8
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert chosen <= 0 and 1 <= len(top) <= 2 and all(v <= 0 for v in top.values())
        assert chosen >= max(top.values()) - 1e-4  # greedy picks the most likely token

    # Streamed, every token's logprob arrives, also for tokens that end inside a multi-byte character.
    kw = dict(model=MODEL, prompt=CJK, max_tokens=30, temperature=1.0, seed=3, logprobs=1, extra_body=IGNORE_EOS)
    whole = client.completions.create(**kw).choices[0].logprobs
    streamed = [x for chunk in client.completions.create(stream=True, **kw) for c in chunk.choices if c.logprobs
                for x in c.logprobs.token_logprobs]
    assert len(whole.token_logprobs) == 30
    # The second request reuses the first's cached prompt blocks, whose attention takes another path (keys read
    # back from the cache under a mask, not causal over the chunk): equal to fp32 rounding, not to the bit.
    assert streamed == pytest.approx(whole.token_logprobs, rel=1e-5, abs=1e-5)


def test_chat_logprobs(client):
    messages = [{"role": "user", "content": "Hello there"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=2, extra_body=IGNORE_EOS)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.logprob >= entry.top_logprobs[0].logprob - 1e-4
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                           extra_body=IGNORE_EOS)
    assert plain.choices[0].logprobs is None

    kw = dict(model=MODEL, messages=[{"role": "user", "content": CJK}], max_tokens=30, temperature=1.0, seed=5,
              logprobs=True, top_logprobs=2, extra_body=IGNORE_EOS)
    whole = client.chat.completions.create(**kw).choices[0].logprobs.content
    streamed = [e for chunk in client.chat.completions.create(stream=True, **kw) for c in chunk.choices
                if c.logprobs and c.logprobs.content for e in c.logprobs.content]
    assert len(streamed) == len(whole) == 30
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in whole])


def _stop_string(text: str) -> str:
    for i in range(4, len(text) - 2):
        s = text[i:i + 2]
        if "\ufffd" not in s and s.strip():
            return s
    raise AssertionError(f"no usable stop string in {text!r}")


def test_stop_strings_end_the_text_before_them(client):
    base = dict(model=MODEL, prompt="The quick brown fox", max_tokens=30, temperature=0, extra_body=IGNORE_EOS)
    full = client.completions.create(**base).choices[0].text
    stop = _stop_string(full)
    expected = full[:full.find(stop)]
    r = client.completions.create(stop=[stop, "never-appears"], **base)
    assert r.choices[0].text == expected and stop not in r.choices[0].text
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens < 30
    chunks = list(client.completions.create(stop=stop, stream=True, **base))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"

    base = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me about foxes."}], max_tokens=30,
                temperature=0, extra_body=IGNORE_EOS)
    full = client.chat.completions.create(**base).choices[0].message.content
    stop = _stop_string(full)
    expected = full[:full.find(stop)]
    r = client.chat.completions.create(stop=stop, **base)
    assert r.choices[0].message.content == expected and r.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(stop=[stop], stream=True, **base))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_stream_include_usage_reports_the_streamed_tokens(url, client):
    prompt = "Sphinx of black quartz"
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=1.0, seed=5,
                                            logprobs=0, stream=True, stream_options={"include_usage": True},
                                            extra_body=IGNORE_EOS))
    *body, last = chunks
    assert last.choices == [] and all(c.usage is None and len(c.choices) == 1 for c in body)
    streamed_tokens = sum(len(c.choices[0].logprobs.tokens) for c in body if c.choices[0].logprobs)
    n_prompt = len(tokenize(url, {"prompt": prompt}))
    assert streamed_tokens == last.usage.completion_tokens == 12
    assert (last.usage.prompt_tokens, last.usage.total_tokens) == (n_prompt, n_prompt + 12)

    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2,
                                                 max_tokens=9, stream=True, stream_options={"include_usage": True},
                                                 extra_body=IGNORE_EOS))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 18
    assert sum(1 for c in chunks for ch in c.choices if ch.finish_reason == "length") == 2


# ---- raw server-sent events ----------------------------------------------------------------
def _sse_payloads(raw: bytes) -> list[bytes]:
    assert raw.endswith(b"data: [DONE]\n\n") and raw.count(b"[DONE]") == 1, raw[-200:]
    events_ = raw[:-2].split(b"\n\n")
    for e in events_:
        assert e.startswith(b"data: ") and b"\n" not in e, e
    return [e[len(b"data: "):] for e in events_]


def _curl(url: str, body: dict) -> bytes:
    out = subprocess.run(["curl", "-sS", "-N", "--fail", "--max-time", "60", "-H", "Content-Type: application/json",
                          "--data-binary", json.dumps(body), url], capture_output=True, timeout=90)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_raw_sse_framing_seen_by_curl(url):
    raw = _curl(url + "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                                "max_tokens": 10, "stream": True, "ignore_eos": True})
    payloads = _sse_payloads(raw)
    assert payloads[-1] == b"[DONE]"
    chunks = [json.loads(p.decode("utf-8")) for p in payloads[:-1]]
    assert len({c["id"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == MODEL for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:])
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])

    raw = _curl(url + "/v1/completions", {"model": MODEL, "prompt": "hello", "max_tokens": 10, "stream": True,
                                          "ignore_eos": True, "stream_options": {"include_usage": True}})
    chunks = [json.loads(p.decode("utf-8")) for p in _sse_payloads(raw)[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 10


def test_multibyte_utf8_is_streamed_as_whole_characters(url, offline):
    cases = [(prompt, seed) for prompt in (CJK, EMOJI) for seed in (11, 12, 13)]

    async def fetch(session, prompt, seed, stream):
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 40, "temperature": 1.0, "seed": seed,
                "ignore_eos": True, "stream": stream}
        async with session.post(url + "/v1/completions", json=body) as r:
            assert r.status == 200
            raw = await r.read()
        if not stream:
            return json.loads(raw)["choices"][0]["text"]
        # every event body is valid UTF-8 JSON on its own: no character is split across events
        return [json.loads(p.decode("utf-8", errors="strict"))["choices"][0]["text"] for p in _sse_payloads(raw)[:-1]]

    async def main():
        async with aiohttp.ClientSession() as s:
            return await asyncio.gather(*[fetch(s, p, seed, stream) for p, seed in cases for stream in (True, False)])

    results = asyncio.run(main())
    refs = offline.generate([p for p, _ in cases], [SamplingParams(max_tokens=40, temperature=1.0, seed=seed,
                                                                   ignore_eos=True) for _, seed in cases])
    saw_multibyte = False
    for i, ref in enumerate(refs):
        pieces, whole = results[2 * i], results[2 * i + 1]
        full_decode = offline.tokenizer.decode(ref.token_ids)
        # A character cut between chunks would show up as U+FFFD that the full decode does not have.
        assert "".join(pieces) == whole == full_decode, cases[i]
        saw_multibyte |= any(ord(ch) > 0x7FF and ch != "\ufffd" for ch in full_decode)
    assert saw_multibyte, "the samples never produced a 3- or 4-byte character"


# ---- disconnects ----------------------------------------------------------------------------
def test_client_disconnect_frees_the_sequence_and_its_kv_blocks(url, client):
    start = metrics_text(url)
    conn, resp = open_stream(url + "/v1/completions", {"model": MODEL, "prompt": "hello", "max_tokens": 240,
                                                       "ignore_eos": True, "stream": True})
    it = events(resp)
    for _ in range(3):
        json.loads(next(it))
    busy = metrics_text(url)
    assert metric(busy, "num_requests_running") == 1 and metric(busy, "kv_cache_usage_perc") > 0
    resp.close()
    conn.close()
    after = wait_for_metrics(url, idle)
    # it stopped because of the disconnect, long before its 240 tokens
    assert metric(after, "generation_tokens_total") - metric(start, "generation_tokens_total") < 200
    r = client.completions.create(model=MODEL, prompt="hello", max_tokens=4, extra_body=IGNORE_EOS)
    assert r.usage.completion_tokens == 4 and r.choices[0].finish_reason == "length"


# ---- bad requests ---------------------------------------------------------------------------
CHAT = "/v1/chat/completions"
CMPL = "/v1/completions"
HI = [{"role": "user", "content": "hi"}]
BAD_REQUESTS = [
    pytest.param(CMPL, {"model": MODEL, "prompt": list(range(5, 305))}, None, 400, "prompt",
                 "context_length_exceeded", "256", id="prompt-longer-than-context"),
    pytest.param(CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "fox " * 400}]}, None, 400,
                 "messages", "context_length_exceeded", "256", id="chat-longer-than-context"),
    pytest.param(CMPL, {"model": MODEL, "prompt": "hi", "max_tokens": 1000}, None, 400, "max_tokens",
                 "context_length_exceeded", "max_tokens", id="max-tokens-beyond-context"),
    pytest.param(CHAT, {"model": MODEL, "messages": HI, "max_completion_tokens": 300}, None, 400, "max_tokens",
                 "context_length_exceeded", "256", id="max-completion-tokens-beyond-context"),
    pytest.param(CHAT, {"model": MODEL, "messages": HI, "temperature": -0.5}, None, 400, "temperature", None,
                 "temperature", id="negative-temperature"),
    pytest.param(CMPL, {"model": MODEL, "prompt": "hi", "temperature": -1, "stream": True}, None, 400, "temperature",
                 None, "temperature", id="negative-temperature-streaming"),
    pytest.param(CMPL, b'{"model": "tiny-llama", "prompt": ', JSON_HEADERS, 400, None, "invalid_json", "JSON",
                 id="malformed-json"),
    pytest.param(CMPL, b'["tiny-llama"]', JSON_HEADERS, 400, None, "invalid_json", "object", id="json-not-an-object"),
    pytest.param(CMPL, b'{"model": "tiny-llama", "prompt": "hi"}', {"Content-Type": "text/plain"}, 415, None, None,
                 "application/json", id="wrong-content-type"),
    pytest.param(CMPL, {"model": "no-such-model", "prompt": "hi"}, None, 404, "model", "model_not_found",
                 "no-such-model", id="unknown-model"),
    pytest.param(CHAT, {"model": "no-such-model", "messages": HI}, None, 404, "model", "model_not_found",
                 "no-such-model", id="unknown-model-chat"),
    pytest.param(CHAT, {"model": MODEL, "messages": []}, None, 400, "messages", None, "messages",
                 id="empty-messages"),
    pytest.param(CHAT, {"model": MODEL}, None, 400, "messages", None, "messages", id="missing-messages"),
    pytest.param(CMPL, {"model": MODEL, "prompt": [5, 6, 512]}, None, 400, "prompt", None, "512",
                 id="token-id-out-of-vocabulary"),
    pytest.param(CMPL, {"model": MODEL, "prompt": []}, None, 400, "prompt", None, "empty", id="empty-prompt"),
    pytest.param(CMPL, {"model": MODEL, "prompt": "hi", "n": 0}, None, 400, "n", None, "n", id="n-zero"),
    pytest.param(CHAT, {"model": MODEL, "messages": HI, "top_logprobs": 2}, None, 400, "top_logprobs", None,
                 "logprobs", id="top-logprobs-without-logprobs"),
    pytest.param(CMPL, {"model": MODEL, "prompt": "hi", "stop_token_ids": [99999]}, None, 400, "stop_token_ids",
                 None, "99999", id="stop-token-out-of-vocabulary"),
]


@pytest.mark.parametrize("path,body,headers,status,param,code,mention", BAD_REQUESTS)
def test_bad_request_gets_an_openai_error_and_the_server_carries_on(url, path, body, headers, status, param, code,
                                                                    mention):
    got, _, raw = call("POST", url + path, body, headers)
    assert_openai_error(got, json.loads(raw), status, param, code, mention)
    assert_serves(url)


def test_errors_surface_as_openai_exceptions(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=HI, temperature=-1)
    assert e.value.status_code == 400 and e.value.param == "temperature"
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-nope", prompt="hi")
    assert e.value.code == "model_not_found" and "gpt-nope" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=list(range(5, 400)), stream=True)
    assert e.value.code == "context_length_exceeded"


# ---- authentication and admission control (one guarded server) ----------------------------
def test_api_key_is_required_on_api_routes_only(guarded):
    url = guarded.url
    requests = [("GET", "/v1/models", None), ("POST", CMPL, {"model": MODEL, "prompt": "hi", "max_tokens": 2}),
                ("POST", CHAT, {"model": MODEL, "messages": HI, "max_tokens": 2}),
                ("POST", "/tokenize", {"prompt": "hi"})]
    for method, path, body in requests:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            status, _, raw = call(method, url + path, body, headers)
            assert_openai_error(status, json.loads(raw), 401, code="invalid_api_key")
    for path in ("/health", "/version", "/metrics", "/openapi.json"):
        assert call("GET", url + path)[0] == 200, path
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    with OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60) as ok:
        assert [m.id for m in ok.models.list().data] == [MODEL]
        r = ok.chat.completions.create(model=MODEL, messages=HI, max_tokens=3, extra_body=IGNORE_EOS)
        assert r.usage.completion_tokens == 3


def test_a_named_origins_pages_may_call_the_api_and_no_other_origins(guarded, url):
    """The preflight a browser sends before a cross-origin POST carries no API key and is answered; the answer to the
    request itself, a stream included, names the origin; another origin, or a server that names none, is not."""
    def preflight(base: str, origin: str) -> http.client.HTTPResponse:
        conn = http.client.HTTPConnection(base.removeprefix("http://"), timeout=30)
        conn.request("OPTIONS", "/v1/chat/completions", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        r = conn.getresponse()
        r.read()
        conn.close()
        return r

    ok = preflight(guarded.url, APP_ORIGIN)
    assert ok.status == 200 and ok.getheader("Access-Control-Allow-Origin") == APP_ORIGIN
    assert "POST" in ok.getheader("Access-Control-Allow-Methods")
    assert ok.getheader("Access-Control-Allow-Headers") == "authorization, content-type"
    refused = preflight(guarded.url, "https://evil.example")
    assert refused.status == 400 and refused.getheader("Access-Control-Allow-Origin") is None
    auth = {"Authorization": f"Bearer {KEY}", "Origin": APP_ORIGIN}
    status, headers, _ = call("GET", guarded.url + "/v1/models", headers=auth)
    assert status == 200 and headers["access-control-allow-origin"] == APP_ORIGIN
    conn, resp = open_stream(guarded.url + "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 2,
                                                                "stream": True}, headers=auth)
    assert resp.getheader("Access-Control-Allow-Origin") == APP_ORIGIN
    resp.read()
    conn.close()
    assert headers["access-control-expose-headers"] == "Retry-After"  # a page may read when to retry a 429
    status, headers, _ = call("GET", guarded.url + "/v1/models", headers={**auth, "Origin": "https://evil.example"})
    assert status == 200 and "access-control-allow-origin" not in headers and "Origin" in headers["vary"]
    from gateway.cors import CorsPolicy

    with pytest.raises(ValueError, match="name the origins"):
        CorsPolicy(("*",), credentials=True)
    # Without --allowed-origins no page may; a plain OPTIONS says what a path takes.
    assert preflight(url, APP_ORIGIN).getheader("Access-Control-Allow-Origin") is None
    status, headers, _ = call("OPTIONS", url + "/v1/models")
    assert status == 204 and {"GET", "OPTIONS"} <= set(headers["allow"].split(", "))


def test_full_queue_gets_429_with_retry_after(guarded):
    url, auth = guarded.url, {"Authorization": f"Bearer {KEY}"}
    long = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 900, "ignore_eos": True, "stream": True}
    running_conn, running = open_stream(url + CMPL, long, auth)
    json.loads(next(events(running)))
    waiting_conn, _ = open_stream(url + CMPL, long, auth)  # --max-num-seqs 1: this one waits
    try:
        wait_for_metrics(url, lambda t: metric(t, "num_requests_running") == 1
                         and metric(t, "num_requests_waiting") == 1)
        for path, body in [(CMPL, {"model": MODEL, "prompt": "hi", "max_tokens": 2}),
                           (CHAT, {"model": MODEL, "messages": HI, "max_tokens": 2, "stream": True})]:
            status, headers, raw = call("POST", url + path, body, auth)
            assert_openai_error(status, json.loads(raw), 429, code="queue_full")
            assert json.loads(raw)["error"]["type"] == "rate_limit_error"
            assert int(headers["retry-after"]) >= 1
        assert metric(metrics_text(url), "request_rejected_total") >= 2
    finally:
        running_conn.close()
        waiting_conn.close()
    wait_for_metrics(url, idle)
    assert_serves(url, auth)


# ---- graceful shutdown ----------------------------------------------------------------------
def _events_until_closed(resp) -> list[str]:
    out = []
    try:
        for e in events(resp):
            out.append(e)
    except (http.client.IncompleteRead, ConnectionError):
        pass  # cut off mid-stream
    return out


@pytest.fixture(scope="module")
def slow_dir(tmp_path_factory):
    """Big enough (68M bf16 parameters, ~17 ms a token on one thread here) that a 1000-token stream outlives a
    drain timeout of seconds however fast the engine gets; the tiny model decodes 1000 tokens inside one."""
    return write_checkpoint(tmp_path_factory.mktemp("slow"), "llama", hidden=1024, layers=6, heads=8, kv_heads=2,
                            intermediate=2816, dtype="bfloat16")


def test_sigterm_lets_open_streams_finish_within_the_drain_timeout_then_exits_0(slow_dir):
    with running_server(slow_dir, "--num-kv-blocks", "80", "--max-model-len", "1024", "--served-model-name", MODEL,
                        "--drain-timeout", "3", "--threads-per-stage", "1") as srv:
        body = {"model": MODEL, "prompt": "hello", "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        short_conn, short = open_stream(srv.url + CMPL, {**body, "max_tokens": 30})  # ~0.5 s
        long_conn, long = open_stream(srv.url + CMPL, {**body, "max_tokens": 1000})  # ~17 s: outlives the drain
        it = events(short)
        first = json.loads(next(it))
        sent = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        # new work is refused: 503 while draining, or no listener at all once it has stopped
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if call("GET", srv.url + "/health", timeout=5)[0] == 503:
                    break
            except ConnectionError:
                break
            time.sleep(0.02)
        else:
            raise AssertionError("the server still reports healthy after SIGTERM")
        try:
            status, _, raw = call("POST", srv.url + CMPL, {"model": MODEL, "prompt": "hi", "max_tokens": 2}, timeout=10)
        except (ConnectionError, http.client.HTTPException):
            pass
        else:
            assert_openai_error(status, json.loads(raw), 503, code="server_shutting_down")

        rest = list(it)
        short_conn.close()
        assert first["choices"][0]["finish_reason"] is None
        assert rest[-1] == "[DONE]"
        usage = json.loads(rest[-2])
        assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 30
        assert json.loads(rest[-3])["choices"][0]["finish_reason"] == "length"

        cut = _events_until_closed(long)
        long_conn.close()
        # Still running when the drain timeout ran out: cut off, and told so before the stream ends.
        assert cut[-1] == "[DONE]" and json.loads(cut[-2])["error"]["code"] == "server_shutting_down", cut[-3:]
        assert all("finish_reason" in e for e in cut[:-2]) and '"length"' not in "".join(cut)
        assert srv.proc.wait(timeout=60) == 0, srv.output()
        assert time.monotonic() - sent < 3 + 60  # it ends, drain timeout or not (no bound a loaded machine breaks)
        out = srv.output()
        assert "draining 2 open requests" in out and "strata: stopped" in out, out


def test_a_port_in_use_fails_before_the_model_loads(llama_dir):
    """The listening socket is bound first: a port in use is one line and exit 1, and no stage is started (the
    ports stages open while they start can never take the server's own)."""
    import socket

    from server_process import ServerProcess

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        server = ServerProcess(llama_dir, port=port)
        try:
            assert server.proc.wait(120) == 1
        finally:
            server.stop()
    out = server.output()
    assert f"cannot listen on 127.0.0.1:{port}" in out and "stage" not in out, out


def test_the_grafana_dashboard_queries_only_what_the_server_exports(url):
    """deploy/grafana/strata.json: every query names a metric this server's /metrics declares (a histogram's
    _bucket, _sum and _count series included), and it covers what the /dashboard page shows."""
    from pathlib import Path

    doc = json.loads((Path(__file__).parents[1] / "deploy" / "grafana" / "strata.json").read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in doc["templating"]["list"] if "definition" in v]
    declared = re.findall(r"^# TYPE (\S+) (\w+)$", metrics_text(url), re.M)
    exported = {n for n, _ in declared} | {n + s for n, k in declared if k == "histogram"
                                           for s in ("_bucket", "_sum", "_count")}
    used = set(re.findall(r"\b((?:strata:|gen_ai_)[a-z0-9_]+)", " ".join(exprs)))
    assert used and used <= exported, sorted(used - exported)
    titles = " ".join(p["title"].lower() for p in doc["panels"])
    for shown in ("requests per second", "errors", "429", "tokens per second", "kv-cache", "prefix-cache hit rate",
                  "queue time", "end-to-end latency", "time to first token", "preemptions", "stage busy",
                  "stage step time"):
        assert shown in titles, shown
