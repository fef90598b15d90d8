"""lm-eval on one checkpoint (a directory or an s3:// prefix, copied locally first), with
a score cache keyed by the checkpoint's fingerprint and the tasks' contents."""

from __future__ import annotations

import logging
import os
import threading
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from orchestrator.cache import cache_dir
from orchestrator.errors import EvaluationError, MergefleetError
from orchestrator.evaluate.offline import offline
from orchestrator.evaluate.tasks import TaskSet, resolve_tasks, task_manager
from orchestrator.hashing import stable_hash
from orchestrator.recipe import EvalSettings
from orchestrator.storage.base import StorageOptions
from orchestrator.storage.checkpoint import checkpoint_digest, open_source

log = logging.getLogger(__name__)

CACHE_VERSION = 1
STAGE_CHUNK = 64 * 1024 * 1024


class CheckpointScores(BaseModel):
    """What lm-eval said about one checkpoint."""

    model: str  # where the checkpoint is
    fingerprint: str  # hash of its files' fingerprints (size, mtime or ETag)
    scores: dict[str, float]  # task -> its primary metric
    primary: dict[str, str]  # task -> the name of that metric (e.g. acc)
    metrics: dict[str, dict[str, float]]  # task -> every number lm-eval reported (acc, acc_stderr, ...)
    seconds: float
    cached: bool = False


def settings_cache_dir(settings: EvalSettings) -> Path:
    """Where scores (and staged copies of remote checkpoints) are kept for ``settings``."""
    return Path(settings.cache_dir) if settings.cache_dir else cache_dir("eval")


def checkpoint_fingerprint(model: str, *, storage: StorageOptions | None = None) -> str:
    """``checkpoint_digest`` of the checkpoint at ``model``; a clear error when there is none."""
    try:
        return checkpoint_digest(open_source(model, storage=storage))
    except (MergefleetError, OSError) as error:
        raise EvaluationError(f"cannot evaluate {model}: {error}") from None


def _cache_key(fingerprint: str, tasks: TaskSet, settings: EvalSettings) -> str:
    identity = {
        "version": CACHE_VERSION,
        "checkpoint": fingerprint,
        "tasks": tasks.digest,
        "num_fewshot": settings.num_fewshot,
        "limit": settings.limit,
        "lm_eval": version("lm_eval"),
    }
    return stable_hash(identity, length=32)


def _local_checkpoint(model: str, fingerprint: str, cache: Path, storage: StorageOptions | None) -> Path:
    """A local directory holding the checkpoint: itself, or a copy of a remote one."""
    source = open_source(model, storage=storage)
    if Path(source.uri).is_dir():
        return Path(source.uri)
    name = source.uri.rstrip("/").rsplit("/", 1)[-1] or "checkpoint"
    dest = cache / "staged" / f"{name}-{fingerprint[:16]}"
    done = dest / ".complete"
    if done.is_file():
        return dest
    log.info("copying %s to %s for evaluation", source.uri, dest)
    dest.mkdir(parents=True, exist_ok=True)
    for file in source.list_files():
        target = dest / file
        target.parent.mkdir(parents=True, exist_ok=True)
        size = source.size(file)
        with open(f"{target}.partial", "wb") as handle:
            for begin in range(0, size, STAGE_CHUNK):
                handle.write(source.read_range(file, begin, min(size, begin + STAGE_CHUNK)))
        os.replace(f"{target}.partial", target)
    done.write_text(fingerprint)
    return dest


_load_lock = threading.Lock()


def _load_model(path: Path, model: str, settings: EvalSettings) -> Any:
    if not (path / "config.json").is_file():
        raise EvaluationError(f"cannot load {model} for evaluation: it has no config.json")
    from lm_eval.models.huggingface import HFLM

    try:
        with _load_lock:  # HFLM builds an accelerate Accelerator, whose shared state two threads must not set up at once
            return HFLM(pretrained=str(path), device=settings.device, batch_size=settings.batch_size, dtype="auto")
    except Exception as error:  # transformers raises many kinds: OSError, ValueError, KeyError, RuntimeError
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise EvaluationError(f"cannot load {model} for evaluation: {type(error).__name__}: {message}") from None


