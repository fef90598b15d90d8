"""Multi-document recipes, as ``mergekit-multi`` reads them: several merges in one YAML file.

Each document is a recipe; a document with ``name: NAME`` is an intermediate merge that
later documents use as a model by writing ``NAME`` where a path would go (``model:``,
``base_model:``, a slice source, ``tokenizer_source:``). The unnamed document (or, when
every document is named, the last one) is the final merge, written to the output. A file
with one document is an ordinary recipe (``load_recipe``), unchanged.

Intermediates are written to ``<intermediate dir>/<NAME>/`` (mergekit-multi's layout);
the directory defaults to ``<OUT>.intermediates`` beside the output. Each is cached by its
plan id: a finished intermediate whose plan (recipe, input fingerprints, shards, dtypes)
is unchanged is used as it is, so a re-run merges again only what changed and what reads it.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypedDict, Unpack

import yaml

from orchestrator.assemble import MANIFEST_FILE, Manifest
from orchestrator.errors import OutputError, RecipeError
from orchestrator.methods import get_method
from orchestrator.pipeline import MergeSummary, held_output, merge, prepare_output
from orchestrator.plan import PLAN_FILE, Plan, build_plan
from orchestrator.receipt import ShardOutcome, finished_receipt
from orchestrator.recipe import Recipe, load_recipe, parse_recipe, recipe_file
from orchestrator.runners.base import ShardRunner
from orchestrator.shard import OnTensor

INTERMEDIATES_SUFFIX = ".intermediates"
"""The default intermediate directory is the output's location with this suffix."""


@dataclass(frozen=True)
class MergeNode:
    """One document of the file: a merge, and the intermediates it reads."""

    name: str | None  # the document's ``name:``; None for the unnamed (final) document
    position: int  # 1-based place of the document in the file
    recipe: Recipe  # references to intermediates still spelled as their names
    needs: tuple[str, ...]  # names of the intermediates it reads, in the recipe's order

    @property
    def label(self) -> str:
        return f"document {self.position}" + (f" ('{self.name}')" if self.name else "")


@dataclass(frozen=True)
class MergeGraph:
    """The merges of a recipe file in dependency order: each after those it reads; the final last."""

    source: str
    nodes: tuple[MergeNode, ...]

    @property
    def final(self) -> MergeNode:
        return self.nodes[-1]

    @property
    def intermediates(self) -> tuple[MergeNode, ...]:
        return self.nodes[:-1]

    @property
    def is_single(self) -> bool:
        return len(self.nodes) == 1

    def documents(self) -> list[Recipe]:
        """The recipes in dependency order, each with its name: what ``graph_of`` takes back."""
        return [node.recipe for node in self.nodes]


def _references(data: dict[str, Any]) -> list[tuple[str, str]]:
    """(key, value) of every place a recipe names a model, keys as a user would spell them."""
    found: list[tuple[str, str]] = []
    if data.get("base_model"):
        found.append(("base_model", data["base_model"]))
    for i, entry in enumerate(data.get("models") or []):
        found.append((f"models.{i}.model", entry["model"]))
    for i, slice_ in enumerate(data.get("slices") or []):
        if slice_.get("base_model"):
            found.append((f"slices.{i}.base_model", slice_["base_model"]))
        for j, source in enumerate(slice_["sources"]):
            found.append((f"slices.{i}.sources.{j}.model", source["model"]))
    if data.get("tokenizer_source"):
        found.append(("tokenizer_source", data["tokenizer_source"]))
    return found


def _replace_references(data: dict[str, Any], locations: dict[str, str]) -> None:
    """Write each intermediate's location where ``data`` names it (in place)."""

    def swap(value: str | None) -> str | None:
        return locations.get(value, value) if value is not None else None

    data["base_model"] = swap(data.get("base_model"))
    for entry in data.get("models") or []:
        entry["model"] = swap(entry["model"])
    for slice_ in data.get("slices") or []:
        slice_["base_model"] = swap(slice_.get("base_model"))
        for source in slice_["sources"]:
            source["model"] = swap(source["model"])
    data["tokenizer_source"] = swap(data.get("tokenizer_source"))


