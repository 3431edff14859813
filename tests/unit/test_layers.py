"""The package's layers, checked by walking its import graph.

::

    interface   api, cli, demo, prefect_server, team_server,       (anything below)
                setup, report, respond
        │
    prefect     flows/, tasks/, blocks/, dispatch, concurrency,      (core, prefect layer)
        │       places, pools, artifacts, progress, sweep_state,
        │       server_watch, preflight, runs, lost_workers
    core        models, errors, plan, checks, gitops, remote,        (core only; never
                target, workspace, session, permissions, redact,      Prefect)
                verify, worker, planner, integrate, resolve,
                summary, sweep, clean, pricing, budget, journal,
                reaper, naming, forges, pull_request, review,
                pr_review, telemetry, testing/

Every import counts, including those inside functions and ``TYPE_CHECKING`` blocks: a
lazy import is still a dependency. A module that is in no layer fails the test, so a new
module has to be placed (and the README's diagram kept true).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Installed names -> source folders (pyproject.toml's package-dir).
SOURCES = {
    "claudecluster": ROOT / "claudecluster",
    "claudecluster.flows": ROOT / "flows",
    "claudecluster.tasks": ROOT / "tasks",
    "claudecluster.blocks": ROOT / "blocks",
}

CORE, PREFECT, INTERFACE = "core", "prefect", "interface"
RANK = {CORE: 0, PREFECT: 1, INTERFACE: 2}

LAYERS: dict[str, str] = {
    "claudecluster": INTERFACE,  # the public face assembles everything
    **{
        f"claudecluster.{name}": CORE
        for name in (
            "models",
            "errors",
            "plan",
            "checks",
            "gitops",
            "remote",
            "target",
            "workspace",
            "session",
            "permissions",
            "redact",
            "verify",
            "worker",
            "planner",
            "integrate",
            "resolve",
            "summary",
            "sweep",
            "clean",
            "testing",
            "pricing",
            "budget",
            "journal",
            "reaper",
            "naming",
            "forges",
            "pull_request",
            "review",
            "pr_review",
            "telemetry",
        )
    },
    **{
        f"claudecluster.{name}": PREFECT
        for name in (
            "flows",
            "tasks",
            "blocks",
            "dispatch",
            "concurrency",
            "places",
            "pools",
            "artifacts",
            "progress",
            "sweep_state",
            "server_watch",
            "preflight",
            "runs",
            "lost_workers",
        )
    },
    **{
        f"claudecluster.{name}": INTERFACE
        for name in (
            "api",
            "cli",
            "demo",
            "prefect_server",
            "team_server",
            "setup",
            "report",
            "respond",
        )
    },
}

# Third-party packages only the Prefect layer and above may use.
PREFECT_PACKAGES = ("prefect", "prefect_docker", "prefect_kubernetes")


@dataclass(frozen=True)
class Violation:
    """One import that reaches up a layer."""

    module: str
    imported: str
    line: int

    def __str__(self) -> str:
        return f"{self.module}:{self.line} imports {self.imported}"


def layer_of(module: str) -> str | None:
    """The layer of a claudecluster module: its own entry, else its closest subpackage's.

    The package root's own entry covers ``claudecluster/__init__.py`` only, so a new
    top-level module is in no layer until it is placed.
    """
    if module in LAYERS:
        return LAYERS[module]
    parts = module.split(".")
    for end in range(len(parts) - 1, 1, -1):
        if (name := ".".join(parts[:end])) in LAYERS:
            return LAYERS[name]
    return None


def modules() -> dict[str, Path]:
    """Every claudecluster module of the source tree, by installed name."""
    found: dict[str, Path] = {}
    for package, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            relative = path.relative_to(folder).with_suffix("")
            parts = [p for p in relative.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if package == "claudecluster" and parts and parts[0] in ("flows", "tasks", "blocks"):
                continue  # those names come from the mapped top-level folders
            found[name] = path
    return found


def imports_of(source: str, module: str, *, is_package: bool) -> list[tuple[str, int]]:
    """Every module ``source`` imports, anywhere in it (absolute names, with line numbers)."""
    here = module if is_package else module.rsplit(".", 1)[0]
    found: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            found.append((base, node.lineno))
            # `from claudecluster import gitops` imports the submodule gitops.
            found += [(f"{base}.{alias.name}", node.lineno) for alias in node.names]
    return found


def violations(module: str, source: str, *, is_package: bool = False) -> list[Violation]:
    """The imports of ``module`` that break the layering."""
    own = layer_of(module)
    assert own is not None, f"{module} is in no layer: add it to LAYERS (and the README)"
    bad: list[Violation] = []
    for imported, line in imports_of(source, module, is_package=is_package):
        top = imported.split(".")[0]
        if top in PREFECT_PACKAGES and RANK[own] < RANK[PREFECT]:
            bad.append(Violation(module, imported, line))
        elif top == "claudecluster" and imported != "claudecluster":
            # A name that is no module is an attribute of its parent: importing it runs
            # the parent (`from claudecluster import run_goal` runs the public face).
            target = layer_of(imported) or layer_of(imported.rsplit(".", 1)[0])
            if target is not None and RANK[target] > RANK[own]:
                bad.append(Violation(module, imported, line))
    return bad


class TestLayers:
    """Core imports no Prefect; the Prefect layer never reaches the interface."""

    def test_every_module_has_a_layer(self) -> None:
        unplaced = [name for name in modules() if layer_of(name) is None]
        assert unplaced == [], f"place these modules in a layer: {unplaced}"

    def test_no_import_reaches_up_a_layer(self) -> None:
        found = [
            violation
            for name, path in modules().items()
            for violation in violations(
                name, path.read_text(), is_package=path.name == "__init__.py"
            )
        ]
        assert found == [], "\n".join(str(v) for v in found)

    def test_the_layers_are_not_empty(self) -> None:
        counts = {layer: 0 for layer in RANK}
        for name in modules():
            counts[layer_of(name) or "none"] = counts.get(layer_of(name) or "none", 0) + 1
        assert counts[CORE] >= 15 and counts[PREFECT] >= 10 and counts[INTERFACE] >= 6, counts


class TestTheChecker:
    """The checker itself finds what it should (negative controls)."""

    @pytest.mark.parametrize(
        ("module", "source"),
        [
            ("claudecluster.worker", "import prefect\n"),
            ("claudecluster.worker", "def f():\n    from prefect.states import Failed\n"),
            ("claudecluster.plan", "from claudecluster.dispatch import run_tasks\n"),
            ("claudecluster.session", "from claudecluster import places\n"),
            ("claudecluster.tasks.worker", "from claudecluster.api import run_goal\n"),
            ("claudecluster.dispatch", "from .cli import main\n"),
            ("claudecluster.gitops", "from claudecluster import run_goal\n"),
        ],
    )
    def test_a_deliberate_violation_is_found(self, module: str, source: str) -> None:
        assert violations(module, source)

    @pytest.mark.parametrize(
        ("module", "source"),
        [
            ("claudecluster.worker", "from claudecluster import gitops\nimport git\n"),
            ("claudecluster.dispatch", "from prefect import task\nfrom .worker import f\n"),
            ("claudecluster.api", "from claudecluster.flows.goal import goal_flow\n"),
        ],
    )
    def test_allowed_imports_pass(self, module: str, source: str) -> None:
        assert violations(module, source) == []

    def test_an_unplaced_module_is_refused(self) -> None:
        with pytest.raises(AssertionError, match="in no layer"):
            violations("claudecluster.brand_new", "")
