"""Traces of a 2-stage pipeline at layer detail, received by a real OTLP/HTTP receiver."""
from __future__ import annotations

import asyncio
import json
import random
import time

import aiohttp
import pytest

from bench.otlp_receiver import OTLPReceiver, ReceivedSpan
from server_process import running_server
from tiny_models import write_checkpoint

MODEL = "tiny"
NUM_LAYERS = 6
STAGE_LAYERS = {0: {0, 1, 2}, 1: {3, 4, 5}}  # set with --layers: the planner's split depends on the probe
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "100"}


@pytest.fixture(scope="module")
def six_layers(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("six"), "llama", layers=NUM_LAYERS)


def traceparent(sampled: bool = True) -> tuple[str, str, str]:
    trace_id, span_id = f"{random.getrandbits(128):032x}", f"{random.getrandbits(64):016x}"
    return trace_id, span_id, f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}"


async def post(url: str, body: dict, header: str) -> dict:
    """One request; a streamed one is read to the end and its usage returned like a whole response's."""
    async with aiohttp.ClientSession() as session, session.post(url, json=body, headers={"traceparent": header}) as r:
        assert r.status == 200, await r.text()
        if not body.get("stream"):
            return await r.json()
        last = None
        async for raw in r.content:
            line = raw.decode().strip()
            if line.startswith("data: {"):
                last = json.loads(line[6:])
        return last


REQUESTS = [
    ("/v1/completions", {"model": MODEL, "prompt": [5, 6, 7, 8], "max_tokens": 6, "temperature": 0.0, "seed": 7,
                         "ignore_eos": True}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
                              "top_p": 0.9, "stream": True, "stream_options": {"include_usage": True},
                              "ignore_eos": True}),
    ("/v1/completions", {"model": MODEL, "prompt": [9, 10], "max_tokens": 4, "n": 2, "ignore_eos": True}),
]


@pytest.fixture(scope="module")
def traced(six_layers):
    """Serve with a 2-stage pipeline at layer detail, send the requests concurrently, collect every span."""
    with OTLPReceiver() as rx, running_server(six_layers, "--devices", "cpu,cpu", "--layers", "3,3",
                                              "--trace-detail", "layer", "--otlp-traces-endpoint", rx.endpoint,
                                              "--served-model-name", MODEL, "--max-model-len", "256",
                                              "--num-kv-blocks", "64", env=FAST_EXPORT) as s:
        parents = [traceparent() for _ in REQUESTS]

        async def send_all():
            return await asyncio.gather(*(post(s.url + path, body, p[2]) for (path, body), p in zip(REQUESTS, parents)))

        responses = asyncio.run(send_all())
        ids = {p[0] for p in parents}
        rx.wait_for(lambda spans: sum(1 for x in spans if x.trace_id in ids and x.kind == "SERVER") == len(ids), 30)
    # The server has stopped, so every process has flushed its spans.
    return parents, responses, rx.spans()


def by_id(spans: list[ReceivedSpan]) -> dict[str, ReceivedSpan]:
    return {s.span_id: s for s in spans}


def test_each_request_is_one_trace_under_the_clients_trace_id(traced):
    parents, responses, spans = traced
    for (path, body), (trace_id, client_span, _), resp in zip(REQUESTS, parents, responses):
        mine = [s for s in spans if s.trace_id == trace_id]
        server = [s for s in mine if s.kind == "SERVER"]
        assert len(server) == 1 and server[0].parent_span_id == client_span
        assert server[0].name == f"POST {path}" and server[0].attributes["http.response.status_code"] == 200
        operation = "chat" if "chat" in path else "text_completion"
        genai = [s for s in mine if s.name == f"{operation} {MODEL}"]
        assert len(genai) == 1 and genai[0].parent_span_id == server[0].span_id
        a = genai[0].attributes
        assert a["gen_ai.operation.name"] == operation and a["gen_ai.provider.name"] == "strata"
        assert a["gen_ai.request.model"] == MODEL and a["gen_ai.request.max_tokens"] == body["max_tokens"]
        assert a["gen_ai.request.stream"] == bool(body.get("stream"))
        assert a["gen_ai.request.choice.count"] == body.get("n", 1)
        for field in ("temperature", "top_p", "seed"):
            if field in body:
                assert a[f"gen_ai.request.{field}"] == body[field]
        assert a["gen_ai.response.id"] == resp["id"]
        assert list(a["gen_ai.response.finish_reasons"]) == ["length"] * body.get("n", 1)
        assert a["gen_ai.usage.input_tokens"] == resp["usage"]["prompt_tokens"]
        assert a["gen_ai.usage.output_tokens"] == resp["usage"]["completion_tokens"]
        assert 0 <= a["gen_ai.latency.time_in_queue"] <= a["gen_ai.latency.time_to_first_token"]
        queue = [s for s in mine if s.name == "queue"]
        assert len(queue) == 1 and queue[0].parent_span_id == genai[0].span_id
        for child, parent in ((genai[0], server[0]), (queue[0], genai[0])):
            assert parent.start_ns <= child.start_ns <= child.end_ns <= parent.end_ns
        assert {s.resource["service.name"] for s in mine} == {"strata"}


