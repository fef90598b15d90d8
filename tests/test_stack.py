"""infra/stack.sh as a user runs it: `up` on ports of its own, `status`, the UI's API
address, `down`; the five services start, answer, and stop without leaving a process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.prefect_services import free_port, worker_online

pytestmark = pytest.mark.slow

STACK = Path(__file__).resolve().parent.parent / "infra" / "stack.sh"
SERVICES = ["s3", "mlflow", "prefect", "prestart", "worker"]


def stack(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(STACK), *args], env=env, capture_output=True, text=True, timeout=300)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_the_stack_comes_up_on_its_own_ports_and_goes_down_leaving_no_process(tmp_path: Path) -> None:
    ports = {"S3_PORT": free_port(), "MLFLOW_PORT": free_port(), "PREFECT_PORT": free_port()}
    state = tmp_path / "stack"
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PREFECT_", "AWS_", "MLFLOW_"))} | {
        key: str(port) for key, port in ports.items()
    } | {"MERGEFLEET_STACK_DIR": str(state), "PYTHON": sys.executable, "POOL": "stack-test",
         "PREFECT_API_URL": "http://127.0.0.1:1/api"}  # a leftover from another stack in the user's shell
    pids: list[int] = []
    try:
        up = stack(env, "up")
        leaders = [int((state / f"{name}.pid").read_text()) for name in SERVICES if (state / f"{name}.pid").exists()]
        assert up.returncode == 0, up.stdout + up.stderr
        assert len(leaders) == len(SERVICES), up.stdout
        pids = leaders + [child.pid for pid in leaders for child in psutil.Process(pid).children(recursive=True)]
        status = stack(env, "status")
        assert status.returncode == 0 and all(f"{name}: up" in status.stdout for name in SERVICES), status.stdout

        exported = (state / "env.sh").read_text()
        assert f"export PREFECT_API_URL=http://127.0.0.1:{ports['PREFECT_PORT']}/api" in exported
        assert f"export AWS_ENDPOINT_URL=http://127.0.0.1:{ports['S3_PORT']}" in exported
        # the browser's UI asks the stack's server, not Prefect's default port or the shell's leftover
        ui = httpx.get(f"http://127.0.0.1:{ports['PREFECT_PORT']}/ui-settings", timeout=10).json()
        assert ui["api_url"] == f"http://127.0.0.1:{ports['PREFECT_PORT']}/api", ui
        online = worker_online(f"http://127.0.0.1:{ports['PREFECT_PORT']}/api", "stack-test")
        deadline = time.monotonic() + 90
        while not online() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert online(), (state / "worker.log").read_text()[-2000:]
        pool = httpx.get(f"http://127.0.0.1:{ports['PREFECT_PORT']}/api/work_pools/stack-test", timeout=10).json()
        assert pool["type"] == "process"
        assert pool["base_job_template"]["variables"]["properties"]["command"]["default"].endswith("-m flows.prestart")
    finally:
        down = stack(env, "down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert all(f"{name}: stopped" in down.stdout for name in SERVICES), down.stdout
    assert not [pid for pid in pids if alive(pid)], down.stdout
    assert not list(state.glob("*.pid"))
    assert (state / "prefect.log").exists()  # `down` keeps the data and logs; `down --purge` removes them
    # SIGINT reached the worker (a script's background jobs would ignore it): it stopped, not killed
    assert "stopped!" in (state / "worker.log").read_text(), (state / "worker.log").read_text()[-2000:]
    purged = stack(env, "down", "--purge")
    assert purged.returncode == 0 and not state.exists(), purged.stdout
