"""A stand-in Kubernetes cluster on 127.0.0.1 for the tests: an API server and a kubelet.

Only the cluster is stood in for. The clients are the real ones (the Prefect Kubernetes
worker and its kopf observer through ``kubernetes_asyncio``, ``mergefleet cluster check``
through ``kubernetes``), and so are the Job manifests: the worker renders them from the
chart's base job template.

The API server is kmock's in-memory Kubernetes emulator (objects, lists, watch streams,
create/patch/delete), extended with what the real clients need and the emulator leaves out:

- ``metadata.generateName``, ``uid``, ``creationTimestamp`` and ``resourceVersion`` on create;
- label selectors on lists and watches (the observer lists and watches by label);
- pod logs (``pods/NAME/log``, with ``tailLines``);
- namespaces read by name, and SelfSubjectAccessReview answered from a set of denied verbs
  (or refused with 403, as an API server refuses a token that may not ask).

The kubelet (an asyncio task in the same loop) schedules each Job's pod onto a node the
way the scheduler would decide it here: the node's labels must match ``nodeSelector``,
its ``NoSchedule`` taints must be tolerated and its allocatable ``nvidia.com/gpu`` must
cover the pod's limit. A pod that fits runs the container's command as a local process:
``command`` (else the image's ENTRYPOINT) + ``args`` (else the image's CMD), with the
image's environment, then ``envFrom`` and ``env`` resolved from the Secrets and ConfigMaps
in the store (a missing one leaves the pod waiting in CreateContainerConfigError), and
``emptyDir`` mount paths mapped to a folder per pod (paths that exist on the host are
left alone: pods share the host's file system). Its exit code sets the pod's phase,
the Job's ``succeeded``/``failed`` counts and conditions; a failed pod is replaced while
``failed <= backoffLimit``. A deleted Job's pod process is killed. Not implemented:
resource accounting other than GPUs, ``ttlSecondsAfterFinished`` garbage collection,
``activeDeadlineSeconds``, events.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import itertools
import json
import os
import secrets
import signal
import threading
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import aiohttp.web
import kmock
import yaml

PODS = kmock.resource(group="", version="v1", plural="pods")
JOBS = kmock.resource(group="batch", version="v1", plural="jobs")
NODES = kmock.resource(group="", version="v1", plural="nodes")
SECRETS = kmock.resource(group="", version="v1", plural="secrets")
CONFIGMAPS = kmock.resource(group="", version="v1", plural="configmaps")
EVENTS = kmock.resource(group="", version="v1", plural="events")
NAMESPACES = kmock.resource(group="", version="v1", plural="namespaces")
ACCESS_REVIEWS = kmock.resource(group="authorization.k8s.io", version="v1", plural="selfsubjectaccessreviews")

_RESOURCES = {
    PODS: ("Pod", True, ["create", "delete", "get", "list", "patch", "watch"], ["log", "status"]),
    JOBS: ("Job", True, ["create", "delete", "get", "list", "patch", "watch"], ["status"]),
    NODES: ("Node", False, ["get", "list", "watch"], []),
    SECRETS: ("Secret", True, ["create", "delete", "get", "list", "patch"], []),
    CONFIGMAPS: ("ConfigMap", True, ["create", "delete", "get", "list", "patch"], []),
    EVENTS: ("Event", True, ["create", "get", "list", "watch"], []),
    NAMESPACES: ("Namespace", False, ["create", "get", "list"], []),
    ACCESS_REVIEWS: ("SelfSubjectAccessReview", False, ["create"], []),
}


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _matches(labels: dict[str, str], selector: str | None) -> bool:
    """Equality-based label selectors (``a=b``, ``a!=b``, ``a``, ``!a``), comma-separated."""
    for term in filter(None, (selector or "").split(",")):
        term = term.strip()
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key) != value:
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def _labels(obj: dict[str, Any]) -> dict[str, str]:
    return obj.get("metadata", {}).get("labels") or {}


@dataclass
class Image:
    """What the container runtime takes from the image: ENTRYPOINT, CMD, ENV, WORKDIR."""

    entrypoint: list[str]
    cmd: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class PodProcess:
    name: str
    namespace: str
    job: str
    process: asyncio.subprocess.Process | None = None
    log: bytearray = field(default_factory=bytearray)


class StandInAPI(kmock.KubernetesEmulator):
    """kmock's emulator plus generateName, label selectors, logs, namespaces and access reviews."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for resource, (kind, namespaced, verbs, subresources) in _RESOURCES.items():
            self.resources[resource] = kmock.ResourceInfo(
                kind=kind, namespaced=namespaced, verbs=verbs, subresources=subresources
            )
        self.versions = itertools.count(1)
        self.denied_verbs: set[tuple[str, str]] = set()  # (verb, resource) the caller may not do
        self.review_status = 201  # 403: the caller may not even ask
        self.namespaces: set[str] = set()
        self.pod_logs: dict[tuple[str, str], bytearray] = {}

    def stamp(self, obj: dict[str, Any], namespace: str | None) -> dict[str, Any]:
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + secrets.token_hex(3)[:5]
        if namespace and not meta.get("namespace"):
            meta["namespace"] = namespace
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", _now())
        meta["resourceVersion"] = str(next(self.versions))
        return obj

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        path = request.url.path.rstrip("/")
        if request.method == "GET" and path.startswith("/api/v1/namespaces/") and path.count("/") == 4:
            name = path.rsplit("/", 1)[1]
            if name not in self.namespaces:
                return self._status(404, "NotFound", f'namespaces "{name}" not found')
            return aiohttp.web.json_response({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
        if request.resource == ACCESS_REVIEWS and request.method == "POST":
            return self._review(request.data or {})
        if request.resource == PODS and request.subresource == "log":
            log = bytes(self.pod_logs.get((request.namespace or "", request.name or ""), b""))
            tail = request.params.get("tailLines")
            text = log.decode(errors="replace")
            if tail:
                text = "\n".join(text.splitlines()[-int(tail):])
            return aiohttp.web.Response(text=text, content_type="text/plain")
        if request.action == kmock.action.CREATE and isinstance(request.data, dict):
            self.stamp(request.data, request.namespace)
        elif request.action == kmock.action.UPDATE and isinstance(request.data, dict):
            request.data.setdefault("metadata", {})["resourceVersion"] = str(next(self.versions))
        return await super()._handle(request)

    @staticmethod
    def _status(code: int, reason: str, message: str) -> aiohttp.web.Response:
        body = {"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure", "code": code,
                "reason": reason, "message": message}
        return aiohttp.web.json_response(body, status=code)

    def _review(self, review: dict[str, Any]) -> aiohttp.web.Response:
        if self.review_status == 403:
            return self._status(
                403, "Forbidden",
                'selfsubjectaccessreviews.authorization.k8s.io is forbidden: User "system:anonymous" cannot create '
                'resource "selfsubjectaccessreviews" in API group "authorization.k8s.io" at the cluster scope',
            )
        attributes = review.get("spec", {}).get("resourceAttributes", {})
        allowed = (attributes.get("verb"), attributes.get("resource")) not in self.denied_verbs
        review["status"] = {"allowed": allowed} | ({} if allowed else {"reason": "RBAC: no rule allows it"})
        return aiohttp.web.json_response(review, status=201)

    async def _serve_list(self, request: kmock.Request) -> Any:
        listing = await super()._serve_list(request)
        selector = request.params.get("labelSelector")
        listing["items"] = [item for item in listing["items"] if _matches(_labels(item), selector)]
        listing["metadata"]["resourceVersion"] = str(next(self.versions))
        return listing

    async def _serve_watch(self, request: kmock.Request) -> Any:
        selector = request.params.get("labelSelector")
        async for event in super()._serve_watch(request):
            if not isinstance(event, dict) or _matches(_labels(event.get("object", {})), selector):
                yield event

    # ---------------------------------------------------------------- store access for the kubelet

    def live(self, resource: Any) -> list[dict[str, Any]]:
        return [obj.raw for (res, _, _), obj in self.objects.items() if res == resource and not obj.deleted]

    def get(self, resource: Any, namespace: str | None, name: str) -> dict[str, Any] | None:
        key = (resource, namespace, name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        return self.objects[key].raw

    async def put(self, resource: Any, obj: dict[str, Any]) -> None:
        """Create ``obj``, as a controller would (ADDED on the watch streams)."""
        meta = obj["metadata"]
        async with self._lock:
            self.stamp(obj, meta.get("namespace"))
            key = (resource, meta.get("namespace"), meta["name"])
            if key in self.objects:
                self.objects[key].create(obj)
            else:
                self.objects[key] = obj
            await self._buses[resource].put({"type": "ADDED", "object": self.objects[key].raw})

    async def change(self, resource: Any, namespace: str | None, name: str, patch: dict[str, Any]) -> None:
        """Patch a stored object (MODIFIED on the watch streams); gone objects are left alone."""
        async with self._lock:
            key = (resource, namespace, name)
            if key not in self.objects or self.objects[key].deleted:
                return
            patch.setdefault("metadata", {})["resourceVersion"] = str(next(self.versions))
            self.objects[key].patch(patch)
            await self._buses[resource].put({"type": "MODIFIED", "object": self.objects[key].raw})


def _tolerates(tolerations: list[dict[str, Any]], taint: dict[str, Any]) -> bool:
    for toleration in tolerations:
        key_ok = toleration.get("key") in (None, "", taint.get("key"))
        if toleration.get("operator") == "Exists":
            value_ok = True
        else:
            value_ok = key_ok and toleration.get("value", "") == taint.get("value", "")
        effect_ok = toleration.get("effect") in (None, "", taint.get("effect"))
        if key_ok and value_ok and effect_ok:
            return True
    return False


def _in_volume(value: str, mounts: dict[str, str]) -> str:
    """A path under a volume's mount path, as the pod sees it: in the pod's folder for that
    volume. Pods here share the host's file system, so a path that exists on the host is
    taken to mean the host's (a checkpoint, the worker's PREFECT_HOME) and left alone. A list
    of paths (PATH) is mapped entry by entry: as a whole it never exists on the host, and
    mapping it whole sent a checkout under /tmp into the pod's /tmp volume."""
    if os.pathsep in value:
        return os.pathsep.join(_in_volume(entry, mounts) for entry in value.split(os.pathsep))
    for mount_path, local in mounts.items():
        if (value == mount_path or value.startswith(mount_path + "/")) and not Path(value).exists():
            return local + value[len(mount_path):]
    return value


def _gpus(pod_spec: dict[str, Any]) -> int:
    return sum(int((c.get("resources") or {}).get("limits", {}).get("nvidia.com/gpu", 0) or 0) for c in pod_spec["containers"])


class Kubelet:
    """Runs every Job's pod as a local process; see the module's docstring."""

    def __init__(self, api: StandInAPI, image: Image, root: Path) -> None:
        self.api, self.image, self.root = api, image, root
        self.pods: dict[tuple[str, str], PodProcess] = {}
        # A fault to inject: the first pod for which this predicate accepts a line of its output
        # is killed there (SIGKILL, exit code 137), as the kernel's OOM killer would.
        self.kill_when: Callable[[dict[str, Any], str], bool] | None = None
        self.killed: list[str] = []
        # What went wrong in the kubelet's own loop (a bug here, not in the code under test):
        # the loop goes on, and the tests report these tracebacks.
        self.errors: list[str] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for pod in self.pods.values():
            if pod.process and pod.process.returncode is None:
                pod.process.kill()
                await pod.process.wait()

    async def _loop(self) -> None:
        while True:
            try:
                await self._tick()
            except Exception:  # noqa: BLE001 -- recorded for the test to report, and the loop goes on
                self.errors.append(traceback.format_exc())
            await asyncio.sleep(0.1)

    async def _tick(self) -> None:
        for job in self.api.live(JOBS):
            meta, status = job["metadata"], job.get("status") or {}
            if any(c.get("type") in ("Complete", "Failed") for c in status.get("conditions", [])):
                continue
            pods = [p for p in self.api.live(PODS) if _labels(p).get("controller-uid") == meta["uid"]]
            running = [p for p in pods if p["status"]["phase"] in ("Pending", "Running")]
            if not running:
                await self._create_pod(job, attempt=len(pods))
        for pod in self.api.live(PODS):
            if pod["status"]["phase"] == "Pending" and (pod["metadata"]["namespace"], pod["metadata"]["name"]) not in self.pods:
                await self._try_start(pod)
        for (namespace, name), pod in list(self.pods.items()):
            owner = self.api.get(JOBS, namespace, pod.job)
            if owner is None and pod.process and pod.process.returncode is None:
                pod.process.kill()

    async def _create_pod(self, job: dict[str, Any], attempt: int) -> None:
        meta, template = job["metadata"], job["spec"]["template"]
        labels = dict((template.get("metadata") or {}).get("labels") or {})
        labels |= {"controller-uid": meta["uid"], "job-name": meta["name"], "batch.kubernetes.io/job-name": meta["name"]}
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": f"{meta['name']}-{attempt}{secrets.token_hex(2)}",
                "namespace": meta["namespace"],
                "labels": labels,
                "annotations": (template.get("metadata") or {}).get("annotations") or {},
                "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": meta["name"], "uid": meta["uid"]}],
            },
            "spec": json.loads(json.dumps(template["spec"])),
            "status": {"phase": "Pending"},
        }
        await self.api.put(PODS, pod)
        await self.api.change(JOBS, meta["namespace"], meta["name"], {"status": {"active": 1, "startTime": _now()}})

    def _node_for(self, spec: dict[str, Any]) -> tuple[str | None, str]:
        nodes = self.api.live(NODES)
        wanted = spec.get("nodeSelector") or {}
        gpus = _gpus(spec)
        reasons = []
        for node in nodes:
            labels = _labels(node)
            if any(labels.get(k) != v for k, v in wanted.items()):
                reasons.append("node(s) didn't match Pod's node affinity/selector")
                continue
            taints = [t for t in (node.get("spec") or {}).get("taints", []) if t.get("effect") == "NoSchedule"]
            if any(not _tolerates(spec.get("tolerations") or [], t) for t in taints):
                reasons.append("node(s) had untolerated taint")
                continue
            allocatable = int((node.get("status") or {}).get("allocatable", {}).get("nvidia.com/gpu", 0))
            used = sum(
                _gpus(p["spec"]) for p in self.api.live(PODS)
                if p["spec"].get("nodeName") == node["metadata"]["name"] and p["status"]["phase"] == "Running"
            )
            if gpus > allocatable - used:
                reasons.append("Insufficient nvidia.com/gpu")
                continue
            return node["metadata"]["name"], ""
        detail = ", ".join(f"{reasons.count(r)} {r}" for r in dict.fromkeys(reasons))
        return None, f"0/{len(nodes)} nodes are available: {detail}."

    def _env(self, namespace: str, container: dict[str, Any], mounts: dict[str, str], pod: dict[str, Any]) -> dict[str, str]:
        env = dict(self.image.env)

        def source(kind: Any, name: str) -> dict[str, str]:
            obj = self.api.get(kind, namespace, name)
            if obj is None:
                raise LookupError(f'{"secret" if kind == SECRETS else "configmap"} "{name}" not found')
            if kind == SECRETS:
                return {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()} | (obj.get("stringData") or {})
            return dict(obj.get("data") or {})

        for item in container.get("envFrom") or []:
            if "secretRef" in item:
                env |= source(SECRETS, item["secretRef"]["name"])
            if "configMapRef" in item:
                env |= source(CONFIGMAPS, item["configMapRef"]["name"])
        for item in container.get("env") or []:
            if "value" in item:
                env[item["name"]] = "" if item["value"] is None else str(item["value"])
            elif "valueFrom" in item:
                ref = item["valueFrom"]
                if "secretKeyRef" in ref:
                    env[item["name"]] = source(SECRETS, ref["secretKeyRef"]["name"])[ref["secretKeyRef"]["key"]]
                elif "configMapKeyRef" in ref:
                    env[item["name"]] = source(CONFIGMAPS, ref["configMapKeyRef"]["name"])[ref["configMapKeyRef"]["key"]]
                elif "fieldRef" in ref:
                    path = ref["fieldRef"]["fieldPath"]
                    env[item["name"]] = {"metadata.name": pod["metadata"]["name"], "metadata.namespace": namespace}.get(path, "")
        return {key: _in_volume(value, mounts) for key, value in env.items()}

    async def _try_start(self, pod: dict[str, Any]) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        namespace, name = meta["namespace"], meta["name"]
        node, why = self._node_for(spec)
        if node is None:
            await self.api.change(PODS, namespace, name, {"status": {"conditions": [
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": why}
            ]}})
            return
        container = spec["containers"][0]
        pod_root = self.root / name
        volumes = {v["name"]: v for v in spec.get("volumes") or []}
        mounts = {}
        for mount in container.get("volumeMounts") or []:
            if "emptyDir" in volumes.get(mount["name"], {}):
                local = pod_root / "volumes" / mount["name"]
                local.mkdir(parents=True, exist_ok=True)
                mounts[mount["mountPath"]] = str(local)
        try:
            env = self._env(namespace, container, mounts, pod)
        except LookupError as missing:
            waiting = {"name": container["name"], "image": container.get("image", ""), "imageID": "", "ready": False, "restartCount": 0,
                       "state": {"waiting": {"reason": "CreateContainerConfigError", "message": str(missing)}}}
            await self.api.change(PODS, namespace, name, {"spec": {"nodeName": node}, "status": {"containerStatuses": [waiting]}})
            return
        argv = (container.get("command") or self.image.entrypoint) + (container.get("args") or ([] if container.get("command") else self.image.cmd))
        entry = PodProcess(name=name, namespace=namespace, job=meta["ownerReferences"][0]["name"])
        self.pods[(namespace, name)] = entry
        self.api.pod_logs[(namespace, name)] = entry.log
        workdir = pod_root / "workdir"
        workdir.mkdir(parents=True, exist_ok=True)
        entry.process = await asyncio.create_subprocess_exec(
            *argv, env=env, cwd=container.get("workingDir") or workdir,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True,
        )
        started = _now()
        await self.api.change(PODS, namespace, name, {
            "spec": {"nodeName": node},
            "status": {"phase": "Running", "startTime": started, "conditions": [{"type": "PodScheduled", "status": "True"}],
                       "containerStatuses": [{"name": container["name"], "image": container.get("image", ""), "imageID": "", "ready": True, "restartCount": 0,
                                              "state": {"running": {"startedAt": started}}}]},
        })
        asyncio.get_running_loop().create_task(self._wait(entry, pod, container, started))

    async def _wait(self, entry: PodProcess, pod: dict[str, Any], container: dict[str, Any], started: str) -> None:
        assert entry.process is not None and entry.process.stdout is not None
        async for line in entry.process.stdout:
            entry.log.extend(line)
            if self.kill_when is not None and self.kill_when(pod, line.decode(errors="replace")):
                self.kill_when = None
                self.killed.append(entry.name)
                kill_pod(entry.process.pid)
        code = await entry.process.wait()
        exit_code = 128 - code if code < 0 else code  # killed by a signal: 128 + signal, as a runtime reports it
        phase = "Succeeded" if exit_code == 0 else "Failed"
        reason = "Completed" if exit_code == 0 else "Error"
        terminated = {"exitCode": exit_code, "reason": reason, "startedAt": started, "finishedAt": _now()}
        namespace, name = entry.namespace, entry.name
        await self.api.change(PODS, namespace, name, {"status": {"phase": phase, "containerStatuses": [
            {"name": container["name"], "image": container.get("image", ""), "imageID": "", "ready": False, "restartCount": 0,
             "state": {"terminated": terminated}}
        ]}})
        job = self.api.get(JOBS, namespace, entry.job)
        if job is None:
            return
        status = job.get("status") or {}
        if exit_code == 0:
            patch = {"active": 0, "succeeded": status.get("succeeded", 0) + 1, "completionTime": _now(),
                     "conditions": [{"type": "Complete", "status": "True"}]}
        else:
            failed = status.get("failed", 0) + 1
            patch = {"active": 0, "failed": failed}
            if failed > job["spec"].get("backoffLimit", 6):
                patch["conditions"] = [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                                        "message": "Job has reached the specified backoff limit"}]
        await self.api.change(JOBS, namespace, entry.job, {"status": patch})


