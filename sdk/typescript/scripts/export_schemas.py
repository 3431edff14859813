"""Write the schemas the TypeScript SDK's types are generated from (``npm run generate``).

- ``claudecluster``: the JSON Schema of ClaudeCluster's own data, from the pydantic models
  (plans and settings as they are read, reports as they are written) and the goal flow's
  parameters (as Prefect derives them for the deployment's form), plus the names the two
  SDKs share (the report artifact's type, the progress events' prefix, the run tag).
- ``prefect``: the Prefect server's OpenAPI schema, from ``create_api_app().openapi()``.

Usage: python export_schemas.py OUT_DIR
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from pydantic.json_schema import models_json_schema

DEFS = "#/$defs/"


def claudecluster_schema() -> dict[str, Any]:
    from prefect.utilities.callables import parameter_schema

    from claudecluster.flows.goal import goal_flow
    from claudecluster.models import ProgressEvent, RunReport, WorkerSettings
    from claudecluster.naming import REPORT_ARTIFACT_TYPE, RUN_TAG_PREFIX
    from claudecluster.plan import Plan
    from claudecluster.progress import EVENT_PREFIX

    _, top = models_json_schema(
        [
            (Plan, "validation"),
            (WorkerSettings, "validation"),
            (RunReport, "serialization"),
            (ProgressEvent, "serialization"),
        ],
        ref_template=DEFS + "{model}",
    )
    defs: dict[str, Any] = top["$defs"]
    # The goal flow's parameters, as the deployment's form shows them. Prefect writes its own
    # copies of the models they use, under "definitions"; ours above are the same models.
    parameters = parameter_schema(goal_flow).model_dump(mode="json", by_alias=True)
    for name, definition in parameters.pop("definitions", {}).items():
        defs.setdefault(name, definition)
    parameters["title"] = "GoalParameters"
    parameters["description"] = "The parameters of the goal flow (the goal deployment's form)."
    defs["GoalParameters"] = parameters
    text = re.sub(r'"#/definitions/', f'"{DEFS}', json.dumps(defs, sort_keys=True))
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://claudecluster.dev/schema/claudecluster.json",
        "title": "ClaudeCluster",
        "$defs": json.loads(text),
        "x-claudecluster-constants": {
            "REPORT_ARTIFACT_TYPE": REPORT_ARTIFACT_TYPE,
            "PROGRESS_EVENT_PREFIX": EVENT_PREFIX,
            "RUN_TAG_PREFIX": RUN_TAG_PREFIX,
            "GOAL_FLOW": goal_flow.name,
        },
    }


def prefect_openapi() -> dict[str, Any]:
    from prefect.server.api.server import create_api_app

    schema: dict[str, Any] = create_api_app().openapi()
    return schema


def main(out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    schemas = {"claudecluster": claudecluster_schema(), "prefect": prefect_openapi()}
    for name, schema in schemas.items():
        text = json.dumps(schema, indent=2, sort_keys=True)
        (out / f"{name}.schema.json").write_text(text + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
