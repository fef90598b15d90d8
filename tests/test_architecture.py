"""The layers hold: the library (orchestrator) never imports Prefect, the flows or the
application (mergefleet); the flows never import the application.

The contracts are import-linter's, in pyproject.toml ([tool.importlinter]); imports inside
functions count as much as those at the top of a module.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("orchestrator", "flows", "mergefleet")


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """import-linter on the packages under ``root``, with ``root``'s pyproject.toml."""
    env = os.environ | {"PYTHONPATH": str(root)}
    command = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"]
    return subprocess.run(
        [*command, "--no-cache", "--no-logo", "--config", str(root / "pyproject.toml")],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )


def test_the_library_and_the_flows_keep_their_import_contracts() -> None:
    done = lint_imports(ROOT)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "2 kept, 0 broken" in done.stdout


@pytest.mark.parametrize(
    "module, forbidden, edge",
    [
        ("orchestrator/recipe.py", "import prefect", "orchestrator.recipe -> prefect"),
        ("orchestrator/storage/base.py", "import flows.tasks", "orchestrator.storage.base -> flows.tasks"),
        ("orchestrator/plan.py", "from mergefleet import cli", "orchestrator.plan -> mergefleet.cli"),
        ("orchestrator/cluster/check.py", "import prefect", "orchestrator.cluster.check -> prefect"),
        ("orchestrator/learned/runs.py", "import flows.candidates", "orchestrator.learned.runs -> flows.candidates"),
        ("orchestrator/learned/search.py", "from mergefleet import cli_learned", "orchestrator.learned.search -> mergefleet.cli_learned"),
        ("flows/tasks.py", "import mergefleet.progress", "flows.tasks -> mergefleet.progress"),
    ],
)
def test_a_forbidden_import_breaks_a_contract(module: str, forbidden: str, edge: str, tmp_path: Path) -> None:
    """The contracts catch a violation (planted in a copy of the tree), even inside a function."""
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with open(tmp_path / module, "a") as handle:
        handle.write(f"\n\ndef _planted() -> None:\n    {forbidden}  # noqa\n")
    done = lint_imports(tmp_path)
    assert done.returncode == 1, done.stdout[-4000:]
    assert "BROKEN" in done.stdout and edge in done.stdout, done.stdout[-4000:]
