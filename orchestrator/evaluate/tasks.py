"""Evaluation tasks: what ``fleet.eval.tasks`` names (lm-eval task names, task YAMLs,
directories of them, JSONL files), resolved into what lm-eval loads, checked before any
model is, and hashed so the score cache knows when a task changed."""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from orchestrator.cache import cache_dir as default_cache_dir
from orchestrator.errors import EvaluationError
from orchestrator.evaluate.offline import offline

JSONL_SUFFIXES = (".jsonl",)
YAML_SUFFIXES = (".yaml", ".yml")


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
    cache = Path(cache_dir) if cache_dir else default_cache_dir("eval")
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
