"""``fleet.target: inline``: each shard a Prefect task in the flow's own process,
``fleet.workers`` at a time, sharing the CPU."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from prefect import task
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner

from flows.runners import common
from orchestrator.plan_ref import PlanRef
from orchestrator.receipt import ShardOutcome
from orchestrator.recipe import FleetSettings
from orchestrator.threads import share_cpu


@task(name="merge-shard", **common.SHARD_TASK)
def merge_shard_task(plan: PlanRef, index: int, device: str, concurrency_limit: str | None) -> ShardOutcome:
    return common.run_one_shard(plan, index, device=device, concurrency_limit=concurrency_limit)


@dataclass(frozen=True)
class InlineTasks:
    """Implements ``ShardRunner`` with Prefect tasks in this process (inside a flow run)."""

    workers: int = 1
    device: str = "cpu"
    retries: int = 2
    concurrency_limit: str | None = None
    concurrency_slots: int | None = None

    @classmethod
    def for_fleet(cls, fleet: FleetSettings) -> "InlineTasks":
        return cls(fleet.workers or 1, fleet.device, fleet.shard_retries, fleet.concurrency_limit, fleet.concurrency_slots)

    def run(self, plan: PlanRef, indices: Sequence[int]) -> list[ShardOutcome]:
        if self.concurrency_limit:
            common.reserve_slots(self.concurrency_limit, self.concurrency_slots)
        shard = merge_shard_task.with_options(retries=self.retries, retry_delay_seconds=common.SHARD_RETRY_DELAY_S)
        parallel = max(1, min(self.workers, len(indices)))
        with share_cpu(parallel), ThreadPoolTaskRunner(max_workers=parallel) as runner:
            futures = [
                runner.submit(
                    shard,
                    parameters={"plan": plan, "index": i, "device": self.device, "concurrency_limit": self.concurrency_limit},
                )
                for i in indices
            ]
            wait(futures)
        return common.settle(plan, futures)
