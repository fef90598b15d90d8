"""Evaluation: lm-eval on a checkpoint, and a merge's scores normalised by its inputs'.

A task is named in ``fleet.eval.tasks`` in one of four ways:

- an lm-eval task name (``hellaswag``), looked up first in the local task directories
  given alongside it, then among lm-eval's bundled tasks;
- a task YAML file, or a directory of them (lm-eval's own format; ``dataset_path: json``
  with ``dataset_kwargs: {data_files: ...}`` reads local JSONL);
- a JSONL file, made into a task here, one example per line::

      {"prompt": "reverse: abc =", "choices": ["cba", "acb", "bac", "cab"], "answer": 0}
      {"prompt": "add: 2+3 =", "completion": " 05"}

  The first form is multiple choice (metric ``acc``: the answer is the likeliest
  choice); the second is a log-likelihood task (``acc``: the completion is the greedy one).

When every task is local, lm-eval runs offline (``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE``)
and indexes only the local task directories, not its ~10 s index of bundled tasks.

Scores are cached by the checkpoint's file fingerprints and the task definitions, so a
sweep evaluates each input once. Normalised scores follow the merging-at-scale study: a
task owned by an expert (``fleet.eval.owners``) is merged ÷ that expert; any other task is
merged ÷ base.

Entry points: ``evaluate_checkpoint`` (one model) and ``evaluate_merge`` (the merged
checkpoint, and optionally its base and experts, with normalised scores).
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import logging
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml

from orchestrator.errors import EvaluationError
from orchestrator.plan import Plan
from orchestrator.recipe import EvalSettings
from orchestrator.storage import checkpoint as ckpt
from orchestrator.storage.base import StorageOptions

log = logging.getLogger(__name__)

CACHE_VERSION = 1
JSONL_SUFFIXES = (".jsonl",)
YAML_SUFFIXES = (".yaml", ".yml")
STAGE_CHUNK = 64 * 1024 * 1024


# ---------------------------------------------------------------- results


@dataclass
class CheckpointScores:
    """What lm-eval said about one checkpoint."""

    model: str  # where the checkpoint is
    fingerprint: str  # hash of its files' fingerprints (size, mtime or ETag)
    scores: dict[str, float]  # task -> its primary metric
    primary: dict[str, str]  # task -> the name of that metric (e.g. acc)
    metrics: dict[str, dict[str, float]]  # task -> every number lm-eval reported (acc, acc_stderr, ...)
    seconds: float
    cached: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CheckpointScores":
        return cls(**data)


@dataclass
class Evaluation:
    """Scores of a merge, of its inputs (when evaluated) and the normalised scores."""

    tasks: list[str]
    merged: CheckpointScores
    base: CheckpointScores | None = None  # None when the inputs were not evaluated or there is no base
    experts: dict[str, CheckpointScores] = field(default_factory=dict)  # by the name the recipe gives
    owners: dict[str, str] = field(default_factory=dict)  # task -> expert name
    normalised: dict[str, float] = field(default_factory=dict)  # task -> merged ÷ reference

    def reference(self, task: str) -> tuple[str, CheckpointScores] | None:
        """What ``task`` is normalised by: its owner expert, or else the base."""
        owner = self.owners.get(task)
        if owner is not None:
            return (owner, self.experts[owner]) if owner in self.experts else None
        return ("base", self.base) if self.base is not None else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "tasks": self.tasks,
            "merged": self.merged.as_dict(),
            "base": self.base.as_dict() if self.base else None,
            "experts": {name: scores.as_dict() for name, scores in self.experts.items()},
            "owners": self.owners,
            "normalised": self.normalised,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Evaluation":
        return cls(
            tasks=list(data["tasks"]),
            merged=CheckpointScores.from_dict(data["merged"]),
            base=CheckpointScores.from_dict(data["base"]) if data.get("base") else None,
            experts={name: CheckpointScores.from_dict(s) for name, s in (data.get("experts") or {}).items()},
            owners=dict(data.get("owners") or {}),
            normalised=dict(data.get("normalised") or {}),
        )


def normalise(
    merged: dict[str, float],
    base: dict[str, float] | None,
    experts: dict[str, dict[str, float]],
    owners: dict[str, str],
) -> dict[str, float]:
    """merged ÷ owner expert for an owned task, merged ÷ base otherwise; a task whose
    reference is missing or scored 0 is left out."""
    result = {}
    for task, score in merged.items():
        owner = owners.get(task)
        reference = experts.get(owner, {}) if owner is not None else (base or {})
        denominator = reference.get(task)
        if denominator:
            result[task] = score / denominator
    return result


# ---------------------------------------------------------------- tasks


@dataclass
class TaskSet:
    """The tasks of ``fleet.eval.tasks``, resolved: what to ask lm-eval and what to hash."""

    names: list[str]  # the tasks' names, as lm-eval reports them
    specs: list[str | dict[str, Any]]  # what TaskManager.load receives
    include_paths: list[str]
    local: bool  # every task is defined by local files: run offline, skip the bundled index
    digest: str  # hash of the task names and the contents of every local task file
    manager: Any = None  # the lm_eval TaskManager that knows them all


class _TolerantLoader(yaml.SafeLoader):
    """Reads lm-eval task YAML without resolving ``!function`` and other tags."""


_TolerantLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.load(path.read_text(), Loader=_TolerantLoader)  # noqa: S506 - SafeLoader subclass
    except (OSError, yaml.YAMLError) as error:
        raise EvaluationError(f"task file {path} is not readable YAML: {error}") from None
    return data if isinstance(data, dict) else {}


def check_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every line of a JSONL file as an object; names the first line that is not one."""
    rows = []
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        raise EvaluationError(f"cannot read task data {path}: {error}") from None
    except UnicodeDecodeError:
        raise EvaluationError(f"task data {path} is not UTF-8 text; a JSONL file holds one JSON object per line") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise EvaluationError(f"{path}:{number} is not valid JSON ({error.msg}); a JSONL file holds one JSON object per line") from None
        if not isinstance(row, dict):
            raise EvaluationError(f"{path}:{number} is a JSON {type(row).__name__}, not an object")
        rows.append(row)
    if not rows:
        raise EvaluationError(f"task data {path} holds no examples")
    return rows


