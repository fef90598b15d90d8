"""Lineage in a real MLflow server (sqlite backend, local artifacts) on 127.0.0.1: one run
per merge, read back through the MLflow client; `mergefleet compare`; the sweep flow."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from mergefleet import cli
from orchestrator.evaluate.scores import evaluate_inputs, evaluate_merge
from orchestrator.pipeline import merge
from orchestrator.plan_ref import open_plan
from orchestrator.receipt import Receipt, ShardOutcome
from orchestrator.recipe import parse_recipe
from orchestrator.tracking.record import track_merge
from orchestrator.tracking.store import default_tracking_uri

pytestmark = pytest.mark.slow

MLFLOW = str(Path(sys.executable).with_name("mlflow"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """``mlflow server`` in its own process group (its job consumers outlive the main
    process otherwise); the whole group is killed afterwards."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(root / "server.log", "wb")
    process = subprocess.Popen(
        [MLFLOW, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield {"uri": uri, "root": root}
    finally:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(process.pid, signal.SIGKILL)
        log.close()


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
    assert tracked_run.url == f"{mlflow_server['uri']}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"

    # the recipe as flattened params, and tags
    params = run.data.params
    assert params["merge_method"] == "ties" and params["models.0.parameters.density"] == "0.6"
    assert params["models.1.model"] == str(skill_models.experts["map"]) and params["base_model"] == str(skill_models.base)
    assert params["fleet.eval.owners.skill_add"] == str(skill_models.experts["add"])
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
    assert sorted(r.info.run_name for r in shards) == ["shard-0", "shard-1"]
    for shard in shards:
        metrics = shard.data.metrics
        assert metrics["bytes_written"] > 0 and metrics["seconds"] > 0
        assert metrics["bytes_per_second"] == pytest.approx(metrics["bytes_written"] / metrics["seconds"])
    assert sum(s.data.metrics["bytes_written"] for s in shards) == run.data.metrics["bytes_written"]

    # raw and normalised scores
    metrics = run.data.metrics
    for task in ("skill_add", "skill_map"):
        assert metrics[f"score/{task}"] == pytest.approx(evaluation.merged.scores[task])
        assert metrics[f"merged/{task}/acc_stderr"] > 0
        assert metrics[f"normalised/{task}"] == pytest.approx(evaluation.normalised[task])
        assert metrics[f"base/{task}"] == pytest.approx(evaluation.base.scores[task])
    assert metrics["expert/add/skill_add"] > metrics["expert/add/skill_map"]
    assert metrics["merge_seconds"] > 0

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
    assert version.source == model.artifact_location and version.run_id == run.info.run_id


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
    assert "models.0.parameters.density" in result["params"] or "merge_method" in result["params"]
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
    assert client.get_experiment(run.experiment_id).artifact_location == (tmp_path / "mlartifacts").as_uri()
    assert {a.path for a in client.list_artifacts(run.run_id)} == {"recipe.yaml", "mergefleet.json"}  # no evaluation
    assert (tmp_path / "mlartifacts").is_dir()
    shards = client.search_runs([run.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{run.run_id}'")
    assert len(shards) == 2  # from the manifest's shard list


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
    assert {r.data.params["merge_method"] for r in runs} == {"ties", "task_arithmetic"}


@pytest.mark.usefixtures("prefect_harness")
def test_the_merge_and_eval_flow_evaluates_and_records_the_merge(skill_models, eval_cache, mlflow_server, tmp_path: Path) -> None:
    from flows.merge_and_eval import merge_and_eval
    from mlflow import MlflowClient

    data = skill_models.recipe("task_arithmetic", output=tmp_path / "flow", shards=2, tracking_uri=mlflow_server["uri"], experiment="flow")
    data["fleet"]["eval"]["cache_dir"] = str(eval_cache)
    recipe = parse_recipe(data)
    evaluate_inputs(recipe.model_refs(), recipe.fleet.eval)  # from the cache when an earlier test evaluated them
    result = merge_and_eval(recipe)
    evaluation = result.evaluation
    assert evaluation.base.cached and all(e.cached for e in evaluation.experts.values())
    assert set(evaluation.normalised) == {"skill_add", "skill_map"}
    run = MlflowClient(mlflow_server["uri"]).get_run(result.tracking.run_id)
    assert run.data.metrics["score/skill_add"] == pytest.approx(evaluation.merged.scores["skill_add"])
    assert run.data.tags["mergefleet.plan_id"] == result.plan_id and run.data.metrics["merge_seconds"] > 0
    card = (tmp_path / "flow" / "README.md").read_text()  # the model card, rewritten with the scores
    assert "## Evaluation" in card and f"| skill_add | {evaluation.merged.scores['skill_add']:.4f} |" in card
