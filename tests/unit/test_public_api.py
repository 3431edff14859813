"""The package's curated public surface."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import claudecluster


class TestPublicApi:
    """`claudecluster.__all__` is deliberate: changing it is an API change."""

    def test_all_is_pinned(self) -> None:
        assert sorted(claudecluster.__all__) == sorted(
            [
                "ClaudeClusterError",
                "ConfigError",
                "FailureReason",
                "FileChange",
                "GitError",
                "Plan",
                "PlanError",
                "RepoError",
                "RunReport",
                "SessionError",
                "TaskResult",
                "TaskSpec",
                "TaskStatus",
                "TestReport",
                "TokenUsage",
                "UsageError",
                "WorkUnit",
                "WorkerSettings",
                "__version__",
                "execute_task",
                "load_plan_file",
                "new_run_id",
                "run_goal",
            ]
        )

    def test_every_name_resolves(self) -> None:
        for name in claudecluster.__all__:
            assert getattr(claudecluster, name) is not None, name


class TestPackaging:
    """What `pip install .` puts into site-packages."""

    @pytest.mark.slow
    def test_wheel_has_only_the_claudecluster_namespace(self, tmp_path: Path) -> None:
        root = Path(__file__).resolve().parents[2]
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--no-deps",
                "--no-build-isolation",
                "-q",
                "-w",
                str(tmp_path),
                str(root),
            ],
            check=True,
            capture_output=True,
        )
        (wheel,) = tmp_path.glob("claudecluster-*.whl")
        names = zipfile.ZipFile(wheel).namelist()
        top_level = {name.split("/")[0] for name in names}
        assert top_level == {"claudecluster", wheel.name.split("-py")[0] + ".dist-info"}
        for module in (
            "claudecluster/flows/goal.py",
            "claudecluster/tasks/worker.py",
            "claudecluster/blocks/__init__.py",
            "claudecluster/testing/model_server.py",
        ):
            assert module in names
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        assert (
            "claudecluster = claudecluster.cli:main"
            in zipfile.ZipFile(wheel).read(entry_points).decode()
        )