def _numbers(row: dict[str, Any]) -> dict[str, float]:
    result = {}
    for key, value in row.items():
        name = key.split(",")[0]
        if name in ("alias", "sample_len", "sample_count") or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        result[name] = float(value)
    return result


def _primary_metric(name: str, results: dict[str, Any], metrics: dict[str, float]) -> str:
    config = (results.get("configs") or {}).get(name) or {}
    for entry in config.get("metric_list") or []:
        metric = entry.get("metric") if isinstance(entry, dict) else None
        if isinstance(metric, str) and metric in metrics:
            return metric
    for metric in metrics:
        if not metric.endswith("_stderr"):
            return metric
    raise EvaluationError(f"lm-eval reported no metric for task '{name}'")


def evaluate_checkpoint(
    model: str,
    settings: EvalSettings,
    *,
    tasks: TaskSet | None = None,
    storage: StorageOptions | None = None,
    use_cache: bool = True,
) -> CheckpointScores:
    """Run lm-eval on the checkpoint at ``model`` (a directory or s3:// URI); scores per task.

    ``tasks`` is ``resolve_tasks(settings.tasks)`` when the caller already has it.
    A result is cached under ``settings.cache_dir`` by the checkpoint's fingerprint and
    the task definitions, and reused while neither changes.
    """
    cache = settings_cache_dir(settings)
    tasks = tasks or resolve_tasks(settings.tasks, cache_dir=cache)
    fingerprint = checkpoint_fingerprint(model, storage=storage)
    cache_file = cache / "scores" / f"{_cache_key(fingerprint, tasks, settings)}.json"
    if use_cache and cache_file.is_file():
        try:
            scores = CheckpointScores.model_validate_json(cache_file.read_text())
        except (ValueError, TypeError):
            log.warning("ignoring the unreadable cached scores %s", cache_file)
        else:
            log.info("scores of %s from the cache (%s)", model, cache_file)
            scores.model, scores.cached = model, True
            return scores

    started = time.perf_counter()
    manager = task_manager(tasks)
    with offline(tasks.local):
        path = _local_checkpoint(model, fingerprint, cache, storage)
        lm = _load_model(path, model, settings)
        from lm_eval import simple_evaluate

        try:
            results = simple_evaluate(
                model=lm,
                tasks=list(tasks.specs),
                task_manager=manager,
                num_fewshot=settings.num_fewshot,
                limit=settings.limit,
                bootstrap_iters=1000,
                log_samples=False,
                device=settings.device,
            )
        except EvaluationError:
            raise
        except Exception as error:
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise EvaluationError(
                f"lm-eval failed on {model} with tasks {', '.join(tasks.names)}: {type(error).__name__}: {message}"
            ) from error
    if not results:
        raise EvaluationError(f"lm-eval returned no results for {model}")

    scores: dict[str, float] = {}
    primary: dict[str, str] = {}
    metrics: dict[str, dict[str, float]] = {}
    for name in tasks.names:
        row = (results.get("results") or {}).get(name)
        if row is None:
            raise EvaluationError(f"lm-eval reported nothing for task '{name}' on {model}")
        metrics[name] = _numbers(row)
        primary[name] = _primary_metric(name, results, metrics[name])
        scores[name] = metrics[name][primary[name]]
    result = CheckpointScores(
        model=model,
        fingerprint=fingerprint,
        scores=scores,
        primary=primary,
        metrics=metrics,
        seconds=round(time.perf_counter() - started, 3),
    )
    if use_cache:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        partial = cache_file.with_suffix(f".partial-{os.getpid()}")
        partial.write_text(result.model_dump_json(indent=1))
        os.replace(partial, cache_file)
    log.info("evaluated %s in %.1f s: %s", model, result.seconds, scores)
    return result
