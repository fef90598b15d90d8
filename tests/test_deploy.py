"""`mergefleet deploy` on a temporary Prefect API: what it registers, and the one-line
errors for a bad schedule, a time zone, a work pool of the wrong type and an unreachable
server, each before anything is written to the server."""

from __future__ import annotations

import json
import socket
from datetime import timedelta
from pathlib import Path

import pytest

from mergefleet import cli
from orchestrator.recipe import parse_recipe
from orchestrator.schedule import deployed_tracking_uri
from tests.helpers import write_recipe
from tests.test_flows import recipe_data

pytestmark = pytest.mark.usefixtures("prefect_harness", "restore_environ")

IMAGE_TEMPLATE = {
    "job_configuration": {"image": "{{ image }}"},
    "variables": {"type": "object", "properties": {"image": {"type": "string", "title": "Image"}}},
}


def client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def create_pool(name: str, type_: str, template: dict | None = None) -> None:
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.workers.process import ProcessWorker

    if template is None:
        template = ProcessWorker.get_default_base_job_template() if type_ == "process" else {}
    with client() as c:
        c.create_work_pool(WorkPoolCreate(name=name, type=type_, base_job_template=template))


def on_server(read: str, name: str) -> bool:
    """Whether ``client.read_<read>(name)`` finds something."""
    from prefect.exceptions import ObjectNotFound

    with client() as c:
        try:
            getattr(c, f"read_{read}")(name)
        except ObjectNotFound:
            return False
    return True


def registered(name: str) -> bool:
    return on_server("deployment_by_name", name)


def pool_exists(name: str) -> bool:
    return on_server("work_pool", name)


def deploy_error(capsys, recipe: Path, *args: str) -> str:
    """Run a deploy that must fail; its stderr, which must be one line."""
    assert cli.main(["deploy", str(recipe), *args]) == 9
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


@pytest.fixture
def recipe(family, tmp_path: Path) -> Path:
    return write_recipe(tmp_path / "checks.yaml", recipe_data(family, tmp_path / "merged"))


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--cron", "61 2 * * *"], "--cron '61 2 * * *'"),
        (["--cron", "every night"], "--cron 'every night'"),
        (["--cron", "0 2 * * *", "--timezone", "Mars/Olympus_Mons"], "--timezone 'Mars/Olympus_Mons'"),
        (["--interval", "0"], "--interval 0"),
        (["--interval", "inf"], "--interval inf"),
    ],
)
def test_a_schedule_prefect_rejects_is_one_line_and_nothing_is_registered(recipe: Path, capsys, args, named) -> None:
    err = deploy_error(capsys, recipe, "--pool", "sched-pool", "--create-pool", *args)
    assert named in err
    assert not pool_exists("sched-pool") and not registered("merge-shard/sched-pool") and not registered("merge-and-eval/checks")


def test_a_pool_that_cannot_run_the_flows_is_refused_before_anything_is_registered(recipe: Path, capsys) -> None:
    create_pool("push-pool", "cloud-run:push", IMAGE_TEMPLATE)  # takes an image, but runs code from storage
    create_pool("odd-pool", "odd-type")
    create_pool("docker-pool", "docker", IMAGE_TEMPLATE)
    create_pool("proc-pool", "process")

    err = deploy_error(capsys, recipe, "--pool", "push-pool")
    assert "'push-pool' is a 'cloud-run:push' pool, which runs code pulled from storage" in err and "process pool" in err
    err = deploy_error(capsys, recipe, "--pool", "proc-pool", "--flow-pool", "odd-pool")
    assert "'odd-pool' is a 'odd-type' pool" in err
    err = deploy_error(capsys, recipe, "--pool", "docker-pool")
    assert "'docker-pool' (docker)" in err and "--image" in err
    err = deploy_error(capsys, recipe, "--pool", "proc-pool", "--image", "registry.local/mergefleet:1")
    assert "--image 'registry.local/mergefleet:1'" in err and "'proc-pool'" in err
    err = deploy_error(capsys, recipe, "--pool", "missing-pool")
    assert "no work pool 'missing-pool'" in err and "--create-pool" in err
    for pool in ("push-pool", "odd-pool", "docker-pool", "proc-pool", "missing-pool"):
        assert not registered(f"merge-shard/{pool}")
    assert not registered("merge-and-eval/checks")

    # a container pool with an image: the image goes to the deployments on that pool only
    assert cli.main(["deploy", str(recipe), "--pool", "docker-pool", "--flow-pool", "proc-pool", "--image", "reg/mf:1", "--json"]) == 0
    with client() as c:
        assert c.read_deployment_by_name("merge-shard/docker-pool").job_variables == {"image": "reg/mf:1"}
        assert not c.read_deployment_by_name("merge-and-eval/checks").job_variables


def test_an_unreachable_server_is_one_line_naming_its_url(recipe: Path, capsys) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}/api"
    with temporary_settings(updates={PREFECT_API_URL: url}):
        err = deploy_error(capsys, recipe, "--pool", "gone-pool", "--create-pool", "--interval", "60")
    assert f"the Prefect server at {url} does not answer" in err
    assert not pool_exists("gone-pool") and not registered("merge-shard/gone-pool")


def test_create_pool_makes_a_process_pool_and_the_summary_says_how_to_watch(recipe: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert cli.main(["deploy", str(recipe), "--pool", "new-pool", "--create-pool", "--interval", "3600", "--name", "hourly"]) == 0
    out = capsys.readouterr().err
    with client() as c:
        assert c.read_work_pool("new-pool").type == "process"
        hourly = c.read_deployment_by_name("merge-and-eval/hourly")
    assert [s.schedule.interval for s in hourly.schedules] == [timedelta(hours=1)]
    assert hourly.global_concurrency_limit is not None and hourly.global_concurrency_limit.limit == 1
    assert "created work pool 'new-pool' (process)" in out
    assert "prefect worker start --pool new-pool --type process" in out
    assert "prefect flow-run ls --flow-name merge-and-eval" in out
    assert f"MLflow runs recorded in sqlite:///{recipe.parent / 'mlflow.db'}" in out  # beside the output
    assert hourly.parameters["recipe"]["fleet"]["tracking_uri"] == f"sqlite:///{recipe.parent / 'mlflow.db'}"

    assert cli.main(["deploy", str(recipe), "--pool", "new-pool", "--name", "hourly", "--json"]) == 0  # again, unscheduled
    with client() as c:
        assert c.read_deployment_by_name("merge-and-eval/hourly").schedules == []


def test_the_tracking_store_of_a_deployment_is_an_absolute_place(family, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    recipe = parse_recipe(recipe_data(family))
    out = str(tmp_path / "runs" / "merged")
    assert deployed_tracking_uri(recipe, out, tmp_path) == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert deployed_tracking_uri(recipe, "s3://bucket/merged", tmp_path) is None  # the worker's default
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///stores/mlflow.db")
    assert deployed_tracking_uri(recipe, out, tmp_path) == f"sqlite:///{tmp_path / 'stores' / 'mlflow.db'}"
    explicit = parse_recipe(recipe_data(family, tracking_uri="http://127.0.0.1:5000"))
    assert deployed_tracking_uri(explicit, out, tmp_path) == "http://127.0.0.1:5000"


def test_deploy_json_prints_only_json(recipe: Path, capsys) -> None:
    create_pool("json-pool", "process")
    assert cli.main(["deploy", str(recipe), "--pool", "json-pool", "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["merge_and_eval"]["schedule"] == "no schedule" and result["created_pools"] == []
