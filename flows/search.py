"""The parameter-search flow: CMA-ES proposes weights and densities, each trial is a merge
and an evaluation (Prefect tasks, ``parallel`` at a time), recorded as a child run of the
search's own MLflow run; the best point is written out as a plain recipe.

All the work is in ``orchestrator.learned.search``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from flows.candidates import result_dicts, run_candidates
from flows.merge_and_eval import the_recipe
from orchestrator.learned.records import child_tags, open_run
from orchestrator.learned.runs import Objective, evaluate_recipe_inputs
from orchestrator.learned.search import Proposal, best_recipe_yaml, run_search, search_space
from orchestrator.recipe import Recipe
from orchestrator.storage import checkpoint as ckpt

BEST_RECIPE = "best-recipe.yaml"


@flow(name="parameter-search", description="Search a merge method's weights and densities with CMA-ES; each trial merged, evaluated and recorded.")
def parameter_search(
    recipe: Recipe | None = None,
    budget: int = 16,
    parallel: int = 2,
    output: str | None = None,
    layer_groups: int = 1,
    parameters: list[str] | None = None,
    time_budget: float | None = None,
    objective: Objective = "mean",
    seed: int = 0,
    overwrite: bool = False,
    recipe_file: str | None = None,
) -> dict[str, Any]:
    """``recipe`` (or ``recipe_file``, its YAML file): the method and the experts to search.
    ``output``: where trial ``k`` writes ``trial-k/`` and the best recipe goes
    (``best-recipe.yaml``; default: fleet.output). ``overwrite``: replace the merges of an
    earlier search there."""
    parsed = the_recipe(recipe, recipe_file)
    root = parsed.output_location(output)
    space = search_space(parsed, parameters=parameters or ["weight", "density"], layer_groups=layer_groups)
    parent = open_run(tracking_uri=parsed.fleet.tracking_uri, near=root, experiment=parsed.fleet.experiment,
                      name=parsed.name or f"search-{parsed.merge_method}", kind="search")
    parent.params({"method": parsed.merge_method, "budget": budget, "parallel": parallel, "layer_groups": layer_groups,
                   "objective": objective, "seed": seed, "dimensions": [d.name for d in space.dimensions]})
    try:
        evaluate_recipe_inputs(parsed)

        def run_batch(proposals: list[Proposal]) -> list[Any]:
            return run_candidates([(p.recipe, p.label) for p in proposals], tags=child_tags(parent, search=parent.run_id),
                                  objective=objective, parallel=parallel, overwrite=overwrite)

        result = run_search(parsed, space, run_batch, output=root, budget=budget, parallel=parallel, time_budget=time_budget, seed=seed)
        text = best_recipe_yaml(result)
        ckpt.open_output(root, storage=parsed.fleet.storage).write_file(BEST_RECIPE, text.encode())
        running = [max(t.score for t in result.trials[: i + 1]) for i in range(len(result.trials))]
        parent.series({"trial_score": [(i, t.score) for i, t in enumerate(result.trials)], "best_score": list(enumerate(running))})
        parent.metrics({"best_score": result.best.score, "trials": float(len(result.trials)), "seconds": result.seconds})
        parent.artifacts({BEST_RECIPE: text})
    except BaseException:
        parent.finish("FAILED")
        raise
    parent.finish()
    return {
        "run_id": parent.run_id,
        "tracking_uri": parent.tracking_uri,
        "best": result.best.model_dump(mode="json"),
        "best_recipe": f"{root.rstrip('/')}/{BEST_RECIPE}" if "://" in root else str(Path(root) / BEST_RECIPE),
        "trials": result_dicts(result.trials),
        "seconds": round(result.seconds, 3),
    }