def _recipe_data(recipe: Recipe) -> dict[str, Any]:
    return recipe.model_dump(mode="json", exclude_defaults=True)


def _check_name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise RecipeError(f"{where}: name must be a non-empty string (the intermediate's name), got {value!r}")
    if "/" in value or "\\" in value or value in (".", "..") or "://" in value:
        raise RecipeError(f"{where}: name '{value}' is also a directory name under the intermediate directory; use no '/' or '\\'")
    return value


def _unknown_reference(source: str, label: str, key: str, value: str, names: list[str]) -> RecipeError:
    close = difflib.get_close_matches(value, names, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return RecipeError(
        f"{source}, {label}: {key} '{value}' names neither an earlier document nor a checkpoint on disk; "
        f"{hint}the documents' names are: {', '.join(names)}"
    )


def graph_of(recipes: list[Recipe], source: str) -> MergeGraph:
    """Check the documents' names and references and order them; ``recipes`` in file order.

    Refused with one line naming the document and key: a repeated name, more than one
    unnamed document, a ``fleet:`` section outside the final document, a reference to a
    name no document has (that is no checkpoint on disk either), a cycle.
    """
    named: dict[str, int] = {}
    unnamed: list[int] = []
    for position, recipe in enumerate(recipes, start=1):
        if recipe.name is None:
            unnamed.append(position)
            continue
        name = _check_name(recipe.name, f"{source}, document {position}")
        if name in named:
            raise RecipeError(f"{source}, document {position}: name '{name}' is already the name of document {named[name]}; give each document its own name")
        named[name] = position
    if len(unnamed) > 1:
        raise RecipeError(
            f"{source}, document {unnamed[1]}: a second document without 'name:' (document {unnamed[0]} is the final merge); "
            "name every intermediate merge"
        )
    final_position = unnamed[0] if unnamed else len(recipes)
    names = list(named)

    nodes: dict[int, MergeNode] = {}
    for position, recipe in enumerate(recipes, start=1):
        label = f"document {position}" + (f" ('{recipe.name}')" if recipe.name else "")
        try:
            get_method(recipe.merge_method)  # an unknown method fails now, before any merge runs
        except RecipeError as error:
            raise RecipeError(f"{source}, {label}: {error}") from None
        if position != final_position and "fleet" in recipe.model_fields_set:
            raise RecipeError(
                f"{source}, {label}: 'fleet:' belongs in the final merge's document (document {final_position}); "
                "intermediates run with its settings"
            )
        needs: list[str] = []
        for key, value in _references(_recipe_data(recipe)):
            if key == "tokenizer_source" and value in ("base", "union"):
                continue
            if value in named:
                if value not in needs:
                    needs.append(value)
            elif "://" not in value and not Path(value).expanduser().exists():
                raise _unknown_reference(source, label, key, value, names)
        nodes[position] = MergeNode(recipe.name, position, recipe, tuple(needs))

    final = nodes[final_position]
    for node in nodes.values():
        if final.name is not None and final.name in node.needs:
            raise RecipeError(
                f"{source}, {node.label}: uses '{final.name}', the final merge (the last document); "
                "put the final merge last, or leave out its name"
            )
    return MergeGraph(source, tuple(_dependency_order(nodes, named, source)))


def _dependency_order(nodes: dict[int, MergeNode], named: dict[str, int], source: str) -> list[MergeNode]:
    """Every node after the nodes it needs, otherwise in file order; the final (no one needs it) last."""
    ordered: list[MergeNode] = []
    state: dict[int, str] = {}

    def visit(position: int, path: list[str]) -> None:
        if state.get(position) == "done":
            return
        node = nodes[position]
        if state.get(position) == "visiting":
            cycle = " -> ".join(path[path.index(node.name or "") :] + [node.name or ""])
            raise RecipeError(f"{source}, {node.label}: the documents use each other in a cycle ({cycle}); an intermediate cannot read itself")
        state[position] = "visiting"
        for name in node.needs:
            visit(named[name], path + [node.name or ""])
        state[position] = "done"
        ordered.append(node)

    final = [p for p, node in nodes.items() if node.name is None] or [max(nodes)]
    for position in sorted(nodes):
        if position not in final:
            visit(position, [])
    visit(final[0], [])
    return ordered


def load_graph(path: str | Path, *, strict: bool = False) -> MergeGraph:
    """The merges of a recipe file: one node for an ordinary recipe (read by ``load_recipe``);
    ``strict`` refuses unknown keys and unused parameters, as ``parse_recipe`` does."""
    path = recipe_file(path)
    try:
        documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    except (OSError, yaml.YAMLError):
        documents = []  # load_recipe reports a missing file or a syntax error as it does for every recipe
    if len(documents) <= 1:
        return MergeGraph(str(path), (MergeNode(None, 1, load_recipe(path, strict=strict), ()),))
    recipes = []
    for position, data in enumerate(documents, start=1):
        where = f"{path}, document {position}"
        if isinstance(data, dict) and "name" in data:
            where += f" ('{_check_name(data['name'], where)}')"
        recipes.append(parse_recipe(data, source=where, strict=strict))
    return graph_of(recipes, str(path))


def intermediate_dir(output: str, explicit: str | None = None) -> str:
    """Where the intermediates go: ``explicit`` (``--intermediate-dir``, ``fleet.intermediate_dir``),
    else ``<output>.intermediates`` beside the output; a local directory is made absolute,
    so every worker finds the same place."""
    chosen = explicit
    if not chosen:
        trimmed = output.rstrip("/")
        if "://" in trimmed and "/" not in trimmed.split("://", 1)[1]:
            raise RecipeError(
                f"output {output} is a bucket's root, so no intermediate directory can sit beside it; "
                "give --intermediate-dir (or fleet.intermediate_dir)"
            )
        chosen = trimmed + INTERMEDIATES_SUFFIX
    return chosen.rstrip("/") if "://" in chosen else os.path.abspath(os.path.expanduser(chosen))


def intermediate_location(root: str, name: str) -> str:
    return f"{root}/{name}"


def node_recipe(graph: MergeGraph, node: MergeNode, root: str) -> Recipe:
    """``node``'s recipe as it runs: intermediates' names replaced by their locations, and
    (for an intermediate) the final document's ``fleet`` settings but its output, eval and registry."""
    data = _recipe_data(node.recipe)
    _replace_references(data, {name: intermediate_location(root, name) for name in node.needs})
    fleet = _recipe_data(graph.final.recipe).get("fleet", {})
    if node is not graph.final:
        fleet = {key: value for key, value in fleet.items() if key not in ("output", "eval", "register_model", "dam")}
    data["fleet"] = fleet
    return parse_recipe({key: value for key, value in data.items() if value is not None}, source=f"{graph.source}, {node.label}", warn=False)


def finished_merge(plan: Plan) -> Manifest | None:
    """The manifest of a merge of exactly ``plan`` already complete at its output, else None."""
    sink = plan.output_sink()
    if not sink.exists(MANIFEST_FILE):
        return None
    try:
        manifest = Manifest.model_validate_json(sink.read_file(MANIFEST_FILE))
    except ValueError:
        return None
    if manifest.plan_id != plan.plan_id or not all(sink.exists(entry.file) for entry in manifest.files):
        return None
    return manifest


def cached_outcomes(plan: Plan) -> list[ShardOutcome]:
    """The shards of a finished merge as every runner reports shards already done."""
    sink = plan.output_sink()
    outcomes = []
    for shard in plan.shards:
        receipt = finished_receipt(plan, sink, shard.index)
        if receipt is None:
            raise OutputError(f"{plan.output}/{shard.file} has no receipt for plan {plan.plan_id}; merge the intermediate again")
        outcomes.append(ShardOutcome(receipt=receipt, skipped=True))
    return outcomes


def claim_intermediate(plan: Plan, name: str, *, overwrite: bool = False) -> Manifest | None:
    """The manifest when the intermediate is already merged (cached); else claim its location.

    An earlier merge of the same intermediate (its plan names the same ``name``) is replaced,
    deleting only the files its plan recorded; anything else there is refused unless ``overwrite``.
    """
    done = finished_merge(plan)
    if done is not None:
        return done
    sink = plan.output_sink()
    replace = overwrite
    if not replace and sink.exists(PLAN_FILE):
        try:
            previous = Plan.from_json(sink.read_file(PLAN_FILE))
        except ValueError:
            previous = None
        replace = previous is not None and previous.recipe.get("name") == name
    prepare_output(plan, overwrite=replace)  # also deletes dead writers' temp files
    return None


@dataclass(frozen=True)
class IntermediateResult:
    """One intermediate of a run: where it is, its plan, whether it was already merged."""

    name: str
    output: str
    plan_id: str
    cached: bool
    summary: MergeSummary | None  # None when cached

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "output": self.output, "plan_id": self.plan_id, "cached": self.cached}


