"""The run journal: what a run did, on the disk of the machine that did it.

Prefect records a run on its server; the journal records it next to the work, under
``<claudecluster home>/runs/<run-id>/``, so that what was paid for is known even when the
server is gone or the process died:

- ``attempts/<task-id>/<n>.json``: each attempt at a task, rewritten after every turn of its
  session (so a killed attempt still says what it spent);
- ``results/<task-id>.json``: a task's final TaskResult, with the fingerprint of the unit it
  did (:meth:`claudecluster.models.WorkUnit.fingerprint`);
- ``report.json``: the run's RunReport, once there is one.

Every file is written whole (write, then rename), so a reader sees the old file or the new
one, never half of one. ``claudecluster resume`` reuses a task whose result is here (same
fingerprint, branch unchanged) without running it again, whatever Prefect recorded.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, Field, ValidationError

from claudecluster.models import Attempt, RunReport, StrictModel, TaskResult
from claudecluster.workspace import claudecluster_home

M = TypeVar("M", bound=BaseModel)


class JournaledResult(StrictModel):
    """A task's final result with the fingerprint of the work it did."""

    fingerprint: str = Field(description="WorkUnit.fingerprint() of the unit that ran.")
    result: TaskResult = Field(description="The task's result.")


def runs_root() -> Path:
    """Where journals live: ``<claudecluster home>/runs``."""
    return claudecluster_home() / "runs"


class RunJournal:
    """The journal of one run on this machine."""

    def __init__(self, run_id: str, root: Path | None = None) -> None:
        self.run_id = run_id
        self.path = (root or runs_root()) / run_id

    # -- attempts

    def attempts(self, task_id: str) -> list[Attempt]:
        """Every recorded attempt at ``task_id``, oldest first."""
        folder = self.path / "attempts" / task_id
        found = [_read(path, Attempt) for path in folder.glob("*.json")] if folder.is_dir() else []
        return sorted((a for a in found if a is not None), key=lambda a: a.number)

    def begin_attempt(self, task_id: str) -> Attempt:
        """Record a new attempt at ``task_id``, running from now."""
        previous = self.attempts(task_id)
        attempt = Attempt(
            number=(previous[-1].number if previous else 0) + 1,
            outcome="running",
            started_at=datetime.now(UTC),
        )
        self.save_attempt(task_id, attempt)
        return attempt

    def save_attempt(self, task_id: str, attempt: Attempt) -> None:
        """Write (or rewrite) one attempt."""
        _write(self._attempt_path(task_id, attempt.number), attempt)

    def drop_attempt(self, task_id: str, number: int) -> None:
        """Forget an attempt that never got to its session."""
        self._attempt_path(task_id, number).unlink(missing_ok=True)

    def _attempt_path(self, task_id: str, number: int) -> Path:
        return self.path / "attempts" / task_id / f"{number}.json"

    # -- results and the report

    def save_result(self, fingerprint: str, result: TaskResult) -> None:
        """Record ``result`` as the task's final result for the unit ``fingerprint``."""
        _write(
            self.path / "results" / f"{result.id}.json",
            JournaledResult(fingerprint=fingerprint, result=result),
        )

    def result(self, task_id: str) -> JournaledResult | None:
        """The task's recorded final result, if any."""
        return _read(self.path / "results" / f"{task_id}.json", JournaledResult)

    def save_report(self, report: RunReport) -> Path:
        """Record the run's report; returns where it is."""
        path = self.path / "report.json"
        _write(path, report)
        return path

    def report(self, *, newer_than: float | None = None) -> RunReport | None:
        """The run's recorded report, if any (only one written after ``newer_than``, a
        ``time.time()``, when given)."""
        path = self.path / "report.json"
        if newer_than is not None:
            try:
                if path.stat().st_mtime < newer_than:
                    return None
            except OSError:
                return None
        return _read(path, RunReport)


def _write(path: Path, model: BaseModel) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(model.model_dump_json(indent=2))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _read(path: Path, model: type[M]) -> M | None:
    try:
        return model.model_validate_json(path.read_bytes())
    except (OSError, ValidationError, ValueError):
        return None  # missing, or written by another version: as good as not there