def test_every_traced_step_has_each_layer_on_its_stage_and_each_hop(traced):
    parents, responses, spans = traced
    genai_ids = {s.span_id for s in spans if s.trace_id in {p[0] for p in parents} and s.name.endswith(MODEL)}
    steps = [s for s in spans if s.name == "engine step"]
    assert steps
    for step in steps:
        assert {sid for _, sid in step.links} <= genai_ids and step.links
        assert step.parent_span_id is None
        children = [s for s in spans if s.trace_id == step.trace_id and s.span_id != step.span_id]
        index = by_id(children)
        forwards = {s.attributes["strata.stage"]: s for s in children if s.name.endswith("forward")}
        assert set(forwards) == {0, 1}
        for stage, fwd in forwards.items():
            assert fwd.parent_span_id == step.span_id
            assert step.start_ns <= fwd.start_ns <= fwd.end_ns <= step.end_ns
            assert fwd.resource["strata.stage"] == stage
            layers = [s for s in children if s.parent_span_id == fwd.span_id]
            assert {s.attributes["strata.layer"] for s in layers} == STAGE_LAYERS[stage]
            for s in layers:
                assert s.name == f"layer {s.attributes['strata.layer']}"
                assert fwd.start_ns <= s.start_ns <= s.end_ns <= fwd.end_ns
                assert s.attributes["strata.device"] == fwd.attributes["strata.device"]
                assert s.attributes["strata.num_tokens"] == fwd.attributes["strata.num_tokens"] >= 1
        hops = sorted((s.attributes["strata.transfer.source"], s.attributes["strata.transfer.destination"])
                      for s in children if s.name.startswith("transfer"))
        assert hops == [("driver", "stage 0 (cpu)"), ("stage 0 (cpu)", "stage 1 (cpu)"), ("stage 1 (cpu)", "driver")]
        for s in children:
            if s.name.startswith("transfer") and s.attributes["strata.transfer.destination"] != "driver":
                assert isinstance(s.attributes["strata.transfer.overlapped_compute"], bool)
        for s in children:
            if s.name.startswith("transfer"):
                assert s.parent_span_id == step.span_id and s.attributes["strata.transfer.bytes"] > 0
                assert s.start_ns <= s.end_ns
                assert s.attributes["strata.transfer.bandwidth_bytes_per_s"] > 0
        assert all(s.parent_span_id in index or s.parent_span_id == step.span_id for s in children)
    # every token of every request came from a traced step that links to it
    for (_, body), (trace_id, _, _) in zip(REQUESTS, parents):
        genai = next(s for s in spans if s.trace_id == trace_id and s.name.endswith(MODEL))
        linking = [s for s in steps if genai.span_id in {sid for _, sid in s.links}]
        assert len(linking) >= body["max_tokens"]


