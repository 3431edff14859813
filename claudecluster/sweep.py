"""Sweeps: one prompt template applied to a set of files, as a plan of batched tasks.

A sweep picks files by glob at the base commit, or only the files changed since the last
successful sweep of the same name, caps how many it takes, batches them (N files per task)
and makes one task per batch. The plan then runs like any goal: integration, verify, report.

Where the last successful sweep of a name started is kept on the Prefect server
(:mod:`claudecluster.sweep_state`); this module only needs that commit.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re

import git
from pydantic import Field

from claudecluster.errors import UsageError
from claudecluster.models import StrictModel, TaskKind, TaskSpec
from claudecluster.plan import Plan

FILES_PLACEHOLDER = "{files}"


class SweepSpec(StrictModel):
    """What a sweep does to which files."""

    name: str = Field(min_length=1, description="Name of the sweep; its state is kept by name.")
    prompt: str = Field(
        min_length=1,
        description="Prompt template; '{files}' is replaced by the batch's file list "
        "(appended when absent).",
    )
    include: list[str] = Field(
        default_factory=lambda: ["**/*.py"], description="Globs of files to sweep."
    )
    exclude: list[str] = Field(default_factory=list, description="Globs of files to skip.")
    changed_since_last: bool = Field(
        default=False, description="Only files changed since the last successful sweep."
    )
    batch_size: int = Field(default=5, ge=1, description="Files per task.")
    max_files: int = Field(default=50, ge=1, description="Most files one sweep run takes.")
    kind: TaskKind = Field(default=TaskKind.REFACTOR, description="Kind of the sweep's tasks.")
    verify: str | None = Field(default=None, description="Verify command for the plan.")


def slug(name: str) -> str:
    """``name`` as a task-id and variable-name safe slug."""
    cleaned = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if not cleaned:
        raise UsageError(f"sweep name {name!r} has no letters or digits", hint="Rename it.")
    return cleaned[:40]


def state_variable(name: str) -> str:
    """The Prefect Variable that remembers a sweep's last successful base commit."""
    return f"claudecluster-sweep-{slug(name)}"


def repo_key(repo: git.Repo) -> str:
    """A short stable key for a repository (its root commit), shared by all its clones."""
    roots = repo.git.rev_list("--max-parents=0", "HEAD").split()
    return hashlib.sha256(" ".join(sorted(roots)).encode()).hexdigest()[:16]


def _matches(path: str, patterns: list[str]) -> bool:
    # fnmatch's "*" already crosses "/", so "**/*.py" also needs the top-level "*.py" case.
    return any(
        fnmatch.fnmatch(path, p) or (p.startswith("**/") and fnmatch.fnmatch(path, p[3:]))
        for p in patterns
    )


def select_files(repo: git.Repo, base: str, spec: SweepSpec, since: str | None) -> list[str]:
    """Files to sweep at ``base``: by glob, or those changed since ``since``; capped."""
    present = set(repo.git.ls_tree("-r", "--name-only", base).splitlines())
    if since is not None and spec.changed_since_last:
        changed = repo.git.diff("--name-only", since, base).splitlines()
        candidates = [path for path in changed if path in present]
    else:
        candidates = sorted(present)
    chosen = [
        path
        for path in candidates
        if _matches(path, spec.include) and not _matches(path, spec.exclude)
    ]
    return sorted(chosen)[: spec.max_files]


def sweep_plan(spec: SweepSpec, files: list[str]) -> Plan:
    """One task per batch of ``batch_size`` files."""
    tasks = []
    prefix = slug(spec.name)
    for number, start in enumerate(range(0, len(files), spec.batch_size), start=1):
        batch = files[start : start + spec.batch_size]
        listing = "\n".join(f"- {path}" for path in batch)
        prompt = (
            spec.prompt.replace(FILES_PLACEHOLDER, listing)
            if FILES_PLACEHOLDER in spec.prompt
            else f"{spec.prompt}\n\nFiles:\n{listing}"
        )
        tasks.append(
            TaskSpec(
                id=f"{prefix}-{number:03d}",
                kind=spec.kind,
                title=f"{spec.name}: {', '.join(batch)}"[:120],
                prompt=prompt,
                paths=batch,
            )
        )
    return Plan(goal=f"Sweep {spec.name}", verify=spec.verify, tasks=tasks)
