"""The team Prefect server's values for the ``prefect-server`` Helm chart, checked without Helm.

``infra/k8s/team-server/values.yaml`` is validated against the chart's own
``values.schema.json`` (vendored next to it, unchanged), which is what ``helm install`` checks
before rendering; then the facts the setup depends on are asserted on the values, read the way
the chart's templates read them. The ``wait-for-migrations`` init container's script is run
against a SQLite database, before and after ``prefect server database upgrade``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any, cast

import jsonschema  # type: ignore[import-untyped]
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
TEAM_SERVER = ROOT / "infra" / "k8s" / "team-server"
VALUES_PATH = TEAM_SERVER / "values.yaml"
SCHEMA_PATH = TEAM_SERVER / "values.schema.json"
README_PATH = TEAM_SERVER / "README.md"

REDIS_BROKER = "prefect_redis.messaging"
DB_SECRET, DB_SECRET_KEY = "prefect-db", "connection-string"
REDIS_SECRET = "prefect-redis"
INIT_CONTAINER = "wait-for-migrations"
# The chart renders extraInitContainers with `tpl`: these resolve to the chart's own image and
# the same database Secret as the server's PREFECT_SERVER_DATABASE_CONNECTION_URL.
CHART_IMAGE = (
    "{{ .Values.global.prefect.image.repository }}:{{ .Values.global.prefect.image.prefectTag }}"
)
DB_SECRET_REF = {
    "name": "{{ .Values.externalDatabase.existingSecret }}",
    "key": "{{ .Values.externalDatabase.connectionStringSecretKey }}",
}


def load_values() -> dict[str, Any]:
    return cast(dict[str, Any], yaml.safe_load(VALUES_PATH.read_text(encoding="utf-8")))


def load_schema() -> dict[str, Any]:
    return cast(dict[str, Any], json.loads(SCHEMA_PATH.read_text(encoding="utf-8")))


def schema_errors(values: dict[str, Any]) -> list[str]:
    """Every violation of the chart's schema, as `path: message`."""
    validator = jsonschema.Draft7Validator(load_schema())
    return [
        f"{'.'.join(str(p) for p in error.absolute_path) or '<root>'}: {error.message}"
        for error in validator.iter_errors(values)
    ]


def env_value(env: list[dict[str, Any]], name: str) -> Any:
    (entry,) = [e for e in env if e.get("name") == name]
    return entry.get("value")


@pytest.fixture
def values() -> dict[str, Any]:
    return load_values()


class TestSchema:
    def test_the_schema_is_a_valid_json_schema(self) -> None:
        jsonschema.Draft7Validator.check_schema(load_schema())

    def test_the_schema_is_the_vendored_copy_the_readme_names(self) -> None:
        digest = hashlib.sha256(SCHEMA_PATH.read_bytes()).hexdigest()
        assert digest in README_PATH.read_text(encoding="utf-8")

    def test_the_values_satisfy_the_charts_schema(self, values: dict[str, Any]) -> None:
        assert schema_errors(values) == []

    @pytest.mark.parametrize(
        ("path", "broken"),
        [
            (("server", "replicaCount"), "2"),
            (("backgroundServices", "runAsSeparateDeployment"), "true"),
            (("migrations", "enabled"), "yes"),
            (("backgroundServices", "messaging", "redis", "port"), [6379]),
            (("backgroundServices", "replicaCount"), 0),
        ],
        ids=["replicas-string", "flag-string", "enabled-word", "port-list", "no-services"],
    )
    def test_a_broken_copy_fails(
        self, values: dict[str, Any], path: tuple[str, ...], broken: object
    ) -> None:
        values = copy.deepcopy(values)
        parent = values
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1]] = broken
        errors = schema_errors(values)
        assert any(e.startswith(".".join(path) + ":") for e in errors), errors
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(values, load_schema(), cls=jsonschema.Draft7Validator)

    def test_an_unknown_key_fails(self, values: dict[str, Any]) -> None:
        # A typo under a closed object is an error, not a silently ignored value.
        values = copy.deepcopy(values)
        values["backgroundServices"]["messaging"]["redis"]["hostname"] = "redis"
        assert schema_errors(values), "a misspelt key passed the schema"