class MergeOptions(TypedDict, total=False):
    """What ``pipeline.merge`` takes besides the recipe, the output and ``overwrite``."""

    shards: int | None
    workers: int | None
    device: str | None
    allow_pickle: bool | None
    on_plan: Callable[[Plan], None] | None
    on_tensor: OnTensor | None
    runner: ShardRunner | None


def merge_graph(
    graph: MergeGraph,
    output: str,
    *,
    intermediates: str | None = None,
    overwrite: bool = False,
    on_intermediate: Callable[[IntermediateResult], None] | None = None,
    **options: Unpack[MergeOptions],
) -> tuple[list[IntermediateResult], MergeSummary]:
    """Every merge of ``graph`` in dependency order (``pipeline.merge`` each, with ``options``),
    skipping the intermediates already merged for their plan; returns the intermediates and
    the final summary.

    ``overwrite`` applies to the final output only (an intermediate's location is replaced
    when it holds an earlier merge of that intermediate).
    """
    root = intermediate_dir(output, intermediates or graph.final.recipe.fleet.intermediate_dir)
    results: list[IntermediateResult] = []
    for node in graph.intermediates:
        assert node.name is not None  # only the final document may be unnamed
        recipe = node_recipe(graph, node, root)
        location = intermediate_location(root, node.name)
        with held_output(recipe, location):  # from its claim to its last file
            plan = build_plan(recipe, location, shards=options.get("shards"), allow_pickle=options.get("allow_pickle"))
            cached = claim_intermediate(plan, node.name) is not None
            result = IntermediateResult(node.name, location, plan.plan_id, cached, None if cached else merge(recipe, location, **options))
        results.append(result)
        if on_intermediate:
            on_intermediate(result)
    summary = merge(node_recipe(graph, graph.final, root), output, overwrite=overwrite, **options)
    return results, summary


