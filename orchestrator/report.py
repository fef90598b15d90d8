"""What a merge shows a person in Prefect and MLflow: the scores table (task, base, each
expert, merged, normalised), short labels for the inputs and shards, and the markdown
summary. Pure functions over the plan, the receipts and the evaluation; the flows and the
tracking module put them where each UI shows them."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

from orchestrator.evaluate.scores import Evaluation
from orchestrator.parameters import layer_index
from orchestrator.plan import Plan, PlannedShard
from orchestrator.receipt import ShardOutcome
from orchestrator.storage.checkpoint import fingerprint_digest

LABEL_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. /]")


def input_labels(plan: Plan) -> dict[str, str]:
    """Short, unique labels for the inputs: ``base`` and the experts' directory names."""
    labels: dict[str, str] = {}
    for index, inp in enumerate(plan.inputs):
        if index == plan.base:
            label = "base"
        else:
            label = LABEL_UNSAFE.sub("_", Path(inp.name.rstrip("/")).name or f"expert{index}")
        candidate, n = label, 2
        while candidate in labels.values():
            candidate, n = f"{label}-{n}", n + 1
        labels[inp.name] = candidate
    return labels


def expert_count(plan: Plan) -> int:
    return len(plan.inputs) - (plan.base is not None)


def layer_range(shard: PlannedShard) -> str:
    """Which transformer blocks a shard writes (``layers 0-3``), and ``+ other`` when it
    also writes tensors outside the blocks (embeddings, norms, the head)."""
    layers = [layer_index(t.name) for t in shard.tensors]
    numbered = [n for n in layers if n is not None]
    if not numbered:
        return "embeddings and head"
    first, last = min(numbered), max(numbered)
    text = f"layer {first}" if first == last else f"layers {first}-{last}"
    return text + (" + other" if len(numbered) < len(layers) else "")


def shard_name(plan: Plan, index: int) -> str:
    """``shard-2 (layers 8-11)``: a shard as the Prefect and MLflow UIs name it."""
    return f"shard-{index} ({layer_range(plan.shard(index))})"


def score_rows(evaluation: Evaluation, labels: dict[str, str]) -> list[dict[str, Any]]:
    """One row per task: ``task``, ``base``, each expert's label, ``merged``, ``normalised``
    (``None`` where that checkpoint was not evaluated)."""
    rows = []
    for task in evaluation.tasks:
        row: dict[str, Any] = {"task": task, "base": evaluation.base.scores.get(task) if evaluation.base else None}
        for name, scores in evaluation.experts.items():
            row[labels.get(name, name)] = scores.scores.get(task)
        row["merged"] = evaluation.merged.scores.get(task)
        row["normalised"] = evaluation.normalised.get(task)
        rows.append(row)
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value).replace("|", "\\|")


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """Rows of equal keys as a GitHub-flavoured markdown table (numbers to 3 decimals)."""
    if not rows:
        return ""
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(column)) for column in columns) + " |" for row in rows]
    return "\n".join(lines)


def short_params(plan: Plan, labels: dict[str, str]) -> dict[str, str]:
    """The settings a person compares merges by, under short names: ``method``, ``experts``,
    each global parameter by its own name (``density``), each expert's as ``<name>.<label>``
    (``weight.math``)."""
    recipe = plan.recipe
    params = {"method": plan.method, "experts": str(expert_count(plan)), "shards": str(len(plan.shards))}
    params |= {str(key): _value(value) for key, value in (recipe.get("parameters") or {}).items()}
    for entry in recipe.get("models") or []:
        if not isinstance(entry, dict):
            continue
        label = labels.get(str(entry.get("model")))
        for key, value in (entry.get("parameters") or {}).items():
            if label is not None:
                params[f"{key}.{label}"] = _value(value)
    return params


def _value(value: Any) -> str:
    return str(value) if not isinstance(value, (list, dict)) else re.sub(r"\s+", " ", repr(value))


def summary_markdown(
    plan: Plan,
    shards: Sequence[ShardOutcome],
    evaluation: Evaluation | None,
    *,
    seconds: float,
    mlflow_url: str | None = None,
) -> str:
    """The merge in one page: method and parameters, inputs with fingerprints, where the
    checkpoint is, bytes and seconds per shard, scores, and where the MLflow run is."""
    labels = input_labels(plan)
    lines = [
        f"# {plan.recipe.get('name') or plan.method}: {plan.method} merge of {expert_count(plan)} expert(s)",
        "",
        f"- **output**: `{plan.output}`",
        f"- **plan**: `{plan.plan_id}`, {len(plan.shards)} shard(s), {seconds:.1f} s",
    ]
    if mlflow_url:
        lines.append(f"- **MLflow run**: [{mlflow_url}]({mlflow_url})")
    lines += ["", "## Parameters", "", markdown_table([{"name": k, "value": v} for k, v in short_params(plan, labels).items()])]
    inputs = [
        {"input": labels[inp.name], "location": inp.ref, "fingerprint": fingerprint_digest(inp.ref, inp.fingerprints)[:16]}
        for inp in plan.inputs
    ]
    lines += ["", "## Inputs", "", markdown_table(inputs)]
    shard_rows = [
        {
            "shard": shard_name(plan, o.receipt.index),
            "MB written": o.receipt.bytes_written / 1e6,
            "seconds": o.receipt.seconds,
            "MB/s": o.receipt.bytes_written / 1e6 / o.receipt.seconds if o.receipt.seconds > 0 else None,
            "state": "already done" if o.skipped else "merged",
        }
        for o in shards
    ]
    lines += ["", "## Shards", "", markdown_table(shard_rows)]
    if evaluation is not None:
        lines += ["", "## Scores", "", markdown_table(score_rows(evaluation, labels))]
    return "\n".join(lines) + "\n"
