"""Can this cluster run a merge? The Kubernetes half of ``mergefleet cluster check``.

Each check gives a :class:`Finding`: what was looked at, whether it passed, and when it
did not, what to do. A *blocking* finding means a merge could not run (no GPU node for a
GPU pool, no S3 Secret, no right to create Jobs); the others are warnings (this account
may not read nodes, for example, which says nothing about the worker's rights).
"""

from __future__ import annotations

import base64
import json
import logging
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Mapping

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException
from urllib3.exceptions import HTTPError

from orchestrator.cluster.template import JobTemplate, from_configmap
from orchestrator.errors import ClusterError

log = logging.getLogger(__name__)

CREDENTIAL_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
GPU = "nvidia.com/gpu"
# What the worker (and its observer) does with the API, as (verb, group, resource, subresource).
WORKER_ACCESS = (
    ("create", "batch", "jobs", ""),
    ("watch", "batch", "jobs", ""),
    ("list", "", "pods", ""),
    ("get", "", "pods", "log"),
)


@dataclass(frozen=True)
class Finding:
    check: str
    ok: bool
    message: str
    fix: str = ""
    blocking: bool = True

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def connect(kubeconfig: str | None = None, context: str | None = None) -> k8s.ApiClient:
    """An API client: in-cluster credentials inside a pod, else the kubeconfig (``$KUBECONFIG``)."""
    if kubeconfig is None and context is None:
        try:
            k8s_config.load_incluster_config()
            return k8s.ApiClient()
        except ConfigException:
            pass
    try:
        return k8s_config.new_client_from_config(config_file=kubeconfig, context=context)
    except (ConfigException, OSError) as error:
        raise ClusterError(
            f"no Kubernetes credentials: {error}; point KUBECONFIG (or --kubeconfig) at a kubeconfig, or run inside the cluster"
        ) from None


def _reason(error: ApiException) -> str:
    return f"{error.status} {error.reason}".strip()


def read_template(api: k8s.ApiClient, namespace: str, configmap: str) -> JobTemplate:
    """The chart's rendered job template, read from its ConfigMap in the cluster."""
    try:
        found = k8s.CoreV1Api(api).read_namespaced_config_map(configmap, namespace)
    except ApiException as error:
        if error.status == 404:
            raise ClusterError(
                f"no ConfigMap '{configmap}' in namespace '{namespace}': install the chart "
                "(helm install ... charts/mergefleet) or give the template with --template FILE"
            ) from None
        raise ClusterError(f"cannot read ConfigMap '{configmap}' in '{namespace}': {_reason(error)}") from None
    return from_configmap({"data": found.data or {}}, f"configmap {namespace}/{configmap}")


def _read(read: Callable[[], Any], missing: Finding, forbidden: Finding | None = None) -> Any:
    """What ``read`` returns, or the finding for a 404 (and for a 403 when ``forbidden`` is given)."""
    try:
        return read()
    except ApiException as error:
        if error.status == 404:
            return missing
        if error.status == 403 and forbidden is not None:
            return forbidden
        raise


def _namespace(core: k8s.CoreV1Api, namespace: str) -> Finding:
    found = _read(
        lambda: core.read_namespace(namespace),
        Finding("namespace", False, f"namespace '{namespace}' does not exist",
                f"kubectl create namespace {namespace} (or helm install --create-namespace)"),
        Finding("namespace", True, f"namespace '{namespace}': this account may not read namespaces; not checked", blocking=False),
    )
    return found if isinstance(found, Finding) else Finding("namespace", True, f"namespace '{namespace}' exists")


