"""What one more pod buys: the same merge with 1, 2, 4 and 8 shards on a process work pool.

Starts the local stack (infra/stack.sh: S3, MLflow, Prefect server, a process worker and
its shard starter on 127.0.0.1, in a temporary state folder), registers merge-shard on its pool, then runs
`mergefleet run --target deployment --shards N` for each N and reads the Prefect API's
run timestamps and state histories and the shards' receipts. Per shard count it prints:

- flow->ckpt: seconds from the flow's start to the assembled checkpoint;
- per shard, averaged over the shards: `create` (the parent's task starts -> its flow run
  exists), `pickup` (flow run created -> Pending: the worker's poll and submission),
  `start` (Pending -> Running: the client's start, the fork, loading the flow), `in-run`
  (Running -> done, less the receipt's merge seconds: plan load, receipt write, state
  reports), `notice` (shard done -> the parent's task sees it), and `overhead` = the
  parent task's wall time less the receipt's seconds (all of the above);
- fixed: the flow's time outside the shards (plan, assemble, track);
- 503s: how many requests the Prefect server answered with 503 during the merge (on SQLite,
  "database is locked" when two writes meet; Prefect's client asks again 2 s later);
- forked: how many of the shards' flow runs started as forks of the starter (the others
  started afresh, as `python -m prefect.engine`: see flows/prestart.py for when);
- the projection at 8 pods with 60 s of compute per shard: one pod doing the 8 shards'
  work (8 x 60 s + one overhead) against 8 pods (60 s + one overhead), both plus the fixed
  part; efficiency = speed-up / 8. The goal: overhead < 2 s per shard. It is projected
  twice: with the overhead measured at 1 shard (a pod has its CPUs to itself) and with the
  overhead measured at the largest shard count, where N shard processes, the parent and
  the Prefect server share this machine's CPUs (an upper bound, not what pods see).

It also times, in a fresh process, what a shard process would import without the starter
(Prefect's engine, torch, the shard flow), wall and CPU seconds: the starter
(flows/prestart.py) imports them once, and each shard is a fork of it.

    python bench/bench_scaleout.py                     # 1,2,4,8 shards, worker polls every 1 s
    python bench/bench_scaleout.py --query-seconds 5   # as a chart with worker.querySeconds 5
    python bench/bench_scaleout.py --database postgres # the Prefect server on PostgreSQL (initdb, pg_ctl on PATH)

The inputs are small on purpose (the merge itself takes little time): what is measured
is what the orchestration costs.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import httpx
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from mergefleet.fixtures.synthetic import LlamaShape, make_model_family  # noqa: E402

MERGEFLEET = [sys.executable, "-m", "mergefleet"]
COMPUTE_S = 60.0
PODS = 8


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _time(value: str | None) -> datetime.datetime:
    assert value, "a run without this timestamp"
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))


def _seconds(start: str | None, end: str | None) -> float:
    return (_time(end) - _time(start)).total_seconds()


RETRYABLE = "Encountered retryable exception in request"
"""What the Prefect server logs for each 503 it answers, with PREFECT_API_LOG_RETRYABLE_ERRORS=true."""


def _answered_503(server_log: Path) -> int:
    return server_log.read_text(errors="replace").count(RETRYABLE) if server_log.exists() else 0


def measure(env: dict[str, str], recipe: Path, out: Path, shards: int, stack: Path) -> dict[str, float]:
    before = _answered_503(stack / "prefect.log")
    done = subprocess.run(
        [*MERGEFLEET, "run", str(recipe), str(out), "--target", "deployment", "--shards", str(shards), "--json"],
        env=env, capture_output=True, text=True, timeout=900,
    )
    if done.returncode != 0:
        raise SystemExit(f"mergefleet run failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout)
    api = env["PREFECT_API_URL"]
    body = {"flow_runs": {"parent_flow_run_id": {"any_": [result["flow_run_id"]]}}}
    runs = [r for r in httpx.post(f"{api}/flow_runs/filter", json={"limit": 200} | body, timeout=30).json()
            if (r["parameters"].get("plan") or {}).get("uri") == f"{out}/.mergefleet/plan.json"]
    children = [r for r in runs if r["state_type"] == "COMPLETED"]  # a shard run again after a crash counts once
    assert sorted(r["parameters"]["index"] for r in children) == list(range(shards)), "a shard without a completed run"
    # Each child flow run's parent is the placeholder task run that run_deployment creates,
    # whose `__parents__` input is the shard task (merge-shard-on-pool) that called it: the
    # task's name carries its layer range, so the link, not the name, finds a shard's task.
    task_runs = {t["id"]: t for t in httpx.post(f"{api}/task_runs/filter", timeout=30, json={
        "limit": 200, "flow_runs": {"id": {"any_": [result["flow_run_id"]]}}}).json()}

    def shard_task(run: dict) -> dict:
        placeholder = task_runs[run["parent_task_run_id"]]
        (parent,) = placeholder["task_inputs"]["__parents__"]
        return task_runs[parent["id"]]

    def pending(run: dict) -> str:
        states = httpx.get(f"{api}/flow_run_states/", params={"flow_run_id": run["id"]}, timeout=30).json()
        return min(state["timestamp"] for state in states if state["type"] == "PENDING")

    rows = []
    for run in children:
        index = run["parameters"]["index"]
        receipt = json.loads((out / ".mergefleet" / f"shard-{index}.json").read_text())
        task = shard_task(run)
        assert "merge_shard_on_pool" in task["task_key"], f"shard {index}: its flow run's parent task is {task['task_key']}"
        rows.append({
            "pickup": _seconds(run["created"], pending(run)),
            "start": _seconds(pending(run), run["start_time"]),
            "in_run": _seconds(run["start_time"], run["end_time"]) - receipt["seconds"],
            "notice": _seconds(run["end_time"], task["end_time"]),
            "create": _seconds(task["start_time"], run["created"]),
            "overhead": _seconds(task["start_time"], task["end_time"]) - receipt["seconds"],
            "compute": receipt["seconds"],
            "task": _seconds(task["start_time"], task["end_time"]),
        })
    per_shard = {key: statistics.fmean(row[key] for row in rows) for key in rows[0]}
    fixed = result["seconds"] - max(row["task"] for row in rows)
    started = (stack / "prestart.log").read_text() if (stack / "prestart.log").exists() else ""
    forked = sum(f"flow run {run['id']} is pid" in started for run in children)  # the rest started afresh
    return {"shards": shards, "flow_to_ckpt": result["seconds"], "fixed": fixed, "retried": len(runs) - shards,
            "forked": forked, "answered_503": _answered_503(stack / "prefect.log") - before, **per_shard}


IMPORTS = """
import json, resource, time
def mark():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), usage.ru_utime + usage.ru_stime
marks = [mark()]
import prefect.engine, prefect.flow_engine
marks.append(mark())
import torch
marks.append(mark())
import flows.merge_shard
marks.append(mark())
names = ["prefect engine", "torch", "the shard flow (mergefleet)"]
print(json.dumps({name: [b[0] - a[0], b[1] - a[1]] for name, a, b in zip(names, marks, marks[1:])}))
"""


def import_seconds(env: dict[str, str]) -> dict[str, list[float]]:
    """What a fresh shard process spends importing, in the order the engine does: Prefect's
    engine, then the flow's module (torch, then mergefleet); [wall, CPU] seconds each."""
    done = subprocess.run([sys.executable, "-c", IMPORTS], env=env, capture_output=True, text=True, timeout=300, check=True)
    return json.loads(done.stdout)