def jsonl_task_config(path: Path, *, cache_dir: Path) -> dict[str, Any]:
    """An lm-eval task config for a JSONL file of prompts with choices or completions."""
    rows = check_jsonl(path)
    multiple_choice = "choices" in rows[0]
    required = ("prompt", "choices", "answer") if multiple_choice else ("prompt", "completion")
    for number, row in enumerate(rows, start=1):
        missing = [key for key in required if key not in row]
        if missing:
            raise EvaluationError(
                f"{path}: example {number} lacks {', '.join(repr(k) for k in missing)}; every line needs "
                + ("prompt, choices and answer (the index of the right choice)" if multiple_choice else "prompt and completion")
            )
        if multiple_choice:
            choices = row["choices"]
            if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
                raise EvaluationError(f"{path}: example {number}: 'choices' must be a list of at least two strings")
            if not isinstance(row["answer"], int) or not 0 <= row["answer"] < len(choices):
                raise EvaluationError(
                    f"{path}: example {number}: 'answer' must be the index of the right choice, 0..{len(choices) - 1}"
                )
    config: dict[str, Any] = {
        "task": path.stem,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(path.resolve())}, "cache_dir": str(cache_dir / "datasets")},
        "test_split": "test",
        "doc_to_text": "{{prompt}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    if multiple_choice:
        config |= {"output_type": "multiple_choice", "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}"}
    else:
        config |= {"output_type": "loglikelihood", "doc_to_target": "{{completion}}", "target_delimiter": ""}
    return config


