"""The TypeScript SDK (``sdk/typescript``): its ``node --test`` suites, run from here.

- the unit suite (the surface against a fake API, and the shared conformance fixtures
  validated by the JSON Schema its types come from);
- the generated types are current (``npm run check-generated``: regenerated from the
  pydantic models and the Prefect server's OpenAPI schema, compared with the committed ones);
- end to end: a real Prefect server with the goal deployment, a process worker and the
  scripted model; the node tests submit a goal, watch it to the end over Prefect's
  websockets, and check the report, the artifacts and the integration branch; a goal that
  cannot start fails with the CLI's line; a failed goal is resumed and only what failed runs
  again; a goal is cancelled while its session runs.

The package's dependencies come from its lock file (``npm ci``, which ``.ci/run`` runs; done
here too when they are missing). Without Node these tests skip, unless
``CLAUDECLUSTER_REQUIRE_NODE=1`` (CI) makes that a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from claudecluster.testing import Script, ScriptedModelServer, text
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
    # A goal whose second task's check fails until the test writes a file, then is resumed.
    flag = tmp_path / "fixed.flag"
    for name in ("rs-a", "rs-b"):
        model_server.add_script(file_task_script(marker, name))
    resume_plan = file_plan(marker, ["rs-a", "rs-b"], goal=f"{marker} resume")
    del resume_plan["verify"]
    resume_plan["tasks"][1]["verify"] = f"test -f {flag}"
    # A goal cancelled while its session thinks.
    model_server.add_script(
        Script(
            name=f"{marker}-cn-a",
            match=f"{marker}-cn-a ",
            turns=[text("Thinking it over.", latency_s=120.0)],
        )
    )
    cancel_plan = file_plan(marker, ["cn-a"], goal=f"{marker} cancel")
    env = {
        **cluster.env,
        "E2E_REPO": str(repo),
        "E2E_PLAN": str(plan),
        "E2E_POOL": POOL,
        "E2E_RESUME_PLAN": str(write_plan(tmp_path / "resume.yaml", resume_plan)),
        "E2E_FLAG": str(flag),
        "E2E_CANCEL_PLAN": str(write_plan(tmp_path / "cancel.yaml", cancel_plan)),
    }

    out = node_test(sdk, "e2e", env, 900)

    assert "# pass 4" in out and "# fail 0" in out, out[-4000:]
    # The goal that could not start made no model request; resuming paid for no session
    # again (rs-b's finished session was reused, only its check ran again); the cancelled
    # goal had its one session.
    sessions = Counter(
        s.script.removeprefix(f"{marker}-")
        for s in model_server.sessions().values()
        if (s.script or "").startswith(marker)
    )
    assert sessions == {**dict.fromkeys(names, 1), "rs-a": 1, "rs-b": 1, "cn-a": 1}
    branches = subprocess.run(
        ["git", "-C", str(repo), "branch", "--list", "claudecluster/*/integration"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    # Two goals merged (the first, and the resumed one): the first's branch holds its files.

    def holds(branch: str, name: str) -> bool:
        shown = subprocess.run(
            ["git", "-C", str(repo), "show", f"{branch}:{name}.py"],
            capture_output=True,
            text=True,
        )
        return shown.returncode == 0 and shown.stdout == f"VALUE = {name!r}\n"

    assert len(branches) == 2, branches
    assert [b for b in branches if all(holds(b, n) for n in names)], branches
