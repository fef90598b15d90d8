"""The task of the search and Merge to Mix flows: one candidate merged, evaluated, recorded;
a batch of them in parallel threads that share the CPU (as the sweep's points do)."""

from __future__ import annotations

from typing import Any, Sequence

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner

from orchestrator.learned.runs import CandidateResult, Objective, merge_evaluate_record
from orchestrator.recipe import Recipe
from orchestrator.threads import share_cpu


@task(name="merge-evaluate-record", task_run_name="{label}", cache_policy=NO_CACHE, persist_result=False)
def merge_candidate(recipe: Recipe, label: str, tags: dict[str, str], objective: Objective, overwrite: bool) -> CandidateResult:
    return merge_evaluate_record(recipe, label=label, tags=tags, objective=objective, overwrite=overwrite)


def run_candidates(
    items: Sequence[tuple[Recipe, str]], *, tags: dict[str, str], objective: Objective, parallel: int, overwrite: bool = False
) -> list[CandidateResult]:
    """(recipe, label) pairs, ``parallel`` at a time; results in the same order."""
    if not items:
        return []
    parallel = max(1, min(parallel, len(items)))
    with share_cpu(parallel), ThreadPoolTaskRunner(max_workers=parallel) as runner:
        futures = [runner.submit(merge_candidate, parameters={"recipe": r, "label": label, "tags": tags, "objective": objective, "overwrite": overwrite}) for r, label in items]
        wait(futures)
    return [future.result() for future in futures]


def result_dicts(results: Sequence[CandidateResult]) -> list[dict[str, Any]]:
    return [r.model_dump(mode="json") for r in results]
