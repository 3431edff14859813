"""The checks every way into a run shares: the CLI, the Python API and the flows.

A run that would fail on its input fails here, before any server starts (where the input
allows it) or any session is paid for, with a :class:`~claudecluster.errors.UsageError`
that says what is wrong and what to do.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from claudecluster.errors import ConfigError, UsageError
from claudecluster.plan import Plan, load_plan_file, validate_plan

MAX_GOAL_CHARS = 20_000
DEFAULT_MAX_TASKS = 12
# A plan file is the user's own decision; this only stops an accidental runaway.
PLAN_FILE_MAX_TASKS = 1000

# Prefect's default cap on a flow run's parameters (server.api.max_parameter_size).
MAX_PARAMETER_BYTES = 512 * 1024

CREDENTIAL_VARS = (
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_AUTH_TOKEN",
    "CLAUDE_CODE_OAUTH_TOKEN",
    "CLAUDE_CODE_USE_BEDROCK",
    "CLAUDE_CODE_USE_VERTEX",
)


def check_goal(goal: str) -> str:
    """The goal, stripped; UsageError when it is empty or absurdly long."""
    text = goal.strip()
    if not text:
        raise UsageError("the goal is empty", hint="Say what the run should achieve.")
    if len(text) > MAX_GOAL_CHARS:
        raise UsageError(
            f"the goal is {len(text)} characters long, more than {MAX_GOAL_CHARS}",
            hint="State the goal briefly; put detailed instructions in a plan file (--plan).",
        )
    return text


def check_limits(*, max_parallel: int | None, budget_usd: float | None) -> None:
    """UsageError for a run width or goal budget that can never work."""
    if budget_usd is not None and budget_usd <= 0:
        raise UsageError(
            f"the goal budget must be more than $0, got {budget_usd:g}",
            hint="Pass --budget-usd with a positive amount.",
        )
    if max_parallel is not None and max_parallel < 1:
        raise UsageError(
            f"max_parallel must be at least 1, got {max_parallel}",
            hint="Pass --max-parallel 1 or more.",
        )


def require_credentials() -> None:
    """Fail fast when no session could authenticate (each runs with a fresh config dir)."""
    if not any(os.environ.get(name) for name in CREDENTIAL_VARS):
        raise ConfigError(
            "no Anthropic credentials: ANTHROPIC_API_KEY is not set",
            hint="Export ANTHROPIC_API_KEY (and ANTHROPIC_BASE_URL for another endpoint), "
            "or try `claudecluster demo`, which needs no key.",
        )


DEFAULT_MODEL_API = "https://api.anthropic.com"
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def check_model_api(env: Mapping[str, str] | None = None, *, timeout_s: float = 5.0) -> None:
    """ConfigError when nothing answers at the model API the sessions will use.

    Only a TCP connection is tried (no request is made, nothing is paid for): a closed port
    or an unknown host is found here once, instead of by every session retrying for
    minutes. Skipped when a proxy or Bedrock/Vertex decides where requests go.
    """
    merged = {**os.environ, **(env or {})}
    if any(merged.get(name) for name in _PROXY_VARS) or any(
        merged.get(name) for name in ("CLAUDE_CODE_USE_BEDROCK", "CLAUDE_CODE_USE_VERTEX")
    ):
        return
    base = merged.get("ANTHROPIC_BASE_URL") or DEFAULT_MODEL_API
    parts = urlsplit(base)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
    raise ConfigError(
        f"model API unreachable: nothing answers at {base} ({reason})",
        hint="Check ANTHROPIC_BASE_URL and the network; no session was started.",
    )


def prepare_plan(
    repo: Path, *, plan: Plan | None, plan_file: str | Path | None, max_tasks: int | None
) -> Plan | None:
    """Load and validate a given plan against ``repo``; None when the planner should plan."""
    if plan_file is not None:
        plan = load_plan_file(plan_file)
    if plan is None:
        return None
    return validate_plan(plan, repo, max_tasks=max_tasks or PLAN_FILE_MAX_TASKS)


def check_parameter_size(
    what: str, parameters: Mapping[str, Any], max_bytes: int = MAX_PARAMETER_BYTES
) -> None:
    """UsageError when ``parameters`` (JSON-ready) exceed what a Prefect server accepts for
    one flow run, measured as Prefect measures it."""
    size = len(json.dumps(parameters, separators=(",", ":"), default=str).encode())
    if size > max_bytes:
        raise UsageError(
            f"{what} would need {size:,} bytes of Prefect flow-run parameters, more than "
            f"the {max_bytes:,} a Prefect server accepts",
            hint="Shorten the goal or the plan's prompts, or split the goal into several runs.",
        )


def default_parallelism() -> int:
    """Concurrent sessions that suit this machine: about two per core, at least 2, at most 8.

    A session costs ~0.5-1 s of CPU to start and ~200 MB of memory; the rest is waiting on
    the model.
    """
    return max(2, min(8, 2 * (os.cpu_count() or 1)))
