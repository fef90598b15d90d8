"""The MLflow run of one merge (see ``orchestrator/tracking/__init__.py`` for what it
holds): params, tags, inputs with fingerprints, shard runs, metrics, artifacts, the logged
model and its registered version."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager, Iterator, Sequence

import yaml
from pydantic import BaseModel

from orchestrator import __version__
from orchestrator.assemble import Manifest
from orchestrator.errors import MergefleetError, RecipeError, TrackingError
from orchestrator.evaluate.scores import Evaluation
from orchestrator.plan import Plan
from orchestrator.receipt import ShardOutcome, load_receipt
from orchestrator.recipe import FleetSettings, Recipe, parse_recipe
from orchestrator.report import expert_count, input_labels, markdown_table, score_rows, shard_name, short_params
from orchestrator.redact import redact, redact_data
from orchestrator.storage.checkpoint import fingerprint_digest
from orchestrator.storage.output_lock import LockHolder
from orchestrator.tracking.charts import score_chart, score_series
from orchestrator.tracking.store import client_for, experiment_id, resolve_tracking_uri, sqlite_path, ui_page

log = logging.getLogger(__name__)

TAG = "mergefleet."
DEFAULT_EXPERIMENT = "mergefleet"
MODEL_TYPE = "mergefleet-checkpoint"
MODEL_VERSIONS_TAG = "mlflow.modelVersions"  # the registered versions of a logged model, as MLflow's UI reads them
PARAM_VALUE_LIMIT = 6000
ERROR_TAG = f"{TAG}error"
ERROR_LIMIT = 500
"""The most characters of an error's line a failed run's ``mergefleet.error`` tag keeps."""
NOTE_TAG = "mlflow.note.content"
HOST_TAG, PID_TAG = f"{TAG}host", f"{TAG}pid"
"""Where an open merge run's process runs, so that a later merge can tell a dead one from a live one."""
_METRIC_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. /]")
_MODEL_NAME_UNSAFE = re.compile(r"[/:.%\"']")
_sqlite_locks: dict[str, threading.Lock] = {}


class TrackedRun(BaseModel):
    """Where the record of one merge is."""

    run_id: str
    experiment_id: str
    tracking_uri: str
    model_id: str | None
    model_version: str | None
    url: str | None  # the run's page when the tracking URI is a server


@dataclass(frozen=True)
class OpenRun:
    """A merge's MLflow run while the merge runs (``start_merge_run``): ``track_merge(run_id=...)``
    fills and finishes it, ``fail_merge_run`` ends it. Kept in the flow's memory only:
    ``tracking_uri`` is the resolved URI (credentials included), never shown or stored."""

    run_id: str
    experiment_id: str
    tracking_uri: str
    url: str | None


@dataclass(frozen=True)
class _ShardRow:
    """One shard as its nested run records it."""

    index: int
    name: str
    file: str
    device: str
    tensors: int | None
    skipped: bool
    sha256: str | None
    seconds: float
    bytes_written: int
    bytes_read: int
    finished_at: float | None  # Unix time; None when the receipt predates the field


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """``{"models": [{"model": "a"}]}`` -> ``{"models.0.model": "a"}``; lists of scalars stay whole."""
    if isinstance(value, dict):
        result: dict[str, str] = {}
        for key, item in value.items():
            result |= flatten(item, f"{prefix}.{key}" if prefix else str(key))
        return result
    if isinstance(value, list) and any(isinstance(item, (dict, list)) for item in value):
        result = {}
        for index, item in enumerate(value):
            result |= flatten(item, f"{prefix}.{index}" if prefix else str(index))
        return result
    text = json.dumps(value) if isinstance(value, list) else str(value)
    if len(text) > PARAM_VALUE_LIMIT:
        text = text[: PARAM_VALUE_LIMIT - 1] + "…"
    return {prefix: text}


def metric_key(*parts: str) -> str:
    return "/".join(_METRIC_UNSAFE.sub("_", part) for part in parts)


def protected_labels(plan: Plan, labels: dict[str, str]) -> list[str]:
    """The experts a merge's drop-rate report is about, in its order: those marked
    ``protect: true``, or every expert when none is (as the engine reports them)."""
    for shard in plan.shards:
        for tensor in shard.tensors:
            if tensor.model_params and "protect" in tensor.model_params[0]:
                experts = [plan.inputs[read.input].name for read in tensor.expert_reads()]
                marked = [name for name, params in zip(experts, tensor.model_params) if params.get("protect")]
                return [labels.get(name, name) for name in (marked or experts)]
    return []


