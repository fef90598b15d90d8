"""The files that make a merge recognisable on the Hugging Face Hub and to mergekit.

``README.md`` is a model card: YAML front matter the Hub reads (``base_model``,
``library_name``, ``tags``), then the method, the models with their parameters, the scores
when the merge was evaluated, and the recipe. ``mergekit_config.yml`` is the recipe as
mergekit reads it: the plan's recipe without mergefleet's ``fleet:`` section, so
``mergekit-yaml mergekit_config.yml OUT`` redoes the merge.

Both come from the plan (never from the environment), so nothing but what the recipe says
is written; the plan's recipe holds no credentials (the recipe refuses them).
"""

from __future__ import annotations

import json
import logging
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

import yaml

from orchestrator import __version__

if TYPE_CHECKING:
    from orchestrator.evaluate.scores import Evaluation
    from orchestrator.plan import Plan
    from orchestrator.storage.base import OutputSink

log = logging.getLogger(__name__)

CARD_FILE = "README.md"
MERGEKIT_CONFIG_FILE = "mergekit_config.yml"
CARD_FILES = (CARD_FILE, MERGEKIT_CONFIG_FILE)
_MERGEFLEET_ONLY = ("fleet", "random_seed")  # random_seed is mergekit's --random-seed flag, not a config key


def mergekit_config(plan: Plan) -> str:
    """``mergekit_config.yml``: the recipe as mergekit reads it."""
    recipe = {key: value for key, value in plan.recipe.items() if key not in _MERGEFLEET_ONLY}
    return yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True)


def _models(plan: Plan) -> list[tuple[str, str, dict[str, Any]]]:
    """(model, role, parameters) per entry, as the recipe lists them."""
    recipe = plan.recipe
    base = recipe.get("base_model")
    rows: list[tuple[str, str, dict[str, Any]]] = []
    if base and base not in [entry["model"] for entry in recipe.get("models") or []]:
        rows.append((base, "base", {}))
    for entry in recipe.get("models") or []:
        rows.append((entry["model"], "base" if entry["model"] == base else "expert", entry.get("parameters") or {}))
    for i, slice_ in enumerate(recipe.get("slices") or []):
        for source in slice_["sources"]:
            start, end = source["layer_range"]
            role = f"slice {i}, layers {start}-{end}"
            rows.append((source["model"], role, source.get("parameters") or {}))
    return rows


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, separators=(", ", ": "))
    return text.replace("|", "\\|").replace("\n", " ")


def _scores_table(evaluation: Evaluation) -> list[str]:
    columns = [("merged", evaluation.merged.scores)]
    if evaluation.base is not None:
        columns.append(("base", evaluation.base.scores))
    columns += [(name, scores.scores) for name, scores in evaluation.experts.items()]
    lines = ["| task | " + " | ".join(_cell(name) for name, _ in columns) + " | normalised |"]
    lines.append("|" + " --- |" * (len(columns) + 2))
    for task in evaluation.tasks:
        cells = [f"{scores[task]:.4f}" if task in scores else "" for _, scores in columns]
        normalised = evaluation.normalised.get(task)
        lines.append(f"| {_cell(task)} | " + " | ".join(cells) + f" | {'' if normalised is None else f'{normalised:.3f}'} |")
    return lines


def model_card(plan: Plan, evaluation: Evaluation | None = None) -> str:
    """``README.md`` for the merge of ``plan``; with ``evaluation``, its scores too."""
    models = _models(plan)
    references = list(dict.fromkeys(model for model, _, _ in models))
    front = {"base_model": references, "library_name": "transformers", "tags": ["merge", "mergefleet"]}
    name = plan.recipe.get("name") or PurePosixPath(plan.output.rstrip("/")).name or "merge"
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(),
        "---",
        f"# {name}",
        "",
        f"A merge of {len(references)} checkpoints made with mergefleet {__version__} using the "
        f"`{plan.method}` method (plan `{plan.plan_id}`), weights written as {plan.out_dtype}.",
        "",
        "## Models",
        "",
        "| model | role | parameters |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {_cell(model)} | {role} | {_cell(params) if params else ''} |" for model, role, params in models]
    if plan.recipe.get("parameters"):
        lines += ["", f"Parameters for every model: `{_cell(plan.recipe['parameters'])}`"]
    if evaluation is not None:
        lines += ["", "## Evaluation", "", "Scores from lm-eval (each task's primary metric):", "", *_scores_table(evaluation)]
    lines += [
        "",
        "## Configuration",
        "",
        f"The recipe as mergekit reads it (also in `{MERGEKIT_CONFIG_FILE}`):",
        "",
        "```yaml",
        mergekit_config(plan).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def recorded_card_files(sink: OutputSink) -> list[str]:
    """The card files the output's manifest records as a merge's own (none without a manifest)."""
    from orchestrator.assemble import MANIFEST_FILE  # assemble imports this module

    if not sink.exists(MANIFEST_FILE):
        return []
    try:
        recorded = json.loads(sink.read_file(MANIFEST_FILE)).get("card_files") or []
    except ValueError:
        return []
    return [file for file in recorded if file in CARD_FILES]


def write_card_files(plan: Plan, sink: OutputSink, evaluation: Evaluation | None = None) -> list[str]:
    """Write (atomically) ``README.md`` and ``mergekit_config.yml``; return those written.

    A file of that name that no merge recorded as its own (the user's README, say) is left
    as it is, with a warning: a merge never writes over what it did not write.
    """
    contents = {CARD_FILE: model_card(plan, evaluation), MERGEKIT_CONFIG_FILE: mergekit_config(plan)}
    ours = recorded_card_files(sink)
    written = []
    for file, text in contents.items():
        if sink.exists(file) and file not in ours:
            log.warning("%s/%s was not written by mergefleet; left as it is (the merge's %s is not written)", plan.output, file, file)
            continue
        sink.write_file(file, text.encode())
        written.append(file)
    return written
