"""The Prefect flows on a temporary Prefect API: inline shards, resume, retries, failure
messages, the concurrency limit, the nightly skip, deployments and the CLI."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from mergefleet import cli
from orchestrator.errors import PlanError
from orchestrator.pipeline import merge
from orchestrator.recipe import parse_recipe
from orchestrator.schedule import changes_since_last_merge, portable_recipe
from tests.helpers import MERGEFLEET, checkpoint_bytes, gta_recipe, write_recipe

pytestmark = [pytest.mark.usefixtures("prefect_harness", "restore_environ"), pytest.mark.slow]



def recipe_data(family, out: Path | None = None, **fleet) -> dict:
    base, experts = family
    data = gta_recipe("ties", base, experts)
    data["fleet"] = {"shards": 3, "workers": 2, **fleet}
    if out is not None:
        data["fleet"]["output"] = str(out)
    return data


@pytest.fixture(scope="module", autouse=True)
def _one_tracking_store(tmp_path_factory):
    """Every merge of this module records into one MLflow store (created once, not per test)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    yield
    if previous is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous


@pytest.fixture
def fast_retries(monkeypatch):
    import flows.runners.common

    monkeypatch.setattr(flows.runners.common, "SHARD_RETRY_DELAY_S", 0)


def mlflow_run_of(out: Path):
    """The MLflow run of the merge into ``out`` (the module's store, default experiment), or None."""
    from mlflow import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("mergefleet")
    if experiment is None:
        return None
    found = client.search_runs([experiment.experiment_id], filter_string=f"tags.`mergefleet.output` = '{out}'")
    assert len(found) <= 1, [run.info.run_name for run in found]
    return found[0] if found else None


@pytest.fixture(scope="module")
def reference(family, tmp_path_factory) -> dict[str, bytes]:
    """The plain (non-Prefect) merge of recipe_data, 3 shards."""
    out = tmp_path_factory.mktemp("reference") / "merged"
    merge(parse_recipe(recipe_data(family)), str(out), workers=1)
    return checkpoint_bytes(out)


def test_inline_flow_gives_the_plain_merge_byte_for_byte(family, reference, tmp_path: Path) -> None:
    from flows.merge_and_eval import merge_and_eval

    out = tmp_path / "merged"
    result = merge_and_eval(parse_recipe(recipe_data(family)), str(out))
    assert result.shards == 3 and result.shards_skipped == 0 and result.target == "inline"
    assert result.output == str(out) and result.flow_run_id
    assert result.evaluation is None  # no fleet.eval in the recipe
    assert result.tracking.run_id
    assert checkpoint_bytes(out) == reference
    manifest = json.loads((out / "mergefleet.json").read_text())
    assert manifest["plan_id"] == result.plan_id


def test_the_flow_opens_its_plan_from_memory(family, reference, tmp_path: Path, monkeypatch) -> None:
    """Every task receives the plan's PlanRef; in the flow's process the plan the plan task
    built is opened from memory: plan.json is written once and never read back."""
    import orchestrator.plan_ref
    from flows.merge_and_eval import merge_and_eval

    read, reads = orchestrator.plan_ref.read_plan, []
    monkeypatch.setattr(orchestrator.plan_ref, "read_plan", lambda ref: reads.append(ref.uri) or read(ref))
    result = merge_and_eval(parse_recipe(recipe_data(family)), str(tmp_path / "merged"))
    assert result.shards == 3 and result.shards_skipped == 0 and reads == []
    assert checkpoint_bytes(tmp_path / "merged") == reference


