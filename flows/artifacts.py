"""What the flow run shows in the Prefect UI's Artifacts tab: the scores table, a markdown
summary of the merge and a link to its MLflow run, so that someone who only opens Prefect
sees the outcome and how to reach the details. Keys are per recipe, so the Artifacts page
keeps each recipe's latest next to its history."""

from __future__ import annotations

import re
from typing import Sequence

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from orchestrator.evaluate.scores import Evaluation
from orchestrator.plan import Plan
from orchestrator.receipt import ShardOutcome
from orchestrator.report import input_labels, score_rows, summary_markdown
from orchestrator.tracking.record import TrackedRun
from orchestrator.tracking.store import ui_command

_KEY_UNSAFE = re.compile(r"[^a-z0-9-]+")


def artifact_key(plan: Plan, what: str) -> str:
    """``<recipe name or method>-<what>``, in the lowercase letters, digits and dashes Prefect takes."""
    stem = _KEY_UNSAFE.sub("-", str(plan.recipe.get("name") or plan.method).lower()).strip("-")
    return f"{stem}-{what}"


def publish_merge(
    plan: Plan, shards: Sequence[ShardOutcome], evaluation: Evaluation | None, tracking: TrackedRun | None, *, seconds: float
) -> None:
    """Create the flow run's artifacts (call inside the flow run, after tracking)."""
    url = tracking.url if tracking is not None else None
    if evaluation is not None:
        rows = [
            {key: round(value, 4) if isinstance(value, float) else value for key, value in row.items()}
            for row in score_rows(evaluation, input_labels(plan))
        ]
        create_table_artifact(
            rows,
            key=artifact_key(plan, "scores"),
            description=f"Scores of the {plan.method} merge (primary metric per task; normalised: merged ÷ owner or base)",
        )
    create_markdown_artifact(
        summary_markdown(plan, shards, evaluation, seconds=seconds, mlflow_url=url),
        key=artifact_key(plan, "summary"),
        description=f"The {plan.method} merge into {plan.output}",
    )
    if url is not None:
        create_link_artifact(url, link_text=f"MLflow run {tracking.run_id}", key=artifact_key(plan, "mlflow"),
                             description="The merge's MLflow run: params, inputs, shard runs, scores, logged model")
    elif tracking is not None:
        create_markdown_artifact(
            f"MLflow run `{tracking.run_id}` in `{tracking.tracking_uri}`; open it with\n\n```\n{ui_command(tracking.tracking_uri)}\n```\n",
            key=artifact_key(plan, "mlflow"),
            description="Where the merge's MLflow run is",
        )
