"""The merge_shard flow: one shard of a plan, the unit a worker runs.

It receives the plan's ``PlanRef`` and opens the plan the way ``mergefleet merge`` does;
tensors never pass through Prefect.
"""

from __future__ import annotations

from prefect import flow

from flows.runners.common import run_one_shard
from orchestrator.memory import keep_freed_memory
from orchestrator.plan_ref import PlanRef
from orchestrator.receipt import ShardOutcome


@flow(name="merge-shard", description="Run one shard of a mergefleet plan.")
def merge_shard(plan: PlanRef, index: int, device: str = "cpu", concurrency_limit: str | None = None) -> ShardOutcome:
    """``plan``: where the plan is and how to open it; ``index``: the shard.
    ``concurrency_limit``: a global concurrency limit to hold one slot of while merging."""
    keep_freed_memory()  # this process runs this shard only
    return run_one_shard(plan, index, device=device, concurrency_limit=concurrency_limit)
