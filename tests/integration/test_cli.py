"""The `claudecluster` command line, run as a real subprocess against real everything."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from claudecluster.testing import Script, ScriptedModelServer, structured, text, tool_use
from tests.conftest import git, snapshot

pytestmark = [pytest.mark.integration, pytest.mark.prefect_server]


def cli(
    *args: str, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the installed console script's entry point in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "claudecluster.cli", *args],
        capture_output=True,
        text=True,
        env=env or dict(os.environ),
        input=stdin,
        timeout=240,
    )


def docstring_script(marker: str, path: str, old: str, new: str) -> Script:
    return Script(
        name=f"edit-{path}",
        match=marker,
        turns=[
            tool_use("Read", {"file_path": path}),
            tool_use("Edit", {"file_path": path, "old_string": old, "new_string": new}),
            text("Done."),
        ],
    )


def write_plan(path: Path, marker: str, *, verify: str = "python -m pytest -q") -> Path:
    plan = {
        "goal": "Add docstrings",
        "verify": verify,
        "tasks": [
            {
                "id": "calc-doc",
                "kind": "docs",
                "title": "Docstring for calc.py",
                "prompt": f"{marker}-calc add a docstring to calc.py",
                "paths": ["calc.py"],
            },
            {
                "id": "strings-doc",
                "kind": "docs",
                "title": "Docstring for strings.py",
                "prompt": f"{marker}-strings add a docstring to strings.py",
                "paths": ["strings.py"],
                "depends_on": ["calc-doc"],
            },
        ],
    }
    path.write_text(yaml.safe_dump(plan))
    return path


@pytest.fixture
def docstring_scripts(model_server: ScriptedModelServer, marker: str) -> None:
    model_server.add_script(
        docstring_script(
            f"{marker}-calc", "calc.py", "def add(a, b):\n", 'def add(a, b):\n    """Add."""\n'
        )
    )
    model_server.add_script(
        docstring_script(
            f"{marker}-strings",
            "strings.py",
            "def shout(text):\n",
            'def shout(text):\n    """Shout."""\n',
        )
    )


@pytest.mark.usefixtures("prefect_backend", "docstring_scripts")
class TestRun:
    """`claudecluster run`: JSON report on stdout, exit codes, the checkout untouched."""

    def test_json_report_and_exit_zero(self, repo: Path, tmp_path: Path, marker: str) -> None:
        plan = write_plan(tmp_path / "plan.yaml", marker)
        (repo / "calc.py").write_text("# the user's uncommitted edit\n")
        before = snapshot(repo)

        proc = cli("run", "--plan", str(plan), "--repo", str(repo), "--json")

        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout)  # stdout is the report and nothing else
        assert report["status"] == "succeeded"
        assert report["goal"] == "Add docstrings"
        assert [t["id"] for t in report["tasks"]] == ["calc-doc", "strings-doc"]
        assert all(t["status"] == "succeeded" for t in report["tasks"])
        assert report["unmerged"] == []
        assert report["final_verify"]["exit_code"] == 0
        assert report["final_verify"]["passed"] == 2
        assert report["totals"]["cost_usd"] > 0
        assert report["totals"]["tokens"] > 0
        assert report["totals"]["duration_s"] > 0
        branch = report["integration_branch"]
        assert branch == f"claudecluster/{report['run_id']}/integration"
        assert git(repo, "rev-parse", branch).strip() == report["head_commit"]
        merged = git(repo, "show", f"{branch}:strings.py")
        assert '"""Shout."""' in merged
        assert snapshot(repo) == before

    def test_failed_final_verify_exits_one(self, repo: Path, tmp_path: Path, marker: str) -> None:
        plan = write_plan(tmp_path / "plan.yaml", marker, verify="python -m pytest -q && false")

        proc = cli("run", "--plan", str(plan), "--repo", str(repo), "--json")

        assert proc.returncode == 1, proc.stderr
        report = json.loads(proc.stdout)
        assert report["status"] == "failed"
        assert report["final_verify"]["exit_code"] == 1


@pytest.mark.usefixtures("prefect_backend")
class TestPlannerFailure:
    """A planner that returns no plan fails the run clearly, never an empty success."""

    def test_no_structured_output(
        self, repo: Path, model_server: ScriptedModelServer, marker: str
    ) -> None:
        model_server.add_script(
            Script(name="lazy-planner", match=marker, turns=[text("I would split it in two.")])
        )

        proc = cli("run", f"{marker} do things", "--repo", str(repo), "--json")

        assert proc.returncode == 1, proc.stderr
        report = json.loads(proc.stdout)
        assert report["status"] == "failed"
        assert report["tasks"] == []
        assert "planner produced no plan" in report["error"]
        assert "structured output" in report["error"]
        assert report["totals"]["cost_usd"] > 0  # the planner's session was paid for


class TestBadInput:
    """Bad input: one line on stderr, exit code 2, no traceback, nothing changed."""

    @pytest.fixture
    def plan(self, tmp_path: Path, marker: str) -> Path:
        return write_plan(tmp_path / "plan.yaml", marker)

    def _assert_usage_error(self, proc: subprocess.CompletedProcess[str], words: str) -> None:
        assert proc.returncode == 2, (proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith("claudecluster: error:")
        assert words in lines[0]
        assert proc.stdout == ""

    def test_repo_does_not_exist(self, tmp_path: Path, plan: Path) -> None:
        proc = cli("run", "--plan", str(plan), "--repo", str(tmp_path / "nope"))
        self._assert_usage_error(proc, "does not exist")

    def test_not_a_git_repo(self, tmp_path: Path, plan: Path) -> None:
        (tmp_path / "plain").mkdir()
        proc = cli("run", "--plan", str(plan), "--repo", str(tmp_path / "plain"))
        self._assert_usage_error(proc, "not a git repository")

    def test_repo_without_commits(self, tmp_path: Path, plan: Path) -> None:
        empty = tmp_path / "empty"
        empty.mkdir()
        git(empty, "init", "-q")
        proc = cli("run", "--plan", str(plan), "--repo", str(empty))
        self._assert_usage_error(proc, "has no commits")

    def test_bare_repo(self, tmp_path: Path, repo: Path, plan: Path) -> None:
        bare = tmp_path / "bare.git"
        git(tmp_path, "clone", "-q", "--bare", str(repo), str(bare))
        proc = cli("run", "--plan", str(plan), "--repo", str(bare))
        self._assert_usage_error(proc, "bare repository")

    def test_plan_with_cycle_changes_nothing(self, repo: Path, tmp_path: Path) -> None:
        bad = tmp_path / "cycle.yaml"
        bad.write_text(
            "tasks:\n"
            "  - {id: a, title: A, prompt: a, depends_on: [b]}\n"
            "  - {id: b, title: B, prompt: b, depends_on: [a]}\n"
        )
        before = snapshot(repo)
        refs = git(repo, "for-each-ref")
        proc = cli("run", "--plan", str(bad), "--repo", str(repo))
        self._assert_usage_error(proc, "cycle: a -> b -> a")
        assert snapshot(repo) == before
        assert git(repo, "for-each-ref") == refs

    @pytest.mark.parametrize(
        ("content", "words"),
        [
            ("", "is empty"),
            ("tasks:\n  - {id: a, title: A, prompt: a, depends_on: [zz]}\n", "unknown task 'zz'"),
            (
                "tasks:\n  - {id: a, title: A, prompt: a}\n  - {id: a, title: B, prompt: b}\n",
                "duplicate task id 'a'",
            ),
            ("tasks:\n  - {id: a, title: A, prompt: a, paths: [../outside]}\n", "leaves the repo"),
            ("tasks:\n  - {id: a, title: A, prompt: a, paths: [/etc/passwd]}\n", "is absolute"),
            ("tasks:\n  - {id: a, title: A, prompt: a, paths: [escape/x.py]}\n", "symlink"),
        ],
        ids=["empty", "unknown-dependency", "duplicate-ids", "dotdot", "absolute", "symlink"],
    )
    def test_bad_plan_changes_nothing(
        self, repo: Path, tmp_path: Path, content: str, words: str
    ) -> None:
        (repo / "escape").symlink_to(tmp_path)  # a symlink inside the repo that leads out
        git(repo, "add", "escape")
        git(repo, "commit", "-qm", "add a symlink")
        bad = tmp_path / "plan.yaml"
        bad.write_text(content)
        before = snapshot(repo)
        refs = git(repo, "for-each-ref")
        proc = cli("run", "--plan", str(bad), "--repo", str(repo))
        self._assert_usage_error(proc, words)
        assert snapshot(repo) == before
        assert git(repo, "for-each-ref") == refs

    def test_missing_plan_file(self, repo: Path, tmp_path: Path) -> None:
        proc = cli("run", "--plan", str(tmp_path / "nope.yaml"), "--repo", str(repo))
        self._assert_usage_error(proc, "does not exist")

    def test_invalid_yaml(self, repo: Path, tmp_path: Path) -> None:
        bad = tmp_path / "bad.yaml"
        bad.write_text("tasks: [\n  - id: a\n")
        proc = cli("run", "--plan", str(bad), "--repo", str(repo))
        self._assert_usage_error(proc, "not valid YAML")

    def test_empty_goal(self, repo: Path) -> None:
        proc = cli("run", "   ", "--repo", str(repo))
        self._assert_usage_error(proc, "goal is empty")

    def test_huge_goal(self, repo: Path) -> None:
        proc = cli("run", "-", "--repo", str(repo), stdin="x" * 1_000_000)
        self._assert_usage_error(proc, "characters long")

    def test_max_parallel_zero(self, repo: Path, plan: Path) -> None:
        proc = cli("run", "--plan", str(plan), "--repo", str(repo), "--max-parallel", "0")
        assert proc.returncode == 2
        assert "must be at least 1" in proc.stderr
        assert "Traceback" not in proc.stderr

    def test_no_credentials(self, repo: Path, plan: Path) -> None:
        env = {
            k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "CLAUDE_CODE_"))
        }
        proc = cli("run", "--plan", str(plan), "--repo", str(repo), env=env)
        self._assert_usage_error(proc, "ANTHROPIC_API_KEY")


@pytest.mark.usefixtures("prefect_backend")
class TestTaskCommand:
    """`claudecluster task` runs one session and prints its TaskResult."""

    def test_task_json(self, repo: Path, model_server: ScriptedModelServer, marker: str) -> None:
        model_server.add_script(
            docstring_script(marker, "calc.py", "def sub(a, b):\n", 'def sub(a, b):\n    """-"""\n')
        )

        proc = cli(
            "task",
            "--repo",
            str(repo),
            "--prompt",
            f"{marker} document sub",
            "--verify",
            "python -m pytest -q",
            "--id",
            "sub-doc",
            "--json",
        )

        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout)
        assert result["status"] == "succeeded"
        assert result["id"] == "sub-doc"
        assert result["files"] == [
            {"path": "calc.py", "added": 1, "removed": 0, "change": "modified"}
        ]
        assert result["test_report"]["passed"] == 2
        assert result["branch"].endswith("/sub-doc")


class TestPlanCommand:
    """`claudecluster plan` writes a plan a user can review and run."""

    def test_plan_out(
        self, repo: Path, tmp_path: Path, model_server: ScriptedModelServer, marker: str
    ) -> None:
        model_server.add_script(
            Script(
                name="planner",
                match=marker,
                turns=[
                    tool_use("Glob", {"pattern": "*.py"}),
                    structured(
                        {
                            "verify": "python -m pytest -q",
                            "tasks": [
                                {
                                    "id": "calc-doc",
                                    "kind": "docs",
                                    "title": "Document calc.py",
                                    "prompt": "Add docstrings to calc.py",
                                    "paths": ["calc.py"],
                                    "depends_on": [],
                                }
                            ],
                        }
                    ),
                ],
            )
        )
        out = tmp_path / "plan.yaml"

        proc = cli("plan", f"{marker} document calc", "--repo", str(repo), "--out", str(out))

        assert proc.returncode == 0, proc.stderr
        plan = yaml.safe_load(out.read_text())
        assert plan["goal"] == f"{marker} document calc"
        assert plan["verify"] == "python -m pytest -q"
        assert [t["id"] for t in plan["tasks"]] == ["calc-doc"]
        assert plan["tasks"][0]["paths"] == ["calc.py"]


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_backend")
class TestDemo:
    """`claudecluster demo`: the README's first command, end to end, green."""

    def test_demo(self, tmp_path: Path) -> None:
        target = tmp_path / "demo"

        proc = cli("demo", "--dir", str(target), "--latency", "0")

        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "SCRIPTED MODEL" in proc.stdout
        assert "succeeded" in proc.stdout
        assert "6 passed, 0 failed" in proc.stdout
        branches = git(target, "branch", "--list", "claudecluster/*").split()
        integration = next(b for b in branches if b.endswith("/integration"))
        assert len([b for b in branches if b.startswith("claudecluster/")]) == 6
        log = git(target, "log", "--first-parent", "--format=%s", integration)
        merges = [line for line in log.splitlines() if line.startswith("Merge task")]
        assert len(merges) == 5
        # Dependencies merge after what they depend on.
        order = [line.split()[2].rstrip(":") for line in reversed(merges)]
        assert order.index("pricing-refactor") < order.index("pricing-docs")
        assert order.index("pricing-refactor") < order.index("pricing-tests")
        tests = subprocess.run(
            [sys.executable, "-m", "pytest", "-q"],
            cwd=target,
            capture_output=True,
            text=True,
        )
        assert tests.returncode == 0  # the user's own checkout is still the original
        assert "2 passed" in tests.stdout
