"""What OpenTelemetry costs ClaudeCluster, off and on (see README "Observability").

    python benchmarks/telemetry.py [--repeat 7] [--out benchmarks/results]

Measures, in fresh interpreters, the time to import the goal flow (which calls
``telemetry.setup()``) with telemetry off and on (an endpoint set, nothing listening), whether
the SDK was imported, and, in this process, the per-call cost of the helpers the run calls
while telemetry is off. Writes ``telemetry.md`` and ``telemetry.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import timeit
from pathlib import Path

PROBE = (
    "import sys, time\n"
    "t = time.perf_counter()\n"
    "import claudecluster.flows.goal\n"
    "from claudecluster import telemetry\n"
    "telemetry.setup()\n"
    "print(time.perf_counter() - t, 'opentelemetry.sdk.trace' in sys.modules)\n"
)


def import_time(env: dict[str, str], repeat: int) -> tuple[float, bool]:
    times, loaded = [], False
    for _ in range(repeat):
        out = subprocess.run(
            [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
        ).stdout.split()
        times.append(float(out[0]))
        loaded = out[1] == "True"
    return statistics.median(times), loaded


def helper_costs_us() -> dict[str, float]:
    from claudecluster import telemetry

    assert not telemetry.setup(), "run without OTEL_EXPORTER_OTLP_ENDPOINT"
    number = 200_000

    def span() -> None:
        with telemetry.span("x", {telemetry.TASK_ID: "t"}):
            pass

    calls = {
        "span()": span,
        "instruments()": telemetry.instruments,
        "session_env()": lambda: telemetry.session_env({telemetry.RUN_ID: "r"}),
        "set_attributes()": lambda: telemetry.set_attributes({telemetry.RUN_ID: "r"}),
    }
    return {name: timeit.timeit(call, number=number) / number * 1e6 for name, call in calls.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    base = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    off, off_loaded = import_time(base, args.repeat)
    on_env = {**base, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}
    on, on_loaded = import_time(on_env, args.repeat)
    helpers = helper_costs_us()
    results = {
        "import_s": {"off": off, "on": on},
        "sdk_imported": {"off": off_loaded, "on": on_loaded},
        "helper_us_off": helpers,
        "repeat": args.repeat,
    }
    lines = [
        "# Telemetry overhead",
        "",
        f"Median of {args.repeat} fresh interpreters: import the goal flow and call setup().",
        "",
        "| telemetry | import + setup (s) | SDK imported |",
        "|---|---:|---|",
        f"| off | {off:.3f} | {off_loaded} |",
        f"| on | {on:.3f} | {on_loaded} |",
        "",
        "Per call, telemetry off (µs): "
        + ", ".join(f"`{name}` {cost:.2f}" for name, cost in helpers.items()),
        "",
    ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "telemetry.md").write_text("\n".join(lines))
    (out / "telemetry.json").write_text(json.dumps(results, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
