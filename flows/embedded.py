"""The Prefect API of `mergefleet run` when no server is configured.

Prefect's ephemeral mode starts its server app in a subprocess on first use, after
importing the whole server into the calling process. Here the same subprocess (the
same command and environment) starts first, while the flow code imports, and the
caller never imports the server: on a 2-core machine that is several seconds of a
short run. A configured server (PREFECT_API_URL in the environment or the profile) is
used as is, and so is whatever a process that already imported Prefect has set up.

This module imports nothing from Prefect at import time.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import runpy
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

from orchestrator.errors import ConfigurationError
from orchestrator.parent import exit_with_parent


_STARTED: set[str] = set()


def is_embedded(url: str | None) -> bool:
    """Whether ``url`` is an API this process started for itself (no worker can reach it)."""
    return url in _STARTED


class EmbeddedAPI:
    """A Prefect server app in a subprocess on 127.0.0.1, for one run. Stopped at exit; if
    this process is killed, the kernel stops it (``serve``): created in the main thread."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self._spawn()
        # Stopped at exit, as Prefect stops its ephemeral server: registered before Prefect
        # is imported, this runs after Prefect's own exit handlers have sent the last logs.
        atexit.register(self.stop)

    def _spawn(self) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/api"
        _STARTED.add(self.url)
        spec = importlib.util.find_spec("prefect")
        assert spec is not None and spec.submodule_search_locations
        app_dir = Path(next(iter(spec.submodule_search_locations))).parent
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "flows.embedded", str(os.getpid()),  # uvicorn, ended with this process
                "--app-dir", str(app_dir),
                "--factory", "prefect.server.api.server:create_app",
                "--host", "127.0.0.1", "--port", str(self.port),
                "--log-level", "error", "--lifespan", "on",
            ],
            env=os.environ | {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"},
        )

    def wait(self, timeout: float) -> None:
        """Until the API answers; a server that lost its port to another process starts again."""
        deadline, respawns = time.monotonic() + timeout, 2
        while time.monotonic() < deadline:
            if self.process is None:
                break
            if self.process.poll() is not None:
                if respawns == 0:
                    break
                respawns -= 1
                self._spawn()
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise ConfigurationError(
            f"the embedded Prefect API did not start within {timeout:.0f} s; "
            "start one with 'prefect server start' and set PREFECT_API_URL"
        )

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None


def start() -> EmbeddedAPI | None:
    """Start the server now if this run will need it (call before importing Prefect)."""
    if "prefect" in sys.modules or os.environ.get("PREFECT_API_URL"):
        return None
    return EmbeddedAPI()


@contextlib.contextmanager
def connected(api: EmbeddedAPI | None, *, timeout: float = 60) -> Iterator[None]:
    """Point Prefect at ``api`` while the block runs, unless the profile names a server."""
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    if api is None or get_current_settings().api.url:
        if api is not None:
            api.stop()
        yield
        return
    api.wait(timeout)
    with temporary_settings(updates={PREFECT_API_URL: api.url}):
        yield


def serve(argv: list[str]) -> None:
    """``python -m flows.embedded PARENT UVICORN_ARGS...``: uvicorn, sent SIGTERM by the kernel
    when process PARENT dies, so a killed ``mergefleet run`` leaves no server behind."""
    exit_with_parent(int(argv[0]), signal.SIGTERM)
    sys.argv = ["uvicorn", *argv[1:]]
    runpy.run_module("uvicorn", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    serve(sys.argv[1:])
