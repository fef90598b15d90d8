"""Shards as Kubernetes Jobs, end to end, and `mergefleet cluster check`, without a cluster.

Real: the Prefect server, the Prefect Kubernetes worker (prefect-kubernetes, with its kopf
observer) started with the chart's worker arguments and the chart's base job template,
`mergefleet deploy/run/cluster`, the S3 server (moto), and the `kubernetes` clients.
Stood in for: the cluster (tests/kube_standin.py: kmock's API emulator on 127.0.0.1 and a
kubelet that runs each Job's pod command as a local process through the image's ENTRYPOINT).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest
import yaml

from orchestrator.cluster import entrypoint
from orchestrator.pipeline import merge
from orchestrator.recipe import parse_recipe
from tests import dockerfile
from tests.chart import NAMESPACE, find, render, validate
from tests.helpers import MERGEFLEET, checkpoint_bytes, gta_recipe, write_recipe
from tests.kube_standin import JOBS, PODS, Image, StandInCluster
from tests.prefect_services import WORKER_GRACE_S, free_port, stop, wait_for, worker_online
from tests.s3_server import ACCESS_KEY, REGION, SECRET_KEY, s3_server  # noqa: F401  (s3_server is a fixture)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
POOL = "k8s-gpu"
SECRET = "mergefleet-s3"


def _image() -> Image:
    """The image as the container runtime would run it: the Dockerfile's ENTRYPOINT, CMD and
    ENV, with this checkout's virtual environment standing in for the one built into it."""
    items = dockerfile.instructions()
    env = dockerfile.env(items) | {
        "PATH": f"{BIN}:/usr/bin:/bin",
        "VIRTUAL_ENV": str(BIN.parent),
        "PYTHONPATH": str(ROOT),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    return Image(entrypoint=dockerfile.last(items, "ENTRYPOINT").exec_form(), cmd=dockerfile.last(items, "CMD").exec_form(), env=env)


@pytest.fixture(scope="module")
def server(real_prefect_server: tuple[dict[str, str], Path]) -> dict[str, str]:
    """The environment that points a process at the session's Prefect server."""
    return real_prefect_server[0]


@pytest.fixture(scope="module")
def chart(server: dict[str, str], s3_server) -> dict[str, Any]:
    values = {
        "image": {"repository": "registry.example/mergefleet", "tag": "test"},
        "workPool": {"name": POOL},
        "prefect": {"apiUrl": server["PREFECT_API_URL"], "server": {"enabled": False}},
        "mlflow": {"server": {"enabled": False}},
        "storage": {"credentialsSecret": SECRET, "endpointUrl": s3_server.endpoint, "region": REGION},
        "shardJob": {
            "nodeSelector": {"pool": "gpu"},
            "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"cpu": "1", "memory": "2Gi"}},
            "ttlSecondsAfterFinished": 600,
            "startTimeoutSeconds": 300,
        },
    }
    return render(values)


@pytest.fixture(scope="module")
def cluster(chart: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandInCluster]:
    """The stand-in cluster with what `helm install` and the operator leave in it: the
    namespace, a GPU node, the chart's ConfigMaps and the S3 Secret."""
    with StandInCluster(_image(), tmp_path_factory.mktemp("pods")) as standin:
        standin.add_namespace(NAMESPACE)
        standin.add_node("gpu-node-0", gpus=4, labels={"pool": "gpu"},
                         taints=[{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}])
        standin.add_node("cpu-node-0")
        for manifest in chart["manifests"]:
            if manifest["kind"] == "ConfigMap":
                standin.add_manifest(manifest | {"metadata": manifest["metadata"] | {"namespace": NAMESPACE}})
        standin.add_secret(NAMESPACE, SECRET, {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY})
        yield standin


@pytest.fixture(autouse=True)
def kubelet_healthy(cluster: StandInCluster) -> Iterator[None]:
    """After each test: the stand-in kubelet's loop raised nothing (its tracebacks otherwise)."""
    yield
    assert cluster.kubelet is not None
    assert not cluster.kubelet.errors, "the stand-in kubelet failed:\n" + "\n".join(cluster.kubelet.errors[:3])


@pytest.fixture(scope="module")
def k8s_env(server: dict[str, str], cluster: StandInCluster, s3_server, tmp_path_factory) -> dict[str, str]:
    """What a user's shell has: the Prefect API, a kubeconfig, S3 credentials for the parent flow."""
    kubeconfig = cluster.write_kubeconfig(tmp_path_factory.mktemp("kube") / "config", NAMESPACE)
    s3_server.bucket("merges")
    return server | {key: value for key, value in os.environ.items() if key.startswith("AWS_")} | {"KUBECONFIG": str(kubeconfig)}


@pytest.fixture(scope="module")
def worker(k8s_env: dict[str, str], chart: dict[str, Any], tmp_path_factory) -> Iterator[dict[str, Any]]:
    """The Prefect Kubernetes worker as the chart's Deployment runs it (its arguments, its
    environment, its job template), through the image's entrypoint; no S3 credentials."""
    home = tmp_path_factory.mktemp("k8s-worker")
    template = home / "base-job-template.json"
    template.write_text(find(chart["manifests"], "ConfigMap", "-job-template")["data"]["base-job-template.json"])
    container = find(chart["manifests"], "Deployment", "-worker")["spec"]["template"]["spec"]["containers"][0]
    args = [str(template) if a == "/etc/mergefleet/base-job-template.json" else a for a in container["args"]]
    port = free_port()
    env = {k: v for k, v in k8s_env.items() if not k.startswith("AWS_")}
    env |= {item["name"]: item["value"] for item in container["env"]}
    env |= {"PREFECT_WORKER_WEBSERVER_HOST": "127.0.0.1", "PREFECT_WORKER_WEBSERVER_PORT": str(port),
            "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_HOME": str(home / "prefect"),
            "PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}"}  # the image's PATH starts with its venv
    log = home / "worker.log"
    with open(log, "w") as sink:
        process = subprocess.Popen([sys.executable, "-m", "orchestrator.cluster.entrypoint", *args], env=env,
                                   stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    api = env["PREFECT_API_URL"]

    try:
        wait_for(worker_online(api, POOL), "kubernetes worker start", 120, process, log)
        yield {"args": args, "env": env, "log": log, "process": process}
    finally:
        stop(process, WORKER_GRACE_S)


def as_kubernetes_keeps_it(job: dict[str, Any]) -> dict[str, Any]:
    """A Job as the API server stores it: without status, and without the two keys the Prefect
    worker demands in the pod template (``parallelism``, ``completions``), which Kubernetes drops."""
    manifest = json.loads(json.dumps({k: job[k] for k in ("apiVersion", "kind", "metadata", "spec")}))
    pod = manifest["spec"]["template"]["spec"]
    assert (pod.pop("parallelism"), pod.pop("completions")) == (1, 1)
    return manifest


def mergefleet(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MERGEFLEET, *args], env=env, capture_output=True, text=True, timeout=timeout)


def ok_json(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def deployed(k8s_env: dict[str, str], worker, family, tmp_path_factory) -> dict[str, str]:
    """`mergefleet deploy --pool` onto the kubernetes pool (merge-shard/POOL)."""
    base, experts = family
    recipe = write_recipe(tmp_path_factory.mktemp("deploy") / "r.yaml", gta_recipe("ties", base, experts))
    result = ok_json(mergefleet(k8s_env, "deploy", str(recipe), "s3://merges/nightly", "--pool", POOL, "--json"))
    assert result["merge_shard"] == result["merge_shard"] | {"name": f"merge-shard/{POOL}", "pool_type": "kubernetes"}
    return k8s_env


def _new_jobs(cluster: StandInCluster, before: set[str]) -> list[dict[str, Any]]:
    """The Jobs created since ``before`` (the names there were then)."""
    return [j for j in cluster.objects(JOBS) if j["metadata"]["name"] not in before]


def _finished_jobs(cluster: StandInCluster, before: set[str], timeout: float = 60) -> list[dict[str, Any]]:
    """The Jobs created since ``before``, once each has counted its pod's end. A Job counts it
    when the pod's process exits, which can be after the flow run in it reported its end
    (the process still shuts its interpreter down), as on a real cluster."""
    deadline = time.monotonic() + timeout
    while True:
        jobs = _new_jobs(cluster, before)
        if all(j["status"].get("failed", 0) + j["status"].get("succeeded", 0) for j in jobs) or time.monotonic() > deadline:
            return jobs
        time.sleep(0.2)


def _job_names(cluster: StandInCluster) -> set[str]:
    return {j["metadata"]["name"] for j in cluster.objects(JOBS)}


def test_a_merge_on_the_kubernetes_pool_gives_the_inline_bytes(deployed: dict[str, str], cluster: StandInCluster,
                                                               s3_server, family, tmp_path: Path) -> None:
    base, experts = family
    recipe = write_recipe(tmp_path / "recipe.yaml", gta_recipe("ties", base, experts) | {"fleet": {"shards": 2}})
    before = _job_names(cluster)
    remote = ok_json(mergefleet(deployed, "run", str(recipe), "s3://merges/k8s-run", "--target", "deployment",
                                "--work-pool", POOL, "--json"))
    inline = merge(parse_recipe(yaml.safe_load(recipe.read_text())), str(tmp_path / "inline"), workers=1)  # same bytes with any workers
    assert remote["plan_id"] == inline.plan_id and remote["shards"] == 2 and remote["target"] == "deployment"
    s3 = s3_server.client()
    local = checkpoint_bytes(tmp_path / "inline")
    assert local == {name: s3.get_object(Bucket="merges", Key=f"k8s-run/{name}")["Body"].read() for name in local}

    # One Job per shard, each from the chart's template as the worker rendered it for its flow run.
    jobs = _finished_jobs(cluster, before)
    # the flow run's name, "<plan id>-shard-0 (layers 0-1 + other)", as a label value: "<plan id>-shard-0-layers-0-1-other"
    names = sorted(j["metadata"]["labels"]["prefect.io/flow-run-name"] for j in jobs)
    assert [re.fullmatch(rf"{remote['plan_id'][:8]}-(shard-\d)-layers?-[0-9a-z-]+", name)[1] for name in names] == ["shard-0", "shard-1"], names
    for job in jobs:
        assert job["status"]["succeeded"] == 1
        assert job["spec"]["ttlSecondsAfterFinished"] == 600 and job["spec"]["backoffLimit"] == 0
        pod = job["spec"]["template"]["spec"]
        container = pod["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert pod["nodeSelector"] == {"pool": "gpu"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        assert {"secretRef": {"name": SECRET}} in container["envFrom"]
        assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]} and pod["securityContext"]["runAsNonRoot"]
        assert container["image"] == "registry.example/mergefleet:test"
        assert container["args"] == ["python", "-m", "prefect.engine"]  # the chart's command: one Python process
        assert SECRET_KEY not in json.dumps(job)  # credentials reach the pod only through the Secret
        validate(as_kubernetes_keeps_it(job))  # raises on a field or value Kubernetes would refuse


def test_a_pod_that_exits_non_zero_is_retried_by_the_flow(deployed: dict[str, str], cluster: StandInCluster,
                                                          family, tmp_path: Path) -> None:
    """The first pod of shard 1 is killed as it starts, at its first line of output (SIGKILL, exit
    code 137, as an OOM kill); the observer marks the run crashed and the flow runs the shard again."""
    base, experts = family
    data = gta_recipe("ties", base, experts) | {"fleet": {"shards": 2, "shard_retries": 1}}
    recipe = write_recipe(tmp_path / "recipe.yaml", data)
    out = tmp_path / "out"
    assert cluster.kubelet is not None

    def shard_1_begins(pod: dict[str, Any], line: str) -> bool:
        # its first line of output: the pod is starting, seconds before the shard is merged
        return "-shard-1-" in pod["metadata"]["labels"].get("prefect.io/flow-run-name", "")

    cluster.kubelet.kill_when = shard_1_begins
    before = _job_names(cluster)
    result = ok_json(mergefleet(deployed, "run", str(recipe), str(out), "--target", "deployment", "--work-pool", POOL, "--json"))
    assert len(cluster.kubelet.killed) == 1, "no pod was killed"
    assert result["shards"] == 2 and result["shards_skipped"] == 0
    jobs = _finished_jobs(cluster, before)
    shard1 = [j for j in jobs if "-shard-1-" in j["metadata"]["labels"]["prefect.io/flow-run-name"]]
    assert sorted((j["status"].get("failed", 0), j["status"].get("succeeded", 0)) for j in shard1) == [(0, 1), (1, 0)]
    killed = next(p for p in cluster.objects(PODS) if p["metadata"]["name"] == cluster.kubelet.killed[0])
    assert killed["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 137
    reference = tmp_path / "reference"
    merge(parse_recipe(data), str(reference), workers=1)
    assert checkpoint_bytes(out) == checkpoint_bytes(reference)


def test_a_job_that_never_starts_ends_the_flow_naming_the_job(deployed: dict[str, str], cluster: StandInCluster,
                                                              family, tmp_path: Path) -> None:
    """A deployment whose pods ask for a node pool that does not exist, with a start timeout of 15 s
    (which also bounds the worker's pickup: under load, 6 s did not always see the Job created)."""
    from prefect.deployments.runner import EntrypointType
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.merge_shard import merge_shard

    with temporary_settings(updates={PREFECT_API_URL: deployed["PREFECT_API_URL"]}):
        merge_shard.to_deployment(
            name="nowhere", work_pool_name=POOL, entrypoint_type=EntrypointType.MODULE_PATH,
            job_variables={"node_selector": {"pool": "a100-that-is-not-there"}, "pod_watch_timeout_seconds": 15},
        ).apply()
    base, experts = family
    data = gta_recipe("ties", base, experts) | {"fleet": {"target": "deployment", "shard_deployment": "merge-shard/nowhere"}}
    recipe = write_recipe(tmp_path / "recipe.yaml", data)
    started = time.monotonic()
    done = mergefleet(deployed, "run", str(recipe), str(tmp_path / "out"), timeout=90)
    assert done.returncode == 5, done.stderr[-3000:]
    error = done.stderr.strip().splitlines()[-1]
    jobs = [j for j in cluster.objects(JOBS) if j["spec"]["template"]["spec"]["nodeSelector"] == {"pool": "a100-that-is-not-there"}]
    assert len(jobs) == 1, error
    job = jobs[0]
    assert f"Kubernetes Job '{NAMESPACE}/{job['metadata']['name']}' did not start within 15 s" in error
    assert "kubectl -n mergefleet describe job" in error
    assert "the cluster says: Pod is unschedulable" in error and "didn't match Pod's node affinity/selector" in error
    assert time.monotonic() - started < 120
    pod = next(p for p in cluster.objects(PODS) if p["metadata"]["labels"].get("job-name") == job["metadata"]["name"])
    assert pod["status"]["phase"] == "Pending" and pod["status"]["conditions"][0]["reason"] == "Unschedulable"


# ---------------------------------------------------------------- mergefleet cluster check / create-pool


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """`mergefleet ARGS` in this process (its main(), as the console script calls it), pointed
    at the module's Prefect server and the stand-in cluster; returns (exit code, stdout, stderr)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from mergefleet import cli as command_line

    def run(env: dict[str, str], *args: str) -> tuple[int, str, str]:
        monkeypatch.setenv("PREFECT_API_URL", env["PREFECT_API_URL"])
        capsys.readouterr()
        with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
            code = command_line.main([*args, "--kubeconfig", env["KUBECONFIG"]])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def check(cli: Callable[..., tuple[int, str, str]], env: dict[str, str], *args: str) -> tuple[int, dict[str, Any], str]:
    code, out, err = cli(env, "cluster", "check", "--namespace", NAMESPACE, "--pool", POOL, "--secret", SECRET, "--json", *args)
    return code, json.loads(out), err


def failed(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f["check"]: f for f in result["findings"] if not f["ok"] and f["blocking"]}


def test_cluster_check_passes_on_a_ready_cluster_and_the_worker_answers_its_healthcheck(cli, deployed: dict[str, str], worker) -> None:
    code, result, stderr = check(cli, deployed)
    assert code == 0 and result["ok"], stderr + json.dumps(result, indent=1)
    messages = {f["check"]: f["message"] for f in result["findings"]}
    assert "1 node(s) matching nodeSelector {'pool': 'gpu'} with nvidia.com/gpu, 4 in all" in messages["gpu nodes"]
    assert "last heartbeat" in messages["worker heartbeat"]
    assert entrypoint.healthcheck(["python", *worker["args"]], worker["env"]) == 0  # the image's HEALTHCHECK


def test_cluster_check_reports_each_problem_with_its_fix(deployed: dict[str, str], cluster: StandInCluster, cli) -> None:
    assert cluster.api is not None
    code, result, stderr = check(cli, deployed, "--secret", "no-such-secret")
    assert code == 10 and set(failed(result)) == {"s3 secret"}
    assert "kubectl -n mergefleet create secret generic no-such-secret" in failed(result)["s3 secret"]["fix"]
    assert "problem(s) would stop a merge" in stderr

    cluster.api.denied_verbs = {("create", "jobs")}
    try:
        code, result, _ = check(cli, deployed)
    finally:
        cluster.api.denied_verbs = set()
    assert code == 10 and set(failed(result)) == {"rbac: create jobs"}
    assert "service account 'mergefleet-worker' may not create jobs" in failed(result)["rbac: create jobs"]["message"]

    cluster.api.review_status = 403
    try:
        code, result, _ = check(cli, deployed)
    finally:
        cluster.api.review_status = 201
    assert code == 10 and "403 Forbidden" in failed(result)["rbac"]["message"]

    # A second pool, registered from the chart's ConfigMap in the cluster, has no worker.
    code, out, _ = cli(deployed, "cluster", "create-pool", "--namespace", NAMESPACE, "--pool", "idle", "--json")
    created = json.loads(out)
    assert code == 0
    assert created == created | {"action": "created", "type": "kubernetes", "template_source": "configmap mergefleet/mergefleet-job-template"}
    code, result, _ = check(cli, deployed, "--pool", "idle")
    assert code == 10 and set(failed(result)) == {"worker heartbeat"}
    assert "no worker has ever sent a heartbeat for pool 'idle'" in failed(result)["worker heartbeat"]["message"]


def test_cluster_check_without_gpu_nodes(deployed: dict[str, str], tmp_path: Path, cli) -> None:
    with StandInCluster(_image(), tmp_path) as cpu_only:
        cpu_only.add_namespace(NAMESPACE)
        cpu_only.add_node("cpu-node-0", labels={"pool": "gpu"})
        env = deployed | {"KUBECONFIG": str(cpu_only.write_kubeconfig(tmp_path / "config", NAMESPACE))}
        code, result, _ = check(cli, env, "--configmap", "absent")
    problems = failed(result)
    assert code == 10 and {"gpu nodes", "s3 secret", "endpoints configmap"} <= set(problems)
    assert "no node matching nodeSelector {'pool': 'gpu'} has allocatable nvidia.com/gpu" in problems["gpu nodes"]["message"]
    assert "NVIDIA device plugin" in problems["gpu nodes"]["fix"]


def test_create_pool_from_a_rendered_file_updates_an_existing_pool(deployed: dict[str, str], chart: dict[str, Any], tmp_path: Path,
                                                                   cli) -> None:
    configmap = find(chart["manifests"], "ConfigMap", "-job-template")
    file = tmp_path / "job-template.yaml"
    file.write_text(yaml.safe_dump(configmap))
    code, out, _ = cli(deployed, "cluster", "create-pool", "--template", str(file), "--json")
    result = json.loads(out)
    assert code == 0
    assert result["pool"] == POOL and result["action"] == "updated"
    pool = httpx.get(f"{deployed['PREFECT_API_URL']}/work_pools/{POOL}", timeout=10).json()
    assert pool["base_job_template"] == json.loads(configmap["data"]["base-job-template.json"])
    code, _, err = cli(deployed, "cluster", "create-pool", "--template", str(file), "--no-update")
    assert code == 10 and "leave out --no-update" in err
