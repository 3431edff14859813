"""The TypeScript SDK (``sdk/typescript``): its ``node --test`` suites, run from here.

- the unit suite (the surface against a fake API, and the shared conformance fixtures
  validated by the JSON Schema its types come from);
- the generated types are current (``npm run check-generated``: regenerated from the
  pydantic models and the Prefect server's OpenAPI schema, compared with the committed ones);
- end to end: a real Prefect server with the goal deployment, a process worker and the
  scripted model; the node test submits a goal, watches it to the end over Prefect's
  websockets, and checks the report, the artifacts and the integration branch.

The package's dependencies come from its lock file (``npm ci``, which ``.ci/run`` runs; done
here too when they are missing). Without Node these tests skip, unless
``CLAUDECLUSTER_REQUIRE_NODE=1`` (CI) makes that a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from claudecluster.testing import ScriptedModelServer
from tests.cluster import Cluster, running_cluster
from tests.integration.test_team import file_plan, file_task_script, write_plan

pytestmark = [pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
SDK = ROOT / "sdk" / "typescript"
POOL = "claudecluster-process"


def _missing(reason: str) -> None:
    if os.environ.get("CLAUDECLUSTER_REQUIRE_NODE") == "1":
        pytest.fail(f"{reason} (CLAUDECLUSTER_REQUIRE_NODE=1)")
    pytest.skip(reason)


def npm(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> None:
    proc = subprocess.run(
        ["npm", *args], cwd=SDK, env=env, capture_output=True, text=True, timeout=timeout
    )
    output = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, f"npm {' '.join(args)}:\n{output}"


@pytest.fixture(scope="module")
def sdk() -> Path:
    """The package, its locked dependencies installed and built."""
    if not (shutil.which("node") and shutil.which("npm")):
        _missing("the TypeScript SDK's tests need Node 20 or newer and npm")
    installed = SDK / "node_modules" / ".package-lock.json"
    lock = SDK / "package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < lock.stat().st_mtime:
        npm("ci", "--no-audit", "--no-fund")
    npm("run", "build")
    return SDK


def node_test(sdk: Path, suite: str, env: dict[str, str], timeout: float) -> str:
    proc = subprocess.run(
        ["node", "--test", "--test-concurrency=1", f"dist/test/{suite}/"],
        cwd=sdk,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-3000:]
    return proc.stdout


def test_unit_suite(sdk: Path) -> None:
    out = node_test(sdk, "unit", dict(os.environ), 300)
    assert "# fail 0" in out and "# pass 0" not in out


def test_generated_types_are_current(sdk: Path) -> None:
    npm("run", "check-generated", env={**os.environ, "PYTHON": sys.executable})


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, model_server: ScriptedModelServer
) -> Iterator[Cluster]:
    with running_cluster(
        tmp_path_factory.mktemp("sdk-home"),
        model_server,
        pool=POOL,
        deployments=("claudecluster-goal/goal", "claudecluster-worker/process"),
    ) as made:
        yield made


@pytest.mark.prefect_server
@pytest.mark.slow
def test_end_to_end(
    sdk: Path,
    cluster: Cluster,
    model_server: ScriptedModelServer,
    repo: Path,
    tmp_path: Path,
    marker: str,
) -> None:
    names = [f"ts{i}" for i in range(3)]
    for name in names:
        model_server.add_script(file_task_script(marker, name, turn_s=0.3))
    plan = write_plan(tmp_path / "plan.yaml", file_plan(marker, names, goal=f"{marker} modules"))
    requests = len(model_server.requests)
    env = {
        **cluster.env,
        "E2E_REPO": str(repo),
        "E2E_PLAN": str(plan),
        "E2E_POOL": POOL,
    }

    out = node_test(sdk, "e2e", env, 600)

    assert "# pass 2" in out and "# fail 0" in out, out[-4000:]
    # The goal that could not start made no model request: three sessions, one per task.
    sessions = [s for s in model_server.sessions().values() if (s.script or "").startswith(marker)]
    assert sorted(s.script for s in sessions) == sorted(f"{marker}-{n}" for n in names)
    assert len(model_server.requests) > requests
    branches = subprocess.run(
        ["git", "-C", str(repo), "branch", "--list", "claudecluster/*/integration"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert len(branches) == 1, branches
    for name in names:
        shown = subprocess.run(
            ["git", "-C", str(repo), "show", f"{branches[0]}:{name}.py"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert shown == f"VALUE = {name!r}\n"
