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
import resource
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


def _wrap_async(
    module: Any,
    name: str,
    phase: str,
    task_of: Any = None,
    sets_task: bool = False,
    before: Any = None,
):
    real = getattr(module, name)

    @functools.wraps(real)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        if before is not None:
            before()
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


_SDK_TIMERS = threading.Lock()
_SDK_TIMED = False


def _install_sdk_timers() -> None:
    """Time the CLI's spawn and the initialize handshake, once the product has the SDK.

    Installed at the first session, not at start: the product imports the SDK lazily (in
    the background while the run starts), and importing it here up front would add its
    import time to the measured start-up.
    """
    global _SDK_TIMED
    with _SDK_TIMERS:
        if _SDK_TIMED:
            return
        _SDK_TIMED = True
        from claude_agent_sdk._internal import query as sdk_query
        from claude_agent_sdk._internal.transport import subprocess_cli

        _wrap_async(subprocess_cli.SubprocessCLITransport, "connect", "sdk_spawn")
        _wrap_async(sdk_query.Query, "initialize", "sdk_initialize")


def install() -> None:
    # Start-up: finding the server, the flow's first steps, the run's limits.
    from claudecluster import api, dispatch, gitops, places
    from claudecluster import session as session_mod
    from claudecluster import worker as core_worker
    from claudecluster.flows import goal as goal_flow_mod
    from claudecluster.tasks import integrate as integrate_task_mod
    from claudecluster.tasks import worker as task_worker

    _wrap_sync(api, "connect", "connect")
    _wrap_sync(goal_flow_mod, "prepare_goal", "flow_body_start")
    _wrap_sync(places, "current_limits", "read_limits")
    _wrap_sync(places.StartPermits, "__init__", "first_permits")

    # Driver side: when a task is submitted to the thread-pool task runner / seen finished.
    _wrap_sync(dispatch._Dispatcher, "_start", "submit", lambda a, k: a[1].id)
    _wrap_sync(dispatch._Dispatcher, "_result_of", "observed", lambda a, k: a[1])
    _wrap_sync(goal_flow_mod, "run_tasks", "run_tasks")
    _wrap_sync(goal_flow_mod, "publish_run_artifacts", "run_artifacts")
    _wrap_sync(integrate_task_mod, "integrate", "integrate")
    # Worker side (inside the Prefect task run).
    _wrap_sync(gitops, "combine_branches", "combine", lambda a, k: k["name"][: -len("-base")])
    _wrap_async(task_worker, "execute_task", "execute", lambda a, k: a[0].spec.id, sets_task=True)
    _wrap_async(task_worker, "publish_task_artifacts", "task_artifacts", lambda a, k: a[0].id)
    _wrap_async(session_mod, "run_session", "session", before=_install_sdk_timers)
    _wrap_sync(core_worker, "run_verify", "verify")
    for name, phase in (
        ("add_worktree", "worktree_add"),
        ("remove_worktree", "worktree_remove"),
        ("commit_all", "commit"),
        ("diff_stats", "diff"),
        ("diff_text", "diff"),
    ):
        _wrap_sync(gitops, name, phase)

    # Waiting for a session place (and start permit, or the server's slots): the context
    # managers a session holds, timed from entry to the body.
    _time_entry(dispatch, "session_place", "slot_wait")
    _time_entry(task_worker, "session_slot", "slot_wait")


def _time_entry(module: Any, name: str, phase: str) -> None:
    real = getattr(module, name)

    @asynccontextmanager
    async def timed(*a: Any, **k: Any):  # type: ignore[no-untyped-def]
        t0 = time.time()
        async with real(*a, **k):
            _record(phase, _TASK.get(), t0, time.time())
            yield

    setattr(module, name, timed)


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    timings_path = sys.argv[1]
    argv = sys.argv[2:]
    # claudecluster.cli.main sets this before Prefect is first imported; install() below
    # imports Prefect earlier than the CLI would, so set it here the same way.
    if "--verbose" not in argv:
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
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
                    "cpu_self_s": _cpu(resource.RUSAGE_SELF),
                    "cpu_children_s": _cpu(resource.RUSAGE_CHILDREN),
                    "spans": _SPANS,
                },
                fh,
            )
    return code


if __name__ == "__main__":
    sys.exit(main())
