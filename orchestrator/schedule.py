"""What a scheduled merge needs, without Prefect: a recipe that runs anywhere, and
whether anything changed since the last successful merge into an output.

A nightly deployment re-merges only when an input checkpoint (or the recipe) changed:
the inputs' fingerprints now are compared with those the output's ``mergefleet.json``
recorded, and that manifest exists only once a merge has finished.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from orchestrator.assemble import MANIFEST_FILE, Manifest
from orchestrator.recipe import Recipe, parse_recipe
from orchestrator.storage import checkpoint as ckpt
from orchestrator.storage.convert import open_checkpoint


def _absolute(ref: str | None, root: Path) -> str | None:
    if ref is None or "://" in ref:
        return ref
    path = Path(ref).expanduser()
    return os.path.normpath(path if path.is_absolute() else root / path)


def portable_recipe(recipe: Recipe, *, root: Path, output: str | None = None) -> dict[str, Any]:
    """The recipe as a mapping whose local paths (models, output) are absolute.

    A deployment's flow runs in another working directory (a worker's temp folder, a pod),
    so a path relative to where the user typed the command would point nowhere there.
    The MLflow store is fixed here too (``deployed_tracking_uri``).
    """
    data = recipe.model_dump(mode="json", exclude_defaults=True)
    data["base_model"] = _absolute(data.get("base_model"), root)
    for entry in data.get("models", []):
        entry["model"] = _absolute(entry["model"], root)
    for slice_ in data.get("slices") or []:
        slice_["base_model"] = _absolute(slice_.get("base_model"), root)
        for source in slice_["sources"]:
            source["model"] = _absolute(source["model"], root)
    fleet = data.setdefault("fleet", {})
    fleet["output"] = _absolute(output or recipe.fleet.output, root)
    tracking = deployed_tracking_uri(recipe, fleet["output"], root)
    if tracking is not None:
        fleet["tracking_uri"] = tracking
    data = {key: value for key, value in data.items() if value is not None}
    parse_recipe(data, source="portable recipe", warn=False)  # still a valid recipe
    return data


def _absolute_sqlite(uri: str, root: Path) -> str:
    if not uri.startswith("sqlite:///"):
        return uri
    path = Path(uri.removeprefix("sqlite:///")).expanduser()
    return f"sqlite:///{os.path.normpath(path if path.is_absolute() else root / path)}"


def deployed_tracking_uri(recipe: Recipe, output: str, root: Path) -> str | None:
    """Where a deployment's runs are recorded, fixed when it is registered.

    ``fleet.tracking_uri``, else ``$MLFLOW_TRACKING_URI`` where the deployment is made,
    else SQLite beside a local output (``<output's parent>/mlflow.db``); a relative SQLite
    path is made absolute against ``root``, since a worker starts each flow run in a
    temporary directory. None for a remote output without either: the worker's
    ``$MLFLOW_TRACKING_URI``, else ``~/.mergefleet/mlflow.db`` in the worker's home.
    """
    from orchestrator.tracking.store import default_tracking_uri

    chosen = recipe.fleet.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if chosen:
        return _absolute_sqlite(chosen, root)
    return None if "://" in output else default_tracking_uri(output)


def changes_since_last_merge(recipe: Recipe, output: str) -> list[str]:
    """What differs from the last successful merge in ``output``; empty when nothing does.

    Compares the recipe hash, every input's fingerprints (size and mtime or ETag of its
    weight files, index and config) and the presence of the output's files.
    """
    storage = recipe.fleet.storage
    sink = ckpt.open_output(output, storage=storage)
    if not sink.exists(MANIFEST_FILE):
        return [f"{sink.uri} holds no finished merge yet"]
    try:
        manifest = Manifest.model_validate_json(sink.read_file(MANIFEST_FILE))
    except ValueError:
        return [f"{sink.uri}/{MANIFEST_FILE} is unreadable"]
    recorded = {entry.name: entry.fingerprints for entry in manifest.inputs}

    changes = []
    if manifest.recipe_sha256 != recipe.recipe_hash():
        changes.append("the recipe changed")
    for ref in recipe.model_refs():
        if ref not in recorded:
            changes.append(f"{ref} is a new input")
            continue
        source = open_checkpoint(ref, allow_pickle=recipe.fleet.allow_pickle, storage=storage)
        now = [asdict(fp) for fp in ckpt.fingerprints(source, verify=ckpt.verify_level(recorded[ref]))]
        if now != recorded[ref]:
            before = {fp["file"]: fp for fp in recorded[ref]}
            changed = [fp["file"] for fp in now if before.get(fp["file"]) != fp]
            changed += [name for name in before if name not in {fp["file"] for fp in now}]
            changes.append(f"{ref} changed ({', '.join(sorted(set(changed)))})")
    for entry in manifest.files:
        if not sink.exists(entry.file):
            changes.append(f"{sink.uri}/{entry.file} is missing")
    return changes
