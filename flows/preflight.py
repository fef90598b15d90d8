"""What ``mergefleet deploy`` checks before it registers anything.

The schedule is one Prefect accepts, the Prefect server answers, and each work pool
exists (or is to be created) and can run the flows. A failed check is a one-line
``DeploymentError`` naming the value; nothing has been written to the server by then.

Which pools can run the flows: the deployments carry no code (their entrypoints are
module paths of the installed mergefleet), so a worker must start them where mergefleet
is installed. A ``process`` pool runs them in the worker's own environment; a pool that
starts containers (``kubernetes``, ``docker``, ...: its job template takes an ``image``)
needs an image with mergefleet, given by ``--image`` or as the pool's default image.
Push and Prefect-managed pools run code pulled from storage, which these deployments
do not have.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL
from pydantic import ValidationError

from orchestrator.errors import DeploymentError

PROCESS = "process"

Schedule = CronSchedule | IntervalSchedule


@dataclass(frozen=True)
class PoolCheck:
    """A work pool as found on the server; ``exists`` False: to be created as a process pool."""

    name: str
    type: str
    exists: bool
    takes_image: bool


def api_url() -> str:
    url = PREFECT_API_URL.value()
    if not url:
        raise DeploymentError("deployments live on a Prefect server: set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api)")
    return str(url)


def parse_schedule(*, cron: str | None, interval: float | None, timezone: str) -> Schedule | None:
    """The schedule Prefect will run, or None; refuses what Prefect's own schedules refuse."""
    try:
        IntervalSchedule(interval=timedelta(hours=1), timezone=timezone)
    except ValidationError:
        raise DeploymentError(
            f"--timezone '{timezone}' is not a time zone; give an IANA name such as 'UTC' or 'Europe/Berlin'"
        ) from None
    if cron is not None:
        try:
            return CronSchedule(cron=cron, timezone=timezone)
        except ValidationError:
            raise DeploymentError(
                f"--cron '{cron}' is not a cron expression Prefect accepts; e.g. '0 2 * * *' (every day at 02:00)"
            ) from None
    if interval is not None:
        if not (interval > 0 and math.isfinite(interval)):
            raise DeploymentError(f"--interval {interval:g}: give a number of seconds above 0")
        return IntervalSchedule(interval=timedelta(seconds=interval), timezone=timezone)
    return None


def check_server(client: SyncPrefectClient, url: str) -> None:
    problem = client.api_healthcheck()
    if problem is not None:
        reason = str(problem).splitlines()[0] if str(problem) else type(problem).__name__
        raise DeploymentError(
            f"the Prefect server at {url} does not answer ({reason}); start it ('prefect server start') "
            "or point PREFECT_API_URL at it"
        )


def _takes_image(template: dict[str, Any]) -> bool:
    return "image" in (template.get("variables") or {}).get("properties", {})


def _default_image(template: dict[str, Any]) -> Any:
    return (template.get("variables") or {}).get("properties", {}).get("image", {}).get("default")


def check_pool(client: SyncPrefectClient, name: str, *, url: str, image: str | None, create: bool) -> PoolCheck:
    """The pool ``name`` if it can run the flows (see the module's docstring)."""
    try:
        pool = client.read_work_pool(name)
    except ObjectNotFound:
        if create:
            return PoolCheck(name=name, type=PROCESS, exists=False, takes_image=False)
        raise DeploymentError(
            f"no work pool '{name}' on the Prefect server at {url}: pass --create-pool (a process pool), "
            f"or create it with 'prefect work-pool create {name} --type process' (or kubernetes)"
        ) from None
    template = pool.base_job_template or {}
    if pool.type.endswith(":push") or pool.type.startswith("prefect:"):
        raise DeploymentError(
            f"work pool '{name}' is a '{pool.type}' pool, which runs code pulled from storage; mergefleet's "
            "deployments run the installed mergefleet: use a process pool, or a kubernetes or docker pool with --image"
        )
    if pool.type == PROCESS:
        return PoolCheck(name=name, type=pool.type, exists=True, takes_image=False)
    if not _takes_image(template):
        raise DeploymentError(
            f"work pool '{name}' is a '{pool.type}' pool, which neither runs flows in the worker's environment "
            "(process) nor starts a container image; use a process pool, or a kubernetes or docker pool with --image"
        )
    if image is None and not _default_image(template):
        raise DeploymentError(
            f"work pool '{name}' ({pool.type}) starts each flow run in a container: give --image IMAGE, an image "
            "with mergefleet installed (Prefect's default image does not have it)"
        )
    return PoolCheck(name=name, type=pool.type, exists=True, takes_image=True)
