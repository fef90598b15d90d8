"""Shards on this machine in threads of this process: what ``mergefleet merge`` runs by default.

torch releases the GIL inside its operations, and reads and writes release it in the file
calls, so ``workers`` shards side by side in threads use the cores as worker processes
would, without starting an interpreter and importing torch again in each (1–3 s per worker
here, the whole of a small merge). Each thread's torch operations get an equal share of the
cores (``orchestrator.threads.share_cpu``).

When a shard fails, the others stop at their next tensor (their temporary files are
removed, finished shards keep their receipts) and the first error is raised once no thread
is writing any more.
"""

from __future__ import annotations

import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Sequence

from orchestrator.plan_ref import PlanRef, open_plan
from orchestrator.receipt import ShardOutcome
from orchestrator.runners.local import LocalRunner
from orchestrator.shard import run_shard
from orchestrator.threads import share_cpu


class _Stopped(Exception):
    """Raised inside a shard's thread to stop it because another shard failed."""


@dataclass(frozen=True)
class WorkerThreads(LocalRunner):
    """Implements ``ShardRunner``: ``workers`` shards at once, each in a thread of this
    process (``workers=1``: one after the other in the calling thread, torch's threads
    left as they are). ``on_tensor`` is called from the shards' threads, one call at a time.
    """

    def run(self, plan: PlanRef, indices: Sequence[int]) -> list[ShardOutcome]:
        indices = list(indices)
        opened = open_plan(plan)
        workers = max(1, min(self.workers, len(indices)))
        if workers == 1:
            return self.one_after_another(opened, indices)
        failed = threading.Event()
        reporting = threading.Lock()

        def report(name: str, nbytes: int) -> None:
            if failed.is_set():
                raise _Stopped
            if self.on_tensor:
                with reporting:
                    self.on_tensor(name, nbytes)

        def one(index: int) -> ShardOutcome:
            if failed.is_set():
                raise _Stopped
            try:
                return run_shard(opened, index, device=self.device, on_tensor=report, streaming=self.streaming, pause=self.pause)
            except BaseException:
                failed.set()
                raise

        with share_cpu(workers), ThreadPoolExecutor(workers, thread_name_prefix="shard") as executor:
            futures = {executor.submit(one, i): i for i in indices}
            try:
                wait(futures, return_when=FIRST_EXCEPTION)
            except BaseException:  # interrupted: the shards stop at their next tensor
                failed.set()
                raise
        # the executor has joined every thread: nothing writes to the output any more
        errors = [f.exception() for f in futures if f.exception() is not None]
        first = next((e for e in errors if not isinstance(e, _Stopped)), None)
        if first is not None:
            raise first
        results = {futures[f]: f.result() for f in futures}
        return [results[i] for i in indices]
