"""Merges recorded in MLflow, side by side: the runs that refs name, one row per merge
(method, the parameters that differ, scores and normalised scores, seconds), chart series."""

from __future__ import annotations

import re
from typing import Any, Sequence

from orchestrator.errors import TrackingError
from orchestrator.tracking.record import AVG_NORMALISED, EVAL_SECONDS, MERGE_SECONDS, TAG
from orchestrator.tracking.store import client_for


def find_merge_runs(refs: Sequence[str], *, tracking_uri: str) -> list[Any]:
    """The merge runs named by ``refs``: run ids, or experiment names or ids (all their merges)."""
    from mlflow.exceptions import MlflowException

    client = client_for(tracking_uri)
    runs: list[Any] = []
    for ref in refs:
        run = None
        if re.fullmatch(r"[0-9a-f]{32}", ref):
            try:
                run = client.get_run(ref)
            except MlflowException:
                run = None
        if run is not None:
            runs.append(run)
            continue
        experiment = None
        try:
            experiment = client.get_experiment_by_name(ref)
            if experiment is None and ref.isdigit():
                experiment = client.get_experiment(ref)
        except MlflowException:
            experiment = None
        if experiment is None:
            raise TrackingError(f"'{ref}' is neither a run id nor an experiment in MLflow at {tracking_uri}")
        # finished merges only: a run still open, or ended by a failed merge, has no scores to compare
        finished = f"tags.`{TAG}plan_id` != '' and attributes.status = 'FINISHED'"
        found = client.search_runs([experiment.experiment_id], filter_string=finished, order_by=["attributes.start_time ASC"], max_results=5000)
        runs += [r for r in found if f"{TAG}shard" not in r.data.tags]
    unique = {run.info.run_id: run for run in runs}
    if not unique:
        raise TrackingError(f"no merge runs found for {', '.join(refs)} in MLflow at {tracking_uri}")
    return list(unique.values())


def compare_rows(runs: Sequence[Any]) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """One row per merge run; also the recipe params that differ between runs, and the tasks."""
    params = [run.data.params for run in runs]
    keys = sorted({key for p in params for key in p if not key.startswith(("recipe.", "mergefleet."))} - {"method"})
    if len(runs) > 1:
        varying = [key for key in keys if len({p.get(key) for p in params}) > 1]
    else:
        varying = [key for key in keys if key not in ("experts", "shards")]
    tasks = sorted({key.split("/", 1)[1] for run in runs for key in run.data.metrics if key.startswith("score/") and key != "score/mean"})
    rows = []
    for run in runs:
        metrics = run.data.metrics
        seconds = _first(metrics, MERGE_SECONDS, "merge_seconds", "time/shards_total", "shard_seconds_total")
        rows.append(
            {
                "run_id": run.info.run_id,
                "name": run.info.run_name,
                "method": run.data.tags.get(f"{TAG}method", run.data.params.get("method")),
                "params": {key: run.data.params.get(key) for key in varying},
                "scores": {task: metrics.get(f"score/{task}") for task in tasks},
                "normalised": {task: metrics.get(f"normalised/{task}") for task in tasks},
                "normalised_mean": _first(metrics, AVG_NORMALISED, "normalised/mean"),
                "base": {task: metrics.get(f"base/{task}") for task in tasks},
                "experts": _expert_scores(metrics),
                "drop_rates": {key.split("/", 1)[1]: value for key, value in metrics.items() if key.startswith("protected_drop_rate/")},
                "seconds": seconds,
                "eval_seconds": _first(metrics, EVAL_SECONDS, "eval_seconds"),
            }
        )
    return rows, varying, tasks


def _first(metrics: dict[str, float], *keys: str) -> float | None:
    """The first of ``keys`` a run has: runs recorded before a metric's rename keep its old name."""
    return next((metrics[key] for key in keys if key in metrics), None)


