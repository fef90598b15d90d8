"""Shards on real workers: a real `prefect server` and a real `prefect worker` (process
pool) on 127.0.0.1, `mergefleet deploy`, and `mergefleet run` with target: deployment.

The session's server (conftest.py), one worker and one shard starter serve the whole
module: the pool starts each flow run as `python -m flows.prestart`, as infra/stack.sh
sets it up, so each shard is a child of the starter (flows/prestart.py).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx
import psutil
import pytest
import torch
from prefect.workers.process import ProcessWorker

from flows.prestart import SOCKET_VARIABLE
from mergefleet.fixtures.synthetic import LlamaShape, make_model_family
from orchestrator.pipeline import merge
from orchestrator.recipe import parse_recipe
from tests.helpers import MERGEFLEET, assert_same_tensors, checkpoint_bytes, gta_recipe, read_tensors, write_recipe
from tests.prefect_services import process_worker, shard_starter
from tests.s3_server import s3_credentials, s3_server  # noqa: F401 -- fixture

pytestmark = pytest.mark.slow

POOL = "it-pool"
MEDIUM = LlamaShape(hidden=384, layers=6, intermediate=1024, vocab=512, heads=8, kv_heads=4)


@pytest.fixture(scope="module")
def server(real_prefect_server: tuple[dict[str, str], Path]) -> dict[str, str]:
    """The environment that points a process at the session's Prefect server, with the fake
    keys of the tests' S3 server (its endpoint only ever in a recipe)."""
    env = {key: value for key, value in real_prefect_server[0].items() if not key.startswith("AWS_")}
    return env | s3_credentials()


@pytest.fixture(scope="module")
def starter(server: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[psutil.Process, Path, Path]]:
    folder = tmp_path_factory.mktemp("starter")
    with shard_starter(server, folder / "starter.sock", folder / "starter.log") as process:
        yield psutil.Process(process.pid), folder / "starter.sock", folder / "starter.log"


@pytest.fixture(scope="module")
def worker(server: dict[str, str], starter, tmp_path_factory: pytest.TempPathFactory) -> Iterator[psutil.Process]:
    """A real process worker on POOL, whose flow runs start as children of the starter."""
    template = ProcessWorker.get_default_base_job_template()
    template["variables"]["properties"]["command"]["default"] = f"{sys.executable} -m flows.prestart"
    created = httpx.post(f"{server['PREFECT_API_URL']}/work_pools/", json={"name": POOL, "type": "process", "base_job_template": template}, timeout=30)
    assert created.status_code == 201, created.text
    env = server | {SOCKET_VARIABLE: str(starter[1])}
    with process_worker(env, POOL, tmp_path_factory.mktemp("worker") / "worker.log") as process:
        yield psutil.Process(process.pid)


