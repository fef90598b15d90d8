"""A schedule that really fires: a real `prefect server` whose scheduler loop is shortened
through Prefect's own settings (tests/prefect_services.py), `mergefleet deploy --interval`
as a user runs it, a real process worker, and nothing triggered by hand.

The cycle: the first scheduled run merges; the next finds nothing changed and ends
Completed, named Skipped; while an input is missing a run fails, says why in its state
message and leaves the merge in place; the input back and another one changed, the next
run merges again. Runs never overlap, and each merge is recorded in the MLflow store that
`deploy` fixed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from tests.helpers import MERGEFLEET, gta_recipe, write_recipe
from tests.prefect_services import BIN, process_worker

pytestmark = pytest.mark.slow

POOL = "schedule-pool"
INTERVAL_S = 5
WAIT_S = 240  # at most, for one scheduled run to start and finish (a busy 2-core machine is slow)
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@pytest.fixture(scope="module")
def services(real_prefect_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, str], Path, Path]]:
    """The session's server (its scheduler loop shortened) and a worker on POOL; yields the
    environment and the two logs."""
    env, server_log = real_prefect_server
    worker_log = tmp_path_factory.mktemp("schedule-worker") / "worker.log"
    with process_worker(env, POOL, worker_log):
        yield env, server_log, worker_log


class Runs:
    """The scheduled runs of one deployment, read from the server's API."""

    def __init__(self, env: dict[str, str], deployment: str, logs: tuple[Path, Path]) -> None:
        self.api, self.deployment, self.logs = env["PREFECT_API_URL"], deployment, logs

    def all(self) -> list[dict]:
        body = {"deployments": {"name": {"any_": [self.deployment]}}, "sort": "EXPECTED_START_TIME_ASC"}
        return httpx.post(f"{self.api}/flow_runs/filter", json=body, timeout=30).json()

    def polled(self) -> list[dict]:
        """``all``, or nothing yet when the server is too busy to answer this poll in time (a
        loaded 2-core machine stalled it past 10 s once); the caller's deadline still holds."""
        try:
            return self.all()
        except httpx.TimeoutException:
            return []

    def next_finished(self, started_after: datetime) -> dict:
        """The first run that started after ``started_after`` and finished; fails with the
        server's and the worker's own logs when none does in time."""
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            for run in self.polled():
                started = run["start_time"] and datetime.fromisoformat(run["start_time"])
                if started and started > started_after and run["state_type"] in FINAL:
                    return run
            time.sleep(0.5)
        server, worker = (log.read_text()[-2500:] for log in self.logs)
        summary = [(r["name"], r["state_name"], r["expected_start_time"], r["start_time"]) for r in self.all()]
        pytest.fail(
            f"no scheduled run of {self.deployment} started after {started_after} and finished within {WAIT_S} s; "
            f"runs: {summary}\n--- server log ---\n{server}\n--- worker log ---\n{worker}"
        )


def manifest_plan(out: Path) -> str:
    return json.loads((out / "mergefleet.json").read_text())["plan_id"]


def test_scheduled_runs_merge_skip_merge_again_and_survive_a_failure(services, family, tmp_path: Path) -> None:
    env, server_log, worker_log = services
    base, experts = family
    models = tmp_path / "models"
    base, *experts = [Path(shutil.copytree(p, models / p.name)) for p in [base, *experts]]
    recipe = write_recipe(tmp_path / "scheduled.yaml", gta_recipe("ties", base, experts))
    out = tmp_path / "merged"
    began = datetime.now(timezone.utc)
    done = subprocess.run(
        [*MERGEFLEET, "deploy", str(recipe), str(out), "--pool", POOL, "--interval", str(INTERVAL_S), "--json"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["merge_and_eval"]["name"] == "merge-and-eval/scheduled"
    runs = Runs(env, "scheduled", (server_log, worker_log))

    first = runs.next_finished(began)
    assert (first["state_type"], first["state_name"]) == ("COMPLETED", "Completed"), first["state"]
    assert first["auto_scheduled"] and first["created_by"]["type"] == "SCHEDULE"  # fired by the schedule
    merged_plan = manifest_plan(out)

    second = runs.next_finished(datetime.fromisoformat(first["end_time"]))
    assert (second["state_type"], second["state_name"]) == ("COMPLETED", "Skipped"), second["state"]
    assert second["state"]["message"] == f"nothing changed since the last successful merge into {out}"

    hidden = experts[1].with_name("away")
    experts[1].rename(hidden)  # an input goes missing for a while
    failed = runs.next_finished(datetime.now(timezone.utc))
    assert failed["state_type"] == "FAILED" and str(experts[1]) in failed["state"]["message"], failed["state"]
    assert manifest_plan(out) == merged_plan  # the failed run took nothing away

    hidden.rename(experts[1])
    weights = next(experts[0].glob("*.safetensors"))
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # and an expert has a new version
    again = runs.next_finished(datetime.now(timezone.utc))
    assert (again["state_type"], again["state_name"]) == ("COMPLETED", "Completed"), again["state"]
    remerged_plan = manifest_plan(out)
    assert remerged_plan != merged_plan
    spans = sorted((datetime.fromisoformat(r["start_time"]), datetime.fromisoformat(r["end_time"])) for r in runs.all() if r["end_time"])
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))  # one run at a time

    store = env["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///")  # the store `deploy` fixed for its runs
    with contextlib.closing(sqlite3.connect(store)) as db:
        recorded = {value for (value,) in db.execute("SELECT value FROM tags WHERE key = 'mergefleet.plan_id'")}
    assert {merged_plan, remerged_plan} <= recorded
