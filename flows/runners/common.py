"""What the Prefect shard runners share: one shard as a task or a flow run does it,
retries for what may pass next time, the global concurrency limit, and waiting for all."""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator, Sequence

from prefect import get_run_logger
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency
from prefect.exceptions import MissingContextError, ObjectNotFound

from flows import naming
from orchestrator import events
from orchestrator.errors import ConfigurationError, MergeError, MergefleetError
from orchestrator.plan_ref import PlanRef, open_plan
from orchestrator.receipt import ShardOutcome, finished_receipt
from orchestrator.shard import run_shard

SHARD_RETRY_DELAY_S = 2.0
"""Seconds before a failed shard's next try (read when a runner starts its tasks)."""
LEASE_S = 60.0
"""A killed shard's concurrency slot is freed within about this long."""


class ShardRunFailed(MergeError):
    """A shard's flow run on a work pool failed or crashed; worth retrying."""


def worth_retrying(task: Any, task_run: Any, state: Any) -> bool:
    """Retry what may pass next time (a crash, I/O, memory); not a bad recipe, plan or input."""
    error = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    return isinstance(error, ShardRunFailed) or not isinstance(error, MergefleetError)


SHARD_TASK = {
    "task_run_name": naming.shard_run_name,
    "cache_policy": NO_CACHE,
    "persist_result": False,
    "retries": 2,
    "retry_delay_seconds": SHARD_RETRY_DELAY_S,
    "retry_condition_fn": worth_retrying,
}
"""The options of every shard task (a runner sets retries and delay from the recipe as it starts)."""


def run_log() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    """The run's logger inside a flow or task run; the module's logger outside one (a direct call)."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


@contextlib.contextmanager
def shard_slot(limit: str | None) -> Iterator[None]:
    """Hold one slot of the global concurrency limit ``limit`` (if any) while a shard runs."""
    if not limit:
        yield
        return
    with concurrency(limit, occupy=1, lease_duration=LEASE_S, strict=True):
        yield


def reserve_slots(limit: str, slots: int | None) -> None:
    """Create the global concurrency limit ``limit`` with ``slots`` slots, or resize it;
    without ``slots``, check that an operator created it."""
    with get_client(sync_client=True) as client:
        if slots is not None:
            client.upsert_global_concurrency_limit_by_name(limit, slots)
            return
        try:
            client.read_global_concurrency_limit_by_name(limit)
        except ObjectNotFound:
            raise ConfigurationError(
                f"fleet.concurrency_limit: there is no global concurrency limit '{limit}'; create it with "
                f"'prefect gcl create {limit} --limit N' or set fleet.concurrency_slots to N"
            ) from None


def run_one_shard(plan: PlanRef, index: int, *, device: str = "cpu", concurrency_limit: str | None = None) -> ShardOutcome:
    """What one shard's task (inline) or flow run (on a worker) does."""
    opened = open_plan(plan)
    done = finished_receipt(opened, opened.output_sink(), index)
    if done is not None:
        outcome = ShardOutcome(receipt=done, skipped=True)
    else:
        with shard_slot(concurrency_limit):
            outcome = run_shard(opened, index, device=device, on_tensor=events.shard_progress(index))
    receipt = outcome.receipt
    events.emit(events.ShardDone(index, receipt.bytes_written, receipt.seconds, outcome.skipped))
    verb = "already done" if outcome.skipped else f"{receipt.bytes_written / 1e6:.1f} MB in {receipt.seconds:.1f} s"
    run_log().info("%s (shard %d, %d tensors): %s", receipt.file, index, len(receipt.tensors), verb)
    return outcome


def settle(plan: PlanRef, futures: Sequence[Any]) -> list[ShardOutcome]:
    """Once every shard task has finished or failed: clear what a killed shard left, then
    raise the first failed shard's own error, or return every outcome in order."""
    open_plan(plan).output_sink().remove_partials()  # nothing writes now
    for future in futures:
        if not future.state.is_completed():
            future.result()  # raises the shard's own error
    return [future.result() for future in futures]
