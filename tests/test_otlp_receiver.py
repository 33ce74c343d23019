"""The in-process OTLP/HTTP receiver decodes what the real SDK exporter sends."""
from __future__ import annotations

import gzip
import time
import urllib.error
import urllib.request

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from bench.otlp_receiver import OTLPReceiver


def _provider(endpoint: str, **exporter_kwargs) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": "t"}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=endpoint, timeout=5, **exporter_kwargs)))
    return provider


def _export_pair(provider: TracerProvider) -> tuple[trace.SpanContext, trace.SpanContext, trace.SpanContext]:
    tracer = provider.get_tracer("strata.test")
    with tracer.start_as_current_span("linked") as linked:
        pass
    with tracer.start_as_current_span("request", kind=trace.SpanKind.SERVER) as parent:
        with tracer.start_as_current_span(
            "step",
            kind=trace.SpanKind.INTERNAL,
            attributes={"s": "x", "i": 7, "f": 1.5, "b": True, "ls": ["a", "b"]},
            links=[trace.Link(linked.get_span_context())],
        ) as child:
            child.add_event("tick")
    provider.shutdown()
    return parent.get_span_context(), child.get_span_context(), linked.get_span_context()


def test_decodes_spans_from_sdk_exporter():
    before = time.time_ns()
    with OTLPReceiver() as rx:
        parent_ctx, child_ctx, linked_ctx = _export_pair(_provider(rx.endpoint))
        spans = rx.wait_for(lambda s: len(s) >= 3, timeout=2)
        assert rx.count == 3 and rx.requests == 3  # SimpleSpanProcessor: one request per span
    after = time.time_ns()
    by_name = {s.name: s for s in spans}
    parent, child = by_name["request"], by_name["step"]

    assert parent.trace_id == format(parent_ctx.trace_id, "032x") and len(parent.trace_id) == 32
    assert parent.span_id == format(parent_ctx.span_id, "016x") and len(parent.span_id) == 16
    assert parent.parent_span_id is None
    assert child.trace_id == parent.trace_id
    assert child.span_id == format(child_ctx.span_id, "016x")
    assert child.parent_span_id == parent.span_id
    assert (parent.kind, child.kind) == ("SERVER", "INTERNAL")

    attrs = child.attributes
    assert attrs["s"] == "x" and attrs["i"] == 7 and attrs["f"] == 1.5 and attrs["b"] is True
    assert list(attrs["ls"]) == ["a", "b"]
    assert isinstance(attrs["i"], int) and isinstance(attrs["f"], float)
    assert child.links == [(format(linked_ctx.trace_id, "032x"), format(linked_ctx.span_id, "016x"))]
    assert child.events == ["tick"]

    for s in spans:
        assert s.resource["service.name"] == "t"
        assert s.scope == "strata.test"
        assert s.status_code == "UNSET"
        assert before <= s.start_ns <= s.end_ns <= after
    assert parent.start_ns <= child.start_ns <= child.end_ns <= parent.end_ns


def test_gzip_compression_and_clear():
    with OTLPReceiver() as rx:
        _export_pair(_provider(rx.endpoint, compression=Compression.Gzip))
        spans = rx.wait_for(lambda s: {"request", "step"} <= {x.name for x in s}, timeout=2)
        assert {s.kind for s in spans} >= {"SERVER", "INTERNAL"}
        rx.clear()
        assert rx.spans() == [] and rx.count == 0 and rx.requests == 0
        with pytest.raises(TimeoutError, match="0 spans"):
            rx.wait_for(lambda s: len(s) > 0, timeout=0.05)


def test_count_only_counts_without_keeping():
    with OTLPReceiver(count_only=True) as rx:
        _export_pair(_provider(rx.endpoint))
        assert rx.count == 3 and rx.requests == 3 and rx.spans() == []


def _post(url: str, body: bytes, headers: dict[str, str]) -> int:
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=2) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


def test_rejects_non_protobuf_and_bad_requests():
    with OTLPReceiver() as rx:
        assert _post(rx.endpoint, b'{"resourceSpans": []}', {"Content-Type": "application/json"}) == 415
        assert _post(rx.endpoint, b"\xff\xff\xff", {"Content-Type": "application/x-protobuf"}) == 400
        bad_gzip = {"Content-Type": "application/x-protobuf", "Content-Encoding": "gzip"}
        assert _post(rx.endpoint, b"not gzip", bad_gzip) == 400
        other = rx.endpoint.replace("/v1/traces", "/v1/metrics")
        assert _post(other, b"", {"Content-Type": "application/x-protobuf"}) == 404
        assert _post(rx.endpoint, gzip.compress(b""), bad_gzip) == 200  # empty request is valid
        assert rx.count == 0 and rx.requests == 1
