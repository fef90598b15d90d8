"""The Helm chart rendered offline with Helm's own engine (helm-python-sdk: Helm's Go
library through ctypes, no binary, no cluster)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import yaml

CHART = Path(__file__).resolve().parent.parent / "charts" / "mergefleet"
NAMESPACE = "mergefleet"
RELEASE = "mergefleet"
K8S_VERSION = "1.35"  # the Kubernetes version whose OpenAPI schemas manifests are checked against


def render(values: dict[str, Any] | None = None, chart: Path = CHART) -> dict[str, Any]:
    """Every rendered template: ``{"manifests": [objects], "notes": text}``; schema errors raise."""
    with helm.Chart.load(str(chart)) as loaded:
        rendered = loaded.render(values or {}, name=RELEASE, namespace=NAMESPACE)
    manifests = []
    notes = ""
    for path, text in rendered.items():
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        manifests += [doc for doc in yaml.safe_load_all(text) if doc]
    return {"manifests": manifests, "notes": notes}


def find(manifests: list[dict[str, Any]], kind: str, suffix: str = "") -> dict[str, Any]:
    found = [m for m in manifests if m["kind"] == kind and m["metadata"]["name"].endswith(suffix)]
    assert len(found) == 1, f"{len(found)} {kind} named *{suffix}"
    return found[0]


def validate(manifest: dict[str, Any]) -> None:
    """Raise kubernetes_validate.ValidationError unless Kubernetes K8S_VERSION accepts
    ``manifest`` in strict mode (no unknown fields)."""
    kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)