def _stored_outcomes(plan: Plan) -> list[ShardOutcome] | None:
    """The shards' receipts at the output, for a merge recorded without its outcomes (a sweep's
    point, ``mergefleet merge`` then ``track_merge``): they hold each shard's real span. None
    when any is missing, unreadable or of another plan."""
    try:
        sink = plan.output_sink()
        receipts = [load_receipt(sink, shard.index) for shard in plan.shards]
    except (OSError, MergefleetError) as error:
        log.info("shard runs of plan %s without their receipts' times: %s", plan.plan_id, redact(str(error)))
        return None
    if not all(r is not None and r.plan_id == plan.plan_id for r in receipts):
        return None
    return [ShardOutcome(receipt=r, skipped=False) for r in receipts if r is not None]


def _shard_rows(plan: Plan, shards: Sequence[ShardOutcome] | None, manifest: Manifest) -> list[_ShardRow]:
    """The shards' outcomes, or (without them) the manifest's shard list."""
    if shards is None:
        return [
            _ShardRow(s.index, shard_name(plan, s.index), "", s.device, None, False, None, s.seconds, s.bytes_written, s.bytes_read, None)
            for s in manifest.shards
        ]
    return [
        _ShardRow(
            r.index, shard_name(plan, r.index), r.file, r.device, len(r.tensors), outcome.skipped, r.sha256,
            r.seconds, r.bytes_written, r.bytes_read, r.finished_at,
        )
        for outcome in shards
        for r in [outcome.receipt]
    ]


def _fleet(plan: Plan) -> FleetSettings:
    try:
        return parse_recipe(plan.recipe, warn=False).fleet
    except RecipeError:  # a plan from an older recipe format: tracking still works
        return FleetSettings()


AVG_SCORE = "avg_score"
AVG_NORMALISED = "avg_normalised"
"""The merge's headline numbers, logged first and named so that they sort before every other
metric key: MLflow's compare view starts its parallel-coordinates plot on the first metric a
run lists (in logging order) and its scatter and contour plots on the first key in sorted
order, and its charts put keys without a ``/`` first; so a person sees a score first, not
bytes or seconds."""
MERGE_SECONDS = "time/merge"
EVAL_SECONDS = "time/eval"


def _evaluation_metrics(evaluation: Evaluation, labels: dict[str, str]) -> dict[str, float]:
    """The evaluation's metrics, the headline ones first."""
    merged = evaluation.merged
    metrics: dict[str, float] = {}
    if evaluation.normalised:
        metrics[AVG_NORMALISED] = sum(evaluation.normalised.values()) / len(evaluation.normalised)
    if merged.scores:
        metrics[AVG_SCORE] = sum(merged.scores.values()) / len(merged.scores)
    for task, value in merged.scores.items():
        metrics[metric_key("score", task)] = value
        for name, number in merged.metrics.get(task, {}).items():
            metrics[metric_key("merged", task, name)] = number
    for task, value in evaluation.normalised.items():
        metrics[metric_key("normalised", task)] = value
    if evaluation.base is not None:
        for task, value in evaluation.base.scores.items():
            metrics[metric_key("base", task)] = value
    for name, scores in evaluation.experts.items():
        for task, value in scores.scores.items():
            metrics[metric_key("expert", labels.get(name, name), task)] = value
    metrics[EVAL_SECONDS] = merged.seconds
    return metrics


def _log_metrics(client: Any, run_id: str, metrics: dict[str, float], *, model_id: str | None = None) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    entries = [Metric(key, float(value), now, 0, model_id=model_id) for key, value in metrics.items()]
    for start in range(0, len(entries), 1000):
        client.log_batch(run_id, metrics=entries[start : start + 1000])