def _expert_scores(metrics: dict[str, float]) -> dict[str, dict[str, float]]:
    experts: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        if key.startswith("expert/"):
            _, label, task = key.split("/", 2)
            experts.setdefault(label, {})[task] = value
    return experts


def reference_series(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """The first run's base and experts (the same inputs for every merge compared)."""
    series: dict[str, dict[str, float]] = {}
    if rows:
        base = {t: v for t, v in rows[0]["base"].items() if v is not None}
        if base:
            series["base"] = base
        for label, scores in rows[0]["experts"].items():
            series[label] = scores
    return series


def merge_series(rows: list[dict[str, Any]], taken: Sequence[str] = ()) -> dict[str, dict[str, float]]:
    """Each merge's scores under its run name (made unique, also against ``taken``)."""
    series: dict[str, dict[str, float]] = {}
    for row in rows:
        label = row["name"] or row["run_id"][:8]
        while label in series or label in taken:
            label += "'"
        series[label] = {t: v for t, v in row["scores"].items() if v is not None}
    return series


def compare_series(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Chart series: the first run's base and experts, then every merge."""
    references = reference_series(rows)
    return references | merge_series(rows, taken=list(references))


def compare_drop_rates(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Chart input: each merge's protected drop rates, for the merges that report one."""
    rates = {}
    for row in rows:
        if row.get("drop_rates"):
            rates[row["name"] or row["run_id"][:8]] = row["drop_rates"]
    return rates


COMPARISON_TAG = f"{TAG}comparison"
COMPARISON_RUN = "comparison"
COMPARISON_CHART = "comparison.png"


def log_comparison(runs: Sequence[Any], *, tracking_uri: str) -> list[str]:
    """Record the comparison where MLflow shows it, once per experiment of ``runs``: a run
    named ``comparison`` (made once, then refreshed) holds the chart (every merge's score per
    task, base and experts as reference lines) and, as its description, the table; the
    experiment's description links to it. Returns the comparison runs' ids."""
    import tempfile

    from orchestrator.report import markdown_table
    from orchestrator.tracking.charts import comparison_chart

    client = client_for(tracking_uri)
    by_experiment: dict[str, list[Any]] = {}
    for run in runs:
        by_experiment.setdefault(run.info.experiment_id, []).append(run)
    logged = []
    for experiment, members in by_experiment.items():
        rows, _, tasks = compare_rows(members)
        if not tasks:
            continue
        run_id = _comparison_run(client, experiment)
        table = [
            {"run": row["name"] or row["run_id"][:8], "method": row["method"], **{t: row["scores"][t] for t in tasks},
             "normalised": row["normalised_mean"]}
            for row in rows
        ]
        references = reference_series(rows)
        reference_rows = [{"run": label, "method": "(input)", **{t: scores.get(t) for t in tasks}, "normalised": None}
                          for label, scores in references.items()]
        note = markdown_table(table + reference_rows)
        with tempfile.TemporaryDirectory(prefix="mergefleet-compare-") as scratch:
            title = f"{len(rows)} merge(s) of experiment {client.get_experiment(experiment).name}"
            chart = comparison_chart(merge_series(rows, taken=list(references)), references, f"{scratch}/{COMPARISON_CHART}", title=title)
            client.log_artifact(run_id, str(chart))
        client.set_tag(run_id, "mlflow.note.content", f"{note}\n\nChart: artifact `{COMPARISON_CHART}` of this run.")
        client.set_experiment_tag(
            experiment,
            "mlflow.note.content",
            f"Merges compared by `mergefleet compare --log`: the chart is `{COMPARISON_CHART}` in run "
            f"`{COMPARISON_RUN}` ({run_id}).\n\n{note}",
        )
        logged.append(run_id)
    return logged


def _comparison_run(client: Any, experiment: str) -> str:
    """The experiment's comparison run, created the first time."""
    found = client.search_runs([experiment], filter_string=f"tags.`{COMPARISON_TAG}` = 'true'", max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment, run_name=COMPARISON_RUN, tags={COMPARISON_TAG: "true"})
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id