def test_rerun_reuses_finished_shards_and_runs_only_missing_ones(family, reference, tmp_path: Path) -> None:
    from flows.merge_and_eval import merge_and_eval

    out = tmp_path / "merged"
    merge_and_eval(parse_recipe(recipe_data(family)), str(out))
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}
    again = merge_and_eval(parse_recipe(recipe_data(family)), str(out))
    assert again.shards_skipped == 3
    # the rerun's MLflow shard runs: reused, each spanning the first run's work on it (from its receipt)
    from mlflow import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    parent = client.get_run(again.tracking.run_id)
    children = client.search_runs([parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 3
    for child in children:
        receipt = json.loads((out / f".mergefleet/shard-{child.data.params['index']}.json").read_text())
        assert child.data.params["skipped"] == "True"
        assert child.info.end_time == round(receipt["finished_at"] * 1000)
        assert child.info.start_time == round((receipt["finished_at"] - receipt["seconds"]) * 1000)
        assert child.info.end_time <= parent.info.start_time  # written before this run began
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")} == before

    (out / ".mergefleet/shard-1.json").unlink()
    third = merge_and_eval(parse_recipe(recipe_data(family)), str(out))
    assert third.shards_skipped == 2
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}
    assert [name for name in after if after[name] != before[name]] == ["model-00002-of-00003.safetensors"]
    assert checkpoint_bytes(out) == reference


def _failing_run_shard(monkeypatch, fail: dict[int, int], error: Exception) -> dict[int, int]:
    """Make shard i fail its first fail[i] attempts with ``error``; returns attempt counts."""
    import flows.runners.common

    real = flows.runners.common.run_shard
    calls: dict[int, int] = {}

    def flaky(plan, index, **kwargs):
        calls[index] = calls.get(index, 0) + 1
        if calls[index] <= fail.get(index, 0):
            raise error
        return real(plan, index, **kwargs)

    monkeypatch.setattr(flows.runners.common, "run_shard", flaky)
    return calls


def test_a_shard_that_keeps_failing_fails_the_flow_with_its_own_message(family, fast_retries, monkeypatch, tmp_path: Path) -> None:
    from flows.merge_and_eval import merge_and_eval

    calls = _failing_run_shard(monkeypatch, {1: 99}, OSError("disk sector 7 is on fire"))
    out = tmp_path / "merged"
    state = merge_and_eval(parse_recipe(recipe_data(family, shard_retries=2)), str(out), return_state=True)
    assert state.is_failed()
    assert "disk sector 7 is on fire" in state.message
    assert calls[1] == 3  # the first try and 2 retries
    assert calls[0] == calls[2] == 1
    # the other shards finished and keep their receipts; nothing looks complete
    assert sorted(p.name for p in (out / ".mergefleet").glob("shard-*.json")) == ["shard-0.json", "shard-2.json"]
    assert not (out / "mergefleet.json").exists()
    assert not list(out.glob("*.partial-*"))
    run = mlflow_run_of(out)  # the MLflow run opened when the flow began ends with it
    assert run.info.status == "FAILED" and run.info.end_time is not None
    assert run.data.tags["mergefleet.error"] == "OSError: disk sector 7 is on fire"
    assert run.data.tags["mlflow.note.content"].startswith("**failed:** `OSError: disk sector 7 is on fire`")


def test_the_mlflow_run_is_running_while_the_flow_merges_and_finished_after(family, monkeypatch, tmp_path: Path) -> None:
    import flows.runners.common
    from flows.merge_and_eval import merge_and_eval
    from prefect.client.orchestration import get_client

    out = tmp_path / "merged"
    real, seen = flows.runners.common.run_shard, []

    def observed(plan, index, **kwargs):
        run = mlflow_run_of(out)
        seen.append((index, run.info.status, run.info.run_id, run.data.tags["mergefleet.method"], run.data.tags["mergefleet.target"]))
        return real(plan, index, **kwargs)

    monkeypatch.setattr(flows.runners.common, "run_shard", observed)
    started = time.time()
    result = merge_and_eval(parse_recipe(recipe_data(family)), str(out))
    assert sorted(index for index, *_ in seen) == [0, 1, 2]
    assert {tuple(rest) for _, *rest in seen} == {("RUNNING", result.tracking.run_id, "ties", "inline")}
    run = mlflow_run_of(out)
    assert run.info.status == "FINISHED" and run.info.run_name == f"ties-{result.plan_id[:8]}"
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(result.flow_run_id)
    assert flow_run.start_time.timestamp() * 1000 - 50 <= run.info.start_time <= started * 1000 + 2000
    assert run.info.end_time >= (started + result.seconds) * 1000  # covers the merge, and the record after it


def test_a_merge_refused_by_the_outputs_lock_ends_its_mlflow_run_failed(family, tmp_path: Path) -> None:
    from flows.merge_and_eval import merge_and_eval
    from orchestrator.storage.output_lock import _local_lock

    out = tmp_path / "merged"
    # the disk lock itself, held on its own file handle (hold_output_lock is re-entrant in a
    # process), as another merge into the same output holds it
    with _local_lock(str(out)):
        state = merge_and_eval(parse_recipe(recipe_data(family)), str(out), return_state=True)
    assert state.is_failed() and f"pid {os.getpid()}" in state.message
    run = mlflow_run_of(out)  # no run left RUNNING: it names the holder
    assert run.info.status == "FAILED" and f"pid {os.getpid()}" in run.data.tags["mergefleet.error"]


def test_a_run_left_running_by_a_killed_merge_is_ended_by_the_next_merge_into_its_output(family, tmp_path: Path) -> None:
    """SIGKILL leaves nothing that could end the MLflow run: the next merge into the output,
    holding its lock, ends it as KILLED and names itself; its own run finishes. The killed
    run's own Prefect API server does not outlive it."""
    import signal
    import subprocess

    import psutil

    from mlflow import MlflowClient

    from flows.merge_and_eval import merge_and_eval

    out = tmp_path / "merged"
    recipe = write_recipe(tmp_path / "recipe.yaml", recipe_data(family))
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env |= {"PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "60"}
    killed = subprocess.Popen([*MERGEFLEET, "run", str(recipe), str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (out / ".mergefleet" / "shard-0.json").exists():  # the run was opened when the flow began
        assert killed.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    started = psutil.Process(killed.pid).children(recursive=True)
    assert any("flows.embedded" in " ".join(child.cmdline()) for child in started)  # its own Prefect API
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    _, alive = psutil.wait_procs(started, timeout=15)  # the kernel ends the API server with it
    assert not alive, f"left running by the killed run: {[(p.pid, p.cmdline()[:4]) for p in alive]}"
    assert mlflow_run_of(out).info.status == "RUNNING"  # what a killed merge leaves

    result = merge_and_eval(parse_recipe(recipe_data(family)), str(out))
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("mergefleet")
    runs = {run.info.run_id: run for run in client.search_runs([experiment.experiment_id], filter_string=f"tags.`mergefleet.output` = '{out}'")}
    first = next(run for run_id, run in runs.items() if run_id != result.tracking.run_id)
    assert len(runs) == 2 and runs[result.tracking.run_id].info.status == "FINISHED"
    assert first.info.status == "KILLED" and first.info.end_time is not None
    assert f"pid {killed.pid}" in first.data.tags["mergefleet.error"] and result.tracking.run_id in first.data.tags["mergefleet.error"]


def test_errors_that_cannot_pass_are_not_retried(family, fast_retries, monkeypatch, tmp_path: Path) -> None:
    from flows.merge_and_eval import merge_and_eval

    calls = _failing_run_shard(monkeypatch, {2: 99}, PlanError("input x changed after planning"))
    state = merge_and_eval(parse_recipe(recipe_data(family)), str(tmp_path / "merged"), return_state=True)
    assert state.is_failed() and "input x changed after planning" in state.message
    assert calls[2] == 1


def test_a_transient_failure_is_retried_and_the_merge_completes(family, reference, fast_retries, monkeypatch, tmp_path: Path) -> None:
    from flows.merge_and_eval import merge_and_eval

    calls = _failing_run_shard(monkeypatch, {0: 1, 2: 2}, MemoryError("out of memory"))
    out = tmp_path / "merged"
    result = merge_and_eval(parse_recipe(recipe_data(family)), str(out))
    assert calls == {0: 2, 1: 1, 2: 3}
    assert result.shards_skipped == 0
    assert checkpoint_bytes(out) == reference


def test_the_global_concurrency_limit_bounds_shards_at_once(family, monkeypatch, tmp_path: Path) -> None:
    import flows.runners.common
    from flows.merge_and_eval import merge_and_eval
    from prefect.client.orchestration import get_client

    real = flows.runners.common.run_shard
    lock, running, peak = threading.Lock(), [0], [0]

    def counted(plan, index, **kwargs):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        try:
            time.sleep(0.3)
            return real(plan, index, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(flows.runners.common, "run_shard", counted)
    data = recipe_data(family, workers=3, concurrency_limit="gpu-test", concurrency_slots=1)
    merge_and_eval(parse_recipe(data), str(tmp_path / "one-slot"))
    assert peak[0] == 1
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name("gpu-test").limit == 1

    peak[0] = 0
    merge_and_eval(parse_recipe(recipe_data(family, workers=3, concurrency_limit="gpu-test", concurrency_slots=3)), str(tmp_path / "three"))
    assert peak[0] > 1


def test_a_missing_concurrency_limit_is_a_clear_error(family, tmp_path: Path) -> None:
    from flows.merge_and_eval import merge_and_eval

    state = merge_and_eval(parse_recipe(recipe_data(family, concurrency_limit="no-such-limit")), str(tmp_path / "m"), return_state=True)
    assert state.is_failed() and "no-such-limit" in state.message


def test_deployment_target_without_its_deployment_says_what_to_register(family, tmp_path: Path) -> None:
    from flows.merge_and_eval import merge_and_eval

    data = recipe_data(family, target="deployment", work_pool="nowhere")
    state = merge_and_eval(parse_recipe(data), str(tmp_path / "m"), return_state=True)
    assert state.is_failed()
    assert "merge-shard/nowhere" in state.message and "mergefleet deploy" in state.message


def test_deployment_target_reads_finished_shards_without_starting_runs(family, tmp_path: Path) -> None:
    from flows.deploy import deploy
    from flows.merge_and_eval import merge_and_eval
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="resume-pool", type="process"))
    deploy(recipe_data(family), name="resume", pool="resume-pool")
    out = tmp_path / "merged"
    merge_and_eval(parse_recipe(recipe_data(family)), str(out))
    again = merge_and_eval(parse_recipe(recipe_data(family, target="deployment", work_pool="resume-pool")), str(out))
    assert again.target == "deployment" and again.shards_skipped == 3
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["resume-pool"])))
    assert runs == []