def _log_params(client: Any, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    entries = [Param(key, redact(value)) for key, value in params.items()]
    for start in range(0, len(entries), 100):
        client.log_batch(run_id, params=entries[start : start + 100])


def _log_inputs(client: Any, run_id: str, plan: Plan, labels: dict[str, str]) -> None:
    from mlflow.entities import Dataset, DatasetInput, InputTag

    inputs = []
    for index, inp in enumerate(plan.inputs):
        fingerprint = fingerprint_digest(inp.ref, inp.fingerprints)
        scheme = inp.ref.split("://", 1)[0] if "://" in inp.ref else "local"
        dataset = Dataset(
            name=labels[inp.name],
            digest=fingerprint[:32],
            source_type=scheme,
            source=json.dumps({"uri": inp.ref}),
            schema=json.dumps({"mergefleet_fingerprints": inp.fingerprints}),
        )
        tags = [
            InputTag("mlflow.data.context", "base" if index == plan.base else "expert"),
            InputTag(f"{TAG}fingerprint", fingerprint),
            InputTag(f"{TAG}uri", inp.ref),
            InputTag(f"{TAG}name", inp.name),
        ]
        inputs.append(DatasetInput(dataset=dataset, tags=tags))
    from mlflow.exceptions import MlflowException

    for attempt in range(3):
        try:
            client.log_inputs(run_id, datasets=inputs)
            return
        except MlflowException as error:
            # merges recorded at once (a sweep) may both create the same input dataset; the
            # loser finds it stored on the next try
            if "UNIQUE constraint" not in str(error) or attempt == 2:
                raise
            time.sleep(0.2 * (attempt + 1))


def _log_shards(client: Any, experiment: str, parent: str, rows: list[_ShardRow], plan_id: str) -> list[str]:
    """One nested run per shard, spanning the shard's own start and end (from its receipt)."""
    ids = []
    for row in rows:
        tags = {"mlflow.parentRunId": parent, f"{TAG}shard": str(row.index), f"{TAG}plan_id": plan_id}
        start = _millis(row.finished_at - row.seconds) if row.finished_at is not None else None
        run = client.create_run(experiment, run_name=row.name, tags=tags, start_time=start)
        run_id = run.info.run_id
        params = {
            "index": str(row.index),
            "file": row.file,
            "device": row.device,
            "tensors": "" if row.tensors is None else str(row.tensors),
            "skipped": str(row.skipped),
            "sha256": row.sha256 or "",
        }
        _log_params(client, run_id, {k: v for k, v in params.items() if v != ""})
        metrics = {"bytes_written": float(row.bytes_written), "bytes_read": float(row.bytes_read), "seconds": row.seconds}
        metrics["bytes_per_second"] = row.bytes_written / row.seconds if row.seconds > 0 else 0.0
        _log_metrics(client, run_id, metrics)
        client.set_terminated(run_id, "FINISHED", end_time=_millis(row.finished_at) if row.finished_at is not None else None)
        ids.append(run_id)
    return ids


def _millis(unix_seconds: float) -> int:
    return int(round(unix_seconds * 1000))


def _log_logged_model(
    client: Any,
    experiment: str,
    run_id: str,
    plan: Plan,
    manifest: Manifest,
    metrics: dict[str, float],
    name: str,
) -> Any:
    """The merged checkpoint as an external logged model that points at its location."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models.utils import get_external_mlflow_model_spec

    tags = {
        f"{TAG}checkpoint_uri": plan.output,
        f"{TAG}plan_id": plan.plan_id,
        f"{TAG}method": plan.method,
        "mlflow.model.isExternal": "true",
    }
    labels = input_labels(plan)
    params = {
        "checkpoint": plan.output,
        "method": plan.method,
        "plan_id": plan.plan_id,
        "out_dtype": plan.out_dtype,
        "experts": str(expert_count(plan)),
    } | {f"input.{labels[inp.name]}": inp.ref for inp in plan.inputs}
    model = client.create_logged_model(experiment, name=name, source_run_id=run_id, tags=tags, params=params, model_type=MODEL_TYPE)
    try:
        with tempfile.TemporaryDirectory(prefix="mergefleet-model-") as scratch:
            get_external_mlflow_model_spec(model).save(os.path.join(scratch, "MLmodel"))
            reference = {
                "uri": plan.output,
                "plan_id": plan.plan_id,
                "recipe_sha256": plan.recipe_hash,
                "files": [entry.model_dump() for entry in manifest.files],
            }
            Path(scratch, "checkpoint.json").write_text(json.dumps(reference, indent=1))
            client.log_model_artifacts(model.model_id, scratch)
        if metrics:
            _log_metrics(client, run_id, metrics, model_id=model.model_id)
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, 0)])
        client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    except Exception:
        client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        raise
    return model


def _register(client: Any, name: str, model: Any, run_id: str, plan: Plan, uri: str) -> str:
    """A new version of registered model ``name``, linked to the logged model both ways: its
    source is ``models:/<model id>`` on a tracking server (a SQLite registry would resolve
    that against MLflow's global URI, so there it is the model's artifact location), and the
    logged model's ``mlflow.modelVersions`` tag, which the model's page reads, names it."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(
        name,
        source=f"models:/{model.model_id}" if _is_server(uri) else model.artifact_location,
        run_id=run_id,
        model_id=model.model_id,
        tags={f"{TAG}plan_id": plan.plan_id, f"{TAG}checkpoint_uri": plan.output},
        await_creation_for=0,
    )
    listed = json.loads(client.get_logged_model(model.model_id).tags.get(MODEL_VERSIONS_TAG) or "[]")
    if not any(e.get("name") == name and str(e.get("version")) == str(version.version) for e in listed):
        # a server lists the version itself; a SQLite store does not
        listed.append({"name": name, "version": str(version.version)})
        client.set_logged_model_tags(model.model_id, {MODEL_VERSIONS_TAG: json.dumps(listed)})
    return str(version.version)


