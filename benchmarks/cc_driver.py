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
    from claudecluster import integrate as integrate_mod
    from claudecluster import session as session_mod
    from claudecluster import worker as core_worker
    from claudecluster.flows import goal as goal_flow_mod
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
    # Merging: what is left when the sessions are done (and the final verify), and the
    # merges made while they ran.
    _wrap_sync(integrate_mod.Integration, "finish", "integrate")
    _wrap_sync(integrate_mod.Integration, "_advance", "merge_early")
    # Worker side (inside the Prefect task run).
    _wrap_sync(gitops, "combine_branches", "combine", lambda a, k: k["name"][: -len("-base")])
    _wrap_async(task_worker, "execute_task", "execute", lambda a, k: a[0].spec.id, sets_task=True)
    _wrap_sync(task_worker, "publish_task_artifacts", "task_artifacts", lambda a, k: a[0].id)
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


_CHILD_CPU: dict[str, float] = {}  # CPU seconds of reaped children, by program name
_CHILD_NAMES: dict[int, str] = {}


def _count_children_cpu() -> None:
    """Record each child's CPU when it is reaped, by program (the CLI, git, ...): the tree's
    CPU minus the CLIs' is what orchestration costs, measured rather than estimated."""
    import subprocess

    real_init = subprocess.Popen.__init__
    real_waitpid = os.waitpid

    def init(self: Any, args: Any, *a: Any, **k: Any) -> None:
        real_init(self, args, *a, **k)
        argv0 = args if isinstance(args, (str, bytes)) else args[0]
        _CHILD_NAMES[self.pid] = os.path.basename(os.fsdecode(argv0)).split()[0]

    def waitpid(pid: int, options: int) -> tuple[int, int]:
        reaped, status, usage = os.wait4(pid, options)
        if reaped:
            name = _CHILD_NAMES.pop(reaped, "other")
            with _LOCK:
                _CHILD_CPU[name] = _CHILD_CPU.get(name, 0.0) + usage.ru_utime + usage.ru_stime
        return reaped, status

    subprocess.Popen.__init__ = init  # type: ignore[method-assign]
    os.waitpid = waitpid  # type: ignore[assignment]
    del real_waitpid


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _dump_stacks_at(spec: str, out: str) -> None:
    """``BENCH_DUMP_AT=3.5,4.5``: every thread's stack (py-spy dump) at those seconds after
    exec, appended to ``out``; for finding what a run waits on at a given moment."""
    import subprocess

    def dump(at: float) -> None:
        time.sleep(max(0.0, T_EXEC + at - time.time()))
        text = subprocess.run(
            ["py-spy", "dump", "--pid", str(os.getpid())], capture_output=True, text=True
        ).stdout
        with _LOCK, open(out, "a") as fh:
            fh.write(f"=== t={at} s\n{text}\n")

    for at in spec.split(","):
        threading.Thread(target=dump, args=(float(at),), daemon=True).start()


def _log_client_retries(out: str) -> None:
    """``BENCH_CLIENT_LOG=1``: the retries of Prefect's HTTP client (status and back-off,
    which it logs at debug level) to ``out``, stamped in seconds after exec."""
    import prefect.client.base as client_base

    real = client_base.logger

    class RetryLog:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def debug(self, msg: str, *args: Any, **kwargs: Any) -> None:
            with _LOCK, open(out, "a") as fh:
                fh.write(f"{time.time() - T_EXEC:8.3f} {threading.current_thread().name} {msg}\n")
            real.debug(msg, *args, **kwargs)

    client_base.logger = RetryLog()  # type: ignore[assignment]

    # And every request, as "t thread METHOD path".
    import re as _re

    def note(request: Any) -> None:
        path = _re.sub(r"[0-9a-f]{8}-[0-9a-f-]{27}", "{id}", request.url.path)
        with _LOCK, open(out, "a") as fh:
            fh.write(f"{time.time() - T_EXEC:8.3f} REQ {request.method} {path}\n")

    real_async_send = client_base.PrefectHttpxAsyncClient.send
    real_sync_send = client_base.PrefectHttpxSyncClient.send

    async def async_send(self: Any, request: Any, *a: Any, **k: Any) -> Any:
        note(request)
        return await real_async_send(self, request, *a, **k)

    def sync_send(self: Any, request: Any, *a: Any, **k: Any) -> Any:
        note(request)
        return real_sync_send(self, request, *a, **k)

    client_base.PrefectHttpxAsyncClient.send = async_send  # type: ignore[method-assign]
    client_base.PrefectHttpxSyncClient.send = sync_send  # type: ignore[method-assign]


def main() -> int:
    timings_path = sys.argv[1]
    if os.environ.get("BENCH_CLIENT_LOG"):
        _log_client_retries(timings_path + ".client.log")
    if os.environ.get("BENCH_DUMP_AT"):
        _dump_stacks_at(os.environ["BENCH_DUMP_AT"], timings_path + ".stacks.txt")
    argv = sys.argv[2:]
    # claudecluster.cli.main sets this before Prefect is first imported; install() below
    # imports Prefect earlier than the CLI would, so set it here the same way.
    if "--verbose" not in argv:
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    t_imports = time.time()
    _count_children_cpu()
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
                    "cpu_children_by_program_s": _CHILD_CPU,
                    "spans": _SPANS,
                },
                fh,
            )
    return code


if __name__ == "__main__":
    sys.exit(main())
