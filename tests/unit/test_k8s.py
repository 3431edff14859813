"""The Kubernetes runner files in infra/k8s/, checked without a cluster.

Every manifest is validated against the real Kubernetes OpenAPI schemas that
``kubernetes-validate`` ships in its wheel (offline), in strict mode (unknown fields are
errors). The work pool's base job template is rendered into the Job the Prefect Kubernetes
worker would submit for a task, through the worker's own code path
(``KubernetesWorkerJobConfiguration.resolve_for_flow_run``: ``from_template_and_values`` then
``prepare_for_flow_run``), and that Job is validated and inspected. Nothing here talks to a
cluster; ``tests/integration/test_k8s_cluster.py`` does, when KUBECONFIG points at one.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import kubernetes_validate
import pytest
import yaml
from prefect.client.schemas.objects import Flow, FlowRun, WorkPool
from prefect.client.schemas.responses import DeploymentResponse
from prefect.server.schemas.actions import validate_base_job_template
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.utilities.schema_tools import is_valid_schema
from prefect.utilities.schema_tools import validate as validate_schema
from prefect_kubernetes.worker import KubernetesWorker, KubernetesWorkerJobConfiguration

from claudecluster.setup import base_job_template, with_result_storage

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "infra" / "k8s"
TEMPLATE_PATH = K8S / "base-job-template.json"

# The newest Kubernetes whose schemas kubernetes-validate (>= 1.37) ships, and an older one
# still common on managed clusters: the manifests must be valid on both.
KUBERNETES_VERSION = "1.37.0"
KUBERNETES_VERSIONS = ("1.30.0", KUBERNETES_VERSION)

NAMESPACE = "claudecluster"
POOL = "claudecluster-kubernetes"
IMAGE = "claudecluster-worker:latest"
TASK_SERVICE_ACCOUNT = "claudecluster-worker"
PREFECT_WORKER = "claudecluster-prefect-worker"
API_KEY_SECRET = "claudecluster-anthropic"
API_KEY_SECRET_KEY = "api-key"
UID = 1000
IN_CLUSTER_API_URL = "http://prefect-server.prefect.svc.cluster.local:4200/api"
WORKER_ENTRYPOINT = "claudecluster.flows.worker:worker_flow"

# Kinds without a namespace.
CLUSTER_SCOPED = {"Namespace"}

# Fields the Prefect worker insists on (prefect_kubernetes.worker._get_base_job_manifest:
# a template without them is rejected) although they are Job fields, not Pod fields. The API
# server drops them with a warning; strict schema validation flags them. Nothing else may be
# unknown.
PREFECT_POD_SPEC_EXTRAS = {"completions": 1, "parallelism": 1}

# What prefect-kubernetes 0.8 does in the Kubernetes API, read from its sources:
# worker.py (create_namespaced_job, delete_namespaced_job on cancellation) and observer.py
# (kopf watches of jobs and pods, list/read of jobs and pods, read_namespaced_pod_log).
REQUIRED_PERMISSIONS = [
    ("batch", "jobs", "create"),
    ("batch", "jobs", "get"),
    ("batch", "jobs", "list"),
    ("batch", "jobs", "watch"),
    ("batch", "jobs", "delete"),
    ("", "pods", "get"),
    ("", "pods", "list"),
    ("", "pods", "watch"),
    ("", "pods/log", "get"),
    ("", "events", "create"),
    ("", "events", "list"),
]


# --------------------------------------------------------------------------- helpers


def validate(obj: dict[str, Any], version: str = KUBERNETES_VERSION, strict: bool = True) -> None:
    """Validate one Kubernetes object against the shipped schemas; raise on any error."""
    kubernetes_validate.validate(obj, version, strict=strict)


def manifest_files() -> list[Path]:
    """Every YAML file under infra/k8s/."""
    return sorted(K8S.glob("*.yaml"))


def documents(path: Path) -> list[dict[str, Any]]:
    """The non-empty YAML documents of a file."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def kubernetes_objects() -> list[tuple[str, dict[str, Any]]]:
    """(file name, object) for every Kubernetes object in infra/k8s/ (not the Kustomization)."""
    found = []
    for path in manifest_files():
        for doc in documents(path):
            if doc.get("kind") != "Kustomization":
                found.append((path.name, doc))
    return found