def project(overhead: float, fixed: float) -> tuple[float, float]:
    """Speed-up and efficiency of 8 pods over one at 60 s of compute per shard."""
    serial = PODS * COMPUTE_S + overhead + fixed
    parallel = COMPUTE_S + overhead + fixed
    return serial / parallel, serial / parallel / PODS


@contextlib.contextmanager
def postgres(folder: Path) -> Iterator[str]:
    """A PostgreSQL server on 127.0.0.1 in ``folder`` (as the chart's ``prefect.server.databaseSecret``
    points the Prefect server at one); yields the Prefect server's database URL."""
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if not (initdb and pg_ctl):
        raise SystemExit("--database postgres needs PostgreSQL's initdb and pg_ctl on PATH")
    as_owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []  # PostgreSQL refuses to run as root
    folder.mkdir()
    if as_owner:
        folder.parent.chmod(0o755)
        shutil.chown(folder, "postgres")
    data, port = folder / "data", _port()
    subprocess.run([*as_owner, initdb, "-D", str(data), "-U", "prefect", "--auth=trust"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run([*as_owner, pg_ctl, "-D", str(data), "-l", str(folder / "postgres.log"), "-w", "start",
                    "-o", f"-h 127.0.0.1 -p {port} -k {folder}"], check=True, stdout=subprocess.DEVNULL)
    try:
        yield f"postgresql+asyncpg://prefect@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_owner, pg_ctl, "-D", str(data), "-m", "fast", "stop"], stdout=subprocess.DEVNULL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shard-counts", default="1,2,4,8")
    parser.add_argument("--query-seconds", type=float, default=1.0, help="the worker's PREFECT_WORKER_QUERY_SECONDS")
    parser.add_argument("--database", choices=["sqlite", "postgres"], default="sqlite",
                        help="the Prefect server's database: SQLite as infra/stack.sh starts it, or a PostgreSQL started here")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    counts = [int(n) for n in args.shard_counts.split(",")]

    with tempfile.TemporaryDirectory(prefix="mergefleet-scaleout-") as tmp, contextlib.ExitStack() as services:
        work = Path(tmp)
        database = {}
        if args.database == "postgres":
            database = {"PREFECT_API_DATABASE_CONNECTION_URL": services.enter_context(postgres(work / "postgres"))}
        base, experts = make_model_family(
            work / "models", experts=2, shape=LlamaShape(hidden=256, layers=max(counts), intermediate=704, vocab=512, heads=8, kv_heads=4),
            dtype=torch.float32, seed=5,
        )
        recipe = work / "recipe.yaml"
        models = [{"model": str(base)}] + [{"model": str(e), "parameters": {"weight": 0.5, "density": 0.5}} for e in experts]
        recipe.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": str(base), "models": models,
                                          "fleet": {"work_pool": "scaleout"}}))
        ports = {"S3_PORT": _port(), "MLFLOW_PORT": _port(), "PREFECT_PORT": _port()}
        stack_env = os.environ | {key: str(value) for key, value in ports.items()} | {
            "POOL": "scaleout", "PYTHON": sys.executable, "MERGEFLEET_STACK_DIR": str(work / "stack"),
            "PREFECT_WORKER_QUERY_SECONDS": str(args.query_seconds), "PYTHONPATH": str(ROOT),
            "PREFECT_API_LOG_RETRYABLE_ERRORS": "true",
        } | database
        stack = [str(ROOT / "infra" / "stack.sh")]
        subprocess.run([*stack, "up"], env=stack_env, check=True, stdout=subprocess.DEVNULL)
        try:
            env = {k: v for k, v in stack_env.items() if not k.startswith(("AWS_", "PREFECT_", "MLFLOW_"))} | {
                "PREFECT_API_URL": f"http://127.0.0.1:{ports['PREFECT_PORT']}/api",
                "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{ports['MLFLOW_PORT']}",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            }
            subprocess.run([*MERGEFLEET, "deploy", str(recipe), str(work / "deployed"), "--pool", "scaleout", "--json"],
                           env=env, check=True, stdout=subprocess.DEVNULL)
            rows = [measure(env, recipe, work / f"out-{n}", n, work / "stack") for n in counts]
            imports = import_seconds(env)
        finally:
            subprocess.run([*stack, "down"], env=stack_env, stdout=subprocess.DEVNULL)

    print(f"process pool on 127.0.0.1, Prefect server on {args.database}, worker polls every {args.query_seconds:g} s, "
          f"{os.cpu_count()} CPUs (a shared machine)")
    print(f"{'shards':>6}{'flow->ckpt s':>14}{'compute s':>11}{'create s':>10}{'pickup s':>10}{'start s':>9}{'in-run s':>10}"
          f"{'notice s':>10}{'overhead s':>12}{'fixed s':>9}{'speed-up@8':>12}{'eff.':>7}{'retried':>9}{'503s':>6}{'forked':>8}")
    for row in rows:
        row["speedup_at_8"], row["efficiency_at_8"] = project(row["overhead"], row["fixed"])
        print(f"{row['shards']:>6}{row['flow_to_ckpt']:>14.2f}{row['compute']:>11.2f}{row['create']:>10.2f}{row['pickup']:>10.2f}"
              f"{row['start']:>9.2f}{row['in_run']:>10.2f}{row['notice']:>10.2f}{row['overhead']:>12.2f}{row['fixed']:>9.2f}"
              f"{row['speedup_at_8']:>11.2f}x{row['efficiency_at_8']:>7.0%}{row['retried']:>9}{row['answered_503']:>6}{row['forked']:>6}/{row['shards']}")
    parts = ", ".join(f"{name} {wall:.2f} s ({cpu:.2f} CPU-s)" for name, (wall, cpu) in imports.items())
    print(f"a shard process started afresh would import {parts}; the starter imported them once")
    alone, most = rows[0], rows[-1]
    for row, conditions in ((alone, "one shard process at a time"), (most, f"{most['shards']} shard processes on {os.cpu_count()} CPUs")):
        verdict = "meets" if row["overhead"] < 2.0 else "misses"
        print(f"at {row['shards']} shard(s), {conditions}: {row['overhead']:.2f} s of orchestration per shard ({verdict} the goal "
              f"of < 2 s); 8 pods x {COMPUTE_S:.0f} s shards would run {row['speedup_at_8']:.2f}x faster than one "
              f"({row['efficiency_at_8']:.0%} efficiency)")
    if args.json:
        print(json.dumps({"rows": rows, "imports": imports}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
