"""The tasks of the merge flows: each wraps one call into ``orchestrator/``.

Shards run in one of two places, chosen by ``fleet.target``:
- ``inline``: a task per shard in the flow's own process, ``fleet.workers`` at a time;
- ``deployment``: a task per shard that starts a run of the merge-shard deployment on a
  work pool (``run_deployment``) and waits for it; the shard's receipt, read back from
  storage, is the task's result.
A failed or crashed shard is retried ``fleet.shard_retries`` times; the receipts make a
retry (or a re-run of the whole flow) skip every shard already done.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from dataclasses import asdict
from typing import Any, Callable, Iterator

import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.futures import wait
from prefect.settings import PREFECT_API_URL
from prefect.task_runners import ThreadPoolTaskRunner

from flows import embedded
from orchestrator.assemble import assemble
from orchestrator.errors import MergeError, MergefleetError
from orchestrator.pipeline import load_plan, prepare_output
from orchestrator.plan import Plan, build_plan
from orchestrator.recipe import FleetSettings, Recipe
from orchestrator.schedule import changes_since_last_merge
from orchestrator.shard import finished_receipt, run_shard
from orchestrator.storage import checkpoint as ckpt
from orchestrator.storage.base import OutputSink

SHARD_RETRY_DELAY_S = 2.0
POLL_S = 1.0  # how often a deployment-target shard task asks for its flow run's state
LEASE_S = 60.0  # a killed shard's concurrency slot is freed within about this long


class ShardRunFailed(MergeError):
    """A shard's flow run on a work pool failed or crashed; worth retrying."""


def _worth_retrying(task: Any, task_run: Any, state: Any) -> bool:
    """Retry what may pass next time (a crash, I/O, memory); not a bad recipe, plan or input."""
    error = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    return isinstance(error, ShardRunFailed) or not isinstance(error, MergefleetError)


def _output(plan: Plan) -> OutputSink:
    """The plan's output location, opened the way its shards open it."""
    storage = getattr(plan, "storage", None)  # fleet.storage (S3 settings), where plans carry it
    return ckpt.open_output(plan.output) if storage is None else ckpt.open_output(plan.output, storage=storage)


def _absolute(output: str) -> str:
    """A local output as an absolute path, so that workers elsewhere find the same place."""
    return output if "://" in output else os.path.abspath(os.path.expanduser(output))


def _log() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    try:
        return get_run_logger()
    except Exception:  # called outside a run (a direct call in a test)
        return logging.getLogger(__name__)


# ---------------------------------------------------------------- plan


