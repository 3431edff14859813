"""`claudecluster <args>` with phase timers wrapped around product functions (no product edits).

Usage (the harness runs this; you rarely need it by hand)::

    python benchmarks/cc_driver.py TIMINGS.json run --plan plan.yaml --repo R --max-parallel 4 --json

It imports the product, replaces a handful of module attributes with thin wrappers that record
``time.time()`` before and after the real call, then calls ``claudecluster.cli.main(args)``.
Behaviour is unchanged; only timestamps are added. At exit it writes every recorded span to
TIMINGS.json as ``{"t_exec": ..., "t_main": ..., "spans": [{"phase", "task", "t0", "t1"}]}``.
"""

from __future__ import annotations

import contextvars
import functools
import json
import os
import sys
import threading
import time
from contextlib import asynccontextmanager
from typing import Any

T_EXEC = float(os.environ.get("BENCH_T_EXEC", "0") or 0) or time.time()
_SPANS: list[dict[str, Any]] = []
_LOCK = threading.Lock()
_TASK: contextvars.ContextVar[str | None] = contextvars.ContextVar("bench_task", default=None)


def _record(phase: str, task: str | None, t0: float, t1: float) -> None:
    with _LOCK:
        _SPANS.append({"phase": phase, "task": task, "t0": t0, "t1": t1})


def _wrap_sync(module: Any, name: str, phase: str, task_of: Any = None) -> None:
    real = getattr(module, name)

    @functools.wraps(real)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.time()
        try:
            return real(*args, **kwargs)
        finally:
            task = task_of(args, kwargs) if task_of else _TASK.get()
            _record(phase, task, t0, time.time())

    setattr(module, name, wrapper)


def _wrap_async(module: Any, name: str, phase: str, task_of: Any = None, sets_task: bool = False):
    real = getattr(module, name)

    @functools.wraps(real)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        task = task_of(args, kwargs) if task_of else _TASK.get()
        token = _TASK.set(task) if sets_task else None
        t0 = time.time()
        try:
            return await real(*args, **kwargs)
        finally:
            _record(phase, task, t0, time.time())
            if token is not None:
                _TASK.reset(token)

    setattr(module, name, wrapper)


def install() -> None:
    from claudecluster import dispatch, gitops
    from claudecluster import worker as core_worker
    from claudecluster.flows import goal as goal_flow_mod
    from claudecluster.tasks import integrate as integrate_task_mod
    from claudecluster.tasks import worker as task_worker

    # Driver side: when a task is submitted to the thread-pool task runner / seen finished.
    _wrap_sync(dispatch, "_start", "submit", lambda a, k: a[0].id)
    _wrap_sync(dispatch, "_result_of", "observed", lambda a, k: a[1].id)
    _wrap_sync(goal_flow_mod, "run_tasks", "run_tasks")
    _wrap_sync(goal_flow_mod, "publish_run_artifacts", "run_artifacts")
    _wrap_sync(integrate_task_mod, "integrate", "integrate")
    # Worker side (inside the Prefect task run).
    _wrap_sync(gitops, "combine_branches", "combine", lambda a, k: k["name"][: -len("-base")])
    _wrap_async(task_worker, "execute_task", "execute", lambda a, k: a[2].id, sets_task=True)
    _wrap_async(task_worker, "publish_task_artifacts", "task_artifacts", lambda a, k: a[0].id)
    _wrap_async(core_worker, "run_session", "session")
    _wrap_sync(core_worker, "run_verify", "verify")
    for name, phase in (
        ("add_worktree", "worktree_add"),
        ("remove_worktree", "worktree_remove"),
        ("commit_all", "commit"),
        ("diff_stats", "diff"),
        ("diff_text", "diff"),
    ):
        _wrap_sync(gitops, name, phase)

    # Split the session slot into its two Prefect acquisitions (imported at call time).
    import prefect.concurrency.asyncio as pca

    real_rate, real_conc = pca.rate_limit, pca.concurrency

    async def timed_rate(*a: Any, **k: Any) -> Any:
        t0 = time.time()
        try:
            return await real_rate(*a, **k)
        finally:
            _record("rate_limit", _TASK.get(), t0, time.time())

    @asynccontextmanager
    async def timed_conc(*a: Any, **k: Any):  # type: ignore[no-untyped-def]
        t0 = time.time()
        async with real_conc(*a, **k):
            _record("gcl_acquire", _TASK.get(), t0, time.time())
            yield

    pca.rate_limit, pca.concurrency = timed_rate, timed_conc
    real_slot = task_worker.session_slot

    @asynccontextmanager
    async def timed_slot():  # type: ignore[no-untyped-def]
        t0 = time.time()
        async with real_slot():
            _record("slot_acquire", _TASK.get(), t0, time.time())
            yield

    task_worker.session_slot = timed_slot


def main() -> int:
    timings_path = sys.argv[1]
    argv = sys.argv[2:]
    t_imports = time.time()
    install()
    t_main = time.time()
    from claudecluster.cli import main as cli_main

    code = 1
    try:
        code = cli_main(argv)
    finally:
        with open(timings_path, "w") as fh:
            json.dump(
                {
                    "t_exec": T_EXEC,
                    "t_imports": t_imports,
                    "t_main": t_main,
                    "t_end": time.time(),
                    "spans": _SPANS,
                },
                fh,
            )
    return code


if __name__ == "__main__":
    sys.exit(main())
