"""The Merge to Mix flow: every subset of the candidate datasets' models merged by linear,
evaluated on the target task, ranked. Subsets run as Prefect tasks, ``parallel`` at a time,
each an MLflow run nested under the flow's own run, which carries the ranking (table and chart).

All the work is in ``orchestrator.learned.merge_to_mix``.
"""

from __future__ import annotations

import json
from typing import Any

from prefect import flow

from flows.candidates import run_candidates
from flows.merge_and_eval import the_recipe
from orchestrator.learned.charts import ranking_chart
from orchestrator.learned.merge_to_mix import Subset, candidates_of, run_merge_to_mix
from orchestrator.learned.records import child_tags, expert_labels, open_run
from orchestrator.learned.runs import Objective
from orchestrator.recipe import Recipe


def ranking_markdown(table: list[dict[str, Any]]) -> str:
    tasks = list(table[0]["scores"]) if table else []
    lines = ["| rank | subset | score | " + " | ".join(tasks) + " |", "|---|---|---|" + "---|" * len(tasks)]
    for row in table:
        lines.append(f"| {row['rank']} | {row['subset']} | {row['score']:.4f} | " + " | ".join(f"{row['scores'][t]:.4f}" for t in tasks) + " |")
    return "\n".join(lines)


@flow(name="merge-to-mix", description="Rank data mixtures by merging the models fine-tuned on each dataset.")
def merge_to_mix(
    recipe: Recipe | None = None,
    output: str | None = None,
    parallel: int = 2,
    budget: int | None = None,
    objective: Objective = "mean",
    overwrite: bool = False,
    recipe_file: str | None = None,
) -> dict[str, Any]:
    """``recipe`` (or ``recipe_file``, its YAML file): the base (optional) and one fine-tuned
    model per candidate dataset under ``models``, the target task(s) in ``fleet.eval``.
    ``output``: each subset writes ``<label>/`` (``overwrite``: replacing an earlier run's merges)."""
    parsed = the_recipe(recipe, recipe_file)
    root = parsed.output_location(output)
    names = expert_labels(candidates_of(parsed))
    parent = open_run(tracking_uri=parsed.fleet.tracking_uri, near=root, experiment=parsed.fleet.experiment,
                      name=parsed.name or "merge-to-mix", kind="merge_to_mix")
    parent.params({"candidates": names, "parallel": parallel, "budget": budget if budget is not None else "all", "objective": objective})
    try:
        def run_batch(subsets: list[Subset]) -> list[Any]:
            return run_candidates([(s.recipe, s.label) for s in subsets], tags=child_tags(parent, merge_to_mix=parent.run_id),
                                  objective=objective, parallel=parallel, overwrite=overwrite)

        result = run_merge_to_mix(parsed, run_batch, output=root, names=names, budget=budget)
        table = result.table()
        parent.metrics({"best_score": result.best.score, "subsets": float(len(table))})
        parent.params({"best_subset": result.best.label, "exhaustive": result.exhaustive})
        parent.artifacts(
            {"ranking.json": json.dumps(table, indent=1), "ranking.md": ranking_markdown(table)},
            {"ranking.png": lambda path: ranking_chart([r["subset"] for r in table], [r["score"] for r in table], path,
                                                       title=f"Merge to Mix: {len(table)} mixtures of {len(names)} datasets")},
        )
    except BaseException:
        parent.finish("FAILED")
        raise
    parent.finish()
    return {"run_id": parent.run_id, "tracking_uri": parent.tracking_uri, "best": result.best.label, "best_score": result.best.score,
            "exhaustive": result.exhaustive, "ranking": table}
