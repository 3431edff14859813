"""Workers in Docker containers that share no disk with the driver.

The repository reaches the containers over git (the driver serves the user's checkout with
``git daemon`` on loopback; containers clone it and push their task branches back), and the
TaskResults come back through Prefect result persistence into a storage block both sides can
reach (here an FTP server on loopback behind a ``RemoteFileSystem`` block; S3 or GCS in real
deployments). No host directory is mounted into any container.

Needs a Docker engine and the worker image: ``.ci/docker-setup`` installs and builds both.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from claudecluster.testing import Script, ScriptedModelServer, text, tool_use
from tests.cluster import Cluster, ftp_result_store, running_cluster
from tests.conftest import git, snapshot

pytestmark = [
    pytest.mark.integration,
    pytest.mark.prefect_server,
    pytest.mark.slow,
    pytest.mark.docker,
]

POOL = "claudecluster-docker"
IMAGE = "claudecluster-worker:latest"
RESULTS_BLOCK = "remote-file-system/claudecluster-results"
SETTINGS_BLOCK = "docker-test"
CONTAINER_LABEL = "io.prefect.flow-run-id"


def _docker(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=60)


def _require_docker() -> None:
    # CI sets CLAUDECLUSTER_REQUIRE_DOCKER=1: there a missing engine is a failure, not a skip.
    missing = pytest.fail if os.environ.get("CLAUDECLUSTER_REQUIRE_DOCKER") == "1" else pytest.skip
    if shutil.which("docker") is None or _docker("info").returncode != 0:
        missing("no Docker engine: run .ci/docker-setup (installs and starts dockerd)")
    if _docker("image", "inspect", IMAGE).returncode != 0:
        missing(f"no {IMAGE} image: run infra/docker/build-images.sh")


@pytest.fixture(scope="module")
def ftp_results(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    """An FTP server on loopback: result storage reachable from the host and containers."""
    with ftp_result_store(tmp_path_factory.mktemp("results")) as store:
        yield store


@pytest.fixture(scope="module")
def docker_cluster(
    tmp_path_factory: pytest.TempPathFactory,
    model_server: ScriptedModelServer,
    ftp_results: dict[str, object],
) -> Iterator[Cluster]:
    """A real server, set up with result storage, deployed, and a Docker worker."""
    _require_docker()

    def save_blocks(cluster: Cluster) -> None:
        script = (
            "import json, sys\n"
            "from pydantic import SecretStr\n"
            "from prefect.filesystems import RemoteFileSystem\n"
            "from claudecluster.blocks import ClaudeCodeSettings\n"
            "args = json.loads(sys.argv[1])\n"
            "RemoteFileSystem(basepath='ftp://results/', settings=args['ftp'])"
            ".save('claudecluster-results', overwrite=True)\n"
            "ClaudeCodeSettings(api_key=SecretStr(args['key']), base_url=args['url'])"
            f".save('{SETTINGS_BLOCK}', overwrite=True)\n"
        )
        args = {
            "ftp": ftp_results["settings"],
            "key": model_server.env()["ANTHROPIC_API_KEY"],
            "url": model_server.base_url,
        }
        proc = cluster.run("python", "-c", script, json.dumps(args))
        assert proc.returncode == 0, proc.stderr

    with running_cluster(
        tmp_path_factory.mktemp("docker-home"),
        model_server,
        pool=POOL,
        deployments=("claudecluster-worker/docker",),
        setup_args=("--result-storage", RESULTS_BLOCK),
        before_worker=save_blocks,
    ) as cluster:
        yield cluster
    leftovers = _docker("ps", "-aq", "--filter", f"label={CONTAINER_LABEL}").stdout.split()
    if leftovers:  # never leave containers behind, even when a test failed
        _docker("rm", "-f", *leftovers)


def edit_script(marker: str, path: str, old: str, new: str) -> Script:
    return Script(
        name=f"{marker}-{path}",
        match=f"{marker}-{path}",
        turns=[
            tool_use("Read", {"file_path": path}),
            tool_use("Edit", {"file_path": path, "old_string": old, "new_string": new}),
            tool_use("Bash", {"command": "python -m pytest -q"}),
            text("Done."),
        ],
    )


class TestDockerPool:
    """A goal of three tasks whose workers run in containers, integrated and verified."""

    def test_goal_in_containers(
        self,
        docker_cluster: Cluster,
        repo: Path,
        tmp_path: Path,
        model_server: ScriptedModelServer,
        ftp_results: dict[str, object],
        marker: str,
    ) -> None:
        edits = {
            "calc.py": ("def add(a, b):\n", 'def add(a, b):\n    """Add two numbers."""\n'),
            "strings.py": ("def shout(text):\n", 'def shout(text):\n    """Shout."""\n'),
            "test_calc.py": ("def test_add():\n", 'def test_add():\n    """It adds."""\n'),
        }
        for path, (old, new) in edits.items():
            model_server.add_script(edit_script(marker, path, old, new))
        plan = {
            "goal": "Docstrings, in containers",
            "verify": "python -m pytest -q",
            "tasks": [
                {
                    "id": path.replace(".py", "").replace("_", "-"),
                    "kind": "docs",
                    "title": f"Document {path}",
                    "prompt": f"{marker}-{path}: add a docstring",
                    "paths": [path],
                }
                for path in edits
            ],
        }
        plan_file = tmp_path / "plan.yaml"
        plan_file.write_text(yaml.safe_dump(plan))
        before = snapshot(repo)
        env = {k: v for k, v in docker_cluster.env.items() if not k.startswith("ANTHROPIC_")}

        proc = docker_cluster.cli(
            "run",
            "--plan",
            str(plan_file),
            "--repo",
            str(repo),
            "--pool",
            POOL,
            "--settings-block",
            SETTINGS_BLOCK,
            "--max-parallel",
            "3",
            "--json",
            env=env,
        )

        assert proc.returncode == 0, proc.stderr[-3000:] + docker_cluster.worker_tail(80)
        report = json.loads(proc.stdout)
        assert report["status"] == "succeeded"
        assert len(report["tasks"]) == 3
        branch = report["integration_branch"]
        for path, (_, new) in edits.items():
            assert new in git(repo, "show", f"{branch}:{path}")
        assert report["final_verify"]["exit_code"] == 0
        assert report["final_verify"]["passed"] == 2
        assert snapshot(repo) == before  # containers pushed branches; the checkout is as it was

        # Every task ran as a worker flow run of the Docker deployment, on a git URL (no
        # mounted checkout), and its result came back through the results block.
        runs = docker_cluster.children(report["flow_run_id"])
        assert len(runs) == 3
        for run in runs:
            assert run["state_type"] == "COMPLETED"
            assert run["parameters"]["unit"]["repo"].startswith("git://127.0.0.1:")
        stored = [p for p in Path(str(ftp_results["root"])).rglob("*") if p.is_file()]
        assert len(stored) >= 3

        # No container is left behind (the pool auto-removes them). The daemon removes an
        # exited container on its own time, after the worker has reported the run done.
        deadline = time.monotonic() + 30
        while True:
            ps = _docker("ps", "-aq", "--filter", f"label={CONTAINER_LABEL}")
            leftovers = ps.stdout.split()
            if not leftovers or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert leftovers == []
