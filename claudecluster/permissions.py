"""Permission policies: what an unattended Claude Code session may do.

``safe`` (the default) is meant for a developer's machine. The session runs in Claude Code's
``dontAsk`` mode, so anything not allowed below is denied (and recorded), never prompted for:

- tools offered at all: Read, Glob, Grep, Edit, Write, NotebookEdit, Bash;
- reads anywhere the CLI allows; edits and writes only under the worktree (``./**``);
- shell: only the verify command, pytest, and read-only git commands (status, diff, log, show).

``read-only`` (the planner) offers Read, Glob and Grep only.

``container`` uses ``bypassPermissions``. It is refused unless the process runs inside a
disposable container (``IS_SANDBOX=1`` or ``/.dockerenv``), because there the container is the
sandbox and nowhere else is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from claudecluster.errors import ConfigError
from claudecluster.models import PermissionPolicy

EDIT_TOOLS = ["Read", "Glob", "Grep", "Edit", "Write", "NotebookEdit", "Bash"]
READ_ONLY_TOOLS = ["Read", "Glob", "Grep"]
SAFE_SHELL = [
    "python -m pytest",
    "pytest",
    "git status",
    "git diff",
    "git log",
    "git show",
]

SdkPermissionMode = Literal["dontAsk", "bypassPermissions"]


@dataclass(frozen=True)
class ToolPermissions:
    """The SDK options a policy maps to."""

    tools: list[str]
    allowed: list[str]
    disallowed: list[str] = field(default_factory=list)
    mode: SdkPermissionMode = "dontAsk"


def in_container() -> bool:
    """True inside a disposable container, where bypassing permissions is acceptable."""
    return os.environ.get("IS_SANDBOX") == "1" or Path("/.dockerenv").exists()


def _bash_rule(command: str) -> str:
    # "Bash(cmd:*)" allows the command with any arguments; an exact rule allows only itself.
    return f"Bash({command.strip()}:*)"


def permissions_for(
    policy: PermissionPolicy,
    *,
    verify: str | None = None,
    extra_allowed: list[str] | None = None,
    extra_disallowed: list[str] | None = None,
) -> ToolPermissions:
    """The tools, allow rules and mode for ``policy``."""
    extra_allowed = list(extra_allowed or [])
    extra_disallowed = list(extra_disallowed or [])
    if policy == "read-only":
        return ToolPermissions(
            tools=list(READ_ONLY_TOOLS),
            allowed=[*READ_ONLY_TOOLS, *extra_allowed],
            disallowed=extra_disallowed,
        )
    if policy == "container":
        if not in_container():
            raise ConfigError(
                "permission policy 'container' (bypassPermissions) is only allowed inside a "
                "container",
                hint="Use the default 'safe' policy, or run the worker on a Docker or "
                "Kubernetes pool.",
            )
        return ToolPermissions(
            tools=list(EDIT_TOOLS),
            allowed=extra_allowed,
            disallowed=extra_disallowed,
            mode="bypassPermissions",
        )
    shell = [*SAFE_SHELL, *([verify] if verify else [])]
    allowed = [
        "Read",
        "Glob",
        "Grep",
        "Edit(./**)",
        "Write(./**)",
        "NotebookEdit(./**)",
        *(_bash_rule(cmd) for cmd in dict.fromkeys(shell)),
        *extra_allowed,
    ]
    return ToolPermissions(tools=list(EDIT_TOOLS), allowed=allowed, disallowed=extra_disallowed)