class StandInCluster:
    """The API server and the kubelet in a thread of their own, on 127.0.0.1."""

    def __init__(self, image: Image, root: Path) -> None:
        self.image, self.root = image, root
        self.loop = asyncio.new_event_loop()
        self.api: StandInAPI | None = None
        self.kubelet: Kubelet | None = None
        self.url = ""
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="kube-standin", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        self.api = StandInAPI()
        async with self.api, kmock.Server(self.api) as server:
            self.url = f"http://127.0.0.1:{server.port}"
            self.kubelet = Kubelet(self.api, self.image, self.root)
            self.kubelet.start()
            self._ready.set()
            await self._stop.wait()
            await self.kubelet.stop()

    def __enter__(self) -> StandInCluster:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the stand-in Kubernetes API did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._stop is not None
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def call(self, coroutine: Any, timeout: float = 10) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    # ---------------------------------------------------------------- what a test sets up

    def add(self, resource: Any, obj: dict[str, Any]) -> None:
        assert self.api is not None
        self.call(self.api.put(resource, json.loads(json.dumps(obj))))

    def add_namespace(self, name: str) -> None:
        assert self.api is not None
        self.api.namespaces.add(name)

    def add_node(self, name: str, *, gpus: int = 0, labels: dict[str, str] | None = None, taints: list[dict[str, str]] | None = None) -> None:
        self.add(NODES, {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name} | (labels or {})},
            "spec": {"taints": taints or []},
            "status": {"allocatable": {"cpu": "8", "memory": "64Gi"} | ({"nvidia.com/gpu": str(gpus)} if gpus else {})},
        })

    def add_secret(self, namespace: str, name: str, values: dict[str, str]) -> None:
        data = {k: base64.b64encode(v.encode()).decode() for k, v in values.items()}
        self.add(SECRETS, {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace}, "data": data})

    def add_manifest(self, manifest: dict[str, Any]) -> None:
        kinds = {kind: resource for resource, (kind, *_rest) in _RESOURCES.items()}
        self.add(kinds[manifest["kind"]], manifest)

    def objects(self, resource: Any) -> list[dict[str, Any]]:
        assert self.api is not None
        return self.call(self._snapshot(resource))

    async def _snapshot(self, resource: Any) -> list[dict[str, Any]]:
        assert self.api is not None
        async with self.api._lock:
            return json.loads(json.dumps(self.api.live(resource)))

    def write_kubeconfig(self, path: Path, namespace: str) -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "standin", "cluster": {"server": self.url}}],
            "users": [{"name": "worker", "user": {"token": "stand-in-token"}}],
            "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "worker", "namespace": namespace}}],
            "current-context": "standin",
        }
        path.write_text(yaml.safe_dump(config))
        return path


def kill_pod(pid: int) -> None:
    """Kill a pod's process group, as the kernel's OOM killer or a node loss would."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)

