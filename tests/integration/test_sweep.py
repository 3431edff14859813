"""Sweeps from the command line: glob selection, batching, "changed since the last sweep"."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from claudecluster.testing import RequestView, Script, ScriptedModelServer, Turn, text, tool_use
from tests.conftest import git
from tests.integration.test_cli import cli

pytestmark = [pytest.mark.integration, pytest.mark.prefect_server]

MODULES = {
    "pkg/__init__.py": "",
    "pkg/alpha.py": "def alpha():\n    return 1\n",
    "pkg/beta.py": "def beta():\n    return 2\n",
    "pkg/gamma.py": "def gamma():\n    return 3\n",
    "README.md": "# pkg\n",
}


def stamp_files(marker: str) -> Script:
    """A worker that appends a comment to every file listed in its prompt."""

    def reply(view: RequestView) -> Turn:
        files = [line[2:].strip() for line in view.prompt.splitlines() if line.startswith("- ")]
        done = len(view.tool_results())
        # Each file needs a Read, then an Edit; the turn index says where we are.
        step = view.turn_index
        if step < 2 * len(files):
            path = files[step // 2]
            if step % 2 == 0:
                return tool_use("Read", {"file_path": path})
            return tool_use(
                "Edit",
                {"file_path": path, "old_string": "def ", "new_string": f"# swept {marker}\ndef "},
            )
        return text(f"Stamped {len(files)} files after {done} tool calls.")

    return Script(name="stamp", match=marker, turns=[reply] * 12)


@pytest.mark.usefixtures("prefect_backend")
class TestSweep:
    """A sweep batches matching files into tasks; a re-run takes only what changed since."""

    def test_glob_then_changed_since_last(
        self, make_repo: Callable[..., Path], model_server: ScriptedModelServer, marker: str
    ) -> None:
        repo = make_repo(MODULES)
        model_server.add_script(stamp_files(marker))
        name = f"stamp-{marker.lower()}"
        args = [
            "sweep",
            name,
            "--repo",
            str(repo),
            "--prompt",
            f"{marker} stamp these files:\n{{files}}",
            "--include",
            "pkg/*.py",
            "--exclude",
            "pkg/__init__.py",
            "--batch-size",
            "2",
            "--changed-since-last",
            "--json",
        ]

        first = cli(*args)

        assert first.returncode == 0, first.stderr
        report = json.loads(first.stdout)
        assert report["status"] == "succeeded"
        tasks = {t["id"]: sorted(f["path"] for f in t["files"]) for t in report["tasks"]}
        prefix = name[:40]
        assert tasks == {
            f"{prefix}-001": ["pkg/alpha.py", "pkg/beta.py"],
            f"{prefix}-002": ["pkg/gamma.py"],
        }
        merged = git(repo, "show", f"{report['integration_branch']}:pkg/gamma.py")
        assert f"# swept {marker}" in merged

        # Only beta changes on main between the two sweeps.
        (repo / "pkg" / "beta.py").write_text("def beta():\n    return 22\n")
        git(repo, "commit", "-qam", "change beta")

        second = cli(*args)

        assert second.returncode == 0, second.stderr
        again = json.loads(second.stdout)
        assert [sorted(f["path"] for f in t["files"]) for t in again["tasks"]] == [["pkg/beta.py"]]

        third = cli(*args)  # nothing changed since the last successful sweep

        assert third.returncode == 0, third.stderr
        assert json.loads(third.stdout)["tasks"] == []
