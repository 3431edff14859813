"""Run progress: a Prefect progress artifact, plus in-process listeners for the terminal.

The goal flow reports every change (planned, task started, task finished, integrating,
done) to a :class:`RunProgress`. It keeps the run's progress artifact up to date, and passes
a :class:`ProgressEvent` to any listener registered with :func:`listen`, which is how the CLI
draws its live display when the flow runs in the same process.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal
from uuid import UUID

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from pydantic import Field

from claudecluster.models import TaskResult, _Model

EventKind = Literal["planning", "planned", "started", "finished", "integrating", "done"]
Listener = Callable[["ProgressEvent"], None]

_listeners: list[Listener] = []
_lock = threading.Lock()
_log = logging.getLogger("claudecluster.progress")


class ProgressEvent(_Model):
    """A snapshot of a run's progress, sent to listeners on every change."""

    run_id: str = Field(description="The run.")
    kind: EventKind = Field(description="What just happened.")
    total: int = Field(default=0, description="Tasks in the plan.")
    done: list[str] = Field(default_factory=list, description="Tasks that finished.")
    running: list[str] = Field(default_factory=list, description="Tasks running now.")
    failed: list[str] = Field(default_factory=list, description="Tasks that did not succeed.")
    cost_usd: float = Field(default=0.0, description="Cost of the finished sessions so far.")
    task: TaskResult | None = Field(default=None, description="The task that just finished.")
    message: str = Field(default="", description="A line for humans.")


@contextmanager
def listen(callback: Listener) -> Iterator[None]:
    """Receive every ProgressEvent of runs in this process while the block runs."""
    with _lock:
        _listeners.append(callback)
    try:
        yield
    finally:
        with _lock:
            _listeners.remove(callback)


class RunProgress:
    """Tracks one run's progress and publishes it."""

    def __init__(self, run_id: str, *, cost_usd: float = 0.0) -> None:
        self.run_id = run_id
        self.total = 0
        self.done: list[str] = []
        self.running: list[str] = []
        self.failed: list[str] = []
        self.cost_usd = cost_usd
        self._artifact_id: UUID | None = None

    def _emit(self, kind: EventKind, task: TaskResult | None = None, message: str = "") -> None:
        event = ProgressEvent(
            run_id=self.run_id,
            kind=kind,
            total=self.total,
            done=list(self.done),
            running=list(self.running),
            failed=list(self.failed),
            cost_usd=round(self.cost_usd, 6),
            task=task,
            message=message,
        )
        with _lock:
            listeners = list(_listeners)
        for listener in listeners:
            try:
                listener(event)
            except Exception:  # a broken display must never break a run
                _log.exception("progress listener failed")

    def _publish(self) -> None:
        percent = 100.0 * len(self.done) / self.total if self.total else 0.0
        if self._artifact_id is None:
            self._artifact_id = create_progress_artifact(  # type: ignore[assignment]
                progress=percent,
                key=f"{self.run_id}-progress",
                description=f"Tasks finished in run {self.run_id}",
            )
        else:
            update_progress_artifact(self._artifact_id, progress=percent)

    def planning(self) -> None:
        """The planner session started."""
        self._emit("planning", message="planning")

    def planned(self, total: int) -> None:
        """The plan is known."""
        self.total = total
        self._publish()
        self._emit("planned", message=f"{total} tasks planned")

    def started(self, task_id: str) -> None:
        """A task's session is about to start."""
        self.running.append(task_id)
        self._emit("started", message=f"{task_id} started")

    def finished(self, result: TaskResult) -> None:
        """A task ended (or was skipped)."""
        if result.id in self.running:
            self.running.remove(result.id)
        self.done.append(result.id)
        if not result.status.ok:
            self.failed.append(result.id)
        self.cost_usd += result.cost_usd
        self._publish()
        self._emit("finished", task=result, message=f"{result.id} {result.status}")

    def integrating(self) -> None:
        """All tasks are done; merging starts."""
        self._emit("integrating", message="merging task branches")

    def complete(self, message: str) -> None:
        """The run is over."""
        self._emit("done", message=message)
