"""Shards on real workers: a real `prefect server` and a real `prefect worker` (process
pool) on 127.0.0.1, `mergefleet deploy`, and `mergefleet run` with target: deployment.

One server and one worker serve the whole module; both run in their own process group
with PREFECT_HOME in a temporary folder, and are stopped with SIGINT (SIGKILL if they
linger).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx
import psutil
import pytest
import torch

from mergefleet.fixtures.synthetic import LlamaShape, make_model_family
from orchestrator.pipeline import merge
from orchestrator.recipe import parse_recipe
from tests.helpers import MERGEFLEET, assert_same_tensors, checkpoint_bytes, gta_recipe, read_tensors, write_recipe
from tests.s3_server import s3_credentials, s3_server  # noqa: F401 -- fixture

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
POOL = "it-pool"
MEDIUM = LlamaShape(hidden=384, layers=6, intermediate=1024, vocab=512, heads=8, kv_heads=4)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(process: subprocess.Popen, timeout: float = 30) -> None:
    """SIGINT to the process group, then SIGKILL if it is still there after ``timeout``."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # whatever of the group is left
    except ProcessLookupError:
        pass
    process.wait(timeout=10)


def _wait_for(check, what: str, timeout: float, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what}: the process exited ({process.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{what} did not happen within {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A real Prefect server; yields the environment that points a process at it."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PREFECT_", "AWS_"))}
    env |= s3_credentials()  # fake keys for the S3 server of the tests; its endpoint only ever in a recipe
    env |= {
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",  # one store for every merge here
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
    }
    log = home / "server.log"
    with open(log, "w") as sink:
        process = subprocess.Popen(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
        )
    api = f"http://127.0.0.1:{port}/api"
    try:
        _wait_for(lambda: httpx.get(f"{api}/health", timeout=2).status_code == 200, "server start", 120, process, log)
        yield env | {"PREFECT_API_URL": api, "PREFECT_WORKER_QUERY_SECONDS": "1"}
    finally:
        _stop(process)


@pytest.fixture(scope="module")
def worker(server: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[psutil.Process]:
    """A real process worker on POOL (it creates the pool)."""
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    with open(log, "w") as sink:
        process = subprocess.Popen(
            [str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--type", "process"],
            env=server, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
        )
    api = server["PREFECT_API_URL"]

    def online() -> bool:
        workers = httpx.post(f"{api}/work_pools/{POOL}/workers/filter", json={}, timeout=2)
        return workers.status_code == 200 and any(w["status"] == "ONLINE" for w in workers.json())

    try:
        _wait_for(online, "worker start", 90, process, log)
        yield psutil.Process(process.pid)
    finally:
        _stop(process)


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


def test_deployment_target_gives_the_inline_checkpoint_byte_for_byte(deployed: dict[str, str], family, tmp_path: Path) -> None:
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
    assert all(run["parent_task_run_id"] for run in runs)  # each shown under its shard task


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
    deployed: dict[str, str], worker: psutil.Process, medium_family, tmp_path: Path
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
        for process in worker.children(recursive=True):
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


def test_prefect_yaml_deploys_with_prefect_deploy(deployed: dict[str, str], tmp_path: Path) -> None:
    api = deployed["PREFECT_API_URL"]
    assert httpx.post(f"{api}/work_pools/", json={"name": "yaml-pool", "type": "process"}, timeout=10).status_code == 201
    env = deployed | {"MERGEFLEET_POOL": "yaml-pool", "MERGEFLEET_RECIPE": str(tmp_path / "recipe.yaml")}
    done = subprocess.run(
        [str(BIN / "prefect"), "--no-prompt", "deploy", "--prefect-file", "flows/prefect.yaml", "--all"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    shard = httpx.get(f"{api}/deployments/name/merge-shard/yaml-pool", timeout=10).json()
    nightly = httpx.get(f"{api}/deployments/name/merge-and-eval/nightly", timeout=10).json()
    assert shard["work_pool_name"] == nightly["work_pool_name"] == "yaml-pool"
    assert nightly["parameters"] == {"recipe_file": str(tmp_path / "recipe.yaml"), "overwrite": True, "skip_unchanged": True}
    assert [s["schedule"]["cron"] for s in nightly["schedules"]] == ["0 2 * * *"]
