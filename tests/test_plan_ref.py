"""The plan handle: a PlanRef names a plan and how to open it; a process reads a plan once."""

from __future__ import annotations

from pathlib import Path

import pytest

import orchestrator.plan_ref
from orchestrator.errors import OutputError, PlanError
from orchestrator.pipeline import prepare_output
from orchestrator.plan import build_plan
from orchestrator.plan_ref import PlanRef, open_plan, remember
from orchestrator.recipe import parse_recipe
from orchestrator.storage.base import StorageOptions
from tests.helpers import gta_recipe


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The plan files read from storage while the test runs."""
    read, seen = orchestrator.plan_ref.read_plan, []

    def counted(ref: PlanRef):
        seen.append(ref.uri)
        return read(ref)

    monkeypatch.setattr(orchestrator.plan_ref, "read_plan", counted)
    return seen


def test_a_plan_is_read_once_per_process_and_checked_against_its_id(family, tmp_path: Path, reads: list[str]) -> None:
    base, experts = family
    plan = build_plan(parse_recipe(gta_recipe("ties", base, experts)), str(tmp_path / "out"), shards=2)
    prepare_output(plan)
    ref = PlanRef.of(plan)
    assert ref.uri == f"{tmp_path / 'out'}/.mergefleet/plan.json" and ref.plan_id == plan.plan_id
    assert open_plan(ref) == plan and open_plan(ref) == plan
    assert reads == [ref.uri]  # the second open came from memory
    assert PlanRef.locate(str(tmp_path / "out")) == PlanRef(uri=ref.uri)  # what a person types: no id, any plan there
    assert PlanRef.locate(ref.uri) == PlanRef(uri=ref.uri)
    with pytest.raises(PlanError, match=f"holds plan {plan.plan_id}, not 0123456789abcdef: another merge replaced it"):
        open_plan(ref.model_copy(update={"plan_id": "0123456789abcdef"}))
    with pytest.raises(OutputError, match=r"no plan at .*/nowhere/\.mergefleet/plan\.json; create one with 'mergefleet plan"):
        open_plan(PlanRef.locate(str(tmp_path / "nowhere")))


def test_the_process_that_built_a_plan_never_reads_it(family, tmp_path: Path, reads: list[str]) -> None:
    base, experts = family
    plan = build_plan(parse_recipe(gta_recipe("ties", base, experts)), str(tmp_path / "out"), shards=2)
    assert open_plan(remember(plan)) is plan and reads == []


def test_a_plan_ref_carries_storage_settings_never_credentials() -> None:
    ref = PlanRef(uri="s3://merges/x/.mergefleet/plan.json", storage=StorageOptions(endpoint_url="http://127.0.0.1:9000"))
    assert PlanRef.model_validate_json(ref.model_dump_json()) == ref  # a Prefect parameter, as JSON
    with pytest.raises(ValueError, match="looks like a credential"):
        PlanRef.model_validate({"uri": ref.uri, "storage": {"aws_secret_access_key": "x"}})