def objects_by_kind(kind: str) -> dict[str, dict[str, Any]]:
    """The objects of one kind, by name."""
    return {o["metadata"]["name"]: o for _, o in kubernetes_objects() if o["kind"] == kind}


def load_template() -> dict[str, Any]:
    """infra/k8s/base-job-template.json."""
    data: dict[str, Any] = json.loads(TEMPLATE_PATH.read_text())
    return data


def container_of(job: dict[str, Any]) -> dict[str, Any]:
    """The (only) container of a Job."""
    containers: list[dict[str, Any]] = job["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def env_of(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A Job container's env entries by name (names must be unique)."""
    entries: list[dict[str, Any]] = container_of(job)["env"]
    names = [entry["name"] for entry in entries]
    assert len(names) == len(set(names)), names
    return {entry["name"]: entry for entry in entries}


class _WorkerClient:
    """The two reads the worker makes while it builds a job: the flow and the deployment."""

    def __init__(self, flow: Flow, deployment: DeploymentResponse) -> None:
        self.flow = flow
        self.deployment = deployment

    async def read_flow(self, flow_id: uuid.UUID) -> Flow:
        assert flow_id == self.flow.id
        return self.flow

    async def read_deployment(self, deployment_id: uuid.UUID) -> DeploymentResponse:
        assert deployment_id == self.deployment.id
        return self.deployment

    async def read_variable_by_name(self, name: str) -> None:
        raise AssertionError(f"the template must not reference Prefect variables ({name})")


def render_job(
    template: dict[str, Any] | None = None,
    *,
    deployment_job_variables: dict[str, Any] | None = None,
    flow_run_job_variables: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], FlowRun]:
    """The Job manifest the Kubernetes worker submits for one task, and its flow run.

    Same call as ``BaseWorker._submit_run_and_capture_errors``: ``resolve_for_flow_run`` with
    the worker's client (here a stand-in that answers the flow and deployment reads), which
    merges the deployment's and flow run's job variables over the pool's template
    (``from_template_and_values``) and then calls ``prepare_for_flow_run``. The worker's
    PREFECT_API_URL is the in-cluster URL of the ConfigMap.
    """
    template = template or load_template()
    flow = Flow(id=uuid.uuid4(), name="claudecluster-worker", labels={})
    deployment = DeploymentResponse(
        id=uuid.uuid4(),
        name="kubernetes",
        flow_id=flow.id,
        entrypoint=WORKER_ENTRYPOINT,
        work_pool_name=POOL,
        job_variables=deployment_job_variables or {},
        pull_steps=[
            {
                "prefect.deployments.steps.set_working_directory": {
                    "directory": "/home/claudecluster"
                }
            }
        ],
        tags=["claudecluster", "kubernetes"],
        labels={},
    )
    flow_run = FlowRun(
        id=uuid.uuid4(),
        name="r20250101-abcd-calc-doc",
        flow_id=flow.id,
        deployment_id=deployment.id,
        work_pool_name=POOL,
        job_variables=flow_run_job_variables or {},
        parameters={"repo": "git://git.example.internal/app.git", "run_id": "r20250101-abcd"},
    )
    work_pool = WorkPool(
        name=POOL, type="kubernetes", base_job_template=template, default_queue_id=uuid.uuid4()
    )
    client = _WorkerClient(flow, deployment)

    async def resolve() -> KubernetesWorkerJobConfiguration:
        return await KubernetesWorkerJobConfiguration.resolve_for_flow_run(
            flow_run,
            client=cast(Any, client),
            work_pool=work_pool,
            worker_name="claudecluster-prefect-worker-abc12",
            worker_id=uuid.uuid4(),
        )

    with temporary_settings({PREFECT_API_URL: IN_CLUSTER_API_URL}):
        configuration = asyncio.run(resolve())
    return configuration.job_manifest, flow_run