@pytest.fixture
def own_family(family, tmp_path: Path) -> tuple[Path, list[Path]]:
    """A copy of the session's family that a test may change."""
    base, experts = family
    copies = [Path(shutil.copytree(p, tmp_path / "models" / p.name)) for p in [base, *experts]]
    return copies[0], copies[1:]


def test_skip_unchanged_merges_again_only_when_an_input_changed(own_family, tmp_path: Path) -> None:
    from flows.merge_and_eval import MergeAndEvalResult, SkippedMerge, merge_and_eval

    out = tmp_path / "merged"
    data = recipe_data(own_family)
    first = merge_and_eval(parse_recipe(data), str(out), skip_unchanged=True)
    assert isinstance(first, MergeAndEvalResult) and first.shards_skipped == 0
    state = merge_and_eval(parse_recipe(data), str(out), skip_unchanged=True, return_state=True)
    skipped = state.result()
    assert state.is_completed() and state.name == "Skipped" and isinstance(skipped, SkippedMerge) and skipped.skipped
    assert state.message == skipped.reason == f"nothing changed since the last successful merge into {out}"

    expert = own_family[1][0]
    weights = next(expert.glob("*.safetensors"))
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a new checkpoint version
    assert changes_since_last_merge(parse_recipe(data), str(out)) == [f"{expert} changed ({weights.name})"]
    again = merge_and_eval(parse_recipe(data), str(out), overwrite=True, skip_unchanged=True)
    assert isinstance(again, MergeAndEvalResult) and again.plan_id != first.plan_id and again.shards_skipped == 0