class TestTeamServer:
    def test_the_image_is_prefect_3_9_1_on_python_3_11(self, values: dict[str, Any]) -> None:
        image = values["global"]["prefect"]["image"]
        assert image["repository"] == "prefecthq/prefect"
        assert image["prefectTag"] == "3.9.1-python3.11"
        # The chart's own check (_validation.tpl) with separate background services.
        assert re.match(r"^[0-9]+\.[0-9]+\.[0-9]+", image["prefectTag"])
        # The server's minor version is the one the project's clients run.
        assert image["prefectTag"].split(".")[:2] == version("prefect").split(".")[:2]

    def test_at_least_two_api_replicas(self, values: dict[str, Any]) -> None:
        server = values["server"]
        assert server["replicaCount"] >= 2
        autoscaling = server.get("autoscaling", {})
        assert not autoscaling.get("enabled") or autoscaling["minReplicas"] >= 2

    def test_background_services_run_as_their_own_deployment(self, values: dict[str, Any]) -> None:
        services = values["backgroundServices"]
        assert services["runAsSeparateDeployment"] is True
        assert services["replicaCount"] == 1
        # The chart adds --no-services to the server's default args only: no custom ones.
        assert not values["server"].get("args")
        assert not values["server"].get("command")

    def test_redis_is_the_messaging_broker_and_docket(self, values: dict[str, Any]) -> None:
        messaging = values["backgroundServices"]["messaging"]
        assert messaging["broker"] == REDIS_BROKER
        assert messaging["cache"] == REDIS_BROKER
        redis = messaging["redis"]
        # The chart refuses separate services without a Redis host or its bundled Redis.
        assert redis["host"] or values["redis"]["enabled"]
        assert redis["existingSecret"] == REDIS_SECRET
        assert not redis.get("password"), "the Redis password belongs in a Secret"
        docket = messaging["docket"]
        assert docket["existingSecret"] == REDIS_SECRET
        assert docket["existingSecretKey"]
        assert not docket.get("url"), "the Docket URL holds the password: Secret only"

    def test_analytics_are_off_everywhere(self, values: dict[str, Any]) -> None:
        name = "PREFECT_SERVER_ANALYTICS_ENABLED"
        assert env_value(values["global"]["prefect"]["env"], name) == "false"
        for section in ("server", "backgroundServices", "migrations"):
            overrides = [e for e in values.get(section, {}).get("env", []) if e["name"] == name]
            assert overrides == [], f"{section}.env overrides {name}"

    def test_every_server_gets_the_settings_the_team_servers_get(
        self, values: dict[str, Any]
    ) -> None:
        from claudecluster.prefect_server import LOG_STREAM_ENV, SERVER_SETTINGS_ENV

        # What `server start --team` gives its processes, log streaming included.
        every = {**SERVER_SETTINGS_ENV, **LOG_STREAM_ENV}
        wanted = {k: v for k, v in every.items() if k.startswith("PREFECT_SERVER_")}
        given = {e["name"]: e.get("value") for e in values["global"]["prefect"]["env"]}
        assert {k: given.get(k) for k in wanted} == wanted

    def test_postgresql_from_a_secret_not_sqlite(self, values: dict[str, Any]) -> None:
        assert values["sqlite"]["enabled"] is False
        assert values["postgresql"]["enabled"] is False
        database = values["externalDatabase"]
        assert database["existingSecret"] == DB_SECRET
        assert database["connectionStringSecretKey"] == DB_SECRET_KEY
        assert not database.get("connectionString"), "the connection URL belongs in a Secret"
        assert not database.get("password")
        assert values["secret"]["create"] is False
        assert not values["secret"].get("password")

    def test_migrations_run_before_the_pods_start(self, values: dict[str, Any]) -> None:
        assert values["migrations"]["enabled"] is True
        server_init = values["server"]["extraInitContainers"]
        assert values["backgroundServices"]["extraInitContainers"] == server_init
        (init,) = [c for c in server_init if c["name"] == INIT_CONTAINER]
        assert init["image"] == CHART_IMAGE
        (url,) = [e for e in init["env"] if e["name"] == "PREFECT_SERVER_DATABASE_CONNECTION_URL"]
        assert url["valueFrom"]["secretKeyRef"] == DB_SECRET_REF
        # It only waits: the migration Job is the one writer of the schema.
        script = init["args"][-1]
        assert "alembic_version" in script
        assert "upgrade" not in script


def init_script() -> str:
    (init,) = [
        c for c in load_values()["server"]["extraInitContainers"] if c["name"] == INIT_CONTAINER
    ]
    return cast(str, init["args"][-1])


@pytest.mark.slow
def test_the_init_container_waits_for_the_schema(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{tmp_path / 'p.db'}"
    wait = [sys.executable, "-c", init_script()]

    with pytest.raises(subprocess.TimeoutExpired) as waiting:
        subprocess.run(wait, env=env, capture_output=True, text=True, timeout=12)
    # Partial output: bytes or text, depending on where the timeout struck.
    raw = cast("bytes | str | None", waiting.value.stdout)
    output = raw.decode() if isinstance(raw, bytes) else raw or ""
    assert "waiting for" in output or "no schema yet" in output, output

    prefect_cli = Path(sys.executable).with_name("prefect")
    subprocess.run(
        [str(prefect_cli), "server", "database", "upgrade", "-y"],
        env=env,
        check=True,
        capture_output=True,
        timeout=240,
    )
    done = subprocess.run(wait, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert ": ready" in done.stdout
