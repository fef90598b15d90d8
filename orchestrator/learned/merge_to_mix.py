"""Merge to Mix: choose a fine-tuning data mixture by merging instead of training.

Given a base and one model fine-tuned per candidate dataset, the average of the models of
a subset S stands in for a model fine-tuned on the union of S. Each subset is merged by
``linear`` (equal weights), evaluated on the target task(s) (``fleet.eval``) and ranked.
Up to ``EXHAUSTIVE_LIMIT`` candidates every non-empty subset is tried; above that a greedy
search within a budget: all singletons, then the best set grown by one candidate at a time
while that improves the score.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Callable, Sequence

from orchestrator.errors import RecipeError
from orchestrator.learned.runs import CandidateResult
from orchestrator.recipe import Recipe, parse_recipe

EXHAUSTIVE_LIMIT = 8


@dataclass(frozen=True)
class Subset:
    members: tuple[int, ...]  # indices into the candidates
    label: str
    recipe: Recipe


def candidates_of(recipe: Recipe) -> list[str]:
    """The fine-tuned models: every model of the recipe but the base."""
    found = [entry.model for entry in recipe.models if entry.model != recipe.base_model]
    if len(found) < 2:
        raise RecipeError("Merge to Mix needs at least two fine-tuned models (one per candidate dataset) under models:")
    if recipe.fleet.eval is None:
        raise RecipeError("Merge to Mix ranks mixtures on the target task: set 'fleet: {eval: {tasks: [...]}}'")
    return found


def all_subsets(count: int) -> list[tuple[int, ...]]:
    """Every non-empty subset of ``range(count)``, smaller first."""
    return [members for size in range(1, count + 1) for members in itertools.combinations(range(count), size)]


def subset_label(members: Sequence[int], names: Sequence[str]) -> str:
    return "+".join(names[i] for i in members)


def subset_recipe(recipe: Recipe, candidates: Sequence[str], members: Sequence[int], *, output: str, label: str) -> Recipe:
    """A plain linear merge of the subset's models with equal weights (a copy for one model)."""
    data = recipe.model_dump(mode="json", exclude_defaults=True)
    data.pop("base_model", None)
    data.pop("parameters", None)
    data["merge_method"] = "linear"
    data["models"] = [{"model": candidates[i], "parameters": {"weight": 1.0}} for i in members]
    data["name"] = label
    data.setdefault("fleet", {})["output"] = f"{output.rstrip('/')}/{label}" if "://" in output else str(PurePosixPath(output) / label)
    return parse_recipe(data, source=f"mixture {label}")


RunBatch = Callable[[list[Subset]], list[CandidateResult]]


@dataclass
class MixtureResult:
    candidates: list[str]
    names: list[str]
    ranking: list[CandidateResult]  # best first
    exhaustive: bool

    @property
    def best(self) -> CandidateResult:
        return self.ranking[0]

    def table(self) -> list[dict[str, Any]]:
        return [
            {"rank": rank, "subset": r.label, "size": len(r.values["members"]), "score": r.score, "scores": r.scores, "run_id": r.run_id}
            for rank, r in enumerate(self.ranking, start=1)
        ]


def _subsets(recipe: Recipe, candidates: Sequence[str], names: Sequence[str], groups: Sequence[tuple[int, ...]], output: str) -> list[Subset]:
    subsets = []
    for members in groups:
        label = subset_label(members, names)
        subsets.append(Subset(tuple(members), label, subset_recipe(recipe, candidates, members, output=output, label=label)))
    return subsets


def run_merge_to_mix(recipe: Recipe, run_batch: RunBatch, *, output: str, names: Sequence[str], budget: int | None = None) -> MixtureResult:
    """Evaluate the subsets (all of them, or greedily within ``budget`` merges above
    ``EXHAUSTIVE_LIMIT`` candidates) and rank them, best first."""
    candidates = candidates_of(recipe)
    if len(names) != len(candidates):
        raise RecipeError(f"{len(names)} name(s) for {len(candidates)} candidate model(s)")
    results: dict[tuple[int, ...], CandidateResult] = {}

    def run(groups: Sequence[tuple[int, ...]]) -> None:
        batch = _subsets(recipe, candidates, names, [g for g in groups if g not in results], output)
        for subset, result in zip(batch, run_batch(batch)):
            result.values = {"members": [names[i] for i in subset.members]}
            results[subset.members] = result

    exhaustive = len(candidates) <= EXHAUSTIVE_LIMIT and (budget is None or budget >= 2 ** len(candidates) - 1)
    if exhaustive:
        run(all_subsets(len(candidates)))
    else:
        limit = budget if budget is not None else 4 * len(candidates)
        if limit < len(candidates):
            raise RecipeError(f"--budget {limit} is below the {len(candidates)} singletons a greedy search starts from")
        run([(i,) for i in range(len(candidates))])
        current = max(results, key=lambda m: results[m].score)
        while len(results) < limit:
            growth = [tuple(sorted(current + (i,))) for i in range(len(candidates)) if i not in current]
            growth = [g for g in growth if g not in results][: limit - len(results)]
            if not growth:
                break
            run(growth)
            best = max(growth, key=lambda m: results[m].score)
            if results[best].score <= results[current].score:
                break
            current = best
    ranking = sorted(results.values(), key=lambda r: (-r.score, len(r.values["members"]), r.label))
    return MixtureResult(candidates=list(candidates), names=list(names), ranking=ranking, exhaustive=exhaustive)
