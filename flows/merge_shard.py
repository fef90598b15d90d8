"""The merge_shard flow: one shard of a plan, the unit a worker runs.

The plan is found by its URI (the output location); tensors never pass through Prefect.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.tasks import run_one_shard


@flow(name="merge-shard", description="Run one shard of a mergefleet plan.")
def merge_shard(plan_uri: str, index: int, device: str = "cpu", concurrency_limit: str | None = None) -> dict[str, Any]:
    """``plan_uri``: the output location holding .mergefleet/plan.json; ``index``: the shard.
    ``concurrency_limit``: a global concurrency limit to hold one slot of while merging."""
    return run_one_shard(plan_uri, index, device=device, concurrency_limit=concurrency_limit)
