"""OpenTelemetry: one trace per goal, and the cluster's metrics, when a collector is named.

Switched on by the standard variables: ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or the per-signal
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``), with ``OTEL_EXPORTER_OTLP_HEADERS``,
``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES`` as usual; ``OTEL_SDK_DISABLED=true`` turns
it off. Off by default: nothing is imported or created then, and every helper here is a
no-op.

When on, :func:`setup` registers an SDK tracer provider and meter provider exporting
OTLP/HTTP (protobuf). Prefect then emits its flow-run and task-run spans into them; the
goal's flow run is the root of the trace, each task run (or a pool's worker flow run, whose
trace context travels in Prefect's ``__OTEL_TRACEPARENT`` label) its child. claude-agent-sdk
hands the current span to the CLI as ``TRACEPARENT``, and :func:`session_env` switches on
Claude Code's own telemetry, so its ``claude_code.interaction`` and ``claude_code.llm_request``
spans land under the task, with its metrics and events tagged with the run and task ids.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

SERVICE_NAME = "claudecluster"
GOAL_ATTRIBUTE_CHARS = 120
TRACE_URL_VAR = "CLAUDECLUSTER_TRACE_URL"  # e.g. https://jaeger.example/trace/{trace_id}

# Span and resource attribute names: one place, so the README and the tests agree.
RUN_ID = "claudecluster.run_id"
TASK_ID = "claudecluster.task_id"
TASK_KIND = "claudecluster.task_kind"
POOL = "claudecluster.pool"
GOAL = "claudecluster.goal"

_STATE: dict[str, Any] = {"on": None}


def enabled(env: Mapping[str, str] | None = None) -> bool:
    """True when an OTLP endpoint is configured and the SDK is not disabled."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    return bool(
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def setup() -> bool:
    """Register the tracer and meter providers once per process (when :func:`enabled`);
    whether telemetry is on. Cheap to call again."""
    if _STATE["on"] is not None:
        return bool(_STATE["on"])
    if not enabled():
        _STATE["on"] = False
        return False
    from opentelemetry import metrics, trace
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", SERVICE_NAME)})
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(tracer_provider)
    reader = PeriodicExportingMetricReader(OTLPMetricExporter())  # OTEL_METRIC_EXPORT_INTERVAL
    meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
    metrics.set_meter_provider(meter_provider)
    _STATE.update(on=True, tracer_provider=tracer_provider, meter_provider=meter_provider)
    atexit.register(flush)
    return True


def flush() -> None:
    """Export what is buffered (spans, metrics) now; at exit, and at the end of a run."""
    if not _STATE.get("on"):
        return
    _STATE["tracer_provider"].force_flush()
    _STATE["meter_provider"].force_flush()


@contextmanager
def span(
    name: str, attributes: Mapping[str, str | int | float | bool] | None = None
) -> Iterator[None]:
    """A span named ``name`` under the current one (nothing when telemetry is off)."""
    if not _STATE.get("on"):
        yield
        return
    from opentelemetry import trace

    with trace.get_tracer("claudecluster").start_as_current_span(name, attributes=attributes):
        yield


def current_trace_id() -> str | None:
    """The current trace's id (32 hex digits), or None without telemetry."""
    if not _STATE.get("on"):
        return None
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    return f"{context.trace_id:032x}" if context.is_valid else None


def trace_url(trace_id: str | None) -> str | None:
    """The trace's page, from ``CLAUDECLUSTER_TRACE_URL`` (``{trace_id}`` is filled in)."""
    template = os.environ.get(TRACE_URL_VAR)
    return template.format(trace_id=trace_id) if template and trace_id else None


def session_env(attributes: Mapping[str, str]) -> dict[str, str]:
    """What a Claude Code session needs to send its own spans, metrics and events to the same
    collector, tagged with ``attributes`` (run and task ids). Empty when telemetry is off."""
    if not _STATE.get("on"):
        return {}
    tags = ",".join(f"{key}={_resource_value(value)}" for key, value in attributes.items() if value)
    existing = os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
    return {
        "CLAUDE_CODE_ENABLE_TELEMETRY": "1",
        "CLAUDE_CODE_ENHANCED_TELEMETRY_BETA": "1",
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_METRICS_EXPORTER": "otlp",
        "OTEL_LOGS_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": os.environ.get(
            "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
        ),
        "OTEL_RESOURCE_ATTRIBUTES": ",".join(p for p in (existing, tags) if p),
    }


def _resource_value(value: str) -> str:
    # The W3C baggage format of OTEL_RESOURCE_ATTRIBUTES: no commas, spaces or equals signs.
    return "".join(c if c.isalnum() or c in "-_.:/" else "_" for c in value)[:GOAL_ATTRIBUTE_CHARS]


def goal_attribute(goal: str) -> str:
    text = " ".join(goal.split())
    return text if len(text) <= GOAL_ATTRIBUTE_CHARS else text[: GOAL_ATTRIBUTE_CHARS - 3] + "..."


def set_attributes(attributes: Mapping[str, str | int | float | bool | None]) -> None:
    """Add attributes to the current span (Prefect's flow or task run span)."""
    if not _STATE.get("on"):
        return
    from opentelemetry import trace

    current = trace.get_current_span()
    for key, value in attributes.items():
        if value is not None:
            current.set_attribute(key, value)


class Instruments:
    """The cluster's metrics, created on first use (low-cardinality attributes only)."""

    def __init__(self) -> None:
        from opentelemetry import metrics

        meter = metrics.get_meter("claudecluster")
        self.sessions_started = meter.create_counter(
            "claudecluster.sessions.started", description="Claude Code sessions started"
        )
        self.sessions_running = meter.create_up_down_counter(
            "claudecluster.sessions.running", description="Claude Code sessions running now"
        )
        self.queue_wait = meter.create_histogram(
            "claudecluster.session.queue_wait",
            unit="s",
            description="Time a session waited for its slot before it started",
        )
        self.task_duration = meter.create_histogram(
            "claudecluster.task.duration", unit="s", description="Wall-clock time of a task"
        )
        self.cost = meter.create_counter(
            "claudecluster.cost", unit="USD", description="What sessions cost, by model"
        )
        self.tokens = meter.create_counter(
            "claudecluster.tokens", description="Tokens of sessions, by model and type"
        )
        self.api_retries = meter.create_counter(
            "claudecluster.api.retries", description="Model API calls retried after 429/529"
        )
        self.merges = meter.create_counter(
            "claudecluster.merges", description="Task branches merged, conflicted, resolved"
        )
        self.budget_spent = meter.create_histogram(
            "claudecluster.budget.spent_ratio",
            description="A goal's spend as a share of its budget, at its end",
        )


def instruments() -> Instruments | None:
    """The metric instruments, or None when telemetry is off."""
    if not _STATE.get("on"):
        return None
    if "instruments" not in _STATE:
        _STATE["instruments"] = Instruments()
    found: Instruments = _STATE["instruments"]
    return found
