"""Waiting for a shard's flow run on a work pool, with a start timeout.

A shard whose pod never starts (no node with a free GPU, a missing Secret, an image that
cannot be pulled) would leave its flow run pending for ever: the Prefect Kubernetes worker
creates the Job and leaves watching it to its observer, which reports what it sees in the
run's logs but does not give up. So the merge flow gives up itself: when the pool's job
template has ``pod_watch_timeout_seconds`` (the chart sets it from
``shardJob.startTimeoutSeconds``; a deployment's or run's job variables override it) and the
run has not started running within that many seconds of its creation, the run is cancelled
(the worker deletes its Job) and the shard fails with an error naming the Job.
"""

from __future__ import annotations

import time
from uuid import UUID

from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId, LogFilterLevel
from prefect.client.schemas.objects import FlowRun
from prefect.states import Cancelling

from orchestrator.errors import MergeError

START_TIMEOUT_VARIABLE = "pod_watch_timeout_seconds"


class ShardNotStarted(MergeError):
    """A shard's flow run did not start within the pool's start timeout (not worth retrying)."""


def start_timeout(client: SyncPrefectClient, run: FlowRun) -> float | None:
    """The run's start timeout in seconds: its job variables, else its deployment's, else the
    default in its pool's base job template; None for pools without one (process pools)."""
    if run.deployment_id is None:
        return None
    deployment = client.read_deployment(run.deployment_id)
    if not deployment.work_pool_name:
        return None
    pool = client.read_work_pool(deployment.work_pool_name)
    properties = pool.base_job_template.get("variables", {}).get("properties", {})
    if START_TIMEOUT_VARIABLE not in properties:
        return None
    for variables in (run.job_variables or {}, deployment.job_variables or {}):
        if variables.get(START_TIMEOUT_VARIABLE) is not None:
            return float(variables[START_TIMEOUT_VARIABLE])
    default = properties[START_TIMEOUT_VARIABLE].get("default")
    return float(default) if default is not None else None


def _job_name(run: FlowRun) -> str | None:
    """The Kubernetes Job behind a run, ``namespace/name`` (the worker records ``namespace:name``)."""
    pid = run.infrastructure_pid
    return pid.replace(":", "/", 1) if pid and ":" in pid else None


def _last_problem(client: SyncPrefectClient, run_id: UUID) -> str | None:
    """The run's latest warning or error log line (the observer's diagnosis of its pod)."""
    logs = client.read_logs(
        log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id]), level=LogFilterLevel(ge_=30)), limit=20
    )
    return logs[-1].message if logs else None


def _not_started(client: SyncPrefectClient, run: FlowRun, index: int, timeout: float, pool: str) -> ShardNotStarted:
    job = _job_name(run)
    problem = _last_problem(client, run.id)
    seen = f"; the cluster says: {problem}" if problem else ""
    if job is None:
        return ShardNotStarted(
            f"shard {index}: flow run '{run.name}' was not picked up by a worker of pool '{pool}' within {timeout:.0f} s"
            f"{seen}; is the worker running? ('mergefleet cluster check')"
        )
    namespace, name = job.split("/", 1)
    return ShardNotStarted(
        f"shard {index}: Kubernetes Job '{job}' did not start within {timeout:.0f} s ({START_TIMEOUT_VARIABLE} of pool "
        f"'{pool}'){seen}; see 'kubectl -n {namespace} describe job {name}' and 'mergefleet cluster check'"
    )


def wait(run: FlowRun, *, index: int, poll: float) -> FlowRun:
    """Until ``run`` is final; a run that has not started within its start timeout is
    cancelled and raises :class:`ShardNotStarted`."""
    begun = time.monotonic()
    with get_client(sync_client=True) as client:
        timeout = start_timeout(client, run)
        pool = run.work_pool_name or "?"
        while True:
            run = client.read_flow_run(run.id)
            state = run.state
            if state is not None and state.is_final():
                return run
            started = state is not None and (state.is_running() or state.is_cancelling() or state.is_paused())
            if not started and timeout is not None and time.monotonic() - begun > timeout:
                error = _not_started(client, run, index, timeout, pool)
                client.set_flow_run_state(run.id, Cancelling(message=str(error)), force=True)
                raise error
            time.sleep(poll)