def without_prefect_extras(job: dict[str, Any]) -> dict[str, Any]:
    """``job`` without the two Job fields Prefect requires inside the pod spec."""
    job = copy.deepcopy(job)
    pod_spec = job["spec"]["template"]["spec"]
    for key, value in PREFECT_POD_SPEC_EXTRAS.items():
        assert pod_spec.pop(key) == value
    return job


@pytest.fixture(scope="module")
def rendered() -> tuple[dict[str, Any], FlowRun]:
    """The Job for one task with the pool's defaults, and its flow run."""
    return render_job()


@pytest.fixture
def job(rendered: tuple[dict[str, Any], FlowRun]) -> dict[str, Any]:
    """A fresh copy of the default rendered Job, safe to modify."""
    return copy.deepcopy(rendered[0])


# --------------------------------------------------------------------------- manifests


class TestManifestSchemas:
    """Every manifest under infra/k8s/ is valid against the real Kubernetes schemas."""

    def test_the_files_are_there(self) -> None:
        names = {path.name for path in manifest_files()}
        assert names == {
            "namespace.yaml",
            "serviceaccounts.yaml",
            "rbac.yaml",
            "configmap.yaml",
            "worker-deployment.yaml",
            "secret.example.yaml",
            "kustomization.yaml",
        }
        kinds = sorted(obj["kind"] for _, obj in kubernetes_objects())
        assert kinds == [
            "ConfigMap",
            "Deployment",
            "Namespace",
            "Role",
            "RoleBinding",
            "Secret",
            "ServiceAccount",
            "ServiceAccount",
        ]

    @pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
    @pytest.mark.parametrize(
        "name_and_object",
        kubernetes_objects(),
        ids=[
            f"{name}:{obj['kind']}/{obj['metadata']['name']}" for name, obj in kubernetes_objects()
        ],
    )
    def test_object_validates_strictly(
        self, name_and_object: tuple[str, dict[str, Any]], version: str
    ) -> None:
        _, obj = name_and_object
        validate(obj, version)

    def test_every_object_is_in_the_namespace(self) -> None:
        for name, obj in kubernetes_objects():
            if obj["kind"] in CLUSTER_SCOPED:
                assert obj["metadata"]["name"] == NAMESPACE, name
            else:
                assert obj["metadata"].get("namespace") == NAMESPACE, name

    def test_the_namespace_enforces_restricted_pod_security(self) -> None:
        labels = objects_by_kind("Namespace")[NAMESPACE]["metadata"]["labels"]
        assert labels["pod-security.kubernetes.io/enforce"] == "restricted"

    def test_the_example_secret_holds_placeholders_only(self) -> None:
        (secret,) = documents(K8S / "secret.example.yaml")
        assert secret["metadata"]["name"] == API_KEY_SECRET
        assert "data" not in secret  # base64 would hide what is in it
        assert secret["stringData"] == {API_KEY_SECRET_KEY: "REPLACE-ME"}


