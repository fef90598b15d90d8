"""The whole merge on one machine: plan, run shards (in worker processes), assemble.

This is what ``mergefleet merge`` runs. The Prefect flows run the same three steps,
with shards as tasks or deployments instead of local processes.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from orchestrator.assemble import INDEX_FILE, MANIFEST_FILE, assemble
from orchestrator.errors import MergeError, OutputError
from orchestrator.plan import PLAN_FILE, Plan, build_plan
from orchestrator.recipe import Recipe
from orchestrator.shard import OnTensor, Receipt, receipt_file, run_shard
from orchestrator.storage import checkpoint as ckpt
from orchestrator.storage.base import OutputSink, StorageOptions
from orchestrator.vocabulary import TOKENIZER_FILES

log = logging.getLogger(__name__)


@dataclass
class MergeSummary:
    plan_id: str
    output: str
    method: str
    shards: int
    shards_skipped: int
    tensors: int
    bytes_written: int
    seconds: float
    manifest: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {
            "plan_id": self.plan_id,
            "output": self.output,
            "method": self.method,
            "shards": self.shards,
            "shards_skipped": self.shards_skipped,
            "tensors": self.tensors,
            "bytes_written": self.bytes_written,
            "seconds": round(self.seconds, 3),
            "report": self.manifest.get("report", {}),
        }


def load_plan(ref: str, *, storage: StorageOptions | None = None) -> Plan:
    """A plan from its JSON file, or from the output location that holds it.

    ``storage`` opens an ``s3://`` location (default: the environment's settings).
    """
    if ref.endswith(".json"):
        directory, _, name = ref.rpartition("/")
        directory = directory or "."
        if directory.endswith(".mergefleet"):
            directory = directory[: -len("/.mergefleet")] or "."
            name = f".mergefleet/{name}"
        sink = ckpt.open_output(directory, storage=storage)
    else:
        sink, name = ckpt.open_output(ref, storage=storage), PLAN_FILE
    if not sink.exists(name):
        raise OutputError(f"no plan at {sink.uri}/{name}; create one with 'mergefleet plan RECIPE OUT'")
    return Plan.from_json(sink.read_file(name), source=f"{sink.uri}/{name}")


def _owned_files(plan: Plan | None) -> list[str]:
    files = [INDEX_FILE, MANIFEST_FILE, "config.json", PLAN_FILE]
    if plan is not None:
        files += [shard.file for shard in plan.shards] + [receipt_file(s.index) for s in plan.shards]
        files += list(TOKENIZER_FILES)
    return files


def prepare_output(plan: Plan, *, overwrite: bool = False) -> OutputSink:
    """Refuse an output that holds another merge (unless overwriting); then write the plan."""
    sink = ckpt.open_output(plan.output, storage=plan.storage)
    previous: Plan | None = None
    if sink.exists(PLAN_FILE):
        try:
            previous = Plan.from_json(sink.read_file(PLAN_FILE))
        except Exception:  # an unreadable plan is another merge too
            previous = None
        if previous is not None and previous.plan_id == plan.plan_id:
            return sink
        if not overwrite:
            what = f"plan {previous.plan_id}, method {previous.method}" if previous else "an unreadable plan"
            raise OutputError(
                f"{plan.output} already holds a different merge ({what}); pass --overwrite to replace it, "
                "or choose another output directory"
            )
    else:
        foreign = [f for f in sink.list_files() if f.endswith(".safetensors") or f in (INDEX_FILE, "config.json")]
        if foreign and not overwrite:
            raise OutputError(
                f"{plan.output} already holds a checkpoint ({foreign[0]}) not written by this merge; "
                "pass --overwrite to replace it, or choose another output directory"
            )
        if overwrite:
            for name in foreign:
                sink.delete(name)
    if overwrite:
        for name in _owned_files(previous):
            if sink.exists(name):
                sink.delete(name)
    sink.write_file(PLAN_FILE, plan.to_json().encode())
    return sink


def _worker_init(progress: Any, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    global _progress_queue
    _progress_queue = progress


_progress_queue: Any = None


def _worker_shard(plan_json: str, index: int, device: str) -> tuple[Receipt, bool]:
    plan = Plan.from_json(plan_json)

    def report(name: str, nbytes: int) -> None:
        _progress_queue.put((name, nbytes))

    return run_shard(plan, index, device=device, on_tensor=report)


def run_shards(
    plan: Plan,
    *,
    workers: int = 1,
    device: str = "cpu",
    on_tensor: OnTensor | None = None,
    indices: list[int] | None = None,
) -> list[tuple[Receipt, bool]]:
    """Run shards in this process (one worker) or in ``workers`` separate processes."""
    indices = list(range(len(plan.shards))) if indices is None else indices
    workers = max(1, min(workers, len(indices)))
    if workers == 1:
        return [run_shard(plan, i, device=device, on_tensor=on_tensor) for i in indices]

    context = multiprocessing.get_context("spawn")
    progress = context.Queue()
    stop = threading.Event()

    def drain() -> None:
        while not stop.is_set() or not progress.empty():
            try:
                name, nbytes = progress.get(timeout=0.1)
            except queue.Empty:
                continue
            if on_tensor:
                on_tensor(name, nbytes)

    drainer = threading.Thread(target=drain, name="shard-progress", daemon=True)
    drainer.start()
    threads = max(1, (os.cpu_count() or 1) // workers)
    plan_json = plan.to_json()
    executor = ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init, initargs=(progress, threads))
    try:
        futures = {executor.submit(_worker_shard, plan_json, i, device): i for i in indices}
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
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
        ckpt.open_output(plan.output, storage=plan.storage).remove_partials()


def merge(
    recipe: Recipe,
    output: str,
    *,
    shards: int | None = None,
    workers: int | None = None,
    device: str | None = None,
    overwrite: bool = False,
    allow_pickle: bool | None = None,
    on_plan: Any = None,
    on_tensor: OnTensor | None = None,
) -> MergeSummary:
    """Plan, shard and assemble a recipe into ``output``; resumes an interrupted merge."""
    started = time.perf_counter()
    plan = build_plan(recipe, output, shards=shards, allow_pickle=allow_pickle)
    if on_plan:
        on_plan(plan)
    prepare_output(plan, overwrite=overwrite)
    ckpt.open_output(plan.output, storage=plan.storage).remove_partials()
    results = run_shards(
        plan,
        workers=workers if workers is not None else recipe.fleet.workers,
        device=device or recipe.fleet.device,
        on_tensor=on_tensor,
    )
    manifest = assemble(plan)
    return MergeSummary(
        plan_id=plan.plan_id,
        output=plan.output,
        method=plan.method,
        shards=len(plan.shards),
        shards_skipped=sum(1 for _, skipped in results if skipped),
        tensors=sum(len(s.tensors) for s in plan.shards),
        bytes_written=sum(r.bytes_written for r, _ in results),
        seconds=time.perf_counter() - started,
        manifest=manifest,
    )
