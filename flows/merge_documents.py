"""The merge-documents flow: a multi-document recipe (orchestrator/multidoc.py) as one flow run.

The intermediates run first, in dependency order, each as plan → shards → assemble → track
(or, when already merged for its plan, track only); then the final merge runs the steps of
merge_and_eval. Each merge is its own MLflow run; the final run lists the intermediates'
runs and they are nested under it. The final run is opened when the flow starts (RUNNING;
FAILED with the error's line if any merge fails), so that it spans the whole recipe; an
intermediate's run is recorded when that intermediate is done.
"""

from __future__ import annotations

import time

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from flows import tasks
from flows.merge_and_eval import MergeAndEvalResult, merge_evaluate_track, open_mlflow_run
from flows.runners import shard_runner
from flows.runners.common import run_log
from orchestrator.assemble import Manifest
from orchestrator.multidoc import (
    cached_outcomes,
    claim_intermediate,
    graph_of,
    intermediate_dir,
    intermediate_location,
    node_recipe,
)
from orchestrator.pipeline import held_output
from orchestrator.plan import build_plan
from orchestrator.plan_ref import PlanRef, open_plan, remember
from orchestrator.recipe import Recipe
from orchestrator.tracking.record import TrackedRun, ended_on_failure, final_tags, intermediate_tags, link_intermediate_runs
from orchestrator.tracking.store import resolve_tracking_uri


class IntermediateRun(BaseModel):
    """One intermediate of the flow run: where it is, its plan, whether it was already merged, its MLflow run."""

    name: str
    output: str
    plan_id: str
    cached: bool
    run_id: str


class MergeDocumentsResult(MergeAndEvalResult):
    """The final merge's result, and its intermediates in the order they ran."""

    intermediates: list[IntermediateRun]


class ClaimedIntermediate(BaseModel):
    plan: PlanRef
    manifest: Manifest | None  # the finished merge when it was already there (cached)


@task(name="plan-intermediate", task_run_name="plan-{name}", cache_policy=NO_CACHE, persist_result=False)
def plan_intermediate_task(recipe: Recipe, output: str, name: str) -> ClaimedIntermediate:
    """Plan one intermediate; use it as it is when merged for this plan, else claim its location."""
    plan = build_plan(recipe, output)
    manifest = claim_intermediate(plan, name)
    state = "already merged" if manifest is not None else "to merge"
    run_log().info("intermediate %s: plan %s, %s, %s", name, plan.plan_id, plan.method, state)
    return ClaimedIntermediate(plan=remember(plan), manifest=manifest)


@task(name="link-runs", task_run_name="link-runs", cache_policy=NO_CACHE, persist_result=False)
def link_runs_task(final: TrackedRun, intermediates: dict[str, TrackedRun]) -> None:
    link_intermediate_runs(final, intermediates)


@flow(name="merge-documents", description="Merge a multi-document recipe: its named intermediates in dependency order, then the final merge.")
def merge_documents(
    documents: list[Recipe], output: str | None = None, overwrite: bool = False, source: str = "recipe"
) -> MergeDocumentsResult:
    """``documents``: the recipe's documents, each with its ``name:`` (the final one may have
    none); ``output``: the final merge's location (default: its fleet.output); ``overwrite``:
    replace a different merge in ``output``; ``source``: the file, named in errors."""
    started_at, started = time.time(), time.perf_counter()
    graph = graph_of(documents, source)
    final = graph.final.recipe
    out = final.output_location(output)
    root = intermediate_dir(out, final.fleet.intermediate_dir)
    tracking_uri = resolve_tracking_uri(final.fleet.tracking_uri, out)
    final_recipe = node_recipe(graph, graph.final, root)
    final_run = open_mlflow_run(final_recipe, out, started_at)

    runs: dict[str, TrackedRun] = {}
    intermediates: list[IntermediateRun] = []
    with ended_on_failure(final_run):
        for node in graph.intermediates:
            name = node.name or ""
            merge_started = time.perf_counter()
            recipe = node_recipe(graph, node, root)
            location = intermediate_location(root, name)
            with held_output(recipe, location):  # held until its last file, as merge_and_eval holds the output's
                claimed = plan_intermediate_task(recipe, location, name)
                opened = open_plan(claimed.plan)
                if claimed.manifest is not None:
                    manifest, shards = claimed.manifest, cached_outcomes(opened)
                else:
                    shards = shard_runner(recipe.fleet).run(claimed.plan, range(len(opened.shards)))
                    manifest = tasks.assemble_task(claimed.plan)
            cached = claimed.manifest is not None
            runs[name] = tasks.track_task(
                claimed.plan,
                manifest,
                shards,
                None,
                time.perf_counter() - merge_started,
                tags=intermediate_tags(name, cached=cached),
                tracking_uri=tracking_uri,
            )
            intermediates.append(
                IntermediateRun(name=name, output=opened.output, plan_id=opened.plan_id, cached=cached, run_id=runs[name].run_id)
            )

        result = merge_evaluate_track(final_recipe, out, final_run, overwrite=overwrite, started=started, tags=final_tags(runs))
    if result.tracking is not None and runs:
        link_runs_task(result.tracking, runs)
    return MergeDocumentsResult(**dict(result), intermediates=intermediates)