def _matches(labels: Mapping[str, str], selector: Mapping[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def _gpu_nodes(core: k8s.CoreV1Api, gpus_per_pod: int, node_selector: Mapping[str, str]) -> Finding:
    try:
        nodes = core.list_node().items
    except ApiException as error:
        if error.status == 403:
            return Finding("gpu nodes", True, "this account may not list nodes (a cluster-wide read); GPUs not checked",
                           "run the check with an account that may 'list nodes', or ask the cluster's admin", blocking=False)
        raise
    eligible = [n for n in nodes if _matches(n.metadata.labels or {}, node_selector)]
    counts = {n.metadata.name: int((n.status.allocatable or {}).get(GPU, "0") or 0) for n in eligible}
    with_gpus = {name: count for name, count in counts.items() if count > 0}
    where = f" matching nodeSelector {dict(node_selector)}" if node_selector else ""
    summary = ", ".join(f"{name}: {count}" for name, count in sorted(with_gpus.items()))
    if gpus_per_pod == 0:
        return Finding("gpu nodes", True, f"the pool's pods ask for no GPU; {len(eligible)} node(s){where}")
    if not with_gpus:
        return Finding(
            "gpu nodes", False,
            f"no node{where} has allocatable {GPU} ({len(nodes)} node(s) in the cluster); shard pods asking for "
            f"{gpus_per_pod} GPU would stay Pending",
            "add a GPU node pool with the NVIDIA device plugin (see infra/values-gpu-example.yaml), "
            "or fix shardJob.nodeSelector / tolerations",
        )
    if max(with_gpus.values()) < gpus_per_pod:
        return Finding("gpu nodes", False, f"no node{where} has {gpus_per_pod} {GPU} free for one pod ({summary})",
                       "lower shardJob.gpus or add larger GPU nodes")
    return Finding("gpu nodes", True, f"{len(with_gpus)} node(s){where} with {GPU}, {sum(with_gpus.values())} in all ({summary})")


def _secret(core: k8s.CoreV1Api, namespace: str, name: str) -> Finding:
    secret = _read(
        lambda: core.read_namespaced_secret(name, namespace),
        Finding("s3 secret", False,
                f"no Secret '{name}' in namespace '{namespace}': shard pods would not start (CreateContainerConfigError)",
                f"kubectl -n {namespace} create secret generic {name} "
                "--from-literal=AWS_ACCESS_KEY_ID=... --from-literal=AWS_SECRET_ACCESS_KEY=..."),
        Finding("s3 secret", True, f"this account may not read Secret '{name}'; not checked", blocking=False),
    )
    if isinstance(secret, Finding):
        return secret
    keys = set(secret.data or {}) | set(secret.string_data or {})
    missing = [key for key in CREDENTIAL_KEYS if key not in keys]
    empty = [key for key in CREDENTIAL_KEYS if key in (secret.data or {}) and not base64.b64decode(secret.data[key])]
    if missing or empty:
        return Finding("s3 secret", False, f"Secret '{name}' lacks {', '.join(missing + empty)} (keys: {', '.join(sorted(keys)) or 'none'})",
                       f"kubectl -n {namespace} create secret generic {name} --from-literal=AWS_ACCESS_KEY_ID=... "
                       "--from-literal=AWS_SECRET_ACCESS_KEY=... --dry-run=client -o yaml | kubectl apply -f -")
    return Finding("s3 secret", True, f"Secret '{name}' holds {', '.join(CREDENTIAL_KEYS)}")


def _configmap(core: k8s.CoreV1Api, namespace: str, name: str) -> Finding:
    found = _read(
        lambda: core.read_namespaced_config_map(name, namespace),
        Finding("endpoints configmap", False, f"no ConfigMap '{name}' in namespace '{namespace}'",
                "install the chart (it renders <release>-mergefleet-endpoints), or pass --configmap NAME"),
    )
    if isinstance(found, Finding):
        return found
    data = found.data or {}
    if "PREFECT_API_URL" not in data:
        return Finding("endpoints configmap", False, f"ConfigMap '{name}' has no PREFECT_API_URL: shard pods could not report",
                       "set prefect.apiUrl (or prefect.server.enabled) in the chart's values")
    shown = ", ".join(f"{key}={data[key]}" for key in sorted(data) if key.endswith(("_URL", "_URI", "REGION")))
    return Finding("endpoints configmap", True, f"ConfigMap '{name}': {shown}")


def _access(api: k8s.ApiClient, namespace: str, service_account: str | None) -> list[Finding]:
    """SelfSubjectAccessReview per verb the worker needs; as the service account when one is named."""
    who = f"service account '{service_account}'" if service_account else "this account"
    if service_account:
        api.set_default_header("Impersonate-User", f"system:serviceaccount:{namespace}:{service_account}")
    authz = k8s.AuthorizationV1Api(api)
    findings = []
    try:
        for verb, group, resource, subresource in WORKER_ACCESS:
            attributes = k8s.V1ResourceAttributes(namespace=namespace, verb=verb, group=group, resource=resource,
                                                  subresource=subresource or None)
            review = authz.create_self_subject_access_review(
                k8s.V1SelfSubjectAccessReview(spec=k8s.V1SelfSubjectAccessReviewSpec(resource_attributes=attributes))
            )
            what = f"{verb} {resource}{'/' + subresource if subresource else ''}"
            if review.status.allowed:
                findings.append(Finding(f"rbac: {what}", True, f"{who} may {what} in '{namespace}'"))
            else:
                why = f" ({review.status.reason})" if review.status.reason else ""
                findings.append(Finding(
                    f"rbac: {what}", False, f"{who} may not {what} in '{namespace}'{why}",
                    "install the chart's Role and RoleBinding (worker.enabled), or grant it: "
                    f"kubectl -n {namespace} create role ... --verb={verb} --resource={resource}",
                ))
    except ApiException as error:
        if error.status != 403:
            raise
        detail = _api_message(error)
        fix = ("let your account impersonate it, or run the check as that account (in the worker's pod); "
               f"kubectl auth can-i create jobs -n {namespace} --as=system:serviceaccount:{namespace}:{service_account}"
               if service_account else "ask the cluster's admin for the rights to review access (selfsubjectaccessreviews)")
        findings.append(Finding("rbac", False, f"the API refused to say what {who} may do (403 Forbidden: {detail})", fix))
    finally:
        api.default_headers.pop("Impersonate-User", None)
    return findings


def _api_message(error: ApiException) -> str:
    try:
        return str(json.loads(error.body or "{}").get("message") or error.reason)
    except ValueError:
        return str(error.reason)


def check_cluster(
    api: k8s.ApiClient,
    *,
    namespace: str,
    secret: str,
    configmap: str,
    service_account: str | None,
    template: JobTemplate | None,
) -> list[Finding]:
    """Every Kubernetes-side check; an unreachable API is one blocking finding."""
    core = k8s.CoreV1Api(api)
    gpus = int(template.default("gpus") or 0) if template else 1
    selector = (template.default("node_selector") or {}) if template else {}
    checks: Iterable[Any] = (
        lambda: [_namespace(core, namespace)],
        lambda: [_gpu_nodes(core, gpus, selector)],
        lambda: [_secret(core, namespace, secret)],
        lambda: [_configmap(core, namespace, configmap)],
        lambda: _access(api, namespace, service_account),
    )
    findings: list[Finding] = []
    for run in checks:
        try:
            findings.extend(run())
        except HTTPError as error:
            host = api.configuration.host
            return findings + [Finding("api server", False, f"cannot reach the Kubernetes API at {host}: {error}",
                                       "check KUBECONFIG / --context, and that the cluster is up")]
        except ApiException as error:
            findings.append(Finding("api server", False, f"the Kubernetes API answered {_reason(error)}: {_api_message(error)}",
                                    "check the account's rights and the API server's health"))
    return findings
