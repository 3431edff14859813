"""Telemetry's switches and the environment it gives sessions (no exporter involved)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from claudecluster import telemetry


class TestSwitch:
    def test_off_without_an_endpoint(self) -> None:
        assert not telemetry.enabled({})
        assert telemetry.enabled({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"})
        assert telemetry.enabled({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"})
        assert not telemetry.enabled(
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}
        )

    def test_off_costs_no_import(self) -> None:
        """With no endpoint, loading the flows imports nothing of the SDK or its exporters."""
        code = (
            "import sys, claudecluster.flows.goal, claudecluster.flows.worker\n"
            "from claudecluster import telemetry\n"
            "assert telemetry.setup() is False and telemetry.instruments() is None\n"
            "with telemetry.span('x'):\n"
            "    pass\n"
            "loaded = [m for m in sys.modules if m.startswith(('opentelemetry.sdk', "
            "'opentelemetry.exporter'))]\n"
            "assert not loaded, loaded\n"
        )
        env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp"}
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr


class TestSessionEnvironment:
    def test_nothing_when_off(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setitem(telemetry._STATE, "on", False)
        assert telemetry.session_env({telemetry.RUN_ID: "r"}) == {}

    def test_claude_codes_telemetry_tagged_with_the_task(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setitem(telemetry._STATE, "on", True)
        monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "team=core")
        monkeypatch.delenv("OTEL_EXPORTER_OTLP_PROTOCOL", raising=False)
        env = telemetry.session_env(
            {
                telemetry.RUN_ID: "20261127-1",
                telemetry.TASK_ID: "docs, x=1",
                telemetry.TASK_KIND: "",
            }
        )
        assert env["CLAUDE_CODE_ENABLE_TELEMETRY"] == "1"
        assert env["CLAUDE_CODE_ENHANCED_TELEMETRY_BETA"] == "1"
        assert env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "http/protobuf"
        assert env["OTEL_RESOURCE_ATTRIBUTES"] == (
            "team=core,claudecluster.run_id=20261127-1,claudecluster.task_id=docs__x_1"
        )


def test_goal_and_link() -> None:
    assert telemetry.goal_attribute("Add  type hints\n to every module") == (
        "Add type hints to every module"
    )
    long = telemetry.goal_attribute("word " * 100)
    assert len(long) == telemetry.GOAL_ATTRIBUTE_CHARS and long.endswith("...")
    assert telemetry.trace_url(None) is None


def test_trace_url_template(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(telemetry.TRACE_URL_VAR, "https://jaeger/trace/{trace_id}")
    assert telemetry.trace_url("ab" * 16) == "https://jaeger/trace/" + "ab" * 16
