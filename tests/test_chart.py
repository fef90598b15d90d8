"""The Helm chart as Kubernetes reads it: rendered and linted offline with Helm's own engine
(helm-python-sdk), every manifest and the shard Job the worker makes from the job template
validated with kubernetes-validate in strict mode (unknown fields are errors)."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest

from tests.chart import CHART, NAMESPACE, find, render, validate

FULL = {
    "image": {"repository": "registry.example/ml/mergefleet", "tag": "0.1.0", "digest": "sha256:" + "ab" * 32},
    "imagePullSecrets": [{"name": "registry-credentials"}],
    "workPool": {"name": "h100"},
    "worker": {"limit": 16, "nodeSelector": {"pool": "system"}, "tolerations": [{"key": "dedicated", "operator": "Exists"}]},
    "prefect": {"server": {"databaseSecret": "prefect-db"}},
    "mlflow": {"server": {"backendStoreSecret": "mlflow-db", "artifactsDestination": "s3://mlflow-artifacts"}},
    "storage": {"credentialsSecret": "s3-creds", "endpointUrl": "https://s3.example.internal", "region": "eu-west-1"},
    "shardJob": {
        "gpus": 2,
        "nodeSelector": {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Equal", "value": "present", "effect": "NoSchedule"}],
        "ttlSecondsAfterFinished": 7200,
        "backoffLimit": 1,
        "startTimeoutSeconds": 1200,
        "scratch": {"sizeLimit": "200Gi"},
        "extraEnv": {"MERGEFLEET_LOG": "info"},
    },
}


def shard_job(manifests: list[dict[str, Any]], variables: dict[str, Any] | None = None) -> dict[str, Any]:
    """The Job the Prefect Kubernetes worker makes for a flow run from the chart's template:
    Prefect's template filling with the variables' defaults and ``variables``, then the
    worker's per-run preparation (what it does before it calls the Kubernetes API)."""
    from prefect.client.schemas.objects import FlowRun
    from prefect.utilities.templating import apply_values
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    template = json.loads(find(manifests, "ConfigMap", "-job-template")["data"]["base-job-template.json"])
    defaults = {name: spec["default"] for name, spec in template["variables"]["properties"].items() if "default" in spec}
    configuration = KubernetesWorkerJobConfiguration(**apply_values(template["job_configuration"], defaults | (variables or {})))
    configuration.prepare_for_flow_run(FlowRun(id=uuid.uuid4(), flow_id=uuid.uuid4(), name="3f2a9c1e-shard-0"))
    job = configuration.job_manifest
    pod = job["spec"]["template"]["spec"]
    assert (pod.pop("parallelism"), pod.pop("completions")) == (1, 1)  # the worker demands them; Kubernetes drops them
    job["metadata"]["name"] = job["metadata"].pop("generateName") + "x1y2z"
    return job


@pytest.mark.parametrize("values", [{}, FULL], ids=["default", "full"])
def test_the_chart_lints_and_every_manifest_is_valid_kubernetes(values: dict[str, Any]) -> None:
    linted = helm.lint(str(CHART), values, strict=True, namespace=NAMESPACE)
    assert linted["errors"] == [] and not [m for m in linted["messages"] if m["severity"] > 1], linted
    rendered = render(values)
    manifests = rendered["manifests"]
    assert {m["kind"] for m in manifests} == {
        "ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Deployment", "Service"
    } | ({"PersistentVolumeClaim"} if values is not FULL else set())
    for manifest in manifests + [shard_job(manifests)]:
        validate(manifest)
    assert "mergefleet cluster check" in rendered["notes"] and "port-forward" in rendered["notes"]


