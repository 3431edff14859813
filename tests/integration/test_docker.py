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
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
        proc = cluster.run(sys.executable, "-c", script, json.dumps(args))
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


def set_pool_env(cluster: Cluster, **changes: str | None) -> None:
    """Change the Docker pool's job environment (None removes a variable), as in the UI."""
    pool = cluster.api("GET", f"/work_pools/{POOL}")
    template = pool["base_job_template"]
    env = template["variables"]["properties"]["env"].setdefault("default", {})
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    cluster.api("PATCH", f"/work_pools/{POOL}", {"base_job_template": template})


def pool_defaults(cluster: Cluster) -> dict[str, Any]:
    """The Docker pool's variables' defaults."""
    properties = cluster.api("GET", f"/work_pools/{POOL}")["base_job_template"]["variables"][
        "properties"
    ]
    return {name: p.get("default") for name, p in properties.items()}


def one_task_plan(
    tmp_path: Path, model_server: ScriptedModelServer, marker: str, edit: bool
) -> Path:
    """A plan of two tasks: one edits calc.py, the other changes nothing."""
    model_server.add_script(
        edit_script(marker, "calc.py", "def add(a, b):\n", 'def add(a, b):\n    """Add."""\n')
    )
    model_server.add_script(
        Script(name=f"{marker}-idle", match=f"{marker}-idle", turns=[text("Nothing.")])
    )
    tasks = [{"id": "idle", "title": "Idle", "prompt": f"{marker}-idle: look"}]
    if edit:
        tasks.append(
            {
                "id": "calc",
                "title": "Calc",
                "prompt": f"{marker}-calc.py: docstring",
                "paths": ["calc.py"],
            }
        )
    plan_file = tmp_path / f"plan-{marker}.yaml"
    plan_file.write_text(
        yaml.safe_dump({"goal": "One box", "verify": "python -m pytest -q", "tasks": tasks})
    )
    return plan_file


def run_on_docker(cluster: Cluster, plan_file: Path, repo: Path) -> tuple[int, dict[str, Any], str]:
    env = {k: v for k, v in cluster.env.items() if not k.startswith("ANTHROPIC_")}
    proc = cluster.cli(
        "run",
        "--plan",
        str(plan_file),
        "--repo",
        str(repo),
        "--pool",
        POOL,
        "--settings-block",
        SETTINGS_BLOCK,
        "--json",
        env=env,
    )
    report = json.loads(proc.stdout) if proc.stdout.strip().startswith("{") else {}
    return proc.returncode, report, proc.stderr


class TestSingleBox:
    """Docker on one machine needs no result storage: results come back through git."""

    def test_without_result_storage(
        self,
        docker_cluster: Cluster,
        repo: Path,
        tmp_path: Path,
        model_server: ScriptedModelServer,
        marker: str,
    ) -> None:
        set_pool_env(docker_cluster, PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK=None)
        try:
            code, report, err = run_on_docker(
                docker_cluster, one_task_plan(tmp_path, model_server, marker, edit=True), repo
            )
        finally:
            set_pool_env(docker_cluster, PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK=RESULTS_BLOCK)
        assert code == 0, err[-3000:] + docker_cluster.worker_tail(60)
        by_id = {t["id"]: t for t in report["tasks"]}
        assert (
            by_id["calc"]["status"] == "succeeded"
            and by_id["calc"]["files"][0]["path"] == "calc.py"
        )
        assert by_id["calc"]["cost_usd"] > 0 and by_id["calc"]["test_report"]["exit_code"] == 0
        assert by_id["idle"]["status"] == "no_changes" and by_id["idle"]["cost_usd"] > 0
        assert '"""Add."""' in git(repo, "show", f"{report['integration_branch']}:calc.py")