def _is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def _run_url(uri: str, experiment: str, run_id: str) -> str | None:
    if _is_server(uri):
        return ui_page(uri, f"experiments/{experiment}/runs/{run_id}")
    return None


def _note(plan: Plan, evaluation: Evaluation | None) -> str:
    """The run's description: the scores table first (what a person opens the run for)."""
    lines = []
    if evaluation is not None:
        lines += [markdown_table(score_rows(evaluation, input_labels(plan))), ""]
        lines.append("Scores: each task's primary metric; normalised = merged ÷ the expert that owns the task, else ÷ base.")
        lines.append("")
    lines.append(f"**{plan.method}** merge of {expert_count(plan)} expert(s), plan `{plan.plan_id}`, checkpoint `{plan.output}`.")
    return "\n".join(lines)


def _store_lock(uri: str) -> ContextManager[Any]:
    """SQLite takes one writer at a time: a sweep's merges record one by one."""
    return _sqlite_locks.setdefault(uri, threading.Lock()) if sqlite_path(uri) else contextlib.nullcontext()


def _merge_tags(method: str, experts: int, recipe_hash: str, output: str, note: str) -> dict[str, str]:
    """The tags every merge run carries, whether opened at the start or recorded at the end."""
    return {
        f"{TAG}method": method,
        f"{TAG}experts": str(experts),
        f"{TAG}recipe_sha256": recipe_hash,
        f"{TAG}output": output,
        f"{TAG}version": __version__,
        NOTE_TAG: note,
    }


def _run_tags(plan: Plan, evaluation: Evaluation | None) -> dict[str, str]:
    tags = _merge_tags(plan.method, expert_count(plan), plan.recipe_hash, plan.output, _note(plan, evaluation))
    return tags | {f"{TAG}plan_id": plan.plan_id}


def start_merge_run(
    recipe: Recipe,
    output: str,
    *,
    target: str | None = None,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    run_name: str | None = None,
    started_at: float | None = None,
) -> OpenRun:
    """Open a merge's MLflow run as the merge starts: status RUNNING, started at
    ``started_at`` (default: now), named and tagged from the recipe (method, experts, target,
    recipe hash, output), so that the run is in the UI while the merge runs and its duration is
    the merge's. ``output``: the merge's absolute location. ``track_merge(run_id=...)`` fills
    and finishes it; ``fail_merge_run`` ends it. Where and under which experiment: as
    ``track_merge`` decides."""
    from mlflow.exceptions import MlflowException

    uri = resolve_tracking_uri(tracking_uri or recipe.fleet.tracking_uri, output)
    experiment_name = redact(experiment or recipe.fleet.experiment or DEFAULT_EXPERIMENT)
    experts = [ref for ref in recipe.model_refs() if ref != recipe.base_model]
    note = f"**{recipe.merge_method}** merge of {len(experts)} expert(s) into `{output}`: running."
    tags = _merge_tags(recipe.merge_method, len(experts), recipe.recipe_hash(), output, note)
    tags[f"{TAG}target"] = target or recipe.fleet.target
    me = LockHolder.me()  # who runs it, as an output lock records its holder: see end_abandoned_runs
    tags[HOST_TAG], tags[PID_TAG] = me.host, str(me.pid)
    name = run_name or recipe.name or recipe.merge_method
    try:
        with _store_lock(uri):
            client = client_for(uri)
            experiment_id_ = experiment_id(client, experiment_name, uri)
            start = _millis(started_at if started_at is not None else time.time())
            run = client.create_run(experiment_id_, run_name=redact(name), tags=redact_data(tags), start_time=start)
    except MlflowException as error:
        raise TrackingError(f"MLflow at {redact(uri)} refused to open the run of the merge into {output}: {error.message}") from None
    except OSError as error:
        raise TrackingError(f"cannot open the MLflow run of the merge into {output} at {redact(uri)}: {error}") from None
    run_id = run.info.run_id
    log.info("MLflow run %s opened for the merge into %s", run_id, output)
    return OpenRun(run_id, experiment_id_, uri, redact(_run_url(uri, experiment_id_, run_id) or "") or None)


