"""Where merges are recorded: the tracking URI (argument, ``fleet.tracking_uri``,
``MLFLOW_TRACKING_URI``, else SQLite beside the output), its artifact location, a client
for it, experiments, and the command that opens the MLflow UI on it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from orchestrator.errors import TrackingError

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
"""The experiment's kind in MLflow 3: machine learning, not a GenAI app."""
CLASSIC_VIEW = "workflowType=machine_learning"
"""MLflow 3.17's UI opens in its GenAI view (traces, judges) unless a page's address asks for
the model-training view (runs, models, registry), whatever the experiment's kind; so every
address mergefleet prints carries this query."""


def ui_page(uri: str, route: str) -> str:
    """The address of ``route`` (``experiments/1/runs/<id>``) in the UI of the server at ``uri``,
    in the model-training view."""
    joiner = "&" if "?" in route else "?"
    return f"{uri.rstrip('/')}/#/{route}{joiner}{CLASSIC_VIEW}"


def default_tracking_uri(output: str) -> str:
    """``sqlite:///<parent of a local output>/mlflow.db``; ``~/.mergefleet/mlflow.db`` otherwise."""
    if "://" in output:
        directory = Path.home() / ".mergefleet"
    else:
        directory = Path(output).expanduser().resolve().parent
    return f"sqlite:///{directory / 'mlflow.db'}"


def resolve_tracking_uri(explicit: str | None, output: str) -> str:
    """The argument, else ``$MLFLOW_TRACKING_URI``, else ``default_tracking_uri(output)``."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(output)


def sqlite_path(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).expanduser()
    return None


def artifact_location(uri: str) -> str | None:
    """``mlartifacts/`` beside a SQLite database; ``None`` (the server decides) otherwise."""
    path = sqlite_path(uri)
    if path is None:
        return None
    return (path.resolve().parent / "mlartifacts").as_uri()


def client_for(uri: str) -> Any:
    from mlflow import MlflowClient

    # MLflow writes "View run ... at ..." to stdout when a run ends; stdout is for --json
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    path = sqlite_path(uri)
    if path is not None:
        path.resolve().parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(client: Any, name: str, uri: str) -> str:
    """The id of experiment ``name``, created (with local artifacts for SQLite) if needed."""
    from mlflow.exceptions import MlflowException

    try:
        found = client.get_experiment_by_name(name)
        if found is not None:
            if EXPERIMENT_KIND_TAG not in found.tags:  # the user's choice of view stays
                client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            return found.experiment_id
        return client.create_experiment(
            name, artifact_location=artifact_location(uri), tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
        )
    except MlflowException as error:
        if "already exists" in str(error):  # created by a concurrent merge of the same sweep
            return client.get_experiment_by_name(name).experiment_id
        raise TrackingError(f"MLflow at {uri} refuses experiment '{name}': {error.message}") from None


def ui_command(uri: str) -> str:
    """How to open the MLflow UI on this tracking store."""
    path = sqlite_path(uri)
    if path is None:
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri} --default-artifact-root {artifact_location(uri)}"


def compare_tracking_uri(explicit: str | None) -> str:
    """For ``mergefleet compare``: the argument, ``$MLFLOW_TRACKING_URI``, or ``./mlflow.db``."""
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    if Path("mlflow.db").is_file():
        return f"sqlite:///{Path('mlflow.db').resolve()}"
    raise TrackingError(
        "where are the merges recorded? give --tracking-uri (e.g. sqlite:///demo-out/mlflow.db or http://127.0.0.1:5000) "
        "or set MLFLOW_TRACKING_URI"
    )
