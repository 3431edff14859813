"""A real goal on a real Kubernetes cluster, through the manifests in infra/k8s/.

Runs only when ``KUBECONFIG`` points at a cluster; skipped otherwise (CI has none). What it
needs, besides that:

- ``kubectl`` on PATH, and permission to create namespaces and RBAC objects;
- a node that is this machine (single-node k3s, ``minikube --driver=none``, ...): the test's
  Prefect server, git daemon, result store and scripted model listen on loopback, and the
  pods reach them through ``hostNetwork`` (a test-only change; see ``_for_this_test``);
- the worker image on that node (``CLAUDECLUSTER_K8S_IMAGE``, default
  ``claudecluster-worker:latest``, pulled only if not present): e.g. for k3s
  ``docker save claudecluster-worker:latest | k3s ctr images import -``;
- the ``kubernetes`` worker deployment in ``deployments/prefect.yaml`` (on the
  ``claudecluster-kubernetes`` pool).

The test applies ``kubectl kustomize infra/k8s`` into a namespace of its own (the Secret from
``secret.example.yaml`` with the test's key), runs the Prefect worker in the cluster from
``worker-deployment.yaml`` with its RBAC, creates the pool from ``base-job-template.json``, and
runs a two-task goal with ``claudecluster run --pool claudecluster-kubernetes``: every task is
a Kubernetes Job that clones the repository over git, runs a real Claude Code session (against
the scripted model) and pushes its branch. The namespace is deleted afterwards.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from claudecluster.prefect_server import ensure_server, stop_server
from claudecluster.setup import with_result_storage
from claudecluster.testing import Script, ScriptedModelServer, text, tool_use
from tests.cluster import (
    DEFAULT_SESSIONS,
    Cluster,
    ftp_result_store,
    kill_pids,
    processes_with,
    wait_for,
)
from tests.conftest import git, snapshot

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "infra" / "k8s"
POOL = "claudecluster-kubernetes"
PREFECT_WORKER = "claudecluster-prefect-worker"
TASK_SERVICE_ACCOUNT = "claudecluster-worker"
API_KEY_SECRET = "claudecluster-anthropic"
RESULTS_BLOCK = "remote-file-system/claudecluster-results"
IMAGE = os.environ.get("CLAUDECLUSTER_K8S_IMAGE", "claudecluster-worker:latest")
FLOW_RUN_LABEL = "prefect.io/flow-run-id"


# --------------------------------------------------------------------------- kubectl


def kubectl(
    *args: str, stdin: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``kubectl ARGS`` with the environment's KUBECONFIG."""
    return subprocess.run(
        ["kubectl", *args], input=stdin, capture_output=True, text=True, timeout=timeout
    )


def kubectl_ok(*args: str, stdin: str | None = None, timeout: float = 120) -> str:
    """``kubectl ARGS``, which must succeed; returns stdout."""
    proc = kubectl(*args, stdin=stdin, timeout=timeout)
    assert proc.returncode == 0, f"kubectl {' '.join(args)}: {proc.stderr.strip()}"
    return proc.stdout


