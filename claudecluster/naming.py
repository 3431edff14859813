"""How a run is named where people look for it: tags, artifact keys, flow run names.

- Every run ClaudeCluster creates carries the tags ``claudecluster``,
  ``claudecluster-run:<run-id>`` and ``claudecluster-goal:<goal>`` (or
  ``claudecluster-sweep:<name>``), so the Prefect UI filters a goal's runs, and a run's
  children, by tag.
- Artifact keys are stable across runs of the same goal or deployment
  (``<scope>-<task-id>-diff``, ``<scope>-summary``, ...), so Prefect keeps each key's history
  and the Artifacts page lists one card per key, not one per run.
"""

from __future__ import annotations

import re

TAG = "claudecluster"
RUN_TAG_PREFIX = f"{TAG}-run:"
"""A run's tag is this prefix and its run id; its task runs and child runs carry it too."""
REPORT_ARTIFACT_TYPE = "claudecluster-run-report"
"""The type of the artifact whose data is a goal run's RunReport (JSON)."""
_SLUG_WORDS = 6
_SLUG_CHARS = 40


def slug(text: str, *, words: int = _SLUG_WORDS, chars: int = _SLUG_CHARS) -> str:
    """``text`` as lowercase words joined by dashes, cut to ``words`` words and ``chars``."""
    parts = re.sub(r"[^a-z0-9]+", " ", text.lower()).split()
    return "-".join(parts[:words])[:chars].strip("-") or "run"


def run_tags(run_id: str, *, goal: str | None = None, sweep: str | None = None) -> list[str]:
    """The tags of a goal's (or sweep's) flow run, its task runs and its child runs."""
    named = f"{TAG}-sweep:{slug(sweep)}" if sweep else f"{TAG}-goal:{slug(goal or '')}"
    return [TAG, f"{RUN_TAG_PREFIX}{run_id}", named]


def artifact_scope(
    *, deployment: str | None, goal: str | None = None, sweep: str | None = None
) -> str:
    """The stable first part of a run's artifact keys: its deployment's name when it has one,
    else the sweep's name, else the goal's first words."""
    if deployment:
        return slug(deployment, words=8)
    if sweep:
        return f"sweep-{slug(sweep)}"
    return f"goal-{slug(goal or '')}"


def artifact_key(*parts: str) -> str:
    """Join parts into a valid Prefect artifact key (lowercase letters, digits, dashes)."""
    key = "-".join(parts).lower()
    key = re.sub(r"[^a-z0-9-]+", "-", key)
    return re.sub(r"-{2,}", "-", key).strip("-")
