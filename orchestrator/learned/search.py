"""Parameter search: the merge method's per-expert weights and densities (optionally one
value per layer group) chosen by CMA-ES to maximise the score on ``fleet.eval``'s tasks.

The baseline DAM is measured against (evolutionary merging). Optuna's ``CmaEsSampler``
proposes points; each point is a plain recipe, merged, evaluated and recorded like any
other (``orchestrator.learned.runs``). A batch of points is proposed at once and run in
parallel by the caller (the flow); the search itself is sequential and Prefect-free.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Callable, Sequence

from orchestrator.errors import RecipeError
from orchestrator.learned.runs import CandidateResult
from orchestrator.methods import get_method
from orchestrator.recipe import Recipe, parse_recipe

log = logging.getLogger(__name__)

SEARCHABLE = {"weight": (0.0, 1.0), "density": (0.1, 1.0)}


@dataclass(frozen=True)
class Dimension:
    """One searched number: ``parameter`` of model ``model`` (index into recipe.models) in layer group ``group``."""

    model: int
    parameter: str
    group: int
    low: float
    high: float
    start: float

    @property
    def name(self) -> str:
        return f"m{self.model}.{self.parameter}.g{self.group}"


@dataclass(frozen=True)
class SearchSpace:
    dimensions: tuple[Dimension, ...]
    layer_groups: int

    def recipe(self, recipe: Recipe, values: dict[str, float], *, output: str, name: str) -> Recipe:
        """``recipe`` with the searched parameters set to ``values``; a layer-grouped value is a
        gradient list (one value per group, interpolated across the layers as in mergekit)."""
        data = recipe.model_dump(mode="json", exclude_defaults=True)
        by_model: dict[tuple[int, str], list[float]] = {}
        for dim in self.dimensions:
            by_model.setdefault((dim.model, dim.parameter), [0.0] * self.layer_groups)[dim.group] = round(float(values[dim.name]), 6)
        for (model, parameter), groups in by_model.items():
            entry = data["models"][model]
            entry.setdefault("parameters", {})[parameter] = groups[0] if self.layer_groups == 1 else groups
        data["name"] = name
        data.setdefault("fleet", {})["output"] = output
        return parse_recipe(data, source=f"search point {name}")


def _start_value(value: Any, low: float, high: float) -> float:
    number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else (low + high) / 2
    return min(high, max(low, float(number)))


def search_space(
    recipe: Recipe,
    *,
    parameters: Sequence[str] = ("weight", "density"),
    layer_groups: int = 1,
    bounds: dict[str, tuple[float, float]] | None = None,
) -> SearchSpace:
    """Every expert's ``parameters`` that the method takes, per layer group. The first trial
    is the recipe's own scalar values (the middle of the range where it has none)."""
    if recipe.slices:
        raise RecipeError("search takes recipes with 'models:', not 'slices:'")
    if layer_groups < 1:
        raise RecipeError(f"--layer-groups must be at least 1, got {layer_groups}")
    method = get_method(recipe.merge_method)
    taken = {spec.name for spec in method.model_params}
    limits = SEARCHABLE | dict(bounds or {})
    unknown = [p for p in parameters if p not in limits]
    if unknown:
        raise RecipeError(f"cannot search '{unknown[0]}'; searchable: {', '.join(sorted(limits))}")
    chosen = [p for p in parameters if p in taken]
    if not chosen:
        raise RecipeError(f"merge_method '{method.name}' takes none of {', '.join(parameters)}; nothing to search")
    dimensions = []
    for index, entry in enumerate(recipe.models):
        if entry.model == recipe.base_model:
            continue
        for parameter in chosen:
            low, high = limits[parameter]
            if not low < high:
                raise RecipeError(f"search range of '{parameter}' is empty: {low}..{high}")
            start = _start_value(entry.parameters.get(parameter, recipe.parameters.get(parameter)), low, high)
            dimensions += [Dimension(index, parameter, group, low, high, start) for group in range(layer_groups)]
    if not dimensions:
        raise RecipeError("the recipe has no expert to search over (every model is the base)")
    return SearchSpace(tuple(dimensions), layer_groups)


@dataclass(frozen=True)
class Proposal:
    number: int
    label: str
    values: dict[str, float]
    recipe: Recipe


class CmaSearch:
    """Optuna's CMA-ES sampler through ask and tell, so a batch can run in parallel."""

    def __init__(self, space: SearchSpace, *, seed: int = 0) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.space = space
        self.distributions = {d.name: optuna.distributions.FloatDistribution(d.low, d.high) for d in space.dimensions}
        sampler = optuna.samplers.CmaEsSampler(n_startup_trials=0, seed=seed, warn_independent_sampling=False)
        self.study = optuna.create_study(direction="maximize", sampler=sampler)
        self.study.enqueue_trial({d.name: d.start for d in space.dimensions})  # the recipe's own values come first
        self._trials: dict[int, Any] = {}

    def ask(self, count: int, recipe: Recipe, output: str) -> list[Proposal]:
        proposals = []
        for _ in range(count):
            trial = self.study.ask(self.distributions)
            self._trials[trial.number] = trial
            label = f"trial-{trial.number:03d}"
            where = f"{output.rstrip('/')}/{label}" if "://" in output else str(PurePosixPath(output) / label)
            proposals.append(Proposal(trial.number, label, dict(trial.params), self.space.recipe(recipe, trial.params, output=where, name=label)))
        return proposals

    def tell(self, number: int, score: float) -> None:
        self.study.tell(self._trials.pop(number), score)


@dataclass
class SearchResult:
    trials: list[CandidateResult]
    best: CandidateResult
    best_recipe: dict[str, Any]  # a plain recipe: the best point's values, no fleet.output
    seconds: float


RunBatch = Callable[[list[Proposal]], list[CandidateResult]]


def run_search(
    recipe: Recipe,
    space: SearchSpace,
    run_batch: RunBatch,
    *,
    output: str,
    budget: int,
    parallel: int = 2,
    time_budget: float | None = None,
    seed: int = 0,
) -> SearchResult:
    """Up to ``budget`` trials, ``parallel`` at a time, stopping early once ``time_budget``
    seconds have passed (after at least one batch). ``run_batch`` merges and evaluates."""
    if budget < 1:
        raise RecipeError(f"--budget must be at least 1 trial, got {budget}")
    started = time.perf_counter()
    searcher = CmaSearch(space, seed=seed)
    trials: list[CandidateResult] = []
    while len(trials) < budget:
        if trials and time_budget is not None and time.perf_counter() - started >= time_budget:
            break
        proposals = searcher.ask(min(parallel, budget - len(trials)), recipe, output)
        results = run_batch(proposals)
        for proposal, result in zip(proposals, results):
            searcher.tell(proposal.number, result.score)
            result.values = dict(proposal.values)
            trials.append(result)
        log.info("search: %d trial(s), best %.4f", len(trials), max(t.score for t in trials))
    best = max(trials, key=lambda t: t.score)
    chosen = space.recipe(recipe, best.values, output=best.output, name=best.label)
    plain = chosen.model_dump(mode="json", exclude_defaults=True)
    plain.get("fleet", {}).pop("output", None)
    plain["name"] = f"{recipe.name or 'search'}-best"
    return SearchResult(trials=trials, best=best, best_recipe=plain, seconds=time.perf_counter() - started)


def best_recipe_yaml(result: SearchResult) -> str:
    import yaml

    header = f"# best of {len(result.trials)} trials: score {result.best.score:.4f} ({result.best.label}); values {json.dumps(result.best.values)}\n"
    return header + yaml.safe_dump(result.best_recipe, sort_keys=False)
