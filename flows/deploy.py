"""Register the deployments of ``mergefleet deploy``.

- ``merge-shard/<pool>``: the merge_shard flow on the work pool ``pool``; the
  ``deployment`` target fans shards out to it.
- ``merge-and-eval/<name>``: the merge_and_eval flow with the recipe as its parameter,
  on a cron schedule if one is given. Its runs pass ``skip_unchanged``: a nightly run
  does nothing unless the recipe or an input checkpoint changed since the last
  successful merge, and then re-merges into the same output.

Both are registered by module path (``flows.merge_shard.merge_shard``), with no code
storage: the worker imports the installed mergefleet, so the same deployments run on a
``process`` pool here and on a ``kubernetes`` pool whose image has mergefleet installed.
"""

from __future__ import annotations

from typing import Any

from prefect.client.orchestration import get_client
from prefect.deployments.runner import EntrypointType
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL

from flows.merge_and_eval import merge_and_eval
from flows.merge_shard import merge_shard
from orchestrator.errors import ConfigurationError


def _check_pool(name: str) -> str:
    with get_client(sync_client=True) as client:
        try:
            return client.read_work_pool(name).type
        except ObjectNotFound:
            raise ConfigurationError(
                f"no work pool '{name}' on the Prefect server at {PREFECT_API_URL.value()}: create it with "
                f"'prefect work-pool create {name} --type process' (or kubernetes), or start a worker with "
                f"'prefect worker start --pool {name} --type process'"
            ) from None


def deploy(
    recipe: dict[str, Any],
    *,
    name: str,
    pool: str,
    flow_pool: str | None = None,
    cron: str | None = None,
    image: str | None = None,
) -> dict[str, Any]:
    """Create or update both deployments; ``recipe`` must be portable (absolute paths)."""
    if PREFECT_API_URL.value() is None:
        raise ConfigurationError("deployments live on a Prefect server: set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api)")
    flow_pool = flow_pool or pool
    pool_types = {p: _check_pool(p) for p in {pool, flow_pool}}
    job_variables = {"image": image} if image else None
    shard = merge_shard.to_deployment(
        name=pool,
        work_pool_name=pool,
        job_variables=job_variables,
        entrypoint_type=EntrypointType.MODULE_PATH,
        tags=["mergefleet"],
    )
    nightly = merge_and_eval.to_deployment(
        name=name,
        work_pool_name=flow_pool,
        cron=cron,
        parameters={"recipe": recipe, "overwrite": True, "skip_unchanged": True},
        job_variables=job_variables,
        entrypoint_type=EntrypointType.MODULE_PATH,
        tags=["mergefleet"],
    )
    return {
        "merge_shard": {"name": f"{merge_shard.name}/{pool}", "id": str(shard.apply()), "pool": pool, "pool_type": pool_types[pool]},
        "merge_and_eval": {
            "name": f"{merge_and_eval.name}/{name}",
            "id": str(nightly.apply()),
            "pool": flow_pool,
            "pool_type": pool_types[flow_pool],
            "cron": cron,
        },
    }
