"""The shard-runner interface: what every place shards can run in implements."""

from __future__ import annotations

from typing import Protocol, Sequence

from orchestrator.plan_ref import PlanRef
from orchestrator.receipt import ShardOutcome


class ShardRunner(Protocol):
    """Runs shards of one plan somewhere and waits for them.

    A runner receives the plan's ``PlanRef`` (never the plan, never tensors): wherever a
    shard runs, it opens the plan with ``open_plan`` and calls ``orchestrator.shard.run_shard``,
    which skips a shard whose receipt says it is done. ``run`` returns each shard's outcome
    in the order of ``indices``; when a shard fails, it raises that shard's own error (a
    ``MergefleetError`` where the cause is ours), and finished shards keep their receipts,
    so running again does only what is missing. Nothing may be left writing to the output
    when ``run`` returns or raises.
    """

    def run(self, plan: PlanRef, indices: Sequence[int]) -> list[ShardOutcome]: ...
