"""The shard starter (flows/prestart.py) with real processes: the client as a work pool
runs it, Prefect's engine in the forked child. No Prefect server is needed: the engine's
own failures (a malformed flow run id; an API that never answers) are enough to see
whose streams, settings and signals the child has. The merge through a real worker and
starter is in tests/test_flows_integration.py."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator

import psutil
import pytest

from flows.prestart import SOCKET_VARIABLE
from tests.prefect_services import shard_starter

pytestmark = pytest.mark.slow
ENGINE_ERROR = "Invalid flow run id"


def starter_env(folder: Path) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")} | {"PREFECT_HOME": str(folder / "home")}


@contextlib.contextmanager
def hangups(disposition: signal.Handlers) -> Iterator[None]:
    """Processes started in the block inherit this SIGHUP disposition (an ignored signal stays
    ignored across exec, as nohup relies on)."""
    previous = signal.signal(signal.SIGHUP, disposition)
    try:
        yield
    finally:
        signal.signal(signal.SIGHUP, previous)


@pytest.fixture(scope="module")
def starter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[psutil.Process, Path, Path]]:
    """A starter that ignores hangups, as one started under nohup: its flow runs must take the
    client's dispositions, not its own."""
    folder = tmp_path_factory.mktemp("starter")
    with contextlib.ExitStack() as stack:
        with hangups(signal.SIG_IGN):
            process = stack.enter_context(shard_starter(starter_env(folder), folder / "starter.sock", folder / "starter.log"))
        yield psutil.Process(process.pid), folder / "starter.sock", folder / "starter.log"


def client_env(socket_path: Path | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != SOCKET_VARIABLE}
    return env | ({SOCKET_VARIABLE: str(socket_path)} if socket_path else {}) | extra


def run_client(env: dict[str, str], *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flows.prestart", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


def children_started(log: Path) -> list[int]:
    return [int(pid) for pid in re.findall(r"is pid (\d+)", log.read_text())]


@pytest.fixture
def silent_api() -> Iterator[str]:
    """An API address that accepts connections and never answers: the engine waits on it."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/api"


def test_the_flow_run_is_a_child_of_the_starter_with_the_clients_streams_and_settings(starter, tmp_path: Path) -> None:
    process, path, log = starter
    before = children_started(log)
    done = run_client(client_env(path), "not-a-flow-run-id", cwd=tmp_path)
    assert done.returncode == 1 and ENGINE_ERROR in done.stderr and "not-a-flow-run-id" in done.stderr, done.stderr
    started = children_started(log)[len(before):]
    assert len(started) == 1 and re.search(rf"pid {started[0]} ended with status 1", log.read_text())
    assert ENGINE_ERROR not in log.read_text()  # the child wrote to the client's stderr, not the starter's

    quiet = run_client(client_env(path, PREFECT_LOGGING_LEVEL="CRITICAL"), "not-a-flow-run-id", cwd=tmp_path)
    assert quiet.returncode == 1 and ENGINE_ERROR not in quiet.stderr, quiet.stderr  # Prefect read the client's environment
    assert len(children_started(log)) == len(before) + 2


def test_without_a_starter_the_client_becomes_the_engine(starter, tmp_path: Path) -> None:
    process, path, log = starter
    before = children_started(log)
    quiet = run_client(client_env(None), "not-a-flow-run-id", cwd=tmp_path)  # no starter asked for: no word about it
    assert quiet.returncode == 1 and ENGINE_ERROR in quiet.stderr and "prestart" not in quiet.stderr, quiet.stderr
    nobody = tmp_path / "nobody.sock"
    told = run_client(client_env(nobody), "not-a-flow-run-id", cwd=tmp_path)
    assert told.returncode == 1 and ENGINE_ERROR in told.stderr
    assert f"mergefleet prestart: no starter answers on {nobody} (No such file or directory); starting the engine here" in told.stderr
    assert children_started(log) == before


def test_a_socket_path_too_long_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / ("s" * 120)
    done = subprocess.run([sys.executable, "-m", "flows.prestart", "serve", str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert f"cannot listen on {path}." in done.stderr and "shorter than 108 bytes" in done.stderr


def test_source_changed_since_the_starter_imported_it_is_refused_and_run_here(starter, tmp_path: Path) -> None:
    process, path, log = starter
    before = children_started(log)
    module = Path(__file__).resolve().parents[1] / "orchestrator" / "memory.py"  # the starter imported it
    times = module.stat()
    os.utime(module, ns=(times.st_atime_ns, times.st_mtime_ns + 1_000_000_000))
    try:
        done = run_client(client_env(path), "not-a-flow-run-id", cwd=tmp_path)
    finally:
        os.utime(module, ns=(times.st_atime_ns, times.st_mtime_ns))
    assert done.returncode == 1 and ENGINE_ERROR in done.stderr
    assert "orchestrator/memory.py changed after the starter imported it (restart the starter)" in done.stderr
    assert children_started(log) == before


def waiting_flow_run(path: Path, log: Path, api: str, cwd: Path) -> tuple[subprocess.Popen[str], psutil.Process]:
    """A client whose flow run (a child of the starter) waits on ``api``, which never answers."""
    count = len(children_started(log))
    with hangups(signal.SIG_DFL):  # whether or not this test runs under nohup
        client = subprocess.Popen([sys.executable, "-m", "flows.prestart", str(uuid.uuid4())], env=client_env(path, PREFECT_API_URL=api),
                                  cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while len(children_started(log)) <= count:
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    return client, psutil.Process(children_started(log)[count])


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_to_the_client_reaches_the_flow_run_and_its_end_comes_back(starter, silent_api: str, tmp_path: Path, signum: int) -> None:
    """SIGTERM is how a worker cancels; SIGHUP, which the engine does not handle, shows that
    the child got the client's signal and not the starter's SIGTERM for a vanished client."""
    process, path, log = starter
    client, child = waiting_flow_run(path, log, silent_api, tmp_path)
    time.sleep(1)  # the engine is waiting on the silent API
    assert client.poll() is None and child.is_running()
    client.send_signal(signum)
    status = client.wait(timeout=60)
    ended = re.search(rf"pid {child.pid} ended with status (-?\d+)", log.read_text())
    assert ended, f"the client ended before its flow run: {log.read_text()}"
    assert int(ended.group(1)) == status == -signum  # Popen and the starter both show a signal as -N


def test_a_client_killed_takes_its_flow_run_with_it(starter, silent_api: str, tmp_path: Path) -> None:
    process, path, log = starter
    client, child = waiting_flow_run(path, log, silent_api, tmp_path)
    client.kill()
    client.wait(timeout=10)
    child.wait(timeout=45)  # SIGTERM at once, SIGKILL after the grace period
    assert process.is_running() and path.exists()  # the starter serves on


def test_stopping_the_starter_stops_its_flow_runs_and_tells_their_clients(silent_api: str, tmp_path: Path) -> None:
    path, log = tmp_path / "starter.sock", tmp_path / "starter.log"
    with shard_starter(starter_env(tmp_path), path, log) as process:
        client, child = waiting_flow_run(path, log, silent_api, tmp_path)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)
        child.wait(timeout=45)
        _, stderr = client.communicate(timeout=30)
    assert client.returncode == 1 and "the starter went away before the flow run ended" in stderr
    assert not path.exists()