@dataclass(frozen=True)
class PlannedNode:
    """What ``mergefleet plan`` says of one document: its plan, or what it waits for."""

    name: str | None
    method: str
    output: str
    plan: Plan | None  # None while an intermediate it reads is not merged yet
    state: str  # "merged" (already, for this plan), "to merge", or "waits for NAME, ..."

    def as_json(self) -> dict[str, Any]:
        plan_id = self.plan.plan_id if self.plan else None
        return {"name": self.name, "method": self.method, "output": self.output, "plan_id": plan_id, "state": self.state}


def plan_graph(
    graph: MergeGraph,
    output: str,
    *,
    intermediates: str | None = None,
    shards: int | None = None,
    allow_pickle: bool | None = None,
) -> list[PlannedNode]:
    """Every document's plan as far as it can be made now, in dependency order; writes nothing.

    A plan id covers the inputs' fingerprints, so a document that reads an intermediate not
    yet merged (or merged for another plan) has no plan until that intermediate is merged.
    """
    root = intermediate_dir(output, intermediates or graph.final.recipe.fleet.intermediate_dir)
    ready: set[str] = set()
    planned: list[PlannedNode] = []
    for node in graph.nodes:
        location = output if node is graph.final else intermediate_location(root, node.name or "")
        waiting = [name for name in node.needs if name not in ready]
        if waiting:
            planned.append(PlannedNode(node.name, node.recipe.merge_method, location, None, "waits for " + ", ".join(waiting)))
            continue
        plan = build_plan(node_recipe(graph, node, root), location, shards=shards, allow_pickle=allow_pickle)
        merged = finished_merge(plan) is not None
        if merged and node.name:
            ready.add(node.name)
        planned.append(PlannedNode(node.name, plan.method, location, plan, "merged" if merged else "to merge"))
    return planned