def test_a_requests_trace_shows_its_prefill_and_decode_and_leads_to_the_steps_that_carried_it(traced):
    """Under each request's GenAI span: a prefill span per prompt chunk and one decode span per sequence, within it,
    each linked to step traces that were exported (and that link back to the request)."""
    parents, responses, spans = traced
    steps = {s.trace_id: s for s in spans if s.name == "engine step"}
    for (_, body), (trace_id, _, _) in zip(REQUESTS, parents):
        genai = next(s for s in spans if s.trace_id == trace_id and s.name.endswith(MODEL))
        prefills = [s for s in spans if s.trace_id == trace_id and s.name == "prefill"]
        decodes = [s for s in spans if s.trace_id == trace_id and s.name == "decode"]
        n = body.get("n", 1)
        assert len({s.attributes["strata.seq_id"] for s in prefills}) == n and len(decodes) == n
        for s in prefills + decodes:
            assert s.parent_span_id == genai.span_id and genai.start_ns <= s.start_ns <= s.end_ns <= genai.end_ns
            assert s.links
            for linked_trace, linked_span in s.links:
                step = steps[linked_trace]  # exported, and it links back to this request
                assert step.span_id == linked_span and genai.span_id in {sid for _, sid in step.links}
        for d in decodes:
            # Every token but the first comes from a decode step (the first from the prefill's).
            assert d.attributes["strata.decode.steps"] == body["max_tokens"] - 1 == len(d.links)
            assert d.attributes["strata.decode.links_dropped"] == 0
            # The first decode step leaves once the last prompt chunk has (scheduled ahead, it overlaps that step).
            mine = [p for p in prefills if p.attributes["strata.seq_id"] == d.attributes["strata.seq_id"]]
            assert max(p.start_ns for p in mine) <= d.start_ns and max(p.end_ns for p in mine) <= d.end_ns


def test_request_detail_traces_requests_only_and_honours_the_sampled_flag(six_layers):
    with OTLPReceiver() as rx, running_server(six_layers, "--otlp-traces-endpoint", rx.endpoint, "--served-model-name",
                                              MODEL, "--max-model-len", "256", "--num-kv-blocks", "64",
                                              env=FAST_EXPORT) as s:
        sampled, unsampled = traceparent(True), traceparent(False)
        body = {"model": MODEL, "prompt": [5, 6], "max_tokens": 3}
        for p in (sampled, unsampled):
            asyncio.run(post(s.url + "/v1/completions", body, p[2]))
        rx.wait_for(lambda spans: any(x.trace_id == sampled[0] and x.kind == "SERVER" for x in spans), 30)
        metrics = asyncio.run(_get(s.url + "/metrics"))
    spans = rx.spans()
    assert {x.name for x in spans if x.trace_id == sampled[0]} == {"POST /v1/completions", f"text_completion {MODEL}",
                                                                   "queue"}
    assert not [x for x in spans if x.trace_id == unsampled[0]]
    assert not [x for x in spans if x.name in ("engine step", "stage 0 forward") or x.name.startswith("layer")]
    # the GenAI server metrics, with the convention's buckets, beside the Prometheus ones
    assert 'gen_ai_server_time_to_first_token_seconds_bucket{gen_ai_operation_name="text_completion"' in metrics
    assert 'le="0.001"} ' in metrics and 'le="81.92"} ' in metrics
    assert 'gen_ai_server_request_duration_seconds_count{gen_ai_operation_name="text_completion",' \
           f'gen_ai_provider_name="strata",gen_ai_request_model="{MODEL}"}} 2' in metrics
    assert "strata:trace_spans_dropped_total{" in metrics


async def _get(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(url) as r:
        return await r.text()


def test_spans_a_collector_never_takes_count_as_dropped_per_process(six_layers):
    """OTLP exporters report a failed export (nothing listening) as FAILURE, not an exception: those spans are
    lost, and /metrics says so for the server and for each stage."""
    from server_process import free_port

    nowhere = f"http://127.0.0.1:{free_port()}"
    env = {**FAST_EXPORT, "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "1"}
    with running_server(six_layers, "--otlp-traces-endpoint", nowhere, "--trace-detail", "step", "--served-model-name",
                        MODEL, "--max-model-len", "256", "--num-kv-blocks", "64", env=env) as s:
        body = {"model": MODEL, "prompt": [5, 6], "max_tokens": 3}
        dropped: dict[str, float] = {}
        for _ in range(120):  # a stage's count rides back on the next traced step
            asyncio.run(post(s.url + "/v1/completions", body, traceparent(True)[2]))
            metrics = asyncio.run(_get(s.url + "/metrics"))
            dropped = {line.split('process="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
                       for line in metrics.splitlines() if line.startswith("strata:trace_spans_dropped_total{")}
            if dropped.get("server", 0) > 0 and dropped.get("stage 0", 0) > 0:
                break
            time.sleep(0.5)
    assert dropped.get("server", 0) > 0 and dropped.get("stage 0", 0) > 0, dropped
