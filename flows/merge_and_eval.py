"""The merge_and_eval flow: plan → shards → assemble → evaluate → track.

Every step is a task in ``flows.tasks``; all the work happens in ``orchestrator/``.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from flows import tasks
from flows.outcomes import skipped
from orchestrator.errors import RecipeError
from orchestrator.recipe import Recipe, load_recipe, parse_recipe


def _recipe(recipe: dict[str, Any] | str) -> Recipe:
    return load_recipe(recipe) if isinstance(recipe, str) else parse_recipe(recipe)


@flow(name="merge-and-eval", description="Merge checkpoints from a recipe, evaluate the merge, record it.")
def merge_and_eval(
    recipe: dict[str, Any] | str,
    output: str | None = None,
    overwrite: bool = False,
    skip_unchanged: bool = False,
) -> dict[str, Any]:
    """``recipe``: the recipe as a mapping, or the path of its YAML file.
    ``output``: where the checkpoint goes (default: fleet.output).
    ``overwrite``: replace a different merge already in ``output``.
    ``skip_unchanged``: do nothing when neither the recipe nor any input changed since
    the last successful merge into ``output`` (a nightly schedule)."""
    started = time.perf_counter()
    parsed = _recipe(recipe)
    out = output or parsed.fleet.output
    if not out:
        raise RecipeError("no output location: pass output= or set 'fleet: {output: PATH}' in the recipe")

    if skip_unchanged:
        changes = tasks.check_unchanged(parsed, out)
        if not changes:
            reason = f"nothing changed since the last successful merge into {out}"
            # the run ends in this state (Completed, named Skipped); a caller gets its data
            return skipped({"output": out, "skipped": True, "reason": reason}, reason)  # type: ignore[return-value]

    plan = tasks.plan_merge(parsed, out, overwrite=overwrite)
    shards = tasks.run_shards(plan, parsed.fleet)
    manifest = tasks.assemble_merge(plan["plan_uri"])
    merge_seconds = time.perf_counter() - started
    evaluation = tasks.evaluate_merge(parsed, plan["plan_uri"])
    tracking = tasks.track_merge(plan["plan_uri"], manifest, shards, evaluation, merge_seconds)

    receipts = [shard["receipt"] for shard in shards]
    return {
        "plan_id": plan["plan_id"],
        "output": plan["plan_uri"],
        "method": plan["method"],
        "shards": plan["shards"],
        "shards_skipped": sum(1 for shard in shards if shard["skipped"]),
        "tensors": plan["tensors"],
        "bytes_written": sum(r["bytes_written"] for r in receipts),
        "seconds": round(merge_seconds, 3),
        "report": manifest.get("report", {}),
        "target": parsed.fleet.target,
        "flow_run_id": flow_run.id,
        "evaluation": evaluation,
        "tracking": tracking,
    }
