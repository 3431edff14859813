"""An OTLP/HTTP receiver on loopback: what a collector would get, decoded for tests.

Point exporters at :attr:`OtlpReceiver.endpoint` (``OTEL_EXPORTER_OTLP_ENDPOINT``, protocol
``http/protobuf``): it accepts ``/v1/traces``, ``/v1/metrics`` and ``/v1/logs``, decodes them
with ``opentelemetry-proto`` and keeps spans, metric points and log records, plus every raw
body (to look for a secret in anything exported).
"""

from __future__ import annotations

import gzip
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    if kind is None:
        return None
    value = getattr(any_value, kind)
    if kind == "array_value":
        return [_value(v) for v in value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in value.values}
    return value


def _attributes(items: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in items}


@dataclass
class ReceivedSpan:
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    attributes: dict[str, Any]
    resource: dict[str, Any]
    start_ns: int
    end_ns: int


@dataclass
class MetricPoint:
    name: str
    attributes: dict[str, Any]
    resource: dict[str, Any]
    value: float
    start_ns: int
    time_ns: int
    cumulative: bool


@dataclass
class OtlpReceiver:
    """Use as a context manager; read :attr:`spans`, :attr:`points`, :attr:`logs`."""

    port: int = 0
    spans: list[ReceivedSpan] = field(default_factory=list)
    points: list[MetricPoint] = field(default_factory=list)
    logs: list[dict[str, Any]] = field(default_factory=list)
    raw: list[bytes] = field(default_factory=list)
    _httpd: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """The standard variables that send a process's telemetry here."""
        return {
            "OTEL_EXPORTER_OTLP_ENDPOINT": self.endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_METRIC_EXPORT_INTERVAL": "1000",
        }

    def __enter__(self) -> OtlpReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                receiver.receive(self.path, body)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = int(self._httpd.server_address[1])
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    def receive(self, path: str, body: bytes) -> None:
        with self._lock:
            self.raw.append(body)
            if path.endswith("/v1/traces"):
                self._traces(body)
            elif path.endswith("/v1/metrics"):
                self._metrics(body)
            elif path.endswith("/v1/logs"):
                self._logs(body)

    def _traces(self, body: bytes) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        request = ExportTraceServiceRequest.FromString(body)
        for resource_spans in request.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    self.spans.append(
                        ReceivedSpan(
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            name=span.name,
                            attributes=_attributes(span.attributes),
                            resource=resource,
                            start_ns=span.start_time_unix_nano,
                            end_ns=span.end_time_unix_nano,
                        )
                    )

    def _metrics(self, body: bytes) -> None:
        from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
            ExportMetricsServiceRequest,
        )

        request = ExportMetricsServiceRequest.FromString(body)
        for resource_metrics in request.resource_metrics:
            resource = _attributes(resource_metrics.resource.attributes)
            for scope in resource_metrics.scope_metrics:
                for metric in scope.metrics:
                    kind = metric.WhichOneof("data")
                    data = getattr(metric, kind)
                    cumulative = getattr(data, "aggregation_temporality", 2) == 2
                    for point in data.data_points:
                        if kind == "histogram":
                            value = float(point.sum)
                        elif point.WhichOneof("value") == "as_int":
                            value = float(point.as_int)
                        else:
                            value = float(point.as_double)
                        self.points.append(
                            MetricPoint(
                                name=metric.name,
                                attributes=_attributes(point.attributes),
                                resource=resource,
                                value=value,
                                start_ns=point.start_time_unix_nano,
                                time_ns=point.time_unix_nano,
                                cumulative=cumulative,
                            )
                        )

    def _logs(self, body: bytes) -> None:
        from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
            ExportLogsServiceRequest,
        )

        request = ExportLogsServiceRequest.FromString(body)
        for resource_logs in request.resource_logs:
            resource = _attributes(resource_logs.resource.attributes)
            for scope in resource_logs.scope_logs:
                for record in scope.log_records:
                    self.logs.append(
                        {
                            "body": _value(record.body),
                            "attributes": _attributes(record.attributes),
                            "resource": resource,
                        }
                    )

    def total(self, name: str, **attributes: Any) -> float:
        """A counter's total over every process that exported it: the last cumulative value
        of each series (process and attribute set), plus every delta."""
        with self._lock:
            latest: dict[tuple[Any, ...], MetricPoint] = {}
            deltas = 0.0
            for point in self.points:
                if point.name != name:
                    continue
                if any(point.attributes.get(k) != v for k, v in attributes.items()):
                    continue
                if not point.cumulative:
                    deltas += point.value
                    continue
                key = (
                    tuple(sorted(point.resource.items(), key=str)),
                    tuple(sorted(point.attributes.items(), key=str)),
                    point.start_ns,
                )
                if key not in latest or point.time_ns >= latest[key].time_ns:
                    latest[key] = point
            return deltas + sum(p.value for p in latest.values())

    def tree(self, trace_id: str) -> str:
        """The trace as indented text (names), for the README and for failing asserts."""
        spans = [s for s in self.spans if s.trace_id == trace_id]
        children: dict[str, list[ReceivedSpan]] = {}
        for span in spans:
            children.setdefault(span.parent_span_id, []).append(span)
        ids = {s.span_id for s in spans}
        roots = [s for s in spans if s.parent_span_id not in ids]
        lines: list[str] = []

        def walk(span: ReceivedSpan, depth: int) -> None:
            lines.append("  " * depth + span.name)
            for child in sorted(children.get(span.span_id, []), key=lambda s: s.start_ns):
                walk(child, depth + 1)

        for root in sorted(roots, key=lambda s: s.start_ns):
            walk(root, 0)
        return "\n".join(lines)