def test_changes_since_last_merge_names_what_differs(own_family, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    recipe = parse_recipe(recipe_data(own_family))
    assert changes_since_last_merge(recipe, str(out)) == [f"{out} holds no finished merge yet"]
    merge(recipe, str(out), workers=1)
    assert changes_since_last_merge(recipe, str(out)) == []
    other = parse_recipe(recipe_data(own_family) | {"random_seed": 12})
    assert changes_since_last_merge(other, str(out)) == ["the recipe changed"]
    (out / "model-00003-of-00003.safetensors").unlink()
    assert changes_since_last_merge(recipe, str(out)) == [f"{out}/model-00003-of-00003.safetensors is missing"]


def test_portable_recipe_makes_local_paths_absolute(family, tmp_path: Path, monkeypatch) -> None:
    base, experts = family
    monkeypatch.chdir(base.parent)
    data = recipe_data((Path(base.name), [Path(e.name) for e in experts]))
    recipe = parse_recipe(data | {"models": data["models"] + [{"model": "s3://bucket/expert9"}]})
    portable = portable_recipe(recipe, root=Path.cwd(), output="out")
    assert portable["base_model"] == str(base)
    assert [m["model"] for m in portable["models"]] == [str(base), *map(str, experts), "s3://bucket/expert9"]
    assert portable["fleet"]["output"] == str(base.parent / "out")
    assert parse_recipe(portable).fleet.shards == 3


def test_cli_run_prints_the_summary_and_resumes(family, reference, tmp_path: Path, capsys) -> None:
    path = write_recipe(tmp_path / "recipe.yaml", recipe_data(family))
    out = tmp_path / "merged"
    assert cli.main(["run", str(path), str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["shards"] == 3 and result["method"] == "ties"
    assert checkpoint_bytes(out) == reference
    assert cli.main(["run", str(path), str(out)]) == 0
    assert "all 3 shards already done; nothing merged into" in capsys.readouterr().err


def test_cli_run_without_a_server_uses_an_embedded_api_and_stops_it(family, reference, tmp_path: Path) -> None:
    import subprocess

    import psutil

    home = tmp_path / "prefect-home"
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")} | {"PREFECT_HOME": str(home)}
    path = write_recipe(tmp_path / "recipe.yaml", recipe_data(family))
    out = tmp_path / "merged"
    command = [*MERGEFLEET, "run", str(path), str(out), "--json"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["shards"] == 3
    assert checkpoint_bytes(out) == reference
    leftovers = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("PREFECT_HOME") == str(home):
                leftovers.append(process.cmdline())
        except psutil.Error:
            continue
    assert leftovers == []


def test_cli_run_refuses_a_bad_recipe_before_running_a_flow(tmp_path: Path, capsys) -> None:
    path = write_recipe(tmp_path / "recipe.yaml", {"merge_method": "ties", "models": ["a"], "fleet": {"target": "deployment"}})
    assert cli.main(["run", str(path), str(tmp_path / "out")]) == 2
    assert "work_pool" in capsys.readouterr().err


def test_cli_deploy_registers_both_deployments(family, tmp_path: Path, capsys, monkeypatch) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="unit-pool", type="process"))
    monkeypatch.chdir(tmp_path)
    data = recipe_data(family, target="deployment", work_pool="unit-pool")
    path = write_recipe(tmp_path / "nightly.yaml", data)
    assert cli.main(["deploy", str(path), "merged", "--cron", "0 2 * * *", "--timezone", "Europe/Berlin", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["merge_shard"]["name"] == "merge-shard/unit-pool"
    assert result["merge_and_eval"]["name"] == "merge-and-eval/nightly"
    assert result["merge_and_eval"]["tracking_uri"] == os.environ["MLFLOW_TRACKING_URI"]  # the module's store
    with get_client(sync_client=True) as client:
        shard = client.read_deployment_by_name("merge-shard/unit-pool")
        nightly = client.read_deployment_by_name("merge-and-eval/nightly")
    assert shard.entrypoint == "flows.merge_shard.merge_shard" and shard.work_pool_name == "unit-pool"
    assert nightly.entrypoint == "flows.merge_and_eval.merge_and_eval"
    assert [(s.schedule.cron, s.schedule.timezone) for s in nightly.schedules] == [("0 2 * * *", "Europe/Berlin")]
    assert nightly.parameters["skip_unchanged"] is True and nightly.parameters["overwrite"] is True
    assert nightly.parameters["output"] == nightly.parameters["recipe"]["fleet"]["output"] == str(tmp_path / "merged")
    assert nightly.global_concurrency_limit.limit == 1  # two scheduled runs never merge into one output at once


def test_cli_commands_are_pinned() -> None:
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    assert sorted(subparsers.choices) == sorted(cli.COMMANDS) == [
        "assemble", "cluster", "compare", "dam", "deploy", "merge", "merge-to-mix", "plan", "run", "search", "shard"
    ]
