"""Plans: the task graph of a goal, loaded from a file or produced by the planner, validated.

A plan file is YAML or JSON (JSON is YAML)::

    goal: Add module docstrings        # optional when given on the command line
    verify: python -m pytest -q        # optional; run per task and on the integration branch
    tasks:
      - id: keys-doc                   # [a-z0-9-]; unique
        kind: docs                     # scaffold | refactor | test | docs | other
        title: Docstring for keys.py
        prompt: Add a module docstring to src/pkg/keys.py
        paths: [src/pkg/keys.py]       # optional; relative to the repo root
        depends_on: []                 # optional
        verify: null                   # optional per-task override

:func:`validate_plan` enforces what the scheduler relies on: unique ids, known dependencies,
no cycles, paths inside the repository, and a task count within bounds.
"""

from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path, PurePosixPath
from typing import Any

import yaml
from pydantic import Field, ValidationError

from claudecluster.errors import PathEscapeError, PlanError
from claudecluster.models import StrictModel, TaskSpec

RESERVED_TASK_IDS = frozenset({"integration"})
# About 25,000 tokens: room for detailed instructions, and every prompt travels as a Prefect
# parameter (a worker flow run's), which the server caps at 512 KiB.
MAX_PROMPT_CHARS = 100_000
LOCAL_POOL = "local"
"""The in-process pool: tasks run as task runs of the goal's own flow run."""
MAX_PLAN_FILE_BYTES = 1_000_000


class Plan(StrictModel):
    """A goal broken into a graph of tasks."""

    goal: str | None = Field(default=None, description="The goal the plan serves.")
    verify: str | None = Field(
        default=None,
        description="Shell command run after each task and on the integration branch.",
    )
    pool: str | None = Field(
        default=None, description="Default work pool for tasks that name none; None is local."
    )
    tasks: list[TaskSpec] = Field(description="The tasks, in any order; depends_on orders them.")

    def by_id(self) -> dict[str, TaskSpec]:
        """Tasks keyed by id."""
        return {task.id: task for task in self.tasks}


def _describe_validation_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {first['msg']}{more}"


def parse_plan(data: Any, *, source: str) -> Plan:
    """A Plan from parsed YAML/JSON data, or a PlanError naming the first problem."""
    if data is None:
        raise PlanError(f"plan {source} is empty", source=source, hint="Add a `tasks:` list.")
    if not isinstance(data, dict):
        raise PlanError(
            f"plan {source} must be a mapping with a `tasks:` list, not {type(data).__name__}",
            source=source,
            hint="See the plan file format in the README.",
        )
    try:
        return Plan.model_validate(data)
    except ValidationError as exc:
        raise PlanError(
            f"plan {source} is invalid: {_describe_validation_error(exc)}",
            source=source,
            hint="Fix that field; the plan file format is in the README.",
        ) from None


def load_plan_file(path: str | Path) -> Plan:
    """Read and parse a YAML or JSON plan file (not yet validated against a repo)."""
    location = Path(path)
    shown = str(path)
    if not location.is_file():
        raise PlanError(
            f"plan file {shown} does not exist", source=shown, hint="Check the --plan path."
        )
    if location.stat().st_size > MAX_PLAN_FILE_BYTES:
        raise PlanError(f"plan file {shown} is larger than 1 MB", source=shown)
    text = location.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise PlanError(f"plan file {shown} is empty", source=shown, hint="Add a `tasks:` list.")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise PlanError(
            f"plan file {shown} is not valid YAML or JSON{where}",
            source=shown,
            hint="Fix the syntax; the plan file format is in the README.",
        ) from None
    return parse_plan(data, source=shown)


def dump_plan(plan: Plan, *, as_json: bool = False) -> str:
    """A plan as YAML (default) or JSON, in the plan-file format."""
    data = plan.model_dump(mode="json", exclude_none=True, exclude_defaults=False)
    for task in data["tasks"]:
        for key in ("pool", "verify"):
            task.pop(key, None) if task.get(key) is None else None
    if as_json:
        return json.dumps(data, indent=2) + "\n"
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100)


def find_cycle(tasks: list[TaskSpec]) -> list[str] | None:
    """A dependency cycle as a list of ids (first id repeated at the end), or None."""
    deps = {task.id: task.depends_on for task in tasks}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in deps.get(node, []):
            if state.get(dep) == 1:
                return [*path[path.index(dep) :], dep]
            if dep in deps and state.get(dep) is None and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for task in tasks:
        if state.get(task.id) is None and (cycle := visit(task.id)):
            return cycle
    return None


def topological_order(plan: Plan) -> list[TaskSpec]:
    """Tasks ordered so each comes after its dependencies; ties keep the plan's order."""
    remaining = {task.id: set(task.depends_on) for task in plan.tasks}
    ordered: list[TaskSpec] = []
    by_id = plan.by_id()
    while remaining:
        ready = [tid for tid in by_id if tid in remaining and not remaining[tid]]
        if not ready:
            raise PlanError("the plan has a dependency cycle", hint="Run validate_plan first.")
        for tid in ready:
            ordered.append(by_id[tid])
            del remaining[tid]
        for deps in remaining.values():
            deps.difference_update(ready)
    return ordered


