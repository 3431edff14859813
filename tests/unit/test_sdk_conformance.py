"""The shared conformance fixtures (``sdk/conformance``), checked by the pydantic models.

The TypeScript SDK's tests check the same files against the JSON Schema its types are
generated from, so a model change that the fixtures or the TypeScript types do not follow
fails on one side or the other.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from claudecluster.models import ProgressEvent, RunReport, WorkerSettings
from claudecluster.plan import Plan

FIXTURES = Path(__file__).resolve().parents[2] / "sdk" / "conformance"
MODELS: dict[str, type[BaseModel]] = {
    "plan": Plan,
    "settings": WorkerSettings,
    "report": RunReport,
    "progress": ProgressEvent,
}
# What a run writes: every field is present, as the generated TypeScript types require.
WRITTEN = {"report", "progress"}


def fixtures(kind: str) -> list[Path]:
    return sorted((FIXTURES / kind).glob("*.json"))


def model_of(path: Path) -> type[BaseModel]:
    return MODELS[path.name.split("-", 1)[0]]


@pytest.mark.parametrize("path", fixtures("valid"), ids=lambda p: p.name)
def test_a_valid_fixture_is_accepted(path: Path) -> None:
    data = json.loads(path.read_text())
    model = model_of(path).model_validate(data)
    if path.name.split("-", 1)[0] in WRITTEN:
        assert model.model_dump(mode="json") == data


@pytest.mark.parametrize("path", fixtures("invalid"), ids=lambda p: p.name)
def test_an_invalid_fixture_is_refused(path: Path) -> None:
    with pytest.raises(ValidationError):
        model_of(path).model_validate(json.loads(path.read_text()))


def test_every_model_has_both_kinds_of_fixture() -> None:
    for kind in ("valid", "invalid"):
        assert {p.name.split("-", 1)[0] for p in fixtures(kind)} == set(MODELS), kind
