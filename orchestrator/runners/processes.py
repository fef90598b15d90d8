"""Shards on this machine: in this process (one worker) or in worker processes.

Each shard in its own memory (``mergefleet merge`` runs threads instead:
``orchestrator/runners/threads.py``). Each worker process opens the plan once from its
``PlanRef`` and runs the shards it is given; progress comes back over a queue. When a
shard fails, or a worker dies (killed, out of memory), the other workers are stopped and
the error is raised; finished shards keep their receipts. When this process dies (SIGKILL
included) its workers die with it: the kernel kills them (Linux ``PR_SET_PDEATHSIG``), and
a watchdog thread in each worker exits it once its parent is gone (other platforms, or a
parent that died before the worker could ask the kernel).
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from orchestrator.errors import MergeError
from orchestrator.memory import keep_freed_memory
from orchestrator.parent import exit_with_parent
from orchestrator.plan_ref import PlanRef, open_plan
from orchestrator.receipt import ShardOutcome
from orchestrator.redact import install_log_redaction
from orchestrator.runners.local import LocalRunner
from orchestrator.shard import PauseHook, run_shard
from orchestrator.streaming import StreamingPolicy
from orchestrator.threads import threads_each


@dataclass(frozen=True)
class WorkerProcesses(LocalRunner):
    """Implements ``ShardRunner``: ``workers`` shards at once, each in its own process
    (``workers=1``: one after the other in this process). ``pause`` runs in the worker, so
    it must be picklable: a module-level function or an instance of a module-level class.
    """

    def run(self, plan: PlanRef, indices: Sequence[int]) -> list[ShardOutcome]:
        indices = list(indices)
        workers = max(1, min(self.workers, len(indices)))
        if workers == 1:
            return self.one_after_another(open_plan(plan), indices)
        try:
            return self._in_processes(plan, indices, workers)
        finally:
            open_plan(plan).output_sink().remove_partials()  # a killed worker's temporary files

    def _in_processes(self, plan: PlanRef, indices: list[int], workers: int) -> list[ShardOutcome]:
        context = multiprocessing.get_context("spawn")
        progress = context.Queue()
        stop = threading.Event()

        def drain() -> None:
            while not stop.is_set() or not progress.empty():
                try:
                    name, nbytes = progress.get(timeout=0.1)
                except queue.Empty:
                    continue
                if self.on_tensor:
                    self.on_tensor(name, nbytes)

        drainer = threading.Thread(target=drain, name="shard-progress", daemon=True)
        drainer.start()
        executor = ProcessPoolExecutor(
            workers, mp_context=context, initializer=_worker_init, initargs=(progress, threads_each(workers), os.getpid())
        )
        try:
            futures = {
                executor.submit(_worker_shard, plan, i, self.device, self.streaming, self.pause): i for i in indices
            }
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = [f for f in done if f.exception() is not None]
            if failed:
                for child in multiprocessing.active_children():
                    child.terminate()
                executor.shutdown(wait=False, cancel_futures=True)
                error = failed[0].exception()
                if isinstance(error, BrokenProcessPool):
                    unfinished = sorted(futures[f] for f in futures if f not in done or f.exception() is not None)
                    raise MergeError(
                        f"a shard worker process died (killed, or out of memory) while shard(s) {unfinished} ran; "
                        "finished shards are kept: run the same command again to resume"
                    ) from None
                raise error  # type: ignore[misc]
            results = {futures[f]: f.result() for f in done}
            return [results[i] for i in indices]
        finally:
            executor.shutdown(wait=True, cancel_futures=True)
            stop.set()
            drainer.join()


_progress: Any = None
"""The progress queue of this worker process (set once, when the worker starts)."""


PARENT_POLL_S = 0.5
"""How often a worker's watchdog checks that its parent is alive."""

def _worker_init(progress: Any, threads: int, parent: int) -> None:
    global _progress
    _die_with_parent(parent)
    keep_freed_memory()
    install_log_redaction()
    torch.set_num_threads(threads)
    _progress = progress


def _die_with_parent(parent: int) -> None:
    """Make this worker exit when process ``parent`` dies, however it dies: the kernel's
    signal where there is one, and a watchdog thread besides."""
    exit_with_parent(parent, signal.SIGKILL)
    threading.Thread(target=_watch_parent, args=(parent,), name="parent-watchdog", daemon=True).start()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os._exit(1)  # an orphan: its shard's temporary file is removed by the next run


def _worker_shard(plan: PlanRef, index: int, device: str, streaming: StreamingPolicy, pause: PauseHook | None) -> ShardOutcome:
    def report(name: str, nbytes: int) -> None:
        _progress.put((name, nbytes))

    return run_shard(open_plan(plan), index, device=device, on_tensor=report, streaming=streaming, pause=pause)
