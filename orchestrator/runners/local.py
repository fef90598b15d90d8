"""What the runners on this machine share (threads, processes): their settings, and the
shards one after the other in the calling thread when there is one worker."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from orchestrator.plan import Plan
from orchestrator.receipt import ShardOutcome
from orchestrator.shard import OnTensor, PauseHook, run_shard
from orchestrator.streaming import StreamingPolicy


@dataclass(frozen=True)
class LocalRunner:
    """``workers`` shards at once on this machine. ``on_tensor`` reports progress in this
    process; ``streaming`` and ``pause`` go to every shard (``pause``: a test's hook)."""

    workers: int = 1
    device: str = "cpu"
    on_tensor: OnTensor | None = field(default=None, compare=False)
    streaming: StreamingPolicy = StreamingPolicy()
    pause: PauseHook | None = None

    def one_after_another(self, plan: Plan, indices: Sequence[int]) -> list[ShardOutcome]:
        return [
            run_shard(plan, i, device=self.device, on_tensor=self.on_tensor, streaming=self.streaming, pause=self.pause)
            for i in indices
        ]
