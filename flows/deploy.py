"""Register the deployments of ``mergefleet deploy``.

- ``merge-shard/<pool>``: the merge_shard flow on the work pool ``pool``; the
  ``deployment`` target fans shards out to it.
- ``merge-and-eval/<name>``: the merge_and_eval flow with the recipe and its output as
  parameters, on a cron or interval schedule if one is given, one run at a time (a
  scheduled run waits while the previous one still merges into the same output). Its
  runs pass ``skip_unchanged``: a run does nothing unless the recipe or an input
  checkpoint changed since the last successful merge, and then re-merges into the same
  output.

Both are registered by module path (``flows.merge_shard.merge_shard``), with no code
storage: the worker imports the installed mergefleet, so the same deployments run on a
``process`` pool here and on a ``kubernetes`` pool whose image has mergefleet installed.
Everything is checked (``flows.preflight``) before anything is written to the server.
"""

from __future__ import annotations

from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.schedules import CronSchedule
from prefect.deployments.runner import EntrypointType
from prefect.settings import PREFECT_UI_URL
from prefect.workers.process import ProcessWorker

from flows.merge_and_eval import merge_and_eval
from flows.merge_shard import merge_shard
from flows.preflight import PROCESS, PoolCheck, Schedule, api_url, check_pool, check_server
from orchestrator.errors import DeploymentError


def describe(schedule: Schedule | None) -> str:
    """The schedule in words, for the summary."""
    if schedule is None:
        return "no schedule"
    if isinstance(schedule, CronSchedule):
        return f"cron '{schedule.cron}' ({schedule.timezone or 'UTC'})"
    return f"every {schedule.interval.total_seconds():g} s"


def deploy(
    recipe: dict[str, Any],
    *,
    name: str,
    pool: str,
    flow_pool: str | None = None,
    schedule: Schedule | None = None,
    image: str | None = None,
    create_pools: bool = False,
) -> dict[str, Any]:
    """Create or update both deployments; ``recipe`` must be portable (absolute paths)."""
    output = recipe.get("fleet", {}).get("output")
    url = api_url()
    flow_pool = flow_pool or pool
    with get_client(sync_client=True) as client:
        check_server(client, url)
        pools = {p: check_pool(client, p, url=url, image=image, create=create_pools) for p in dict.fromkeys([pool, flow_pool])}
    if image and not any(check.takes_image for check in pools.values()):
        raise DeploymentError(
            f"--image '{image}': work pool '{pool}' runs flows in the worker's own environment ({pools[pool].type}), not in an image"
        )

    def variables(check: PoolCheck) -> dict[str, Any] | None:
        return {"image": image} if image and check.takes_image else None

    shard = merge_shard.to_deployment(
        name=pool,
        work_pool_name=pool,
        job_variables=variables(pools[pool]),
        entrypoint_type=EntrypointType.MODULE_PATH,
        tags=["mergefleet"],
    )
    scheduled = merge_and_eval.to_deployment(
        name=name,
        work_pool_name=flow_pool,
        schedules=[schedule] if schedule else None,
        concurrency_limit=1,
        parameters={"recipe": recipe, "output": output, "overwrite": True, "skip_unchanged": True},
        job_variables=variables(pools[flow_pool]),
        entrypoint_type=EntrypointType.MODULE_PATH,
        tags=["mergefleet"],
    )

    with get_client(sync_client=True) as client:  # everything checked: now write
        template = ProcessWorker.get_default_base_job_template()
        for check in pools.values():
            if not check.exists:
                client.create_work_pool(WorkPoolCreate(name=check.name, type=check.type, base_job_template=template))
    return {
        "created_pools": [check.name for check in pools.values() if not check.exists],
        "merge_shard": {"name": f"{merge_shard.name}/{pool}", "id": str(shard.apply()), "pool": pool, "pool_type": pools[pool].type},
        "merge_and_eval": {
            "name": f"{merge_and_eval.name}/{name}",
            "id": str(scheduled.apply()),
            "pool": flow_pool,
            "pool_type": pools[flow_pool].type,
            "schedule": describe(schedule),
            "output": output,
            "tracking_uri": recipe.get("fleet", {}).get("tracking_uri"),
        },
    }


def summary(result: dict[str, Any]) -> list[str]:
    """What ``mergefleet deploy`` tells a person: what is registered, where runs record, how to watch."""
    shard, scheduled = result["merge_shard"], result["merge_and_eval"]
    lines = [f"created work pool '{name}' (process)" for name in result["created_pools"]]
    lines.append(
        f"registered {shard['name']} on pool {shard['pool']} ({shard['pool_type']}) and {scheduled['name']} on pool "
        f"{scheduled['pool']} ({scheduled['schedule']}); a run that finds nothing changed ends Completed, named Skipped"
    )
    tracking = scheduled["tracking_uri"] or "the worker's $MLFLOW_TRACKING_URI, else ~/.mergefleet/mlflow.db on the worker"
    lines.append(f"merges into {scheduled['output']}; MLflow runs recorded in {tracking}")
    if PROCESS in (shard["pool_type"], scheduled["pool_type"]):
        process_pool = shard["pool"] if shard["pool_type"] == PROCESS else scheduled["pool"]
        lines.append(f"a worker runs them: prefect worker start --pool {process_pool} --type process")
    ui = PREFECT_UI_URL.value()
    lines.append(
        f"watch: prefect flow-run ls --flow-name {merge_and_eval.name}" + (f", or {ui}/deployments" if ui else "")
        + f"; run one now: prefect deployment run '{scheduled['name']}'"
    )
    return lines