@task(name="plan", task_run_name="plan", cache_policy=NO_CACHE, persist_result=False, retries=1, retry_condition_fn=_worth_retrying)
def plan_merge(recipe: Recipe, output: str, *, shards: int | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Build the plan, claim the output (writes plan.json), clear a killed run's temp files."""
    plan = build_plan(recipe, _absolute(output), shards=shards)
    prepare_output(plan, overwrite=overwrite).remove_partials()
    _log().info("plan %s: %s, %d inputs, %d shard(s) into %s", plan.plan_id, plan.method, len(plan.inputs), len(plan.shards), plan.output)
    return {
        "plan_uri": plan.output,
        "plan_id": plan.plan_id,
        "method": plan.method,
        "shards": len(plan.shards),
        "tensors": sum(len(s.tensors) for s in plan.shards),
    }


@task(name="check-inputs", task_run_name="check-inputs", cache_policy=NO_CACHE, persist_result=False)
def check_unchanged(recipe: Recipe, output: str) -> list[str]:
    """What changed since the last successful merge into ``output`` (empty: nothing)."""
    changes = changes_since_last_merge(recipe, output)
    if changes:
        _log().info("merging again: %s", "; ".join(changes))
    else:
        _log().info("nothing changed since the last successful merge into %s; skipping", output)
    return changes


# ---------------------------------------------------------------- shards


@contextlib.contextmanager
def shard_slot(limit: str | None) -> Iterator[None]:
    """Hold one slot of the global concurrency limit ``limit`` (if any) while a shard runs."""
    if not limit:
        yield
        return
    with concurrency(limit, occupy=1, lease_duration=LEASE_S, strict=True):
        yield


def run_one_shard(plan_uri: str, index: int, *, device: str = "cpu", concurrency_limit: str | None = None) -> dict[str, Any]:
    """What one shard's task (inline) or flow run (on a worker) does; returns the receipt."""
    plan = load_plan(plan_uri)
    done = finished_receipt(plan, _output(plan), index)
    if done is not None:
        receipt, skipped = done, True
    else:
        with shard_slot(concurrency_limit):
            receipt, skipped = run_shard(plan, index, device=device)
    verb = "already done" if skipped else f"{receipt.bytes_written / 1e6:.1f} MB in {receipt.seconds:.1f} s"
    _log().info("%s (shard %d, %d tensors): %s", receipt.file, index, len(receipt.tensors), verb)
    return {"receipt": receipt.model_dump(), "skipped": skipped}


@task(
    name="merge-shard",
    task_run_name="shard-{index}",
    cache_policy=NO_CACHE,
    persist_result=False,
    retries=2,
    retry_delay_seconds=SHARD_RETRY_DELAY_S,
    retry_condition_fn=_worth_retrying,
)
def merge_shard_inline(plan_uri: str, index: int, device: str, concurrency_limit: str | None) -> dict[str, Any]:
    return run_one_shard(plan_uri, index, device=device, concurrency_limit=concurrency_limit)


@task(
    name="merge-shard-on-pool",
    task_run_name="shard-{index}",
    cache_policy=NO_CACHE,
    persist_result=False,
    retries=2,
    retry_delay_seconds=SHARD_RETRY_DELAY_S,
    retry_condition_fn=_worth_retrying,
)
def merge_shard_on_pool(
    plan_uri: str, index: int, deployment: str, device: str, concurrency_limit: str | None
) -> dict[str, Any]:
    """Run shard ``index`` as a flow run of ``deployment``, wait, and read its receipt."""
    plan = load_plan(plan_uri)
    sink = _output(plan)
    done = finished_receipt(plan, sink, index)
    if done is not None:
        return {"receipt": done.model_dump(), "skipped": True}
    run = run_deployment(
        deployment,
        parameters={"plan_uri": plan_uri, "index": index, "device": device, "concurrency_limit": concurrency_limit},
        flow_run_name=f"{plan.plan_id[:8]}-shard-{index}",
        poll_interval=POLL_S,
    )
    state = run.state
    if state is None or not state.is_completed():
        kind = state.type.value.lower() if state else "no state"
        message = (state.message or "") if state else ""
        message = message.removeprefix("Flow run encountered an exception: ")
        raise ShardRunFailed(f"shard {index}: flow run '{run.name}' of {deployment} {kind}: {message}".rstrip(": "))
    receipt = finished_receipt(plan, sink, index)
    if receipt is None:
        raise ShardRunFailed(
            f"shard {index}: flow run '{run.name}' of {deployment} completed but left no receipt in {plan.output}; "
            "does the worker see the same storage?"
        )
    _log().info("shard %d done by flow run '%s'", index, run.name)
    return {"receipt": receipt.model_dump(), "skipped": False}


def _check_deployment(name: str) -> None:
    if PREFECT_API_URL.value() is None or embedded.is_embedded(PREFECT_API_URL.value()):
        raise MergeError(
            "target 'deployment' needs a Prefect server that the workers share: set PREFECT_API_URL "
            "(e.g. http://127.0.0.1:4200/api after 'prefect server start')"
        )
    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(name)
        except ObjectNotFound:
            raise MergeError(
                f"no deployment '{name}' on the Prefect server at {PREFECT_API_URL.value()}: register it with "
                "'mergefleet deploy RECIPE --pool POOL', or set fleet.shard_deployment"
            ) from None


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
            raise MergeError(
                f"fleet.concurrency_limit: there is no global concurrency limit '{limit}'; create it with "
                f"'prefect gcl create {limit} --limit N' or set fleet.concurrency_slots to N"
            ) from None


@contextlib.contextmanager
def _torch_threads(parallel: int) -> Iterator[None]:
    """Share the CPU between ``parallel`` shards merging in threads of this process."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // parallel))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_shards(plan: dict[str, Any], fleet: FleetSettings) -> list[dict[str, Any]]:
    """Run every shard of ``plan`` where ``fleet.target`` says; wait for all of them.

    Raises the first failed shard's own error once every shard has finished or failed,
    so the finished ones keep their receipts for the next run.
    """
    indices = range(plan["shards"])
    if fleet.concurrency_limit:
        reserve_slots(fleet.concurrency_limit, fleet.concurrency_slots)
    common = {"plan_uri": plan["plan_uri"], "device": fleet.device, "concurrency_limit": fleet.concurrency_limit}
    shard_task: Callable[..., Any]
    if fleet.target == "inline":
        shard_task = merge_shard_inline.with_options(retries=fleet.shard_retries, retry_delay_seconds=SHARD_RETRY_DELAY_S)
        parallel, threads = min(fleet.workers, len(indices)), _torch_threads(min(fleet.workers, len(indices)))
    else:
        deployment = fleet.shard_deployment_name()
        _check_deployment(deployment)
        shard_task = merge_shard_on_pool.with_options(retries=fleet.shard_retries, retry_delay_seconds=SHARD_RETRY_DELAY_S)
        common["deployment"] = deployment
        parallel, threads = len(indices), contextlib.nullcontext()
    with threads, ThreadPoolTaskRunner(max_workers=max(1, parallel)) as runner:
        futures = [runner.submit(shard_task, parameters={**common, "index": i}) for i in indices]
        wait(futures)
    _output(load_plan(plan["plan_uri"])).remove_partials()  # nothing writes now
    for future in futures:
        if not future.state.is_completed():
            future.result()  # raises the shard's own error
    return [future.result() for future in futures]


# ---------------------------------------------------------------- assemble


@task(name="assemble", task_run_name="assemble", cache_policy=NO_CACHE, persist_result=False, retries=1, retry_condition_fn=_worth_retrying)
def assemble_merge(plan_uri: str) -> dict[str, Any]:
    manifest = assemble(load_plan(plan_uri))
    _log().info("assembled %s: %d file(s)", plan_uri, len(manifest["files"]))
    return manifest


# ---------------------------------------------------------------- evaluate and track
# orchestrator.evaluate / orchestrator.tracking (issue 6) are wired here and only here;
# a step is skipped while its module is absent (and evaluation while fleet.eval is).


def _optional(module: str, name: str) -> Callable[..., Any] | None:
    try:
        return getattr(importlib.import_module(module), name, None)
    except ModuleNotFoundError as error:
        if error.name != module:
            raise
        return None


@task(name="evaluate", task_run_name="evaluate", cache_policy=NO_CACHE, persist_result=False, retries=1, retry_condition_fn=_worth_retrying)
def evaluate_merge(recipe: Recipe, plan_uri: str) -> dict[str, Any] | None:
    """Scores of the merge (and of its inputs); cached by fingerprint, so a re-run reuses them."""
    settings = getattr(recipe.fleet, "eval", None)
    evaluate = _optional("orchestrator.evaluate.scores", "evaluate_merge") if settings is not None else None
    if evaluate is None:
        _log().info("evaluation skipped: no fleet.eval in the recipe")
        return None
    evaluation = evaluate(load_plan(plan_uri), settings, storage=getattr(recipe.fleet, "storage", None))
    _log().info("scores of %s: %s", plan_uri, evaluation.merged.scores)
    return evaluation.model_dump()


@task(name="track", task_run_name="track", cache_policy=NO_CACHE, persist_result=False, retries=1, retry_condition_fn=_worth_retrying)
def track_merge(
    plan_uri: str, manifest: dict[str, Any], shards: list[dict[str, Any]], evaluation: dict[str, Any] | None, merge_seconds: float
) -> dict[str, Any] | None:
    """Record the merge as one MLflow run; returns where it is."""
    track = _optional("orchestrator.tracking.record", "track_merge")
    if track is None:
        _log().info("tracking skipped: orchestrator.tracking is not installed")
        return None
    tracked = track(plan_uri, manifest, shards, evaluation, merge_seconds=merge_seconds)
    _log().info("recorded as MLflow run %s in %s", tracked.run_id, tracked.tracking_uri)
    return asdict(tracked)
