"""Lineage in a real MLflow server (sqlite backend, local artifacts) on 127.0.0.1: one run
per merge, read back through the MLflow client; `mergefleet compare` (and `--log`); the
sweep flow; the merge_and_eval flow as the Prefect UI shows it (names, tags, the task
graph, artifacts, read back from the Prefect API) and as the MLflow UI shows it (the run's
span, shard runs' times, the logged model and its registry link, the description)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml

from mergefleet import cli
from orchestrator.errors import EvaluationError
from orchestrator.evaluate.scores import evaluate_inputs, evaluate_merge
from orchestrator.pipeline import merge
from orchestrator.plan_ref import open_plan
from orchestrator.receipt import Receipt, ShardOutcome
from orchestrator.recipe import parse_recipe
from orchestrator.tracking.record import track_merge
from orchestrator.tracking.store import default_tracking_uri

pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def tracked(skill_models, eval_cache, mlflow_server, tmp_path_factory) -> dict:
    """Two merges of the skill experts (ties, task_arithmetic), evaluated and recorded."""
    out = tmp_path_factory.mktemp("tracked")
    result = {}
    for method in ("ties", "task_arithmetic"):
        data = skill_models.recipe(method, output=out / method, shards=2, experiment="skills", register_model="skills-merge")
        data["fleet"]["eval"]["cache_dir"] = str(eval_cache)
        data["name"] = f"skills-{method}"
        recipe = parse_recipe(data)
        summary = merge(recipe, str(out / method))
        plan = open_plan(summary.plan_ref)
        evaluation = evaluate_merge(plan, recipe.fleet.eval)
        receipts = [Receipt.model_validate_json((out / method / f".mergefleet/shard-{i}.json").read_text()) for i in range(2)]
        outcomes = [ShardOutcome(receipt=receipt, skipped=False) for receipt in receipts]
        run = track_merge(plan, summary.manifest, outcomes, evaluation, tracking_uri=mlflow_server["uri"], merge_seconds=summary.seconds)
        result[method] = {"plan": plan, "evaluation": evaluation, "run": run, "summary": summary}
    return result


def test_a_merge_is_one_mlflow_run_with_its_lineage(tracked, skill_models, mlflow_server, tmp_path: Path) -> None:
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModelStatus

    client = MlflowClient(mlflow_server["uri"])
    entry = tracked["ties"]
    plan, evaluation, tracked_run = entry["plan"], entry["evaluation"], entry["run"]
    run = client.get_run(tracked_run.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "skills-ties"
    assert client.get_experiment(run.info.experiment_id).name == "skills"
    assert tracked_run.url == f"{mlflow_server['uri']}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}?workflowType=machine_learning"

    # short params (the columns a person adds), and the recipe as flattened params
    params = run.data.params
    assert params["method"] == "ties" and params["experts"] == "2" and params["shards"] == "2"
    assert params["density.add"] == params["density.map"] == "0.6" and params["weight.add"] == "1.0"
    assert params["recipe.merge_method"] == "ties" and params["recipe.models.0.parameters.density"] == "0.6"
    assert params["recipe.models.1.model"] == str(skill_models.experts["map"]) and params["recipe.base_model"] == str(skill_models.base)
    assert params["recipe.fleet.eval.owners.skill_add"] == str(skill_models.experts["add"])
    tags = run.data.tags
    assert tags["mergefleet.method"] == "ties" and tags["mergefleet.experts"] == "2"
    assert tags["mergefleet.plan_id"] == plan.plan_id

    # every input, with its URI and fingerprint
    inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"base", "add", "map"}
    for item in inputs.values():
        source = json.loads(item.dataset.source)["uri"]
        planned = next(inp for inp in plan.inputs if inp.ref == source)
        input_tags = {t.key: t.value for t in item.tags}
        assert input_tags["mlflow.data.context"] == ("base" if item.dataset.name == "base" else "expert")
        assert input_tags["mergefleet.fingerprint"].startswith(item.dataset.digest)
        assert json.loads(item.dataset.schema)["mergefleet_fingerprints"] == planned.fingerprints

    # shard runs nested under it
    shards = client.search_runs([run.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
    assert sorted(r.info.run_name.split(" ")[0] for r in shards) == ["shard-0", "shard-1"]  # "shard-0 (layer 0 + other)"
    for shard in shards:
        metrics = shard.data.metrics
        assert metrics["bytes_written"] > 0 and metrics["seconds"] > 0
        assert metrics["bytes_per_second"] == pytest.approx(metrics["bytes_written"] / metrics["seconds"])
    assert sum(s.data.metrics["bytes_written"] for s in shards) == run.data.metrics["bytes/written"]

    # raw and normalised scores
    metrics = run.data.metrics
    for task in ("skill_add", "skill_map"):
        assert metrics[f"score/{task}"] == pytest.approx(evaluation.merged.scores[task])
        assert metrics[f"merged/{task}/acc_stderr"] > 0
        assert metrics[f"normalised/{task}"] == pytest.approx(evaluation.normalised[task])
        assert metrics[f"base/{task}"] == pytest.approx(evaluation.base.scores[task])
    assert metrics["expert/add/skill_add"] > metrics["expert/add/skill_map"]
    assert metrics["time/merge"] > 0 and metrics["time/eval"] > 0
    # the headline scores come first where MLflow lists metrics in key order (its compare view's
    # scatter plot starts on the first key) or in the run's order (its parallel coordinates plot):
    # the mean normalised score, then the mean score
    assert sorted(metrics)[:2] == ["avg_normalised", "avg_score"]
    assert list(metrics)[:2] == ["avg_normalised", "avg_score"]  # the server lists them first too (logged first)
    assert metrics["avg_normalised"] == pytest.approx(sum(evaluation.normalised.values()) / len(evaluation.normalised))

    # artifacts: recipe, manifest, evaluation, chart
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert names == {"recipe.yaml", "mergefleet.json", "evaluation.json", "scores.png"}
    local = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path)))
    assert yaml.safe_load((local / "recipe.yaml").read_text()) == plan.recipe
    assert json.loads((local / "mergefleet.json").read_text())["plan_id"] == plan.plan_id
    assert (local / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the merged checkpoint as a logged model, pointing at its location, registered
    model = client.get_logged_model(tracked_run.model_id)
    assert model.status == LoggedModelStatus.READY and model.model_type == "mergefleet-checkpoint"
    assert model.tags["mergefleet.checkpoint_uri"] == plan.output and model.source_run_id == run.info.run_id
    assert model.params["method"] == "ties"
    assert {m.key for m in model.metrics} >= {"score/skill_add", "normalised/skill_map"}
    assert [o.model_id for o in run.outputs.model_outputs] == [tracked_run.model_id]
    version = client.get_model_version("skills-merge", tracked_run.model_version)
    assert version.source == f"models:/{model.model_id}" and version.run_id == run.info.run_id


def test_compare_prints_a_table_of_merges_and_writes_the_chart(tracked, mlflow_server, tmp_path: Path, capsys) -> None:
    chart = tmp_path / "compare.png"
    status = cli.main(["compare", "skills", "--tracking-uri", mlflow_server["uri"], "--chart", str(chart), "--json"])
    assert status == 0
    result = json.loads(capsys.readouterr().out)
    assert [row["method"] for row in result["runs"]] == ["ties", "task_arithmetic"]
    assert result["tasks"] == ["skill_add", "skill_map"]
    for row in result["runs"]:
        method = row["method"]
        assert row["scores"] == pytest.approx(tracked[method]["evaluation"].merged.scores)
        assert row["seconds"] > 0
    assert "density.add" in result["params"]  # ties has it, task_arithmetic does not
    assert chart.read_bytes()[:4] == b"\x89PNG"

    run_id = tracked["ties"]["run"].run_id
    assert cli.main(["compare", run_id, "--tracking-uri", mlflow_server["uri"], "--chart", str(chart)]) == 0
    assert "skills-ties" in capsys.readouterr().err
    assert cli.main(["compare", "no-such-experiment", "--tracking-uri", mlflow_server["uri"]]) == 8
    assert "neither a run id nor an experiment" in capsys.readouterr().err


def test_default_tracking_is_sqlite_beside_the_output(tracked, tmp_path: Path, monkeypatch) -> None:
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    entry = tracked["ties"]
    plan = entry["plan"].model_copy(update={"output": str(tmp_path / "merged")})
    shutil.copytree(entry["plan"].output, tmp_path / "merged")
    assert default_tracking_uri(plan.output) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = track_merge(plan, entry["summary"].manifest, None, None, experiment="local")
    assert run.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}" and run.url is None
    assert run.model_version == "1"  # fleet.register_model of the recipe, in the local registry
    client = MlflowClient(run.tracking_uri)
    # the logged model names its registered version (a server adds that tag itself; SQLite does not)
    versions = json.loads(client.get_logged_model(run.model_id).tags["mlflow.modelVersions"])
    assert versions == [{"name": entry["plan"].recipe["fleet"]["register_model"], "version": "1"}]
    assert client.get_experiment(run.experiment_id).artifact_location == (tmp_path / "mlartifacts").as_uri()
    assert {a.path for a in client.list_artifacts(run.run_id)} == {"recipe.yaml", "mergefleet.json"}  # no evaluation
    assert (tmp_path / "mlartifacts").is_dir()
    shards = client.search_runs([run.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{run.run_id}'")
    assert len(shards) == 2  # from the manifest's shard list


def test_a_run_opened_at_the_start_is_filled_by_the_record_and_a_retried_record_starts_over(tracked, mlflow_server) -> None:
    from mlflow import MlflowClient

    from orchestrator.tracking.record import start_merge_run

    entry, uri = tracked["ties"], mlflow_server["uri"]
    plan = entry["plan"]
    opened = start_merge_run(parse_recipe(plan.recipe), plan.output, tracking_uri=uri, experiment="opened")
    client = MlflowClient(uri)
    run = client.get_run(opened.run_id)
    assert run.info.status == "RUNNING" and run.info.run_name == "skills-ties"
    assert run.data.tags["mergefleet.method"] == "ties" and run.data.tags["mergefleet.experts"] == "2"
    assert run.data.tags["mergefleet.recipe_sha256"] == plan.recipe_hash and "mergefleet.plan_id" not in run.data.tags
    for _ in range(2):  # the track task's retry records into the same run again
        tracked_run = track_merge(plan, entry["summary"].manifest, None, None, tracking_uri=uri, run_id=opened.run_id)
    assert tracked_run.run_id == opened.run_id and tracked_run.experiment_id == opened.experiment_id
    run = client.get_run(opened.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["mergefleet.plan_id"] == plan.plan_id
    shards = client.search_runs([opened.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{opened.run_id}'")
    assert sorted(r.data.params["index"] for r in shards) == ["0", "1"]  # the first record's shard runs are gone


@pytest.mark.usefixtures("prefect_harness")
def test_the_sweep_flow_merges_a_grid_and_reuses_the_inputs_evaluations(skill_models, eval_cache, mlflow_server, tmp_path: Path) -> None:
    from flows.sweep import sweep
    from mlflow import MlflowClient

    from orchestrator.sweep import SweepGrid

    data = skill_models.recipe("ties", output=tmp_path / "sweep", tracking_uri=mlflow_server["uri"], experiment="sweep")
    data["fleet"]["eval"]["cache_dir"] = str(eval_cache)
    data["fleet"]["eval"]["limit"] = 50
    grid = {"methods": ["ties", "task_arithmetic"], "parameters": {"density": [0.4, 0.7]}}
    result = sweep(parse_recipe(data), SweepGrid.model_validate(grid), parallel=2)
    labels = sorted(point.label for point in result.points)
    assert labels == ["task_arithmetic", "ties-density0.4", "ties-density0.7"]  # density means nothing to task_arithmetic
    for point in result.points:
        evaluation = point.evaluation
        assert evaluation.base.cached and all(e.cached for e in evaluation.experts.values())
        assert not evaluation.merged.cached
    client = MlflowClient(mlflow_server["uri"])
    experiment = client.get_experiment_by_name("sweep")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`mergefleet.sweep` = '{result.sweep}'")
    assert sorted(r.info.run_name for r in runs) == labels
    assert {r.data.params["method"] for r in runs} == {"ties", "task_arithmetic"}
    # recorded after the merge, its shard runs still span each shard's work (from the receipts)
    shards = client.search_runs([experiment.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{runs[0].info.run_id}'")
    assert shards
    for shard in shards:
        assert shard.info.end_time - shard.info.start_time == pytest.approx(shard.data.metrics["seconds"] * 1000, abs=5)
        assert shard.info.end_time <= runs[0].info.start_time


@pytest.fixture(scope="module")
def flow_merge(prefect_harness, skill_models, eval_cache, mlflow_server, tmp_path_factory):
    """The merge_and_eval flow on the skill experts (task_arithmetic, 2 shards), recorded on the server."""
    from flows.merge_and_eval import merge_and_eval

    out = tmp_path_factory.mktemp("flow") / "merged"
    data = skill_models.recipe(
        "task_arithmetic", output=out, shards=2, tracking_uri=mlflow_server["uri"], experiment="flow", register_model="flow-merge"
    )
    data["fleet"]["eval"]["cache_dir"] = str(eval_cache)
    data["name"] = "skills demo"
    recipe = parse_recipe(data)
    evaluate_inputs(recipe.model_refs(), recipe.fleet.eval)  # from the cache when an earlier test evaluated them
    return merge_and_eval(recipe)


def test_the_merge_and_eval_flow_evaluates_and_records_the_merge(flow_merge, mlflow_server) -> None:
    from mlflow import MlflowClient

    result = flow_merge
    evaluation = result.evaluation
    assert evaluation.base.cached and all(e.cached for e in evaluation.experts.values())
    assert set(evaluation.normalised) == {"skill_add", "skill_map"}
    run = MlflowClient(mlflow_server["uri"]).get_run(result.tracking.run_id)
    assert run.data.metrics["score/skill_add"] == pytest.approx(evaluation.merged.scores["skill_add"])
    assert run.data.tags["mergefleet.plan_id"] == result.plan_id and run.data.metrics["time/merge"] > 0
    card = (Path(result.output) / "README.md").read_text()  # the model card, rewritten with the scores
    assert "## Evaluation" in card and f"| skill_add | {evaluation.merged.scores['skill_add']:.4f} |" in card


def _prefect_runs(flow_run_id: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id])))
    return flow_run, task_runs, artifacts


def test_the_flow_run_is_named_and_tagged_and_its_graph_follows_the_data(flow_merge, skill_models) -> None:
    result = flow_merge
    flow_run, task_runs, _ = _prefect_runs(result.flow_run_id)
    assert flow_run.name == f"skills-demo-task_arithmetic-{result.plan_id[:8]}"
    assert {"method:task_arithmetic", "experts:2", "target:inline"} <= set(flow_run.tags)

    by_name = {run.name: run for run in task_runs}
    shard_runs = [run for name, run in by_name.items() if name.startswith("shard-")]
    assert sorted(by_name) == sorted(["plan", "assemble", "evaluate", "track", *(r.name for r in shard_runs)])
    assert len(shard_runs) == 2
    covered: set[int] = set()
    for run in shard_runs:  # "shard-0 (layers 0-1 + other)": index and the blocks it writes
        match = re.fullmatch(r"shard-(\d) \(layers? (\d+)(?:-(\d+))?( \+ other)?\)", run.name)
        assert match, run.name
        first, last = int(match[2]), int(match[3] or match[2])
        covered |= set(range(first, last + 1))
    layers = json.loads((skill_models.base / "config.json").read_text())["num_hidden_layers"]
    assert covered == set(range(layers))

    def upstream(name: str) -> set:
        return {i.id for inputs in by_name[name].task_inputs.values() for i in inputs if getattr(i, "id", None)}

    plan_id = by_name["plan"].id
    assert all(plan_id in upstream(run.name) for run in shard_runs)
    assert upstream("assemble") >= {run.id for run in shard_runs}
    assert by_name["assemble"].id in upstream("evaluate")
    assert by_name["evaluate"].id in upstream("track")


def test_the_flow_run_carries_scores_summary_and_the_mlflow_link(flow_merge) -> None:
    result = flow_merge
    evaluation = result.evaluation
    _, _, artifacts = _prefect_runs(result.flow_run_id)
    kinds = {artifact.key.rsplit("-", 1)[1]: artifact for artifact in artifacts}
    assert set(kinds) == {"scores", "summary", "mlflow"}
    assert kinds["scores"].type == "table"

    table = kinds["scores"].data
    rows = json.loads(table) if isinstance(table, str) else table
    assert [row["task"] for row in rows] == evaluation.tasks
    for row in rows:
        task = row["task"]
        assert row["merged"] == pytest.approx(evaluation.merged.scores[task], abs=1e-4)
        assert row["base"] == pytest.approx(evaluation.base.scores[task], abs=1e-4)
        assert row["normalised"] == pytest.approx(evaluation.normalised[task], abs=1e-4)
        for name, scores in evaluation.experts.items():
            assert row[Path(name).name] == pytest.approx(scores.scores[task], abs=1e-4)

    summary = kinds["summary"].data
    assert "task_arithmetic merge of 2 expert(s)" in summary and f"`{result.output}`" in summary
    assert "| weight.add | 1.0 |" in summary and "shard-1 (" in summary and result.tracking.url in summary
    for inp in ("base", "add", "map"):
        assert f"| {inp} |" in summary
    assert f"]({result.tracking.url})" in kinds["mlflow"].data  # a link artifact: markdown [text](url)


def test_the_mlflow_run_spans_the_merge_and_its_shard_runs_their_own_time(flow_merge, mlflow_server) -> None:
    from mlflow import MlflowClient

    result = flow_merge
    flow_run, task_runs, _ = _prefect_runs(result.flow_run_id)
    client = MlflowClient(mlflow_server["uri"])
    run = client.get_run(result.tracking.run_id)
    flow_start_ms = flow_run.start_time.timestamp() * 1000
    assert flow_start_ms - 50 <= run.info.start_time <= flow_start_ms + 2000  # the run starts with the flow
    by_name = {task.name: task for task in task_runs}
    assert run.info.start_time <= by_name["plan"].start_time.timestamp() * 1000  # opened before any step ran
    assert run.info.end_time >= by_name["evaluate"].end_time.timestamp() * 1000  # and covers the merge and the evaluation
    assert run.info.status == "FINISHED" and run.data.tags["mergefleet.target"] == "inline"

    shards = client.search_runs([run.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
    assert len(shards) == 2
    for shard in shards:
        span = shard.info.end_time - shard.info.start_time
        assert span == pytest.approx(shard.data.metrics["seconds"] * 1000, abs=5)
        assert run.info.start_time <= shard.info.start_time <= shard.info.end_time <= run.info.end_time


def test_the_logged_model_shows_its_checkpoint_inputs_and_registered_version(flow_merge, skill_models, mlflow_server) -> None:
    from mlflow import MlflowClient

    result = flow_merge
    client = MlflowClient(mlflow_server["uri"])
    model = client.get_logged_model(result.tracking.model_id)
    assert model.params["checkpoint"] == result.output
    assert model.params["input.base"] == str(skill_models.base)
    assert model.params["input.add"] == str(skill_models.experts["add"])
    listed = json.loads(model.tags["mlflow.modelVersions"])  # what the model's page lists
    assert [(entry["name"], str(entry["version"])) for entry in listed] == [("flow-merge", result.tracking.model_version)]
    version = client.get_model_version("flow-merge", result.tracking.model_version)
    assert version.source == f"models:/{model.model_id}"


def test_the_run_description_opens_with_the_scores_table(tracked, mlflow_server) -> None:
    from mlflow import MlflowClient

    evaluation = tracked["ties"]["evaluation"]
    client = MlflowClient(mlflow_server["uri"])
    run = client.get_run(tracked["ties"]["run"].run_id)
    note = run.data.tags["mlflow.note.content"]
    header, _, *rows = note.split("\n\n", 1)[0].splitlines()
    assert header == "| task | base | add | map | merged | normalised |"
    for line, task in zip(rows, evaluation.tasks):
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[0] == task
        assert float(cells[4]) == pytest.approx(evaluation.merged.scores[task], abs=5e-4)
        assert float(cells[5]) == pytest.approx(evaluation.normalised[task], abs=5e-4)
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_compare_log_records_one_comparison_run_per_experiment_and_refreshes_it(tracked, mlflow_server, tmp_path: Path, capsys) -> None:
    from mlflow import MlflowClient

    uri = mlflow_server["uri"]
    arguments = ["compare", "skills", "--tracking-uri", uri, "--chart", str(tmp_path / "c.png"), "--log", "--json"]
    assert cli.main(arguments) == 0
    first = json.loads(capsys.readouterr().out)["comparison_runs"]
    assert cli.main(arguments) == 0
    second = json.loads(capsys.readouterr().out)["comparison_runs"]
    assert len(first) == 1 and first == second  # refreshed, not a new run each time
    client = MlflowClient(uri)
    run = client.get_run(first[0])
    assert run.info.run_name == "comparison"
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["comparison.png"]
    local = Path(client.download_artifacts(run.info.run_id, "comparison.png", str(tmp_path)))
    assert local.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    experiment = client.get_experiment(run.info.experiment_id)
    description = experiment.tags["mlflow.note.content"]
    for entry in tracked.values():
        score = entry["evaluation"].merged.scores["skill_add"]
        method = entry["plan"].method
        assert f"| skills-{method} | {method} | {score:.3f} |" in description
    # the comparison run is not a merge: compare itself leaves it out
    assert cli.main(["compare", "skills", "--tracking-uri", uri, "--chart", str(tmp_path / "c.png"), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["runs"]) == 2


@pytest.mark.parametrize(
    ("field", "named"),
    [("tasks", "task file missing_task.yaml does not exist"), ("owners", "'nobody' (owner of task 'skill_add') is not one of the merge's experts")],
)
@pytest.mark.usefixtures("prefect_harness")
def test_unknown_tasks_and_owners_are_refused_when_the_recipe_is_planned(skill_models, eval_cache, tmp_path: Path, field, named) -> None:
    from flows.merge_and_eval import merge_and_eval

    out = tmp_path / "merged"
    data = skill_models.recipe("ties", output=out, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    data["fleet"]["eval"]["cache_dir"] = str(eval_cache)
    if field == "tasks":
        data["fleet"]["eval"]["tasks"].append("missing_task.yaml")
    else:
        data["fleet"]["eval"]["owners"]["skill_add"] = "nobody"
    with pytest.raises(EvaluationError, match=re.escape(named)):
        merge_and_eval(parse_recipe(data))
    # refused before any merge work: no plan, no shard, no checkpoint (only the output's lock was taken)
    assert not (out / ".mergefleet" / "plan.json").exists() and not list(out.glob("*.safetensors"))


def test_the_mlflow_ui_shows_the_merge_in_a_browser(tracked, mlflow_server, tmp_path: Path) -> None:
    """Headless Chromium renders MLflow's own pages (run, logged model, registered version,
    compare view) and each shows what it should; the page texts stay in the test's tmp_path
    (``infra/check_ui.py`` also takes screenshots)."""
    from infra.check_ui import ChromiumMissing, check_pages, chromium, merge_pages

    try:
        chromium()
    except ChromiumMissing as missing:
        pytest.skip(str(missing))
    ties = tracked["ties"]
    pages = merge_pages(
        mlflow_server["uri"], experiment_id=ties["run"].experiment_id, run_ids=[e["run"].run_id for e in tracked.values()],
        model_id=ties["run"].model_id, model_name="skills-ties", method="ties", scores=ties["evaluation"].merged.scores, checkpoint=ties["plan"].output,
        registered=("skills-merge", ties["run"].model_version),
    )
    pages = [page for page in pages if page.name != "experiment"]  # four pages, about 15 s each on 2 busy cores
    failed = check_pages(pages, tmp_path / "pages", screenshots=False)
    assert not failed, "; ".join(f"{page.name} lacks {page.missing}" for page in failed)


def test_a_failed_runs_error_is_one_redacted_line() -> None:
    from orchestrator.tracking.record import ERROR_LIMIT, error_line

    error = OSError("\n  cannot read s3://user:hunter2@bucket/x: password=hunter2\nTraceback (most recent call last)")
    assert error_line(error) == "OSError: cannot read s3://***@bucket/x: password=***"
    assert error_line(KeyboardInterrupt()) == "KeyboardInterrupt"
    assert len(error_line(ValueError("x" * 2 * ERROR_LIMIT))) == ERROR_LIMIT
