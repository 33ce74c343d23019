"""An in-process OTLP/HTTP trace receiver for tests and benchmarks.

Start it, point an OTLP/HTTP exporter at `.endpoint`, and read back what arrived:

    with OTLPReceiver() as rx:
        ...  # export spans to rx.endpoint
        spans = rx.wait_for(lambda s: len(s) >= 2, timeout=5)

It speaks the real wire protocol (protobuf `ExportTraceServiceRequest`, optionally gzipped)
so tracing is checked end to end, exporter included, without an external collector.
`count_only=True` skips flattening and only counts spans, for throughput benchmarks.
"""
from __future__ import annotations

import gzip
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

PROTOBUF = "application/x-protobuf"
_RESPONSE = ExportTraceServiceResponse().SerializeToString()


@dataclass(slots=True)
class ReceivedSpan:
    trace_id: str
    span_id: str
    parent_span_id: str | None
    name: str
    kind: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    links: list[tuple[str, str]]  # (trace_id, span_id) hex
    resource: dict[str, Any]
    scope: str
    status_code: str
    events: list[str]


def _value(v: AnyValue) -> Any:
    which = v.WhichOneof("value")
    if which == "array_value":
        return [_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return _attrs(v.kvlist_value.values)
    return None if which is None else getattr(v, which)  # string/bool/int/double/bytes


def _attrs(kvs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs}


def _flatten(req: ExportTraceServiceRequest) -> list[ReceivedSpan]:
    out: list[ReceivedSpan] = []
    for rs in req.resource_spans:
        resource = _attrs(rs.resource.attributes)
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append(ReceivedSpan(
                    trace_id=s.trace_id.hex(),
                    span_id=s.span_id.hex(),
                    parent_span_id=s.parent_span_id.hex() or None,
                    name=s.name,
                    kind=Span.SpanKind.Name(s.kind).removeprefix("SPAN_KIND_"),
                    start_ns=s.start_time_unix_nano,
                    end_ns=s.end_time_unix_nano,
                    attributes=_attrs(s.attributes),
                    links=[(ln.trace_id.hex(), ln.span_id.hex()) for ln in s.links],
                    resource=dict(resource),
                    scope=ss.scope.name,
                    status_code=Status.StatusCode.Name(s.status.code).removeprefix("STATUS_CODE_"),
                    events=[e.name for e in s.events],
                ))
    return out


class OTLPReceiver:
    """OTLP/HTTP trace receiver on 127.0.0.1 and a free port, served from a daemon thread.

    With `count_only=True` only `.count` and `.requests` move; `.spans()` stays empty.
    """

    def __init__(self, count_only: bool = False) -> None:
        self.count_only = count_only
        self._lock = threading.Lock()
        self._spans: list[ReceivedSpan] = []
        self._count = 0
        self._requests = 0
        handler = type("Handler", (_Handler,), {"receiver": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1/traces"

    def start(self) -> OTLPReceiver:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever, args=(0.05,), name="otlp-receiver", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    __enter__ = start

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self._spans)

    @property
    def count(self) -> int:
        with self._lock:
            return self._count

    @property
    def requests(self) -> int:
        with self._lock:
            return self._requests

    def clear(self) -> None:
        with self._lock:
            self._spans.clear()
            self._count = 0
            self._requests = 0

    def wait_for(self, predicate: Callable[[list[ReceivedSpan]], bool], timeout: float = 5.0) -> list[ReceivedSpan]:
        """Poll until `predicate(spans)` holds and return those spans; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            spans = self.spans()
            if predicate(spans):
                return spans
            if time.monotonic() >= deadline:
                names = sorted({s.name for s in spans})
                raise TimeoutError(f"OTLP receiver: condition not met after {timeout}s; "
                                   f"{self.count} spans in {self.requests} requests, names={names}")
            time.sleep(0.01)

    def _ingest(self, body: bytes) -> None:
        req = ExportTraceServiceRequest.FromString(body)
        if self.count_only:
            spans, n = [], sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)
        else:
            spans = _flatten(req)
            n = len(spans)
        with self._lock:
            self._spans.extend(spans)
            self._count += n
            self._requests += 1


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the exporter's session expects
    receiver: OTLPReceiver  # set on the per-receiver subclass

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _reply(self, code: int, body: bytes, ctype: str = "text/plain") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._reply(404, b"not found")

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        encoding = self.headers.get("Content-Encoding", "identity").strip().lower()
        if self.path.split("?", 1)[0] != "/v1/traces":
            return self._reply(404, b"not found")
        if self.headers.get("Content-Type", "").split(";", 1)[0].strip() != PROTOBUF:
            return self._reply(415, b"expected application/x-protobuf")
        if encoding not in ("gzip", "identity", ""):
            return self._reply(415, b"unsupported content encoding")
        try:
            self.receiver._ingest(gzip.decompress(body) if encoding == "gzip" else body)
        except Exception as e:  # malformed gzip or protobuf
            return self._reply(400, f"bad request: {e}".encode())
        self._reply(200, _RESPONSE, PROTOBUF)
