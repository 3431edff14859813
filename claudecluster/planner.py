"""The planner: a read-only Claude Code session that turns a goal into a validated Plan.

It explores the repository at the base commit (in a scratch worktree, so nothing uncommitted
of the user's is read) with Read, Grep and Glob only, and must answer through structured
output constrained by :data:`PLAN_SCHEMA` (derived from the Plan and TaskSpec models). No
structured output, or a plan that does not validate, is a
:class:`~claudecluster.errors.PlannerError`, never an empty success.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from claudecluster import gitops, telemetry
from claudecluster.errors import PlanError, PlannerError
from claudecluster.models import TaskKind, TaskSpec, WorkerSettings
from claudecluster.permissions import permissions_for
from claudecluster.plan import Plan, parse_plan, validate_plan
from claudecluster.session import SessionHost, SessionOutcome, SessionRequest

# What the planner answers: the plan-file fields a planner decides. Pools and per-task
# verify commands are the user's call, so they are left out of its schema.
PLANNED_TASK_FIELDS = ("id", "kind", "title", "prompt", "paths", "depends_on")


def planner_schema() -> dict[str, Any]:
    """The StructuredOutput schema of a planner answer, derived from Plan and TaskSpec.

    Self-contained (no ``$ref``), every property required and nothing else allowed, so
    the model fills in every field the scheduler relies on.
    """
    task = inline_refs(TaskSpec.model_json_schema())
    task_properties = {
        name: {k: v for k, v in task["properties"][name].items() if k not in ("title", "default")}
        for name in PLANNED_TASK_FIELDS
    }
    plan = Plan.model_json_schema()["properties"]
    verify = {
        "type": "string",
        "description": plan["verify"]["description"] + " Empty when the repository has no tests.",
    }
    return {
        "type": "object",
        "properties": {
            "verify": verify,
            "tasks": {
                "type": "array",
                "minItems": 1,
                "description": plan["tasks"]["description"],
                "items": {
                    "type": "object",
                    "properties": task_properties,
                    "required": list(PLANNED_TASK_FIELDS),
                    "additionalProperties": False,
                },
            },
        },
        "required": ["tasks"],
        "additionalProperties": False,
    }


def inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with its ``$defs`` references replaced by the definitions themselves."""
    definitions = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                name = node["$ref"].rsplit("/", 1)[-1]
                return inline(
                    {**definitions[name], **{k: v for k, v in node.items() if k != "$ref"}}
                )
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(item) for item in node]
        return node

    resolved: dict[str, Any] = inline(schema)
    return resolved


PLAN_SCHEMA: dict[str, Any] = planner_schema()

PLANNER_INSTRUCTIONS = """\
You are the ClaudeCluster planner. You do not change anything: explore the repository with
Read, Grep and Glob, then return a plan through the StructuredOutput tool. Each task of the
plan will be done by a separate, unattended Claude Code session in its own git worktree,
possibly at the same time as the others; their branches are merged afterwards.

What makes a good task:
- Well scoped: one coherent change a single session can finish and verify, e.g. one module
  or one feature, not "the whole codebase".
- Independent where possible: tasks that touch different files run in parallel. Only add a
  depends_on when a task really needs another's result (e.g. tests for a module that a
  scaffolding task creates). Never make two parallel tasks edit the same file.
- Explicit about files: list in `paths` every file or folder the task will touch, relative
  to the repository root.
- Self-contained prompt: the worker sees only its own prompt, so say exactly what to change,
  where, and how to check it.
- Ids are short, lowercase, with dashes (e.g. `keys-docstring`); kinds are
  {kinds}.
Set `verify` to the command that runs the project's tests, if it has any.""".format(
    kinds=", ".join(kind.value for kind in TaskKind)
)


def planner_prompt(goal: str, max_tasks: int) -> str:
    """The planner session's prompt."""
    return (
        f"Goal: {goal.strip()}\n\n"
        f"Plan this goal as at most {max_tasks} tasks for parallel Claude Code workers. "
        "Explore the repository first, then answer with the StructuredOutput tool."
    )


async def run_planner(
    goal: str,
    repo_path: str | Path,
    base_commit: str,
    settings: WorkerSettings,
    *,
    max_tasks: int,
    verify: str | None,
    worktree_root: Path,
    host: SessionHost | None = None,
) -> tuple[Plan, SessionOutcome]:
    """Plan ``goal`` on the repository at ``base_commit``; return the plan and the session."""
    host = host or SessionHost()
    repo = gitops.open_repo(repo_path)
    name = f"plan-{uuid.uuid4().hex[:8]}"
    with gitops.scratch_worktree(repo, worktree_root, name, base_commit) as scratch:
        outcome = await host.run(
            SessionRequest(
                prompt=planner_prompt(goal, max_tasks),
                cwd=Path(scratch.working_dir),
                settings=settings.model_copy(update={"permission_policy": "read-only"}),
                permissions=permissions_for("read-only"),
                system_prompt_append=PLANNER_INSTRUCTIONS,
                attributes={telemetry.TASK_KIND: "plan"},
                output_format={"type": "json_schema", "schema": PLAN_SCHEMA},
            )
        )
    if not outcome.ok:
        raise PlannerError(
            f"the planner produced no plan: {outcome.error or outcome.failure_reason}",
            hint="Retry, or write a plan file and pass it with --plan.",
            cost_usd=outcome.cost_usd,
            turns=outcome.turns,
        )
    data = outcome.structured_output
    if isinstance(data, dict):
        data = {**data, "goal": goal}
        if verify is not None or not data.get("verify"):
            data["verify"] = verify
    try:
        plan = parse_plan(data, source="from the planner")
        plan = validate_plan(plan, Path(repo.working_dir), max_tasks=max_tasks)
    except PlanError as exc:
        raise PlannerError(
            f"the planner's plan is invalid: {exc.message}",
            hint="Retry, or write a plan file and pass it with --plan.",
            cost_usd=outcome.cost_usd,
            turns=outcome.turns,
        ) from None
    host.log("plan: " + json.dumps([task.id for task in plan.tasks]))
    return plan, outcome