def ancestors(plan: Plan, task_id: str) -> set[str]:
    """Ids of every task ``task_id`` depends on, directly or not."""
    by_id = plan.by_id()
    seen: set[str] = set()
    stack = list(by_id[task_id].depends_on)
    while stack:
        current = stack.pop()
        if current not in seen:
            seen.add(current)
            stack.extend(by_id[current].depends_on)
    return seen


def check_path(repo_root: Path, raw: str) -> str:
    """Normalise a task path; raise PathEscapeError if it leaves the repository."""
    if not raw.strip():
        raise PathEscapeError("a task path is empty", path=raw)
    if raw.startswith(("/", "\\", "~")) or PurePosixPath(raw).is_absolute() or ":" in raw[:3]:
        raise PathEscapeError(
            f"task path {raw!r} is absolute",
            path=raw,
            hint="Use a path relative to the repository root.",
        )
    parts = PurePosixPath(raw).parts
    if ".." in parts:
        raise PathEscapeError(
            f"task path {raw!r} leaves the repository",
            path=raw,
            hint="Use a path inside the repository, without '..'.",
        )
    root = repo_root.resolve()
    # Resolve the longest existing prefix, so a symlink inside the repo that points out of it
    # is caught even when the rest of the path (or a glob) does not exist yet.
    literal = [p for p in parts if not any(ch in p for ch in "*?[")]
    candidate = root.joinpath(*literal[: len(literal)]) if literal else root
    while not candidate.exists() and candidate != root:
        candidate = candidate.parent
    resolved = Path(os.path.realpath(candidate))
    if resolved != root and root not in resolved.parents:
        raise PathEscapeError(
            f"task path {raw!r} resolves outside the repository (through a symlink)",
            path=raw,
            hint="Point tasks at real paths inside the repository.",
        )
    return str(PurePosixPath(*parts))


def validate_plan(plan: Plan, repo_root: Path, *, max_tasks: int = 12) -> Plan:
    """Check ``plan`` against the rules the scheduler relies on; return it normalised."""
    if not plan.tasks:
        raise PlanError("the plan has no tasks", hint="A plan needs at least one task.")
    if len(plan.tasks) > max_tasks:
        raise PlanError(
            f"the plan has {len(plan.tasks)} tasks, more than --max-tasks {max_tasks}",
            hint="Raise --max-tasks or merge tasks.",
        )
    seen: set[str] = set()
    for task in plan.tasks:
        if task.id in RESERVED_TASK_IDS:
            raise PlanError(
                f"task id {task.id!r} is reserved", hint="Rename the task; it names a branch."
            )
        if task.id in seen:
            raise PlanError(f"duplicate task id {task.id!r}", hint="Give every task its own id.")
        if len(task.prompt) > MAX_PROMPT_CHARS:
            raise PlanError(
                f"task {task.id!r} has a prompt of {len(task.prompt):,} characters, more than "
                f"{MAX_PROMPT_CHARS:,}",
                hint="Put long instructions in a file in the repository and point the prompt "
                "at it.",
            )
        seen.add(task.id)
    for task in plan.tasks:
        for dep in task.depends_on:
            if dep == task.id:
                raise PlanError(f"task {task.id!r} depends on itself", hint="Remove it.")
            if dep not in seen:
                raise PlanError(
                    f"task {task.id!r} depends on unknown task {dep!r}",
                    hint="Fix depends_on to name ids in the plan.",
                )
        task.paths = [check_path(repo_root, p) for p in task.paths]
    cycle = find_cycle(plan.tasks)
    if cycle:
        raise PlanError(
            "the plan has a dependency cycle: " + " -> ".join(cycle),
            hint="Break the cycle in depends_on.",
        )
    return plan


def paths_overlap(a: list[str], b: list[str]) -> bool:
    """True when two tasks' path lists may touch the same file.

    A path covers itself and everything under it; globs are compared by matching either
    side against the other. Tasks without paths are assumed to touch nothing in particular.
    """
    for left in a:
        for right in b:
            if left == right or _under(left, right) or _under(right, left):
                return True
            if fnmatch.fnmatch(left, right) or fnmatch.fnmatch(right, left):
                return True
    return False


def _under(child: str, parent: str) -> bool:
    literal_parent = parent.split("*", 1)[0].split("?", 1)[0].rstrip("/")
    if not literal_parent or literal_parent == ".":
        return True
    return child == literal_parent or child.startswith(literal_parent + "/")


def pool_for(spec: TaskSpec, *, run_pool: str | None, plan_pool: str | None) -> str:
    """The pool ``spec`` runs on: its own, else the run's, else the plan's, else local."""
    return spec.pool or run_pool or plan_pool or LOCAL_POOL


def pools_in(plan: Plan | None, run_pool: str | None) -> set[str]:
    """Every pool a run will dispatch to (the run's default, when the plan is not known yet)."""
    if plan is None:
        return {run_pool or LOCAL_POOL}
    return {pool_for(task, run_pool=run_pool, plan_pool=plan.pool) for task in plan.tasks}
