"""Shared fixtures: tiny checkpoints built here, never downloaded."""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from pathlib import Path

import pytest
import torch

from mergefleet.fixtures.synthetic import fine_tuned, random_weights, save_checkpoint
from tests.helpers import TINY


SLOW_FIXTURES = {"skill_models", "prefect_harness", "real_prefect_server", "mlflow_server"}
"""A test that trains the skill models or starts a Prefect or MLflow server is slow, whatever else it does."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    # The files with the most slow tests first (the order inside a file kept): under
    # pytest-xdist the long files start early and the short ones fill the end.
    slow_per_file = Counter(item.path for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow_per_file[item.path])


class InputGuard:
    """The sha256 of every file of the input checkpoints the shared fixtures build, so the
    suite can check that no merge, resume, fault or overwrite changed an input's bytes."""

    def __init__(self) -> None:
        self.recorded: dict[Path, str] = {}

    def add(self, *roots: Path) -> None:
        for root in roots:
            for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
                self.recorded[path] = _sha256(path)

    def changed(self) -> list[str]:
        return [str(path) for path, digest in self.recorded.items() if not path.is_file() or _sha256(path) != digest]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def input_guard() -> InputGuard:
    return InputGuard()


@pytest.fixture(autouse=True)
def inputs_unchanged(request: pytest.FixtureRequest):
    """After each test that used a shared input family: its files' bytes are unchanged."""
    yield
    if {"family", "skill_models"} & set(request.fixturenames):
        changed = request.getfixturevalue("input_guard").changed()
        assert not changed, f"{request.node.nodeid} changed input checkpoint files: {changed}"


@pytest.fixture(scope="session")
def family(tmp_path_factory: pytest.TempPathFactory, input_guard: InputGuard) -> tuple[Path, list[Path]]:
    """A float32 base and three experts; the second expert is split over several files."""
    root = tmp_path_factory.mktemp("family")
    weights = random_weights(TINY, seed=7, dtype=torch.float32)
    base = save_checkpoint(root / "base", weights, TINY)
    experts = []
    for i in range(3):
        split = 40_000 if i == 1 else None
        experts.append(save_checkpoint(root / f"expert{i + 1}", fine_tuned(weights, seed=100 + i), TINY, max_file_bytes=split))
    input_guard.add(base, *experts)
    return base, experts


@pytest.fixture
def restore_environ():
    """`mergefleet run/deploy` set Prefect defaults in os.environ; keep them to one test."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect API (SQLite in a temp folder) for the whole session."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture(scope="session")
def real_prefect_server(tmp_path_factory: pytest.TempPathFactory):
    """A real `prefect server` on 127.0.0.1 for the session's modules that need one; yields
    the environment that points a process at it, and its log."""
    from tests.prefect_services import SERVER_SETTINGS, prefect_server

    with prefect_server(tmp_path_factory.mktemp("prefect-home"), **SERVER_SETTINGS) as served:
        yield served


@pytest.fixture(scope="session")
def skill_models(tmp_path_factory: pytest.TempPathFactory, input_guard: InputGuard):
    """A tiny base and two experts with real skills (add, map) and their lm-eval tasks,
    trained here on CPU (about 20 s), once per run: under pytest-xdist the first worker to
    need them trains them and the others wait for it and reuse its files."""
    from filelock import FileLock

    from mergefleet.fixtures.skills import SkillsConfig, build_skills

    run_root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        run_root = run_root.parent  # this run's folder, shared by its workers
    with FileLock(run_root / "skills.lock"):
        models = build_skills(run_root / "skills", SkillsConfig(skills=("add", "map")))
    input_guard.add(models.base, *models.experts.values())
    return models


@pytest.fixture(scope="session")
def eval_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One evaluation cache for the session: each input is evaluated once."""
    return tmp_path_factory.mktemp("eval-cache")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """A real ``mlflow server`` on 127.0.0.1 (SQLite store, local artifacts) for a module."""
    from infra.mlflow_server import mlflow_server as serve

    root = tmp_path_factory.mktemp("mlflow-server")
    with serve(root) as uri:
        yield {"uri": uri, "root": root}