def mergefleet(env: dict[str, str], *args: str, timeout: float = 240) -> dict:
    done = subprocess.run([*MERGEFLEET, *args, "--json"], env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


def shard_runs(env: dict[str, str]) -> list[dict]:
    api = env["PREFECT_API_URL"]
    body = {"deployments": {"name": {"any_": [POOL]}}, "sort": "EXPECTED_START_TIME_ASC"}
    return httpx.post(f"{api}/flow_runs/filter", json=body, timeout=10).json()


@pytest.fixture(scope="module")
def deployed(server: dict[str, str], worker: psutil.Process, family, tmp_path_factory) -> dict[str, str]:
    """`mergefleet deploy`: merge-shard/POOL and a nightly merge-and-eval."""
    workdir = tmp_path_factory.mktemp("deploy")
    base, experts = family
    recipe = write_recipe(workdir / "nightly.yaml", gta_recipe("ties", base, experts) | {"fleet": {"work_pool": POOL}})
    result = mergefleet(server, "deploy", str(recipe), str(workdir / "nightly-out"), "--cron", "0 2 * * *")
    assert result["merge_shard"]["name"] == f"merge-shard/{POOL}"
    assert result["merge_and_eval"]["pool_type"] == "process"
    return server


def test_deployment_target_gives_the_inline_checkpoint_byte_for_byte(deployed: dict[str, str], starter, family, tmp_path: Path) -> None:
    base, experts = family
    data = gta_recipe("ties", base, experts) | {
        "fleet": {"shards": 3, "target": "deployment", "work_pool": POOL, "concurrency_limit": "gpu", "concurrency_slots": 2}
    }
    recipe = write_recipe(tmp_path / "recipe.yaml", data)
    remote = mergefleet(deployed, "run", str(recipe), str(tmp_path / "remote"))
    inline = mergefleet(deployed, "run", str(recipe), str(tmp_path / "inline"), "--target", "inline", "--workers", "2")
    assert remote["target"] == "deployment" and inline["target"] == "inline"
    assert remote["plan_id"] == inline["plan_id"] and remote["shards"] == 3
    assert checkpoint_bytes(tmp_path / "remote") == checkpoint_bytes(tmp_path / "inline")

    runs = [run for run in shard_runs(deployed) if run["parameters"]["plan"]["uri"] == f"{tmp_path / 'remote'}/.mergefleet/plan.json"]
    assert sorted(run["parameters"]["index"] for run in runs) == [0, 1, 2]
    assert {run["state_type"] for run in runs} == {"COMPLETED"}
    for run in runs:  # named like the shard's task run: "<plan id>-shard-1 (layers 2-3)"
        assert re.fullmatch(rf"{remote['plan_id'][:8]}-shard-{run['parameters']['index']} \(layers? \d+(-\d+)?( \+ other)?\)", run["name"]), run["name"]
    assert all(run["parent_task_run_id"] for run in runs)  # each shown under its shard task
    started = starter[2].read_text()
    assert all(f"flow run {run['id']} is pid" in started for run in runs), started  # each a child of the starter


RECORDED = """
import json
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.context import TaskRunContext
from flows.runners.deployment import wait_until_recorded

@task
def shard_task():
    waited = wait_until_recorded(20.0)
    with get_client(sync_client=True) as client:
        recorded = client.read_task_run(TaskRunContext.get().task_run.id).state_type.value
    return {"waited": waited, "recorded": recorded}

@flow
def parent():
    return {"in_task": shard_task(), "outside_a_task": wait_until_recorded(20.0)}

print(json.dumps(parent()))
"""


def test_a_shard_task_creates_its_flow_run_only_once_the_server_has_recorded_it_running(server: dict[str, str]) -> None:
    """run_deployment's placeholder write meets the recording of the task's own Running state
    otherwise (503 on SQLite, retried 2 s later): the wait ends when the record is there."""
    done = subprocess.run([sys.executable, "-c", RECORDED], env=server, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["in_task"]["recorded"] == "RUNNING", result
    assert result["in_task"]["waited"] < 20.0, result
    assert result["outside_a_task"] == 0.0, result


@pytest.fixture(scope="module")
def s3_inputs(s3_server, family) -> list[str]:
    """The tiny family uploaded to the S3 server; a bucket for the outputs."""
    base, experts = family
    s3_server.bucket("merges")
    return [s3_server.upload_dir(path, "models", f"run/{path.name}") for path in [base, *experts]]


@pytest.mark.parametrize("target", ["inline", "deployment"])
def test_run_on_s3_with_the_endpoint_only_in_the_recipe(target: str, deployed, s3_server, s3_inputs, family, tmp_path: Path) -> None:
    """Inputs and output on S3, the endpoint only in fleet.storage and nowhere in the
    environment: every task and every worker's flow run opens the plan as the recipe says."""
    assert not [name for name in deployed if name.startswith("AWS_ENDPOINT_URL")]
    base, experts = family
    fleet = {"shards": 3, "target": target, "work_pool": POOL, "storage": {"endpoint_url": s3_server.endpoint}}
    recipe = write_recipe(tmp_path / "recipe.yaml", gta_recipe("ties", s3_inputs[0], s3_inputs[1:]) | {"fleet": fleet})
    result = mergefleet(deployed, "run", str(recipe), f"s3://merges/run-{target}")
    assert result["target"] == target and result["shards"] == 3 and result["shards_skipped"] == 0
    local = tmp_path / "local"
    merge(parse_recipe(gta_recipe("ties", base, experts)), str(local), shards=3)
    got = s3_server.download(f"s3://merges/run-{target}", tmp_path / "got")
    assert_same_tensors(read_tensors(got), read_tensors(local))


@pytest.fixture(scope="module")
def medium_family(tmp_path_factory: pytest.TempPathFactory):
    return make_model_family(tmp_path_factory.mktemp("medium"), experts=3, shape=MEDIUM, dtype=torch.float32, seed=3)


def test_a_shard_process_killed_mid_shard_is_retried_and_the_checkpoint_is_complete(
    deployed: dict[str, str], starter, medium_family, tmp_path: Path
) -> None:
    base, experts = medium_family
    data = gta_recipe("dare_ties", base, experts) | {"fleet": {"shards": 3, "target": "deployment", "work_pool": POOL}}
    recipe = write_recipe(tmp_path / "recipe.yaml", data)
    out = tmp_path / "out"
    run = subprocess.Popen(
        [*MERGEFLEET, "run", str(recipe), str(out), "--json"],
        env=deployed, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    victim = None
    deadline = time.monotonic() + 180
    while victim is None and time.monotonic() < deadline and run.poll() is None:
        for process in starter[0].children(recursive=True):
            try:
                if any(".partial-" in f.path and f.path.startswith(str(out)) for f in process.open_files()):
                    victim = process
                    break
            except psutil.Error:
                continue
        time.sleep(0.01)
    assert victim is not None, "every shard finished before one could be killed mid-write"
    victim.send_signal(signal.SIGKILL)
    stdout, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr[-4000:]
    result = json.loads(stdout)
    assert result["shards"] == 3 and result["shards_skipped"] == 0

    runs = [r for r in shard_runs(deployed) if r["parameters"]["plan"]["uri"] == f"{out}/.mergefleet/plan.json"]
    crashed = [r for r in runs if r["state_type"] == "CRASHED"]
    assert len(crashed) == 1 and "-9" in (crashed[0]["state"]["message"] or "")
    retried = crashed[0]["parameters"]["index"]
    assert sorted(r["parameters"]["index"] for r in runs if r["state_type"] == "COMPLETED") == [0, 1, 2]
    assert [r["parameters"]["index"] for r in runs].count(retried) == 2
    assert not list(out.glob("*.partial-*")) and (out / "mergefleet.json").exists()

    reference = tmp_path / "reference"
    merge(parse_recipe(data), str(reference), workers=1)
    assert checkpoint_bytes(out) == checkpoint_bytes(reference)
