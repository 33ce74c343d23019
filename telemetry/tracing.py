"""OpenTelemetry traces: requests, engine steps, stage forwards, layers and transfers.

The gateway and every stage process export spans over OTLP into the same traces. Request
spans (HTTP server, the GenAI span, the queue wait) go through the SDK's tracer, so the
incoming `traceparent` and the `OTEL_TRACES_SAMPLER` decide what is sampled. Engine-side
spans are different: the hot path only notes timestamps (host clocks; CUDA events on
GPUs) into `SpanRecord`s with ids drawn up front, and the export thread turns them into
SDK spans later, off the hot path. A step is traced when a sampled request rides in it;
its span links to those requests' GenAI spans.

Detail levels: `request` (HTTP, GenAI and queue spans), `step` (plus one span per engine
step, per stage forward and per transfer between processes), `layer` (plus one span per
decoder layer).
"""
from __future__ import annotations

import os
import queue
import random
import threading
import time
from dataclasses import dataclass, field

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, TraceFlags

DETAILS = ("request", "step", "layer")
PROTOCOLS = ("http/protobuf", "grpc")
SCOPE = "strata"
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)


@dataclass(slots=True)
class TraceSettings:
    """What a process needs to export its spans; sent to the stages with their spec."""

    endpoint: str
    detail: str = "request"
    protocol: str = "http/protobuf"
    service_name: str = "strata"

    def __post_init__(self) -> None:
        if self.detail not in DETAILS:
            raise ValueError(f"trace detail must be one of {', '.join(DETAILS)}, got {self.detail!r}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"OTLP traces protocol must be {' or '.join(PROTOCOLS)}, got {self.protocol!r}")

    def covers(self, detail: str) -> bool:
        return DETAILS.index(self.detail) >= DETAILS.index(detail)

    @staticmethod
    def from_env(endpoint: str | None, detail: str = "request") -> TraceSettings | None:
        """None when there is no endpoint (tracing off). Protocol and service name follow the OTEL_* variables."""
        endpoint = endpoint or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        if not endpoint:
            return None
        protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                    or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf")
        return TraceSettings(endpoint, detail, protocol, os.environ.get("OTEL_SERVICE_NAME", "strata"))


@dataclass(slots=True)
class SpanRecord:
    """A span noted on the hot path: ids, clock readings and attributes; no SDK objects."""

    name: str
    trace_id: int
    span_id: int
    parent_id: int | None
    start_ns: int
    end_ns: int
    attributes: dict
    links: list[tuple[int, int]] = field(default_factory=list)
    kind: SpanKind = SpanKind.INTERNAL


def new_trace_id() -> int:
    return random.getrandbits(128) or 1


def new_span_id() -> int:
    return random.getrandbits(64) or 1


def link_limit() -> int:
    return int(os.environ.get("OTEL_SPAN_LINK_COUNT_LIMIT", "128"))


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


class SpanQueue(SpanProcessor):
    """A bounded queue and one export thread (the OTEL_BSP_* variables size it). A span that a full queue drops, or
    whose export fails, counts in `dropped`; the default size holds several seconds of layer-detail spans of a
    busy pipeline."""

    def __init__(self, exporter, resource: Resource) -> None:
        self.exporter = exporter
        self.resource = resource
        self.scope = InstrumentationScope(SCOPE)
        self.max_batch = _env_int("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 2048)
        self.delay_s = _env_int("OTEL_BSP_SCHEDULE_DELAY", 1000) / 1000
        self._queue: queue.Queue = queue.Queue(_env_int("OTEL_BSP_MAX_QUEUE_SIZE", 65536))
        self.dropped = 0
        self.exported = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="strata-span-export", daemon=True)
        self._thread.start()

    # SpanProcessor: spans of the SDK's tracer
    def on_start(self, span, parent_context=None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        if span.context.trace_flags.sampled:
            self._put(span)

    def emit(self, records: list) -> None:
        """SpanRecords, or callables that return SpanRecords once their clocks can be read."""
        for r in records:
            self._put(r)

    def _put(self, item) -> None:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.dropped += 1

    def _run(self) -> None:
        while True:
            stopping = self._stop.wait(self.delay_s)
            self._export_all()
            if stopping:
                return

    def _export_all(self) -> None:
        while True:
            batch = []
            try:
                while len(batch) < self.max_batch:
                    batch.append(self._queue.get_nowait())
            except queue.Empty:
                pass
            if not batch:
                return
            spans = []
            for item in batch:
                try:
                    if isinstance(item, ReadableSpan):
                        spans.append(item)
                    elif isinstance(item, SpanRecord):
                        spans.append(self._to_span(item))
                    else:  # deferred: records whose times are read here (CUDA events), not on the hot path
                        spans.extend(self._to_span(r) for r in item())
                except Exception:  # one record that cannot be built must not stop the thread
                    self.dropped += 1
            try:
                # OTLP exporters answer a collector that is down or refuses with FAILURE (after their retries)
                # rather than an exception: those spans are lost too.
                ok = self.exporter.export(spans) is SpanExportResult.SUCCESS
            except Exception:  # a collector that is down must not take the server with it
                ok = False
            if ok:
                self.exported += len(spans)
            else:
                self.dropped += len(spans)

    def _to_span(self, r: SpanRecord) -> ReadableSpan:
        ctx = SpanContext(r.trace_id, r.span_id, is_remote=False, trace_flags=_SAMPLED)
        parent = SpanContext(r.trace_id, r.parent_id, is_remote=True, trace_flags=_SAMPLED) if r.parent_id else None
        links = [Link(SpanContext(t, s, is_remote=True, trace_flags=_SAMPLED)) for t, s in r.links]
        return ReadableSpan(name=r.name, context=ctx, parent=parent, resource=self.resource, attributes=r.attributes,
                            links=links, kind=r.kind, start_time=r.start_ns, end_time=r.end_ns,
                            instrumentation_scope=self.scope)

    def shutdown(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        self._export_all()
        return True


def make_exporter(settings: TraceSettings):
    if settings.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=settings.endpoint, insecure=settings.endpoint.startswith("http://"))
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    endpoint = settings.endpoint
    if not endpoint.rstrip("/").endswith("/v1/traces"):
        endpoint = endpoint.rstrip("/") + "/v1/traces"
    return OTLPSpanExporter(endpoint=endpoint)


class Tracing:
    """One process's tracing: the SDK tracer for request spans and the queue for engine-side records."""

    def __init__(self, settings: TraceSettings, **resource_attributes) -> None:
        self.settings = settings
        self.resource = Resource.create({"service.name": settings.service_name, **resource_attributes})
        self.queue = SpanQueue(make_exporter(settings), self.resource)
        self.provider = TracerProvider(resource=self.resource)  # the sampler follows OTEL_TRACES_SAMPLER
        self.provider.add_span_processor(self.queue)
        self.tracer = self.provider.get_tracer(SCOPE)

    def covers(self, detail: str) -> bool:
        return self.settings.covers(detail)

    def emit(self, records: list[SpanRecord]) -> None:
        self.queue.emit(records)

    @property
    def dropped(self) -> int:
        return self.queue.dropped

    def shutdown(self) -> None:
        self.provider.shutdown()


def now_ns() -> int:
    return time.time_ns()


def stage_spans(trace, stage: int, device: str, layers: tuple[int, int], batch, clock, received_ns: int,
                nbytes: int, overlapped: bool, fetches=()) -> list:
    """A stage's spans for one traced step: the transfer that brought the batch, the forward, its layers, and the
    reads of its streamed layers (engine.model.layer_stream.Fetch: layer, tier, nbytes, start_ns, end_ns,
    overlapped), each a child of the forward even where it began during the step before.
    trace: the batching.batch.TraceContext the batch arrived with. clock: the step's clock
    (engine.pipeline.step_clock.StepClock): `start_ns`, `end_ns()`, `layer_ends_ns()` on the host clock, and `cuda`,
    whether reading them waits on the device (then the forward and its layers are read in the export thread).
    overlapped: whether the batch arrived while the stage was still computing the step before."""
    trace_id, step_id = trace.trace_id, trace.step_id
    common = {"strata.stage": stage, "strata.device": device, "strata.batch_size": len(batch.seqs),
              "strata.num_tokens": batch.num_tokens}
    forward_id = new_span_id()

    def forward_spans() -> list[SpanRecord]:
        start_ns, end_ns = clock.start_ns, clock.end_ns()
        spans = [SpanRecord(f"stage {stage} forward", trace_id, forward_id, step_id, start_ns, end_ns,
                            {**common, "strata.layers": f"{layers[0]}-{layers[1] - 1}"})]
        if clock.layers:
            begin = start_ns
            experts = clock.experts_starts_ns()
            for layer, end in clock.layer_ends_ns():
                if layer >= 0:
                    index = layers[0] + layer
                    layer_id = new_span_id()
                    spans.append(SpanRecord(f"layer {index}", trace_id, layer_id, forward_id, begin, end,
                                            {**common, "strata.layer": index}))
                    if layer in experts:  # a mixture of experts: the routing and the experts' products
                        spans.append(SpanRecord(f"experts {index}", trace_id, new_span_id(), layer_id, experts[layer],
                                                end, {**common, "strata.layer": index}))
                begin = end
        for f in fetches:
            seconds = max(f.end_ns - f.start_ns, 1) / 1e9
            spans.append(SpanRecord(f"fetch layer {f.layer}", trace_id, new_span_id(), forward_id, f.start_ns,
                                    f.end_ns, {**common, "strata.layer": f.layer, "strata.fetch.tier": f.tier,
                                               "strata.fetch.bytes": f.nbytes,
                                               "strata.fetch.bandwidth_bytes_per_s": f.nbytes / seconds,
                                               "strata.fetch.overlapped_compute": f.overlapped}))
        return spans

    transfer = transfer_span(trace_id, step_id, trace.sent_by, device, trace.sent_ns, received_ns, nbytes,
                             overlapped)
    return [transfer, forward_spans] if clock.cuda else [transfer, *forward_spans()]


def transfer_span(trace_id: int, parent_id: int, src: str, dst: str, start_ns: int, end_ns: int,
                  nbytes: int, overlapped: bool | None = None) -> SpanRecord:
    """overlapped: into a stage, whether the transfer ended while that stage was computing (so it cost no time)."""
    seconds = max(end_ns - start_ns, 1) / 1e9
    attributes = {
        "strata.transfer.source": src, "strata.transfer.destination": dst, "strata.transfer.bytes": nbytes,
        "strata.transfer.bandwidth_bytes_per_s": nbytes / seconds,
    }
    if overlapped is not None:
        attributes["strata.transfer.overlapped_compute"] = overlapped
    return SpanRecord(f"transfer {src} -> {dst}", trace_id, new_span_id(), parent_id, start_ns, end_ns, attributes)