def end_abandoned_runs(run: OpenRun, output: str) -> list[str]:
    """End as KILLED the merge runs into ``output`` left RUNNING by a process that died
    (SIGKILL, out of memory, a power cut: nothing could end them), naming ``run``, the merge
    that took the output over. Call it while holding the output's lock, so that no live merge
    into ``output`` can be among them; only runs opened on this host, whose process is gone,
    are ended (a run from another host is left as it is). Returns the ended run ids; never
    raises (a failure to tidy up is logged, the merge goes on)."""
    from mlflow.exceptions import MlflowException

    ended = []
    try:
        with _store_lock(run.tracking_uri):
            client = client_for(run.tracking_uri)
            running = client.search_runs([run.experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000)
            for other in running:
                tags = other.data.tags
                if other.info.run_id == run.run_id or tags.get(f"{TAG}output") != output or not tags.get(PID_TAG, "").isdigit():
                    continue
                if not LockHolder(tags.get(HOST_TAG, ""), int(tags[PID_TAG]), started=0.0).is_dead():
                    continue
                line = f"its process (pid {tags[PID_TAG]}) ended without a word; run {run.run_id} merged into {output} after it"
                client.set_tag(other.info.run_id, ERROR_TAG, line)
                client.set_tag(other.info.run_id, NOTE_TAG, f"**killed:** {line}\n\n{tags.get(NOTE_TAG, '')}".rstrip())
                client.set_terminated(other.info.run_id, "KILLED")
                ended.append(other.info.run_id)
    except (MlflowException, OSError) as failure:
        log.warning("could not end abandoned MLflow runs of %s: %s", output, redact(str(failure)).splitlines()[0])
    for run_id in ended:
        log.info("MLflow run %s of a merge into %s whose process died: ended as KILLED", run_id, output)
    return ended


def error_line(error: BaseException) -> str:
    """``OSError: disk sector 7 is on fire``: an error's type and first line, redacted, at most
    ``ERROR_LIMIT`` characters."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = redact(f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__)
    return text if len(text) <= ERROR_LIMIT else text[: ERROR_LIMIT - 1] + "…"


def fail_merge_run(run: OpenRun, error: BaseException) -> None:
    """End ``run`` because its merge failed: FAILED (KILLED when interrupted rather than
    failed: ``KeyboardInterrupt``, a cancellation), the error's line as tag
    ``mergefleet.error`` and at the top of the description. Never raises: the merge's own
    error is what the caller reports; a failure to record it is logged. A run already
    FINISHED (the merge was recorded; a later step such as publishing failed) stays so."""
    from mlflow.exceptions import MlflowException

    line = error_line(error)
    status = "FAILED" if isinstance(error, Exception) else "KILLED"
    try:
        with _store_lock(run.tracking_uri):
            client = client_for(run.tracking_uri)
            current = client.get_run(run.run_id)
            if current.info.status == "FINISHED":  # the merge was recorded whole; what failed after is not the merge's
                log.info("MLflow run %s stays FINISHED: %s came after its record", run.run_id, line)
                return
            note = current.data.tags.get(NOTE_TAG, "")
            client.set_tag(run.run_id, ERROR_TAG, line)
            client.set_tag(run.run_id, NOTE_TAG, f"**{status.lower()}:** `{line}`\n\n{note}".rstrip())
            client.set_terminated(run.run_id, status)
    except (MlflowException, OSError) as failure:
        log.warning("the MLflow run %s of a failed merge stays open: %s", run.run_id, redact(str(failure)).splitlines()[0])


@contextlib.contextmanager
def ended_on_failure(run: OpenRun) -> Iterator[OpenRun]:
    """The work of ``run``'s merge: any error escaping the block ends the run (``fail_merge_run``)
    and goes on."""
    try:
        yield run
    except BaseException as error:
        fail_merge_run(run, error)
        raise


def track_merge(
    plan: Plan,
    manifest: Manifest,
    shards: Sequence[ShardOutcome] | None = None,
    evaluation: Evaluation | None = None,
    *,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    register_model: str | None = None,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
    merge_seconds: float | None = None,
    started_at: float | None = None,
    run_id: str | None = None,
) -> TrackedRun:
    """Record one merge as an MLflow run (see the module's docstring); return where it is.

    ``manifest``: what ``orchestrator.assemble.assemble`` returned. ``shards``: every
    runner's outcomes (default: the receipts at the output, else the manifest's shard list;
    either without the skipped flags).
    ``evaluation``: the merge's scores, if it was evaluated. ``tracking_uri``,
    ``experiment`` and ``register_model`` default to the recipe's ``fleet`` settings.
    ``run_id``: the run ``start_merge_run`` opened when the merge started, filled and
    finished here (renamed after its plan); without it a new run is created, starting at
    ``started_at`` (default: now). Either way the run ends FINISHED, or FAILED if recording fails.
    """
    from mlflow.entities import RunTag
    from mlflow.exceptions import MlflowException

    fleet = _fleet(plan)
    uri = resolve_tracking_uri(tracking_uri or fleet.tracking_uri, plan.output)
    if shards is None:
        shards = _stored_outcomes(plan)
    plan = Plan.model_validate(redact_data(plan.model_dump(mode="json")))  # what MLflow gets holds no secret
    experiment_name = redact(experiment or fleet.experiment or DEFAULT_EXPERIMENT)
    model_name = redact(register_model or fleet.register_model or "") or None
    labels = input_labels(plan)
    name = redact(run_name or plan.recipe.get("name") or f"{plan.method}-{plan.plan_id[:8]}")
    run_tags = _run_tags(plan, evaluation) | redact_data(dict(tags or {}))
    try:
        with _store_lock(uri):
            client = client_for(uri)
            if run_id is None:
                experiment_id_ = experiment_id(client, experiment_name, uri)
                start = _millis(started_at) if started_at is not None else None
                run_id = client.create_run(experiment_id_, run_name=name, tags=run_tags, start_time=start).info.run_id
            else:
                experiment_id_ = client.get_run(run_id).info.experiment_id
                client.update_run(run_id, name=name)
                client.log_batch(run_id, tags=[RunTag(key, value) for key, value in run_tags.items()])
                _delete_shard_runs(client, experiment_id_, run_id)  # a retried record starts over
            try:
                model_id, version = _fill_run(
                    client, experiment_id_, run_id, plan, manifest, shards, evaluation, labels, name, model_name, merge_seconds, uri
                )
            except BaseException:
                client.set_terminated(run_id, "FAILED")
                raise
            client.set_terminated(run_id, "FINISHED")
    except MlflowException as error:
        raise TrackingError(f"MLflow at {redact(uri)} refused the record of plan {plan.plan_id}: {error.message}") from None
    except OSError as error:
        raise TrackingError(f"cannot record plan {plan.plan_id} in MLflow at {redact(uri)}: {error}") from None
    log.info("recorded merge %s as MLflow run %s in %s", plan.plan_id, run_id, redact(uri))
    return TrackedRun(
        run_id=run_id,
        experiment_id=experiment_id_,
        tracking_uri=redact(uri),
        model_id=model_id,
        model_version=version,
        url=redact(_run_url(uri, experiment_id_, run_id) or "") or None,
    )


def _delete_shard_runs(client: Any, experiment: str, parent: str) -> None:
    found = client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'", max_results=5000)
    for run in found:
        if f"{TAG}shard" in run.data.tags:
            client.delete_run(run.info.run_id)


def _fill_run(
    client: Any,
    experiment: str,
    run_id: str,
    plan: Plan,
    manifest: Manifest,
    shards: Sequence[ShardOutcome] | None,
    evaluation: Evaluation | None,
    labels: dict[str, str],
    name: str,
    model_name: str | None,
    merge_seconds: float | None,
    uri: str,
) -> tuple[str, str | None]:
    # short names (method, density, weight.<expert>: the columns a person adds to a
    # comparison), and the whole recipe under ``recipe.`` (``recipe.models.0.parameters.density``)
    recipe = {f"recipe.{key}": value for key, value in flatten(plan.recipe).items()}
    params = short_params(plan, labels) | recipe | {"mergefleet.out_dtype": plan.out_dtype}
    _log_params(client, run_id, params)
    _log_inputs(client, run_id, plan, labels)

    rows = _shard_rows(plan, shards, manifest)
    _log_shards(client, experiment, run_id, rows, plan.plan_id)
    merge_metrics = {
        "bytes/written": float(sum(r.bytes_written for r in rows)),
        "bytes/read": float(sum(r.bytes_read for r in rows)),
        "time/shards_total": float(sum(r.seconds for r in rows)),
        "time/shards_max": float(max([r.seconds for r in rows] + [0])),
    }
    if merge_seconds is not None:
        merge_metrics[MERGE_SECONDS] = float(merge_seconds)
    for key, value in manifest.report.items():
        if isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
            merge_metrics[f"report/{key}/mean"] = float(sum(value)) / len(value)
    rates = manifest.report.get("protected_drop_rate") or []
    drop_rates = {label: float(rate) for label, rate in zip(protected_labels(plan, labels), rates)}
    merge_metrics |= {metric_key("protected_drop_rate", label): rate for label, rate in drop_rates.items()}
    # the scores first (with the logged model): MLflow's compare view starts its plot on the
    # first metric the run lists, in the order they were logged
    eval_metrics = _evaluation_metrics(evaluation, labels) if evaluation is not None else {}
    model = _log_logged_model(client, experiment, run_id, plan, manifest, eval_metrics, _model_name(name))
    _log_metrics(client, run_id, merge_metrics)

    with tempfile.TemporaryDirectory(prefix="mergefleet-track-") as scratch:
        files = {
            "recipe.yaml": yaml.safe_dump(plan.recipe, sort_keys=False),
            "mergefleet.json": json.dumps(manifest.model_dump(mode="json"), indent=1),
        }
        if evaluation is not None:
            files["evaluation.json"] = evaluation.model_dump_json(indent=1)
        for file, text in files.items():
            Path(scratch, file).write_text(redact(text))
            client.log_artifact(run_id, os.path.join(scratch, file))
        if evaluation is not None:
            owners = {task: labels.get(expert, expert) for task, expert in evaluation.owners.items()}
            title = f"{name}: {plan.method} merge of {expert_count(plan)} experts"
            chart = score_chart(
                score_series(evaluation, labels), Path(scratch, "scores.png"), title=title, owners=owners,
                drop_rates={name: drop_rates} if drop_rates else None,
            )
            client.log_artifact(run_id, str(chart))

    version = _register(client, model_name, model, run_id, plan, uri) if model_name else None
    return model.model_id, version


def _model_name(name: str) -> str:
    return _MODEL_NAME_UNSAFE.sub("-", name) or "merged"


def intermediate_tags(name: str, *, cached: bool) -> dict[str, str]:
    """The tags of an intermediate merge's run (a multi-document recipe, orchestrator/multidoc.py)."""
    return {f"{TAG}intermediate": name, f"{TAG}cached": str(cached).lower()}


def final_tags(intermediates: dict[str, TrackedRun]) -> dict[str, str]:
    """The tags of a multi-document recipe's final run: its intermediates' run ids by name."""
    return {f"{TAG}intermediate_runs": json.dumps({name: run.run_id for name, run in intermediates.items()})}


def link_intermediate_runs(final: TrackedRun, intermediates: dict[str, TrackedRun]) -> None:
    """Nest each intermediate's run under the final run (``mlflow.parentRunId``) and name the
    final run on it (``mergefleet.final_run_id``), so the MLflow UI shows one tree per recipe."""
    from mlflow.exceptions import MlflowException

    try:
        client = client_for(final.tracking_uri)
        for run in intermediates.values():
            client.set_tag(run.run_id, "mlflow.parentRunId", final.run_id)
            client.set_tag(run.run_id, f"{TAG}final_run_id", final.run_id)
    except MlflowException as error:
        raise TrackingError(f"MLflow at {final.tracking_uri} refused to link run {final.run_id}'s intermediates: {error.message}") from None
