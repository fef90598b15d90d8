"""MLflow runs of the trained merges: a DAM training, and the parent run of a search or
of a Merge to Mix (its candidates are ordinary merge runs, nested under it).

Like ``orchestrator.tracking.record``: ``MlflowClient`` with an explicit URI, no global state.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from orchestrator.errors import TrackingError
from orchestrator.redact import redact
from orchestrator.tracking.record import TAG, flatten, metric_key
from orchestrator.tracking.store import client_for, experiment_id, resolve_tracking_uri

PARENT_TAG = "mlflow.parentRunId"


@dataclass
class RunRecord:
    """One open MLflow run."""

    client: Any
    run_id: str
    experiment_id: str
    tracking_uri: str

    def params(self, values: dict[str, Any]) -> None:
        from mlflow.entities import Param

        entries = [Param(key, value) for key, value in flatten(values).items()]
        for start in range(0, len(entries), 100):
            self.client.log_batch(self.run_id, params=entries[start : start + 100])

    def metrics(self, values: dict[str, float], *, step: int = 0) -> None:
        self.series({key: [(step, value)] for key, value in values.items()})

    def series(self, values: dict[str, Iterable[tuple[int, float]]]) -> None:
        """Metrics with steps: ``{key: [(step, value), ...]}``."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        entries = [Metric(metric_key(*key.split("/")), float(v), now, int(step)) for key, points in values.items() for step, v in points]
        for start in range(0, len(entries), 1000):
            self.client.log_batch(self.run_id, metrics=entries[start : start + 1000])

    def artifacts(self, files: dict[str, str | bytes], writers: dict[str, Callable[[Path], Any]] | None = None) -> None:
        """Text or bytes by file name, and files drawn by ``writers`` (name -> draw(path))."""
        with tempfile.TemporaryDirectory(prefix="mergefleet-record-") as scratch:
            for name, content in files.items():
                path = Path(scratch, name)
                path.write_bytes(content if isinstance(content, bytes) else redact(content).encode())
                self.client.log_artifact(self.run_id, str(path))
            for name, draw in (writers or {}).items():
                path = Path(scratch, name)
                draw(path)
                self.client.log_artifact(self.run_id, str(path))

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)


def open_run(
    *, tracking_uri: str | None, near: str, experiment: str, name: str, kind: str, tags: dict[str, str] | None = None
) -> RunRecord:
    """A new run named ``name`` tagged ``mergefleet.kind``; ``near``: the output that decides
    the default tracking store (sqlite beside it)."""
    from mlflow.exceptions import MlflowException

    uri = resolve_tracking_uri(tracking_uri, near)
    try:
        client = client_for(uri)
        experiment_ = experiment_id(client, experiment, uri)
        run = client.create_run(experiment_, run_name=name, tags={f"{TAG}kind": kind} | dict(tags or {}))
    except MlflowException as error:
        raise TrackingError(f"MLflow at {uri} refused the run '{name}': {error.message}") from None
    except OSError as error:
        raise TrackingError(f"cannot record '{name}' in MLflow at {uri}: {error}") from None
    return RunRecord(client=client, run_id=run.info.run_id, experiment_id=experiment_, tracking_uri=uri)


def child_tags(parent: RunRecord, **extra: str) -> dict[str, str]:
    """Tags that nest a candidate's merge run under ``parent``."""
    return {PARENT_TAG: parent.run_id} | {f"{TAG}{key}": value for key, value in extra.items()}


def record_dam(
    result: Any,
    *,
    settings: Any,
    coefficients_uri: str,
    tracking_uri: str | None,
    experiment: str,
    name: str,
    labels: list[str],
) -> RunRecord:
    """A DAM training as one run: settings and data as params, the loss curve (metric steps
    and a chart), each expert's coefficient statistics, the memory estimate."""
    from orchestrator.learned.charts import loss_chart

    record = open_run(tracking_uri=tracking_uri, near=coefficients_uri, experiment=experiment, name=name, kind="dam")
    try:
        record.params({"experts": result.experts, "coefficients": coefficients_uri, "dam": settings.model_dump(mode="json")})
        steps = [loss.step for loss in result.losses]
        record.series({"loss": [(s.step, s.total) for s in result.losses], "regulariser": [(s.step, s.regulariser) for s in result.losses]}
                      | {f"kl/{label}": [(s.step, s.kl[i]) for s in result.losses] for i, label in enumerate(labels)})
        statistics = {f"coefficients/{key}": value for key, value in result.statistics(labels).items()}
        memory = {f"memory/{part}_bytes": float(size) for part, size in result.memory.parts.items()}
        record.metrics(statistics | memory | {"memory/total_bytes": float(result.memory.total), "seconds": result.seconds, "steps": float(result.steps)})
        curves = {"total": [s.total for s in result.losses]} | {f"KL {label}": [s.kl[i] for s in result.losses] for i, label in enumerate(labels)}
        record.artifacts(
            {"coefficient_statistics.json": json.dumps(statistics, indent=1)},
            {"loss.png": lambda path: loss_chart(steps, curves, path, title=f"DAM: {len(labels)} experts, {result.steps} steps")},
        )
    except BaseException:
        record.finish("FAILED")
        raise
    record.finish()
    return record


def expert_labels(refs: list[str]) -> list[str]:
    """Short unique labels for experts: their directory names."""
    labels: list[str] = []
    for ref in refs:
        label = os.path.basename(ref.rstrip("/")) or "expert"
        candidate, n = label, 2
        while candidate in labels:
            candidate, n = f"{label}-{n}", n + 1
        labels.append(candidate)
    return labels