def test_rbac_is_namespaced_and_holds_only_what_the_worker_uses() -> None:
    manifests = render(FULL)["manifests"]
    assert not [m for m in manifests if m["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    role = find(manifests, "Role")
    granted = {(resource, verb) for rule in role["rules"] for resource in rule["resources"] for verb in rule["verbs"]}
    assert {resource for resource, _ in granted} == {"jobs", "pods", "pods/log", "events"}
    assert ("jobs", "create") in granted and ("pods/log", "get") in granted
    assert not {verb for _, verb in granted} & {"*", "escalate", "bind", "impersonate", "update", "patch"}
    binding = find(manifests, "RoleBinding")
    worker = find(manifests, "Deployment", "-worker")["spec"]["template"]["spec"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": worker["serviceAccountName"], "namespace": NAMESPACE}]
    shard_account = find(manifests, "ServiceAccount", "-shard")
    assert shard_account["automountServiceAccountToken"] is False


def test_every_container_is_non_root_with_requests_limits_and_no_capabilities() -> None:
    manifests = render(FULL)["manifests"]
    pods = [m["spec"]["template"]["spec"] for m in manifests if m["kind"] == "Deployment"] + [shard_job(manifests)["spec"]["template"]["spec"]]
    assert len(pods) == 4
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
        assert pod["imagePullSecrets"] == [{"name": "registry-credentials"}]
        for container in pod["containers"]:
            assert container["image"] == f"registry.example/ml/mergefleet@sha256:{'ab' * 32}"
            assert set(container["resources"]) == {"requests", "limits"}
            assert {"cpu", "memory"} <= set(container["resources"]["requests"]) and {"cpu", "memory"} <= set(container["resources"]["limits"])
            security = container["securityContext"]
            assert security["capabilities"] == {"drop": ["ALL"]} and security["allowPrivilegeEscalation"] is False
            assert security["readOnlyRootFilesystem"] is True
            assert any(mount["mountPath"] == "/tmp" for mount in container["volumeMounts"])  # the one writable place


def test_the_shard_job_asks_for_gpus_tolerates_their_taint_and_gets_credentials_only_from_the_secret() -> None:
    manifests = render(FULL)["manifests"]
    job = shard_job(manifests, {"env": {"MERGEFLEET_RUN": "nightly"}})
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert pod["tolerations"] == FULL["shardJob"]["tolerations"]
    assert {"secretRef": {"name": "s3-creds"}} in container["envFrom"]
    assert {"configMapRef": {"name": "mergefleet-endpoints"}} in container["envFrom"]
    assert not [e for e in container["env"] if "SECRET" in e["name"] or "KEY" in e["name"]]
    assert {"name": "MERGEFLEET_RUN", "value": "nightly"} in container["env"]
    assert job["spec"]["ttlSecondsAfterFinished"] == 7200 and job["spec"]["backoffLimit"] == 1
    assert pod["volumes"] == [{"name": "scratch", "emptyDir": {"sizeLimit": "200Gi"}}]
    assert pod["automountServiceAccountToken"] is False and pod["serviceAccountName"] == "mergefleet-shard"
    assert container["args"] == ["python", "-m", "prefect.engine"]  # one Python process per shard, not three
    template = json.loads(find(manifests, "ConfigMap", "-job-template")["data"]["base-job-template.json"])
    assert template["variables"]["properties"]["pod_watch_timeout_seconds"]["default"] == 1200
    endpoints = find(manifests, "ConfigMap", "-endpoints")["data"]
    assert endpoints["AWS_ENDPOINT_URL"] == "https://s3.example.internal" and endpoints["PREFECT_API_URL"].endswith(":4200/api")


def test_external_servers_turn_the_in_chart_ones_off() -> None:
    values = {"prefect": {"apiUrl": "https://prefect.example/api", "server": {"enabled": False}},
              "mlflow": {"trackingUri": "https://mlflow.example", "server": {"enabled": False}}}
    manifests = render(values)["manifests"]
    assert [m["metadata"]["name"] for m in manifests if m["kind"] == "Deployment"] == ["mergefleet-worker"]
    endpoints = find(manifests, "ConfigMap", "-endpoints")["data"]
    assert endpoints["PREFECT_API_URL"] == "https://prefect.example/api" and endpoints["MLFLOW_TRACKING_URI"] == "https://mlflow.example"
    with pytest.raises(helm.HelmError, match="prefect.apiUrl is required"):
        render({"prefect": {"server": {"enabled": False}}})


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"shardJob": {"gpus": "two"}}, "gpus"),
        ({"shardJob": {"scratch": {"sizeLimit": "lots"}}}, "sizeLimit"),
        ({"podSecurityContext": {"runAsNonRoot": False}}, "runAsNonRoot"),
        ({"securityContext": {"capabilities": {"drop": []}}}, "drop"),
        ({"shardJob": {"extraEnv": {"AWS_SECRET_ACCESS_KEY": "x"}}}, "AWS_SECRET_ACCESS_KEY"),
        ({"worker": {"resources": {"limits": None}}}, "limits"),
        ({"image": {"digest": "latest"}}, "digest"),
        ({"workers": {"replicas": 2}}, "workers"),
    ],
    ids=["gpus-not-a-number", "bad-quantity", "root", "capabilities-kept", "secret-in-env", "no-limits", "bad-digest", "unknown-key"],
)
def test_a_value_that_violates_the_schema_fails_the_install(values: dict[str, Any], complaint: str) -> None:
    with pytest.raises(helm.HelmError, match=complaint):
        render(values)


@pytest.mark.parametrize(
    ("template", "old", "new", "error"),
    [
        ("worker.yaml", "{{ .Values.worker.replicas }}", "{{ .Values.worker.replicas", helm.HelmError),
        ("worker.yaml", "containerPort: {{ .Values.worker.healthPort }}", "containerPort: port-{{ .Values.worker.healthPort }}",
         kubernetes_validate.ValidationError),
        ("role.yaml", "  - apiGroups: [\"batch\"]", "  - apiGroup: [\"batch\"]", kubernetes_validate.ValidationError),
    ],
    ids=["template-syntax", "wrong-type", "unknown-field"],
)
def test_a_broken_template_fails(tmp_path: Path, template: str, old: str, new: str, error: type[Exception]) -> None:
    broken = tmp_path / "mergefleet"
    shutil.copytree(CHART, broken)
    path = broken / "templates" / template
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(error):
        for manifest in render(chart=broken)["manifests"]:
            validate(manifest)
