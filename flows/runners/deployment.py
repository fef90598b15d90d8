"""``fleet.target: deployment``: each shard a run of the merge-shard deployment on a Prefect
work pool (a ``process`` pool here, a ``kubernetes`` pool in a cluster), started with
``run_deployment`` by a task that waits for it and reads the shard's receipt back from
storage. Each flow run is named like its shard's task run, after the plan:
``ab12cd34-shard-2 (layers 8-11)`` (Prefect bans only ``/ % & < >`` in names; a Kubernetes
worker slugs the name into its Job's labels: ``ab12cd34-shard-2-layers-8-11``). The flow
run receives the plan's ``PlanRef``; tensors never pass through Prefect. ``flows.pool_runs``
follows each flow run (a Kubernetes pool's run that never starts is cancelled after the
pool's start timeout, naming its Job)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Sequence

from prefect import task
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.context import TaskRunContext
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.futures import wait
from prefect.settings import PREFECT_API_URL
from prefect.task_runners import ThreadPoolTaskRunner

from flows import embedded, pool_runs
from flows.runners import common
from orchestrator import events
from orchestrator.errors import ConfigurationError
from orchestrator.plan_ref import PlanRef, open_plan
from orchestrator.receipt import ShardOutcome, finished_receipt
from orchestrator.recipe import FleetSettings
from orchestrator.report import shard_name

POLL_S = 0.25
"""How often a shard's task asks for its flow run's state: it notices the end ~0.15 s late
on average, for four light reads a second per running shard."""

_CREATING = threading.Lock()
"""One shard's flow run created at a time from this process. A Prefect server on SQLite
answers concurrent writes with 503 "database is locked", and Prefect's client tries again
only 2 s later: shards created side by side waited 2-8 s each; one after another, each
creation takes a few tens of milliseconds."""

RECORDED_WAIT_S = 2.0
"""How long a shard's task waits for the server to record it as Running before it creates
its flow run anyway (see ``wait_until_recorded``)."""


@task(name="merge-shard-on-pool", **common.SHARD_TASK)
def merge_shard_on_pool(plan: PlanRef, index: int, deployment: str, device: str, concurrency_limit: str | None) -> ShardOutcome:
    """Run shard ``index`` as a flow run of ``deployment``, wait, and read its receipt."""
    opened = open_plan(plan)
    sink = opened.output_sink()
    done = finished_receipt(opened, sink, index)
    if done is not None:
        events.emit(events.ShardDone(index, done.bytes_written, done.seconds, skipped=True))
        return ShardOutcome(receipt=done, skipped=True)
    wait_until_recorded(RECORDED_WAIT_S)
    with _CREATING:
        run = run_deployment(
            deployment,
            parameters={"plan": plan.model_dump(mode="json"), "index": index, "device": device, "concurrency_limit": concurrency_limit},
            flow_run_name=f"{opened.plan_id[:8]}-{shard_name(opened, index)}",  # "ab12cd34-shard-2 (layers 8-11)"
            timeout=0,  # returns once created; pool_runs.wait follows it, with the pool's start timeout
        )
    run = pool_runs.wait(run, index=index, poll=POLL_S)
    state = run.state
    if state is None or not state.is_completed():
        kind = state.type.value.lower() if state else "no state"
        message = (state.message or "") if state else ""
        message = message.removeprefix("Flow run encountered an exception: ")
        raise common.ShardRunFailed(f"shard {index}: flow run '{run.name}' of {deployment} {kind}: {message}".rstrip(": "))
    receipt = finished_receipt(opened, sink, index)
    if receipt is None:
        raise common.ShardRunFailed(
            f"shard {index}: flow run '{run.name}' of {deployment} completed but left no receipt in {opened.output}; "
            "does the worker see the same storage?"
        )
    common.run_log().info("shard %d done by flow run '%s'", index, run.name)
    events.emit(events.ShardDone(index, receipt.bytes_written, receipt.seconds, skipped=False))
    return ShardOutcome(receipt=receipt, skipped=False)


def wait_until_recorded(timeout_s: float, poll_s: float = 0.02) -> float:
    """Wait until the Prefect server has recorded the calling task run as Running; returns
    the seconds waited (``timeout_s`` at most: the wait only saves time, nothing needs it).

    ``run_deployment`` links a shard's flow run to this task through a placeholder task run,
    which the server creates by reading and then writing in one transaction. The server
    records this task's own Running state from its event at about the same moment; on SQLite
    the placeholder's write then fails with 503 "database is locked", and Prefect's client
    asks again only 2 s later. Waiting for the record, a few light reads, takes that
    collision out."""
    context = TaskRunContext.get()
    if context is None:
        return 0.0
    started = time.monotonic()
    with get_client(sync_client=True) as client:
        while time.monotonic() - started < timeout_s:
            try:
                if client.read_task_run(context.task_run.id).state_type == StateType.RUNNING:
                    break
            except ObjectNotFound:
                pass
            time.sleep(poll_s)
    return time.monotonic() - started


def check_deployment(name: str) -> None:
    """The deployment exists on a server that workers share (not this process's own API)."""
    if PREFECT_API_URL.value() is None or embedded.is_embedded(PREFECT_API_URL.value()):
        raise ConfigurationError(
            "target 'deployment' needs a Prefect server that the workers share: set PREFECT_API_URL "
            "(e.g. http://127.0.0.1:4200/api after 'prefect server start')"
        )
    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(name)
        except ObjectNotFound:
            raise ConfigurationError(
                f"no deployment '{name}' on the Prefect server at {PREFECT_API_URL.value()}: register it with "
                "'mergefleet deploy RECIPE --pool POOL', or set fleet.shard_deployment"
            ) from None


@dataclass(frozen=True)
class DeploymentRuns:
    """Implements ``ShardRunner`` with flow runs of a deployment on a work pool, all at once
    (the pool's workers, and the concurrency limit if any, decide how many run)."""

    deployment: str
    device: str = "cpu"
    retries: int = 2
    concurrency_limit: str | None = None
    concurrency_slots: int | None = None

    @classmethod
    def for_fleet(cls, fleet: FleetSettings) -> "DeploymentRuns":
        return cls(fleet.shard_deployment_name(), fleet.device, fleet.shard_retries, fleet.concurrency_limit, fleet.concurrency_slots)

    def run(self, plan: PlanRef, indices: Sequence[int]) -> list[ShardOutcome]:
        if self.concurrency_limit:
            common.reserve_slots(self.concurrency_limit, self.concurrency_slots)
        check_deployment(self.deployment)
        shard = merge_shard_on_pool.with_options(retries=self.retries, retry_delay_seconds=common.SHARD_RETRY_DELAY_S)
        common_parameters = {"plan": plan, "deployment": self.deployment, "device": self.device, "concurrency_limit": self.concurrency_limit}
        with ThreadPoolTaskRunner(max_workers=max(1, len(indices))) as runner:
            futures = [runner.submit(shard, parameters={**common_parameters, "index": i}) for i in indices]
            wait(futures)
        return common.settle(plan, futures)
