"""A real `prefect server` and a real process worker on 127.0.0.1, for the tests that need
them. Each runs in its own process group with PREFECT_HOME in a temporary folder and is
stopped with SIGINT (SIGKILL if it lingers); its output goes to a log file that a failing
wait shows."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import httpx

BIN = Path(sys.executable).parent

# The one server of the test session (conftest.py: real_prefect_server). Its scheduler loop
# is shortened through Prefect's own settings, so that a schedule fires within seconds
# (tests/test_schedule_fires.py); nothing else there has a schedule that comes due.
SERVER_SETTINGS = {
    "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "1",
    "PREFECT_SERVER_SERVICES_SCHEDULER_MIN_RUNS": "1",
    "PREFECT_SERVER_SERVICES_SCHEDULER_MAX_RUNS": "2",
    "PREFECT_SERVER_SERVICES_SCHEDULER_MIN_SCHEDULED_TIME": "PT0S",
    "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "2",
    "PREFECT_SERVER_DATABASE_TIMEOUT": "30",  # SQLite waits longer for its lock on a loaded machine
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


WORKER_GRACE_S = 5
"""How long a stopping worker gets before SIGKILL. When the suite runs as a background job
(`make test &`), its children start with SIGINT ignored; Prefect's worker answers SIGINT and
SIGTERM by sending itself that ignored SIGINT and runs on, so a longer wait only slows the
suite. A worker holds nothing of a merge that a kill could lose."""


def stop(process: subprocess.Popen, timeout: float = 30) -> None:
    """SIGINT to the process group, then SIGKILL if it is still there after ``timeout``."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # whatever of the group is left
    except ProcessLookupError:
        pass
    process.wait(timeout=10)


def wait_for(check: Callable[[], bool], what: str, timeout: float, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what}: the process exited ({process.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not happen within {timeout} s:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def prefect_server(home: Path, **settings: str) -> Iterator[tuple[dict[str, str], Path]]:
    """A Prefect server with ``settings`` (PREFECT_* variables); yields the environment that
    points a process at it and the server's log."""
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env |= {
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",  # one store for every merge here
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
    } | settings
    log = home / "server.log"
    with open(log, "w") as sink:
        process = subprocess.Popen(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
        )
    api = f"http://127.0.0.1:{port}/api"
    try:
        wait_for(lambda: httpx.get(f"{api}/health", timeout=2).status_code == 200, "server start", 120, process, log)
        yield env | {"PREFECT_API_URL": api, "PREFECT_WORKER_QUERY_SECONDS": "1"}, log
    finally:
        stop(process)


def worker_online(api: str, pool: str) -> Callable[[], bool]:
    """A check for ``wait_for``: a worker of ``pool`` reports ONLINE."""

    def online() -> bool:
        workers = httpx.post(f"{api}/work_pools/{pool}/workers/filter", json={}, timeout=2)
        return workers.status_code == 200 and any(w["status"] == "ONLINE" for w in workers.json())

    return online


@contextlib.contextmanager
def process_worker(env: dict[str, str], pool: str, log: Path) -> Iterator[subprocess.Popen]:
    """A process worker on ``pool`` (it creates the pool), online when this yields."""
    with open(log, "w") as sink:
        process = subprocess.Popen(
            [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process"],
            env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        wait_for(worker_online(env["PREFECT_API_URL"], pool), "worker start", 90, process, log)
        yield process
    finally:
        stop(process, WORKER_GRACE_S)


@contextlib.contextmanager
def shard_starter(env: dict[str, str], path: Path, log: Path) -> Iterator[subprocess.Popen]:
    """`python -m flows.prestart serve PATH` (flows/prestart.py), accepting when this yields."""
    with open(log, "w") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "flows.prestart", "serve", str(path)],
            env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        wait_for(path.exists, "shard starter", 90, process, log)
        yield process
    finally:
        stop(process)