def _yaml_data_files(config: dict[str, Any]) -> list[Path]:
    """The local JSONL files a task YAML reads (through ``dataset_kwargs.data_files``); a
    relative path is read from the current directory, as ``datasets`` does."""
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, dict):
        values = [v for value in files.values() for v in (value if isinstance(value, list) else [value])]
    elif isinstance(files, list):
        values = files
    else:
        values = [files] if files else []
    paths = []
    for value in values:
        if isinstance(value, str) and "://" not in value and value.endswith(JSONL_SUFFIXES):
            paths.append(Path(value).expanduser())
    return paths


def _yaml_tasks(directory: Path) -> dict[str, Path]:
    """Task name -> YAML file, for every task YAML under ``directory``."""
    found = {}
    for path in sorted(p for suffix in YAML_SUFFIXES for p in directory.rglob(f"*{suffix}")):
        config = _read_yaml(path)
        if isinstance(config.get("task"), str):
            found[config["task"]] = path
    return found


def _looks_like_path(spec: str) -> bool:
    return spec.endswith(JSONL_SUFFIXES + YAML_SUFFIXES) or os.sep in spec or spec.startswith((".", "~"))


def resolve_tasks(specs: list[str], *, cache_dir: str | Path | None = None) -> TaskSet:
    """Turn ``fleet.eval.tasks`` into lm-eval task specs; check files and names first."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    names: list[str] = []
    load: list[str | dict[str, Any]] = []
    include: list[str] = []
    pending: list[str] = []
    digest = hashlib.sha256()

    def add_file(path: Path) -> None:
        digest.update(str(path.resolve()).encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())

    def add_yaml_task(name: str, path: Path) -> None:
        for data in _yaml_data_files(_read_yaml(path)):
            if not data.is_file():
                where = "" if data.is_absolute() else f" (relative to the current directory, {Path.cwd()})"
                raise EvaluationError(f"task '{name}' ({path}) reads {data}{where}, which does not exist")
            check_jsonl(data)
            add_file(data)
        add_file(path)
        names.append(name)
        load.append(name)

    for spec in specs:
        path = Path(spec).expanduser()
        if spec.endswith(JSONL_SUFFIXES):
            if not path.is_file():
                raise EvaluationError(f"task file {spec} does not exist")
            config = jsonl_task_config(path, cache_dir=cache)
            add_file(path)
            names.append(config["task"])
            load.append(config)
        elif spec.endswith(YAML_SUFFIXES):
            if not path.is_file():
                raise EvaluationError(f"task file {spec} does not exist")
            name = _read_yaml(path).get("task")
            if not isinstance(name, str):
                raise EvaluationError(f"{spec} defines no 'task:' (a group file is given by its name, with its directory)")
            include.append(str(path.parent.resolve()))
            add_yaml_task(name, path)
        elif path.is_dir():
            found = _yaml_tasks(path)
            if not found:
                raise EvaluationError(f"task directory {spec} holds no task YAML (a file with a 'task:' key)")
            include.append(str(path.resolve()))
            for name, file in found.items():
                add_yaml_task(name, file)
        elif _looks_like_path(spec):
            raise EvaluationError(f"task path {spec} does not exist")
        else:
            pending.append(spec)
            names.append(spec)
            load.append(spec)
            digest.update(f"lm-eval:{spec}".encode())

    include = list(dict.fromkeys(include))
    local_names = {name for directory in include for name in _yaml_tasks(Path(directory))}
    unknown_locally = [name for name in pending if name not in local_names]
    if len(set(names)) != len(names):
        repeated = sorted({n for n in names if names.count(n) > 1})
        raise EvaluationError(f"task(s) {', '.join(repeated)} named more than once in fleet.eval.tasks")
    return TaskSet(
        names=names,
        specs=load,
        include_paths=include,
        local=not unknown_locally,
        digest=digest.hexdigest(),
    )


def task_manager(tasks: TaskSet) -> Any:
    """lm-eval's TaskManager for ``tasks``, built once; checks every name is known."""
    if tasks.manager is not None:
        return tasks.manager
    with offline(tasks.local):
        from lm_eval.tasks import TaskManager

        manager = TaskManager(include_path=tasks.include_paths or None, include_defaults=not tasks.local)
    known = set(manager.all_tasks)
    for spec in tasks.specs:
        if isinstance(spec, str) and spec not in known:
            where = f"the task directories {', '.join(tasks.include_paths)} nor " if tasks.include_paths else ""
            close = difflib.get_close_matches(spec, sorted(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise EvaluationError(
                f"unknown task '{spec}': it is not in {where}lm-eval's {len(known)} bundled tasks{hint} "
                "(a local task is given as a JSONL file, a task YAML, or a directory of them)"
            )
    tasks.manager = manager
    return manager


# ---------------------------------------------------------------- environment


_OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
_OFFLINE_CONSTANTS = (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_DATASETS_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"))
_offline_lock = threading.Lock()
_offline_depth = 0
_offline_saved: list[tuple[Any, str, Any]] = []


@contextlib.contextmanager
def offline(enabled: bool = True) -> Iterator[None]:
    """Hugging Face libraries make no network call inside this block (when ``enabled``).

    They read these variables when first imported, so modules already imported get the
    same setting through their constants; everything is restored when the last of
    several concurrent blocks (a sweep's threads) ends."""
    global _offline_depth
    if not enabled:
        yield
        return
    with _offline_lock:
        if _offline_depth == 0:
            _offline_saved.clear()
            _offline_saved.extend((os.environ, key, os.environ.get(key)) for key in _OFFLINE_ENV)
            os.environ.update(_OFFLINE_ENV)
            for module_name, attribute in _OFFLINE_CONSTANTS:
                module = sys.modules.get(module_name)
                if module is not None and isinstance(getattr(module, attribute, None), bool):
                    _offline_saved.append((module, attribute, getattr(module, attribute)))
                    setattr(module, attribute, True)
        _offline_depth += 1
    try:
        yield
    finally:
        with _offline_lock:
            _offline_depth -= 1
            if _offline_depth == 0:
                for target, key, value in _offline_saved:
                    if target is os.environ:
                        if value is None:
                            os.environ.pop(key, None)
                        else:
                            os.environ[key] = value
                    else:
                        setattr(target, key, value)
                _offline_saved.clear()


def default_cache_dir() -> Path:
    """Where scores are cached: $XDG_CACHE_HOME/mergefleet/eval."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "mergefleet" / "eval"


# ---------------------------------------------------------------- one checkpoint


def checkpoint_fingerprint(model: str, *, storage: StorageOptions | None = None) -> str:
    """Hash of a checkpoint's weight, index and config files' fingerprints."""
    try:
        source = ckpt.open_source(model, storage=storage)
        prints = [asdict(fp) for fp in ckpt.fingerprints(source)]
    except Exception as error:
        raise EvaluationError(f"cannot evaluate {model}: {error}") from None
    if not prints:
        raise EvaluationError(f"cannot evaluate {model}: it holds no checkpoint files")
    return hashlib.sha256(json.dumps([source.uri, prints], sort_keys=True).encode()).hexdigest()


def _cache_key(fingerprint: str, tasks: TaskSet, settings: EvalSettings) -> str:
    from importlib.metadata import version

    identity = {
        "version": CACHE_VERSION,
        "checkpoint": fingerprint,
        "tasks": tasks.digest,
        "num_fewshot": settings.num_fewshot,
        "limit": settings.limit,
        "lm_eval": version("lm_eval"),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]


def _local_checkpoint(model: str, fingerprint: str, cache: Path, storage: StorageOptions | None) -> Path:
    """A local directory holding the checkpoint: itself, or a copy of a remote one."""
    source = ckpt.open_source(model, storage=storage)
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


def _load_model(path: Path, model: str, settings: EvalSettings) -> Any:
    if not (path / "config.json").is_file():
        raise EvaluationError(f"cannot load {model} for evaluation: it has no config.json")
    from lm_eval.models.huggingface import HFLM

    try:
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
    cache = Path(settings.cache_dir) if settings.cache_dir else default_cache_dir()
    tasks = tasks or resolve_tasks(settings.tasks, cache_dir=cache)
    fingerprint = checkpoint_fingerprint(model, storage=storage)
    cache_file = cache / "scores" / f"{_cache_key(fingerprint, tasks, settings)}.json"
    if use_cache and cache_file.is_file():
        try:
            scores = CheckpointScores.from_dict(json.loads(cache_file.read_text()))
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
        partial.write_text(json.dumps(result.as_dict(), indent=1))
        os.replace(partial, cache_file)
    log.info("evaluated %s in %.1f s: %s", model, result.seconds, scores)
    return result


# ---------------------------------------------------------------- a merge


def resolve_owners(owners: dict[str, str], experts: list[str], tasks: list[str]) -> dict[str, str]:
    """``fleet.eval.owners`` with every expert as the recipe names it; an owner may also be
    given by its directory name when that is unambiguous."""
    resolved = {}
    for task, owner in owners.items():
        if task not in tasks:
            raise EvaluationError(f"fleet.eval.owners names task '{task}', which is not evaluated; tasks: {', '.join(tasks)}")
        if owner in experts:
            resolved[task] = owner
            continue
        by_name = [e for e in experts if Path(e.rstrip("/")).name == owner]
        if len(by_name) != 1:
            raise EvaluationError(
                f"fleet.eval.owners: '{owner}' (owner of task '{task}') is not one of the merge's experts: "
                + ", ".join(sorted(experts))
            )
        resolved[task] = by_name[0]
    return resolved


def evaluate_merge(
    plan: Plan,
    settings: EvalSettings,
    *,
    output: str | None = None,
    storage: StorageOptions | None = None,
) -> Evaluation:
    """Evaluate the merged checkpoint of ``plan`` and, with ``settings.evaluate_inputs``,
    its base and every expert (each cached by fingerprint); return raw and normalised scores.

    ``output`` overrides where the merged checkpoint is (default: ``plan.output``).
    """
    cache = Path(settings.cache_dir) if settings.cache_dir else default_cache_dir()
    tasks = resolve_tasks(settings.tasks, cache_dir=cache)
    expert_refs = {inp.name: inp.ref for i, inp in enumerate(plan.inputs) if i != plan.base}
    owners = resolve_owners(settings.owners, list(expert_refs), tasks.names)

    merged = evaluate_checkpoint(output or plan.output, settings, tasks=tasks, storage=storage)
    base = None
    experts: dict[str, CheckpointScores] = {}
    if settings.evaluate_inputs:
        if plan.base is not None:
            base = evaluate_checkpoint(plan.inputs[plan.base].ref, settings, tasks=tasks, storage=storage)
        for name, ref in expert_refs.items():
            experts[name] = evaluate_checkpoint(ref, settings, tasks=tasks, storage=storage)
    normalised = normalise(
        merged.scores,
        base.scores if base else None,
        {name: scores.scores for name, scores in experts.items()},
        owners,
    )
    return Evaluation(tasks=tasks.names, merged=merged, base=base, experts=experts, owners=owners, normalised=normalised)


def evaluate_inputs(refs: list[str], settings: EvalSettings, *, storage: StorageOptions | None = None) -> dict[str, CheckpointScores]:
    """Scores of several checkpoints (a merge's inputs), each from the cache when it has them."""
    cache = Path(settings.cache_dir) if settings.cache_dir else default_cache_dir()
    tasks = resolve_tasks(settings.tasks, cache_dir=cache)
    return {ref: evaluate_checkpoint(ref, settings, tasks=tasks, storage=storage) for ref in refs}