def _local_addresses() -> set[str]:
    """This machine's IP addresses."""
    found = {"127.0.0.1", "::1"}
    with contextlib.suppress(OSError):
        found.update(socket.gethostbyname_ex(socket.gethostname())[2])
    if shutil.which("ip"):
        out = subprocess.run(["ip", "-o", "addr", "show"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            fields = line.split()
            if len(fields) > 3 and fields[2] in {"inet", "inet6"}:
                found.add(fields[3].split("/")[0])
    return found


def require_cluster() -> str:
    """The ``kubernetes.io/hostname`` of the node that is this machine; skip without one."""
    if not os.environ.get("KUBECONFIG"):
        pytest.skip("no Kubernetes cluster: set KUBECONFIG to run this test")
    if shutil.which("kubectl") is None:
        pytest.skip("KUBECONFIG is set, but kubectl is not installed")
    nodes = kubectl("get", "nodes", "-o", "json", timeout=30)
    if nodes.returncode != 0:
        pytest.skip(f"the cluster in KUBECONFIG does not answer: {nodes.stderr.strip()[:300]}")
    local = _local_addresses()
    for node in json.loads(nodes.stdout)["items"]:
        addresses = {a["address"] for a in node["status"].get("addresses", [])}
        if node["metadata"]["name"] == socket.gethostname() or addresses & local:
            hostname: str = node["metadata"]["labels"]["kubernetes.io/hostname"]
            return hostname
    pytest.skip(
        "no node of the cluster in KUBECONFIG is this machine: the test's services listen on "
        "loopback and its pods reach them with hostNetwork (use single-node k3s or "
        "minikube --driver=none)"
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------- the test setup


def _for_this_test(
    objects: list[dict[str, Any]], *, namespace: str, node: str, api_url: str
) -> list[dict[str, Any]]:
    """The kustomize output moved to ``namespace``, the worker on this node's network.

    The only changes besides the namespace: PREFECT_API_URL is the test's server; the worker
    pod uses hostNetwork (so it reaches the server on loopback) pinned to this node, with its
    healthcheck on a free port; the namespace allows hostNetwork (``privileged`` Pod
    Security).
    """
    health_port = _free_port()
    moved = []
    for obj in copy.deepcopy(objects):
        kind, meta = obj["kind"], obj["metadata"]
        if kind == "Namespace":
            meta["name"] = namespace
            for mode in ("enforce", "warn", "audit"):
                meta["labels"][f"pod-security.kubernetes.io/{mode}"] = "privileged"
        else:
            meta["namespace"] = namespace
        if kind == "RoleBinding":
            for subject in obj["subjects"]:
                subject["namespace"] = namespace
        if kind == "ConfigMap":
            obj["data"]["PREFECT_API_URL"] = api_url
            obj["data"]["PREFECT_WORKER_QUERY_SECONDS"] = "1"
            obj["data"]["PREFECT_WORKER_WEBSERVER_PORT"] = str(health_port)
        if kind == "Deployment":
            pod = obj["spec"]["template"]["spec"]
            pod["hostNetwork"] = True
            pod["dnsPolicy"] = "ClusterFirstWithHostNet"
            pod["nodeSelector"] = {"kubernetes.io/hostname": node}
            (container,) = pod["containers"]
            container["image"] = IMAGE
            for port in container["ports"]:
                port["containerPort"] = port["hostPort"] = health_port
        moved.append(obj)
    return moved


def _pool_template(namespace: str, node: str, model_server: ScriptedModelServer) -> dict[str, Any]:
    """infra/k8s/base-job-template.json for this test: its namespace, node and services."""
    template: dict[str, Any] = json.loads((K8S / "base-job-template.json").read_text())
    template = with_result_storage(template, RESULTS_BLOCK)
    properties = template["variables"]["properties"]
    properties["namespace"]["default"] = namespace
    properties["image"]["default"] = IMAGE
    properties["env"]["default"].update(
        {"ANTHROPIC_BASE_URL": model_server.base_url, "CLAUDE_CODE_MAX_RETRIES": "2"}
    )
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    pod["hostNetwork"] = True
    pod["dnsPolicy"] = "ClusterFirstWithHostNet"
    pod["nodeSelector"] = {"kubernetes.io/hostname": node}
    return template


@dataclass
class KubeCluster(Cluster):
    """A Prefect server on loopback whose pool's worker runs in a Kubernetes namespace."""

    namespace: str = ""

    def worker_tail(self, lines: int = 40) -> str:
        """The end of the in-cluster worker's log, and the namespace's pods."""
        logs = kubectl(
            "-n", self.namespace, "logs", f"deployment/{PREFECT_WORKER}", f"--tail={lines}"
        )
        pods = kubectl("-n", self.namespace, "get", "pods", "-o", "wide")
        return f"worker log:\n{logs.stdout}{logs.stderr}\npods:\n{pods.stdout}{pods.stderr}"


@pytest.fixture(scope="module")
def kube_node() -> str:
    """The node that is this machine (the test is skipped before anything starts without it)."""
    return require_cluster()


@pytest.fixture(scope="module")
def ftp_results(
    kube_node: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, object]]:
    """An FTP server on loopback: result storage the driver and the pods both reach."""
    with ftp_result_store(tmp_path_factory.mktemp("k8s-results")) as store:
        yield store


@pytest.fixture(scope="module")
def kube_cluster(
    kube_node: str,
    tmp_path_factory: pytest.TempPathFactory,
    model_server: ScriptedModelServer,
    ftp_results: dict[str, object],
) -> Iterator[KubeCluster]:
    """A Prefect server set up and deployed, and the infra/k8s manifests in a test namespace."""
    node = kube_node
    namespace = f"claudecluster-test-{uuid.uuid4().hex[:8]}"
    home = tmp_path_factory.mktemp("k8s-home")
    saved = os.environ.pop("PREFECT_API_URL", None)
    try:
        info = ensure_server(home)
    finally:
        if saved is not None:
            os.environ["PREFECT_API_URL"] = saved
    applied = False
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "ANTHROPIC_"))}
        env.update(
            {
                "PREFECT_API_URL": info.api_url,
                "PREFECT_UI_URL": info.ui_url,
                "PREFECT_HOME": str(home / "client"),
                "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING",
                "CLAUDECLUSTER_HOME": str(home),
                "PYTHONUNBUFFERED": "1",
            }
        )
        worker_log = home / "worker.log"
        worker_log.touch()
        cluster = KubeCluster(info.api_url, home, env, worker_log, pool=POOL, namespace=namespace)

        # Result storage, setup, the pool from infra/k8s/base-job-template.json, deployments.
        blocks = (
            "import json, sys\n"
            "from prefect.filesystems import RemoteFileSystem\n"
            "RemoteFileSystem(basepath='ftp://results/', settings=json.loads(sys.argv[1]))"
            ".save('claudecluster-results', overwrite=True)\n"
        )
        proc = cluster.run(sys.executable, "-c", blocks, json.dumps(ftp_results["settings"]))
        assert proc.returncode == 0, proc.stderr
        proc = cluster.cli(
            "setup", "--sessions", str(DEFAULT_SESSIONS), "--result-storage", RESULTS_BLOCK
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        template_file = home / "base-job-template.json"
        template_file.write_text(json.dumps(_pool_template(namespace, node, model_server)))
        proc = cluster.prefect(
            "work-pool",
            "create",
            POOL,
            "--type",
            "kubernetes",
            "--base-job-template",
            str(template_file),
            "--overwrite",
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        proc = cluster.prefect("deploy", "--all", "--prefect-file", "deployments/prefect.yaml")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        deployments = cluster.api(
            "POST",
            "/deployments/filter",
            {
                "flows": {"name": {"any_": ["claudecluster-worker"]}},
                "work_pools": {"name": {"any_": [POOL]}},
            },
        )
        if not deployments:
            pytest.fail(
                f"deployments/prefect.yaml has no claudecluster-worker deployment on {POOL}: "
                "add the `kubernetes` worker deployment on that pool"
            )

        # The manifests, as kustomize builds them, in the test's namespace.
        built = [d for d in yaml.safe_load_all(kubectl_ok("kustomize", str(K8S))) if d]
        objects = _for_this_test(built, namespace=namespace, node=node, api_url=info.api_url)
        (secret,) = [d for d in yaml.safe_load_all((K8S / "secret.example.yaml").read_text()) if d]
        secret["metadata"]["namespace"] = namespace
        secret["stringData"] = {"api-key": model_server.env()["ANTHROPIC_API_KEY"]}
        applied = True
        kubectl_ok("apply", "-f", "-", stdin=yaml.safe_dump_all([*objects, secret]))
        rollout = kubectl(
            "-n",
            namespace,
            "rollout",
            "status",
            f"deployment/{PREFECT_WORKER}",
            "--timeout=240s",
            timeout=260,
        )
        assert rollout.returncode == 0, rollout.stderr + cluster.worker_tail()

        def online() -> bool:
            workers = cluster.api("POST", f"/work_pools/{POOL}/workers/filter", {})
            return any(w.get("status") == "ONLINE" for w in workers)

        wait_for(online, 120, cluster.worker_tail)
        yield cluster
    finally:
        if applied:
            kubectl("delete", "namespace", namespace, "--wait=false", timeout=60)
        kill_pids(processes_with(f"CLAUDECLUSTER_HOME={home}"))
        stop_server(home)


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


class TestKubernetesPool:
    """A goal whose tasks run as Kubernetes Jobs built from infra/k8s/."""

    @pytest.mark.timeout(900)
    def test_goal_on_kubernetes(
        self,
        kube_cluster: KubeCluster,
        repo: Path,
        tmp_path: Path,
        model_server: ScriptedModelServer,
        marker: str,
    ) -> None:
        namespace = kube_cluster.namespace
        # RBAC: the worker's account may run Jobs; the tasks' account may do nothing.
        for account, expected in ((PREFECT_WORKER, "yes"), (TASK_SERVICE_ACCOUNT, "no")):
            proc = kubectl(
                "auth",
                "can-i",
                "create",
                "jobs.batch",
                "-n",
                namespace,
                f"--as=system:serviceaccount:{namespace}:{account}",
            )
            assert proc.stdout.strip() == expected, (account, proc.stdout, proc.stderr)

        edits = {
            "calc.py": ("def add(a, b):\n", 'def add(a, b):\n    """Add two numbers."""\n'),
            "strings.py": ("def shout(text):\n", 'def shout(text):\n    """Shout."""\n'),
        }
        for path, (old, new) in edits.items():
            model_server.add_script(edit_script(marker, path, old, new))
        plan = {
            "goal": "Docstrings, on Kubernetes",
            "verify": "python -m pytest -q",
            "tasks": [
                {
                    "id": path.replace(".py", ""),
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

        # The driver has no Anthropic key: the pods get theirs from the Secret only.
        proc = kube_cluster.cli(
            "run",
            "--plan",
            str(plan_file),
            "--repo",
            str(repo),
            "--pool",
            POOL,
            "--max-parallel",
            "2",
            "--json",
        )

        assert proc.returncode == 0, proc.stderr[-3000:] + kube_cluster.worker_tail(80)
        report = json.loads(proc.stdout)
        assert report["status"] == "succeeded"
        branch = report["integration_branch"]
        for path, (_, new) in edits.items():
            assert new in git(repo, "show", f"{branch}:{path}")
        assert report["final_verify"]["exit_code"] == 0
        assert snapshot(repo) == before

        # Every task was a worker flow run on a git URL, run by a Job built from the template.
        runs = kube_cluster.children(report["flow_run_id"])
        assert len(runs) == len(edits)
        jobs = json.loads(
            kubectl_ok("-n", namespace, "get", "jobs", "-l", FLOW_RUN_LABEL, "-o", "json")
        )["items"]
        by_run = {job["metadata"]["labels"][FLOW_RUN_LABEL]: job for job in jobs}
        for run in runs:
            assert run["state_type"] == "COMPLETED"
            assert run["parameters"]["unit"]["repo"].startswith("git://127.0.0.1:")
            job = by_run[run["id"]]
            assert job["status"].get("succeeded") == 1
            pod = job["spec"]["template"]["spec"]
            assert pod["serviceAccountName"] == TASK_SERVICE_ACCOUNT
            assert pod["securityContext"]["runAsUser"] == 1000
            assert pod["volumes"][0]["emptyDir"] is not None
            (container,) = pod["containers"]
            env = {entry["name"]: entry for entry in container["env"]}
            assert env["ANTHROPIC_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == API_KEY_SECRET
            assert env["PREFECT__FLOW_RUN_ID"]["value"] == run["id"]

        # The sessions sent an API key (its value is redacted in the records).
        ours = [r for r in model_server.requests if marker.encode() in r.body]
        assert ours
        assert all("x-api-key" in r.headers for r in ours)
