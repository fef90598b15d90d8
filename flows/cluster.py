"""The Prefect half of the cluster: the kubernetes work pool and its worker.

- :func:`create_pool` registers (or updates) the work pool with the chart's base job template;
- :func:`pool_findings` says whether the pool exists, is of type kubernetes, and has a
  worker whose last heartbeat is recent (``mergefleet cluster check``).
"""

from __future__ import annotations

import datetime
from typing import Any

import httpx
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.settings import PREFECT_API_URL

from orchestrator.cluster.check import Finding
from orchestrator.cluster.template import JobTemplate
from orchestrator.errors import ClusterError

POOL_TYPE = "kubernetes"


def _api() -> str:
    url = PREFECT_API_URL.value()
    if not url:
        raise ClusterError("the work pool lives on a Prefect server: set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api)")
    return url


def create_pool(name: str, template: JobTemplate, *, update: bool = True) -> dict[str, Any]:
    """Create the work pool ``name`` of type kubernetes with ``template``; an existing pool of
    that type gets the template (``update``), one of another type is refused."""
    _api()
    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=name, type=POOL_TYPE, base_job_template=dict(template.template)))
            action = "created"
        except ObjectAlreadyExists:
            existing = client.read_work_pool(name)
            if existing.type != POOL_TYPE:
                raise ClusterError(
                    f"work pool '{name}' exists with type '{existing.type}', not {POOL_TYPE}: "
                    "pick another name (--pool) or delete it with 'prefect work-pool delete'"
                ) from None
            if not update:
                raise ClusterError(f"work pool '{name}' exists and was left as it is; leave out --no-update to give it this job template") from None
            client.update_work_pool(name, WorkPoolUpdate(base_job_template=dict(template.template)))
            action = "updated"
        pool = client.read_work_pool(name)
    return {"pool": name, "type": pool.type, "action": action, "template_source": template.source, "api": PREFECT_API_URL.value()}


def read_pool_template(name: str) -> JobTemplate | None:
    """The base job template of pool ``name`` on the server (None when there is no such pool)."""
    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            return None
    return JobTemplate(template=pool.base_job_template, source=f"work pool {name}", pool=name)


def check_pool(name: str, *, max_heartbeat_age: float) -> tuple[list[Finding], JobTemplate | None]:
    """The pool's findings and its job template; an unreachable Prefect API is one blocking finding."""
    try:
        return pool_findings(name, max_heartbeat_age=max_heartbeat_age), read_pool_template(name)
    except httpx.HTTPError as error:
        return [Finding("prefect api", False, f"cannot reach the Prefect API at {PREFECT_API_URL.value()}: {error}",
                        "check PREFECT_API_URL and the port-forward to the Prefect server")], None


def pool_findings(name: str, *, max_heartbeat_age: float, now: datetime.datetime | None = None) -> list[Finding]:
    """The pool exists, is of type kubernetes, and a worker sent a heartbeat in the last ``max_heartbeat_age`` s."""
    api = _api()
    now = now or datetime.datetime.now(datetime.timezone.utc)
    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            return [Finding("work pool", False, f"no work pool '{name}' on the Prefect server at {api}",
                            f"mergefleet cluster create-pool --pool {name} (or install the chart: its worker creates it)")]
        workers = client.read_workers_for_work_pool(name)
    findings = []
    if pool.type != POOL_TYPE:
        findings.append(Finding("work pool", False, f"work pool '{name}' is of type '{pool.type}', not {POOL_TYPE}",
                                "use the pool the chart's worker serves (workPool.name)"))
    else:
        findings.append(Finding("work pool", True, f"work pool '{name}' ({POOL_TYPE}) on {api}"))
    beats = [w.last_heartbeat_time for w in workers if w.last_heartbeat_time is not None]
    if not beats:
        findings.append(Finding("worker heartbeat", False, f"no worker has ever sent a heartbeat for pool '{name}'",
                                "start the worker: helm install (worker.enabled) or check its pod: "
                                "kubectl logs deploy/<release>-mergefleet-worker"))
        return findings
    latest = max(beats)
    age = (now - latest).total_seconds()
    if age > max_heartbeat_age:
        findings.append(Finding(
            "worker heartbeat", False,
            f"the last heartbeat of a worker for pool '{name}' is {age:.0f} s old (more than {max_heartbeat_age:.0f} s)",
            "the worker is down or cannot reach the Prefect API: kubectl logs deploy/<release>-mergefleet-worker",
        ))
    else:
        findings.append(Finding("worker heartbeat", True, f"{len(workers)} worker(s); last heartbeat {age:.0f} s ago"))
    return findings