class TestUnusableStorage:
    """A result storage the containers cannot use is found before a session spends."""

    def test_found_before_any_session(
        self,
        docker_cluster: Cluster,
        repo: Path,
        tmp_path: Path,
        model_server: ScriptedModelServer,
        marker: str,
    ) -> None:
        script = (
            "from prefect.filesystems import RemoteFileSystem\n"
            "RemoteFileSystem(basepath='s3://no-such-bucket/claudecluster/')"
            ".save('no-s3', overwrite=True)\n"
        )
        proc = docker_cluster.run(sys.executable, "-c", script)
        assert proc.returncode == 0, proc.stderr
        set_pool_env(
            docker_cluster, PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK="remote-file-system/no-s3"
        )
        before = len(model_server.requests)
        try:
            code, report, err = run_on_docker(
                docker_cluster, one_task_plan(tmp_path, model_server, marker, edit=False), repo
            )
        finally:
            set_pool_env(docker_cluster, PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK=RESULTS_BLOCK)
        assert code == 1, err
        [task] = report["tasks"]
        assert task["failure_reason"] == "result_storage"
        assert "cannot persist results to remote-file-system/no-s3" in task["error"]
        assert len(model_server.requests) == before  # no session was paid for


class TestSetupKeepsThePool:
    """`claudecluster setup` merges into a pool's settings; it never resets them."""

    def test_setup_sessions_keeps_storage_and_image(self, docker_cluster: Cluster) -> None:
        set_pool_env(docker_cluster, MY_SETTING="kept")
        before = pool_defaults(docker_cluster)
        assert before["env"]["PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"] == RESULTS_BLOCK

        proc = docker_cluster.cli("setup", "--sessions", "8")

        assert proc.returncode == 0, proc.stderr
        after = pool_defaults(docker_cluster)
        assert after["env"]["PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"] == RESULTS_BLOCK
        assert after["env"]["MY_SETTING"] == "kept"
        assert after["image"] == before["image"]
        set_pool_env(docker_cluster, MY_SETTING=None)


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[str]:
    """A Docker registry on loopback (Debian's docker-registry); its host:port."""
    binary = shutil.which("docker-registry")
    if binary is None:
        missing = (
            pytest.fail if os.environ.get("CLAUDECLUSTER_REQUIRE_DOCKER") == "1" else pytest.skip
        )
        missing("no docker-registry: run .ci/docker-setup (installs Debian's docker-registry)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = tmp_path / "registry.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "version": 0.1,
                "storage": {"filesystem": {"rootdirectory": str(tmp_path / "data")}},
                "http": {"addr": f"127.0.0.1:{port}"},
            }
        )
    )
    proc = subprocess.Popen(
        [str(binary), "serve", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


class TestPushedImage:
    """The documented way to use a pushed image: setup --image, pulled by the worker."""

    def test_worker_pulls_the_pushed_image(
        self,
        docker_cluster: Cluster,
        registry: str,
        repo: Path,
        tmp_path: Path,
        model_server: ScriptedModelServer,
        marker: str,
    ) -> None:
        pushed = f"{registry}/claudecluster-worker:e2e-{marker.lower()}"
        assert _docker("tag", IMAGE, pushed).returncode == 0
        push = subprocess.run(
            ["docker", "push", pushed], capture_output=True, text=True, timeout=600
        )
        assert push.returncode == 0, push.stderr
        assert _docker("image", "rm", pushed).returncode == 0  # only the registry has it now
        proc = docker_cluster.cli("setup", "--image", pushed)
        assert proc.returncode == 0, proc.stderr
        try:
            defaults = pool_defaults(docker_cluster)
            assert (defaults["image"], defaults["image_pull_policy"]) == (pushed, "IfNotPresent")
            code, _report, err = run_on_docker(
                docker_cluster, one_task_plan(tmp_path, model_server, marker, edit=False), repo
            )
            assert code == 0, err[-3000:] + docker_cluster.worker_tail(60)
            assert _docker("image", "inspect", pushed).returncode == 0  # the worker pulled it
        finally:
            docker_cluster.cli("setup", "--image", IMAGE)
            _docker("image", "rm", pushed)