class TestKustomization:
    """kustomization.yaml ties the manifests together (and leaves the example secret out)."""

    def kustomization(self) -> dict[str, Any]:
        (doc,) = documents(K8S / "kustomization.yaml")
        return doc

    def test_lists_every_manifest_but_the_example_secret(self) -> None:
        doc = self.kustomization()
        assert doc["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
        assert doc["kind"] == "Kustomization"
        assert set(doc) == {"apiVersion", "kind", "namespace", "resources"}
        assert doc["namespace"] == NAMESPACE
        expected = {
            path.name
            for path in manifest_files()
            if path.name not in {"kustomization.yaml", "secret.example.yaml"}
        }
        assert len(doc["resources"]) == len(set(doc["resources"]))
        assert set(doc["resources"]) == expected

    def test_kustomize_build_gives_the_same_valid_objects(self) -> None:
        if shutil.which("kubectl") is None:
            pytest.skip("kubectl is not installed: `kubectl kustomize` renders the kustomization")
        proc = subprocess.run(
            ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, proc.stderr
        built = [doc for doc in yaml.safe_load_all(proc.stdout) if doc]
        for obj in built:
            validate(obj)
        expected = {
            (obj["kind"], obj["metadata"]["name"])
            for name, obj in kubernetes_objects()
            if name != "secret.example.yaml"
        }
        assert {(o["kind"], o["metadata"]["name"]) for o in built} == expected
        assert all(
            o["metadata"].get("namespace") == NAMESPACE
            for o in built
            if o["kind"] not in CLUSTER_SCOPED
        )


class TestRbac:
    """The worker's Role grants what prefect-kubernetes calls, bound to the worker's account."""

    def grants(self) -> set[tuple[str, str, str]]:
        role = objects_by_kind("Role")[PREFECT_WORKER]
        return {
            (group, resource, verb)
            for rule in role["rules"]
            for group in rule["apiGroups"]
            for resource in rule["resources"]
            for verb in rule["verbs"]
        }

    @pytest.mark.parametrize("permission", REQUIRED_PERMISSIONS, ids=lambda p: "/".join(p))
    def test_role_grants(self, permission: tuple[str, str, str]) -> None:
        assert permission in self.grants()

    def test_role_grants_no_wildcards_and_no_secrets(self) -> None:
        grants = self.grants()
        assert not any("*" in grant for grant in grants)
        assert not any(resource == "secrets" for _, resource, _ in grants)

    def test_binding_ties_the_role_to_the_worker_account(self) -> None:
        binding = objects_by_kind("RoleBinding")[PREFECT_WORKER]
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": PREFECT_WORKER,
        }
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": PREFECT_WORKER, "namespace": NAMESPACE}
        ]
        assert PREFECT_WORKER in objects_by_kind("ServiceAccount")

    def test_task_pods_get_an_account_with_no_access(self) -> None:
        account = objects_by_kind("ServiceAccount")[TASK_SERVICE_ACCOUNT]
        assert account["automountServiceAccountToken"] is False
        bound = [
            subject["name"]
            for binding in objects_by_kind("RoleBinding").values()
            for subject in binding["subjects"]
        ]
        assert TASK_SERVICE_ACCOUNT not in bound


