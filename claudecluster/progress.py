"""Run progress: a Prefect progress artifact, Prefect events, and in-process listeners.

The goal flow reports every change (planned, task started, task finished, integrating,
done) to a :class:`RunProgress`. It keeps the run's progress artifact up to date, emits each
:class:`ProgressEvent` as a Prefect event (``claudecluster.run.<kind>``, related to the goal's
flow run, so the TypeScript SDK's ``watchRun`` and automations see it over Prefect's events
websocket), and passes it to any listener registered with :func:`listen`, which is how the
CLI draws its live display when the flow runs in the same process.

The artifact is written by a background thread that only ever sends the latest figure: the
dispatcher reports from its scheduling loop, and a write that waits on a busy server (the
Prefect client backs off for seconds when the server's database is locked) must not hold up
the start of the next task.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from uuid import UUID

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.events import emit_event

from claudecluster.models import EventKind, ProgressEvent, TaskResult
from claudecluster.naming import artifact_key

Listener = Callable[[ProgressEvent], None]
# The prefix of the Prefect events a run emits: ``claudecluster.run.finished`` and so on.
EVENT_PREFIX = "claudecluster.run."

_listeners: list[Listener] = []
_lock = threading.Lock()
_log = logging.getLogger("claudecluster.progress")


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

    def __init__(
        self,
        run_id: str,
        *,
        cost_usd: float = 0.0,
        scope: str | None = None,
        flow_run_id: str | None = None,
        tags: list[str] | None = None,
    ) -> None:
        self.run_id = run_id
        self.flow_run_id = flow_run_id
        self.tags = tags or []
        self.scope = scope or run_id
        self.total = 0
        self.planned_ids: list[str] = []
        self.done: list[str] = []
        self.running: list[str] = []
        self.failed: list[str] = []
        self.cost_usd = cost_usd
        self._publisher: _ProgressPublisher | None = None

    def _emit(self, kind: EventKind, task: TaskResult | None = None, message: str = "") -> None:
        event = ProgressEvent(
            run_id=self.run_id,
            kind=kind,
            total=self.total,
            planned=list(self.planned_ids),
            done=list(self.done),
            running=list(self.running),
            failed=list(self.failed),
            cost_usd=round(self.cost_usd, 6),
            task=task,
            message=message,
        )
        self._emit_prefect_event(event)
        with _lock:
            listeners = list(_listeners)
        for listener in listeners:
            try:
                listener(event)
            except Exception:  # a broken display must never break a run
                _log.exception("progress listener failed")

    def _emit_prefect_event(self, event: ProgressEvent) -> None:
        related = [
            {"prefect.resource.id": f"prefect.tag.{tag}", "prefect.resource.role": "tag"}
            for tag in self.tags
        ]
        if self.flow_run_id:
            related.append(
                {
                    "prefect.resource.id": f"prefect.flow-run.{self.flow_run_id}",
                    "prefect.resource.role": "flow-run",
                }
            )
        try:
            emit_event(
                event=f"{EVENT_PREFIX}{event.kind}",
                resource={
                    "prefect.resource.id": f"claudecluster.run.{self.run_id}",
                    "prefect.resource.name": self.run_id,
                },
                related=related,
                # The diff can be large and is in the task's artifact and the report.
                payload=event.model_dump(mode="json", exclude={"task": {"diff"}}),
            )
        except Exception:  # progress is informative; the run goes on without it
            _log.warning("could not emit the progress event", exc_info=True)

    def _publish(self) -> None:
        percent = 100.0 * len(self.done) / self.total if self.total else 0.0
        if self._publisher is None:
            self._publisher = _ProgressPublisher(self.run_id, artifact_key(self.scope, "progress"))
        self._publisher.publish(percent)

    def planning(self) -> None:
        """The planner session started."""
        self._emit("planning", message="planning")

    def planned(self, task_ids: list[str]) -> None:
        """The plan is known."""
        self.planned_ids = list(task_ids)
        self.total = total = len(task_ids)
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
        """The run is over: the artifact shows the final figure before this returns."""
        if self._publisher is not None:
            self._publisher.close()
        self._emit("done", message=message)


_WRITE_INTERVAL_S = 2.0


class _ProgressPublisher:
    """Writes a run's progress artifact from a thread, newest figure only, at most once every
    :data:`_WRITE_INTERVAL_S` (each write is a server write beside the sessions' own)."""

    def __init__(self, run_id: str, key: str) -> None:
        self.run_id, self.key = run_id, key
        self._artifact_id: UUID | None = None
        self._latest: float | None = None
        self._closed = False
        self._changed = threading.Condition()
        # The copied context carries the flow run, so the artifact is linked to it.
        context = contextvars.copy_context()
        self._thread = threading.Thread(
            target=context.run, args=(self._run,), name=f"progress-{run_id}", daemon=True
        )
        self._thread.start()

    def publish(self, percent: float) -> None:
        with self._changed:
            self._latest = percent
            self._changed.notify()

    def close(self, timeout_s: float = 30.0) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            with self._changed:
                while self._latest is None and not self._closed:
                    self._changed.wait()
                percent, self._latest = self._latest, None
                closed = self._closed
            if percent is not None:
                try:
                    self._write(percent)
                except Exception:  # progress is informative; the run goes on without it
                    _log.warning("could not update the progress artifact", exc_info=True)
            if closed and percent is None:
                return
            with self._changed:  # one server write per interval at most, the last one at once
                self._changed.wait_for(lambda: self._closed, timeout=_WRITE_INTERVAL_S)

    def _write(self, percent: float) -> None:
        if self._artifact_id is None:
            self._artifact_id = create_progress_artifact(  # type: ignore[assignment]
                progress=percent,
                key=self.key,
                description=f"Tasks finished in run {self.run_id}",
            )
        else:
            update_progress_artifact(self._artifact_id, progress=percent)
