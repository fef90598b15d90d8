"""The work pool's base job template, as the Helm chart renders it.

The chart is the one place the template is written (``templates/configmap-job-template.yaml``);
this module only reads what it rendered: from the ConfigMap in the cluster, or from a
file holding that ConfigMap (``helm template ... --show-only templates/configmap-job-template.yaml``)
or the template's JSON itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from orchestrator.errors import ClusterError

TEMPLATE_KEY = "base-job-template.json"
POOL_KEY = "work-pool"


@dataclass(frozen=True)
class JobTemplate:
    """A Prefect base job template (``job_configuration`` and ``variables``) and where it came from."""

    template: Mapping[str, Any]
    source: str
    pool: str | None = None  # the work pool the chart rendered it for

    def default(self, variable: str) -> Any:
        """The default value of one of the template's variables (None when it has none)."""
        return self.template["variables"].get("properties", {}).get(variable, {}).get("default")

    def manifest(self) -> Mapping[str, Any]:
        return self.template["job_configuration"]["job_manifest"]


def _checked(template: Any, source: str, pool: str | None) -> JobTemplate:
    if not isinstance(template, dict) or "job_configuration" not in template or "variables" not in template:
        raise ClusterError(
            f"{source}: not a Prefect base job template (needs 'job_configuration' and 'variables'); "
            f"give the chart's ConfigMap or its '{TEMPLATE_KEY}'"
        )
    manifest = template["job_configuration"].get("job_manifest")
    if not isinstance(manifest, dict) or manifest.get("kind") != "Job":
        raise ClusterError(f"{source}: job_configuration.job_manifest is not a Kubernetes Job")
    return JobTemplate(template=template, source=source, pool=pool)


def from_configmap(configmap: Mapping[str, Any], source: str) -> JobTemplate:
    """The template held by the chart's ConfigMap (a manifest as a mapping)."""
    data = configmap.get("data") or {}
    if TEMPLATE_KEY not in data:
        raise ClusterError(f"{source}: ConfigMap has no key '{TEMPLATE_KEY}'; is it the chart's job-template ConfigMap?")
    try:
        template = json.loads(data[TEMPLATE_KEY])
    except json.JSONDecodeError as error:
        raise ClusterError(f"{source}: '{TEMPLATE_KEY}' is not JSON ({error})") from None
    return _checked(template, source, data.get(POOL_KEY))


def from_file(path: str | Path) -> JobTemplate:
    """A file with the chart's ConfigMap (YAML, possibly among other documents) or the template's JSON."""
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as error:
        raise ClusterError(f"{file}: cannot read the job template ({error.strerror})") from None
    try:
        documents = [d for d in yaml.safe_load_all(text) if d]
    except yaml.YAMLError as error:
        raise ClusterError(f"{file}: neither YAML nor JSON ({error})") from None
    for document in documents:
        if isinstance(document, dict) and document.get("kind") == "ConfigMap" and TEMPLATE_KEY in (document.get("data") or {}):
            return from_configmap(document, str(file))
    if len(documents) == 1:
        return _checked(documents[0], str(file), None)
    raise ClusterError(f"{file}: holds no ConfigMap with '{TEMPLATE_KEY}' and is not a base job template")