class TestWorkerDeployment:
    """The Prefect worker Deployment polls the pool, as the official Helm chart runs it."""

    def pod_spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = objects_by_kind("Deployment")[PREFECT_WORKER]["spec"]["template"][
            "spec"
        ]
        return spec

    def container(self) -> dict[str, Any]:
        (container,) = self.pod_spec()["containers"]
        return cast(dict[str, Any], container)

    def test_runs_a_kubernetes_worker_for_the_pool(self) -> None:
        command = self.container()["command"]
        assert command[:3] == ["prefect", "worker", "start"]
        assert command[command.index("--pool") + 1] == POOL
        assert command[command.index("--type") + 1] == "kubernetes"
        assert "--no-create-pool-if-not-found" in command
        assert command[command.index("--install-policy") + 1] == "never"

    def test_same_image_and_account_as_the_manifests(self) -> None:
        assert (
            self.container()["image"]
            == load_template()["variables"]["properties"]["image"]["default"]
        )
        assert self.pod_spec()["serviceAccountName"] == PREFECT_WORKER

    def test_gets_the_api_url_from_the_configmap(self) -> None:
        (source,) = self.container()["envFrom"]
        configmap = objects_by_kind("ConfigMap")[source["configMapRef"]["name"]]
        assert configmap["data"]["PREFECT_API_URL"].endswith("/api")

    def test_observer_watches_only_its_namespace(self) -> None:
        env = {entry["name"]: entry for entry in self.container()["env"]}
        observer = env["PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_NAMESPACES"]
        assert observer["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}

    def test_liveness_probe_hits_the_worker_healthcheck(self) -> None:
        container = self.container()
        assert "--with-healthcheck" in container["command"]
        probe = container["livenessProbe"]["httpGet"]
        (port,) = [p for p in container["ports"] if p["name"] == probe["port"]]
        assert (probe["path"], port["containerPort"]) == ("/health", 8080)

    def test_runs_non_root_read_only(self) -> None:
        pod, container = self.pod_spec(), self.container()
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == UID
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert {"/home/claudecluster", "/tmp"} <= mounts

    def test_uid_matches_the_image_user(self) -> None:
        dockerfile = (ROOT / "infra" / "docker" / "Dockerfile").read_text()
        match = re.search(r"^ARG USER_UID=(\d+)$", dockerfile, re.MULTILINE)
        assert match is not None
        assert int(match.group(1)) == UID


# --------------------------------------------------------------------------- the template


class TestBaseJobTemplate:
    """base-job-template.json is prefect-kubernetes' default plus ClaudeCluster's settings."""

    def test_keeps_every_default_variable_and_field(self) -> None:
        ours = load_template()
        default = KubernetesWorker.get_default_base_job_template()
        assert set(default["job_configuration"]) == set(ours["job_configuration"])
        for key, value in default["job_configuration"].items():
            if key != "job_manifest":
                assert ours["job_configuration"][key] == value, key
        for name, schema in default["variables"]["properties"].items():
            mine = dict(ours["variables"]["properties"][name])
            mine.pop("default", None)
            theirs = {k: v for k, v in schema.items() if k != "default"}
            assert mine == theirs, name
        assert ours["variables"]["definitions"] == default["variables"]["definitions"]

    def test_the_server_accepts_it(self) -> None:
        template = load_template()
        validate_base_job_template(template)  # what the API checks when the pool is created
        variables = template["variables"]
        is_valid_schema(variables, preprocess=False)
        defaults = {
            name: schema["default"]
            for name, schema in variables["properties"].items()
            if schema.get("default") is not None
        }
        validate_schema(defaults, variables, raise_on_error=True, ignore_required=True)

    def test_defaults(self) -> None:
        properties = load_template()["variables"]["properties"]
        defaults = {name: schema.get("default") for name, schema in properties.items()}
        assert defaults["image"] == IMAGE
        assert defaults["image_pull_policy"] == "IfNotPresent"
        assert defaults["namespace"] == NAMESPACE
        assert defaults["service_account_name"] == TASK_SERVICE_ACCOUNT
        assert defaults["backoff_limit"] == 0
        assert defaults["finished_job_ttl"] == 3600
        assert (defaults["cpu_request"], defaults["memory_request"]) == ("500m", "1Gi")
        assert (defaults["cpu_limit"], defaults["memory_limit"]) == ("2", "4Gi")
        assert defaults["env"]["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"] == "1"
        assert defaults["env"]["PYTHONUNBUFFERED"] == "1"
        assert defaults["anthropic_api_key_secret"] == API_KEY_SECRET
        assert defaults["anthropic_api_key_secret_key"] == API_KEY_SECRET_KEY

    def test_secret_and_accounts_match_the_manifests(self) -> None:
        properties = load_template()["variables"]["properties"]
        (secret,) = documents(K8S / "secret.example.yaml")
        assert properties["anthropic_api_key_secret"]["default"] == secret["metadata"]["name"]
        assert properties["anthropic_api_key_secret_key"]["default"] in secret["stringData"]
        assert properties["service_account_name"]["default"] in objects_by_kind("ServiceAccount")
        assert properties["namespace"]["default"] in objects_by_kind("Namespace")

    def test_ships_with_the_package(self) -> None:
        # `claudecluster setup` reads templates through importlib.resources.
        assert base_job_template("k8s/base-job-template.json") == load_template()


class TestRenderedJob:
    """The Job the worker submits for a task: valid, and carrying everything a task needs."""

    @pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
    def test_validates(self, job: dict[str, Any], version: str) -> None:
        validate(job, version, strict=False)
        validate(without_prefect_extras(job), version, strict=True)

    def test_strict_validation_flags_only_prefects_pod_spec_extras(
        self, job: dict[str, Any]
    ) -> None:
        with pytest.raises(kubernetes_validate.ValidationError) as caught:
            validate(job)
        assert list(caught.value.path) == ["spec", "template", "spec"]
        assert sorted(re.findall(r"'(\w+)'", caught.value.message)) == sorted(
            PREFECT_POD_SPEC_EXTRAS
        )

    def test_job(self, job: dict[str, Any], rendered: tuple[dict[str, Any], FlowRun]) -> None:
        flow_run = rendered[1]
        assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
        assert job["metadata"]["namespace"] == NAMESPACE
        assert job["metadata"]["generateName"] == f"{flow_run.name}-"
        assert job["metadata"]["labels"]["prefect.io/flow-run-id"] == str(flow_run.id)
        pod_labels = job["spec"]["template"]["metadata"]["labels"]
        assert pod_labels["prefect.io/flow-run-id"] == str(flow_run.id)
        assert job["spec"]["backoffLimit"] == 0
        assert job["spec"]["ttlSecondsAfterFinished"] == 3600

    def test_pod(self, job: dict[str, Any]) -> None:
        pod = job["spec"]["template"]["spec"]
        assert pod["restartPolicy"] == "Never"
        assert pod["serviceAccountName"] == TASK_SERVICE_ACCOUNT
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == UID
        assert pod["securityContext"]["fsGroup"] == UID
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["volumes"] == [{"name": "workspace", "emptyDir": {"sizeLimit": "10Gi"}}]

    def test_container(self, job: dict[str, Any]) -> None:
        container = container_of(job)
        assert container["image"] == IMAGE
        assert container["imagePullPolicy"] == "IfNotPresent"
        assert container["resources"] == {
            "requests": {"cpu": "500m", "memory": "1Gi"},
            "limits": {"cpu": "2", "memory": "4Gi"},
        }
        assert container["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "runAsNonRoot": True,
            "runAsUser": UID,
            "runAsGroup": UID,
        }
        assert container["volumeMounts"] == [{"name": "workspace", "mountPath": "/workspace"}]

    def test_command_and_prefect_env(
        self, job: dict[str, Any], rendered: tuple[dict[str, Any], FlowRun]
    ) -> None:
        flow_run = rendered[1]
        assert container_of(job)["args"] == ["prefect", "flow-run", "execute"]
        env = env_of(job)
        assert env["PREFECT__FLOW_RUN_ID"]["value"] == str(flow_run.id)
        assert env["PREFECT_API_URL"]["value"] == IN_CLUSTER_API_URL
        assert env["PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR"]["value"] == "reschedule"

    def test_session_env(self, job: dict[str, Any]) -> None:
        env = env_of(job)
        assert env["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"]["value"] == "1"
        assert env["PYTHONUNBUFFERED"]["value"] == "1"
        assert env["IS_SANDBOX"]["value"] == "1"  # the pod is the sandbox (permissions.py)
        # Clones and worktrees go to the emptyDir.
        assert env["CLAUDECLUSTER_HOME"]["value"].startswith("/workspace/")

    def test_api_key_comes_from_the_secret(self, job: dict[str, Any]) -> None:
        entry = env_of(job)["ANTHROPIC_API_KEY"]
        assert entry == {
            "name": "ANTHROPIC_API_KEY",
            "valueFrom": {
                "secretKeyRef": {
                    "name": API_KEY_SECRET,
                    "key": API_KEY_SECRET_KEY,
                    "optional": True,
                }
            },
        }
        values = [e for e in container_of(job)["env"] if "value" in e and "valueFrom" in e]
        assert values == []

    def test_job_variables_override_the_defaults(self) -> None:
        volumes = [{"name": "cache", "persistentVolumeClaim": {"claimName": "claudecluster-cache"}}]
        mounts = [{"name": "cache", "mountPath": "/workspace"}]
        job, _ = render_job(
            deployment_job_variables={
                "cpu_limit": "4",
                "memory_limit": "8Gi",
                "image": "registry.example.com/claudecluster-worker:0.1.0",
                "volumes": volumes,
                "volume_mounts": mounts,
                "anthropic_api_key_secret": "team-a-anthropic",
            },
            flow_run_job_variables={"env": {"ANTHROPIC_MODEL": "claude-sonnet-4-5"}},
        )
        validate(without_prefect_extras(job))
        container = container_of(job)
        assert container["image"] == "registry.example.com/claudecluster-worker:0.1.0"
        assert container["resources"]["limits"] == {"cpu": "4", "memory": "8Gi"}
        assert container["resources"]["requests"] == {"cpu": "500m", "memory": "1Gi"}
        assert job["spec"]["template"]["spec"]["volumes"] == volumes
        assert container["volumeMounts"] == mounts
        env = env_of(job)
        assert env["ANTHROPIC_MODEL"]["value"] == "claude-sonnet-4-5"
        assert env["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"]["value"] == "1"  # merged, kept
        assert env["ANTHROPIC_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "team-a-anthropic"

    def test_a_key_in_env_replaces_the_secret_reference(self) -> None:
        job, _ = render_job(deployment_job_variables={"env": {"ANTHROPIC_API_KEY": "sk-from-env"}})
        assert env_of(job)["ANTHROPIC_API_KEY"] == {
            "name": "ANTHROPIC_API_KEY",
            "value": "sk-from-env",
        }

    def test_result_storage_reaches_the_job(self) -> None:
        # `claudecluster setup --result-storage SLUG` on this template.
        template = with_result_storage(load_template(), "s3-bucket/claudecluster-results")
        job, _ = render_job(template)
        env = env_of(job)
        assert env["PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"]["value"] == (
            "s3-bucket/claudecluster-results"
        )
        assert env["PYTHONUNBUFFERED"]["value"] == "1"


# --------------------------------------------------------------------------- negative controls


def _container(obj: dict[str, Any]) -> dict[str, Any]:
    spec = obj["spec"]["template"]["spec"]
    return cast(dict[str, Any], spec["containers"][0])


def _cpu_limit_list(obj: dict[str, Any]) -> None:
    _container(obj)["resources"]["limits"]["cpu"] = [1]


def _no_container_name(obj: dict[str, Any]) -> None:
    del _container(obj)["name"]


def _misspelt_field(obj: dict[str, Any]) -> None:
    _container(obj)["imagePulPolicy"] = _container(obj).pop("imagePullPolicy")


def _env_from_nowhere(obj: dict[str, Any]) -> None:
    _container(obj)["env"].append({"name": "BROKEN", "valueFrom": {"secretKeyRef": "x"}})


BREAKAGES: dict[str, tuple[Callable[[dict[str, Any]], None], list[Any]]] = {
    "limits-cpu-is-a-list": (_cpu_limit_list, ["resources", "limits", "cpu"]),
    "container-without-name": (_no_container_name, []),
    "misspelt-field": (_misspelt_field, []),
    "secretKeyRef-not-an-object": (_env_from_nowhere, ["valueFrom", "secretKeyRef"]),
}


def _sources() -> Iterator[tuple[str, Callable[[], dict[str, Any]]]]:
    yield "rendered-job", lambda: without_prefect_extras(render_job()[0])
    yield "worker-deployment", lambda: copy.deepcopy(objects_by_kind("Deployment")[PREFECT_WORKER])


class TestValidationCanFail:
    """Deliberately broken copies of the Job and the Deployment fail validation."""

    @pytest.mark.parametrize("breakage", sorted(BREAKAGES))
    @pytest.mark.parametrize("source", [name for name, _ in _sources()])
    def test_broken_copy_is_rejected(self, source: str, breakage: str) -> None:
        make = dict(_sources())[source]
        obj = make()
        validate(obj)  # the intact copy passes
        breaker, tail = BREAKAGES[breakage]
        breaker(obj)
        with pytest.raises(kubernetes_validate.ValidationError) as caught:
            validate(obj)
        path = list(caught.value.path)
        assert path[:5] == ["spec", "template", "spec", "containers", 0]
        if tail:
            assert path[-len(tail) :] == tail
