"""No orphans: a merge killed with SIGKILL mid-shard takes its worker processes with it.

A pause hook holds one shard in a worker (``tests/hooks.HoldShard``, for 300 s); the test
kills the merge process there and expects every process it started to be gone within 5 s.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers import gta_recipe, write_recipe

pytestmark = pytest.mark.slow  # kills processes

ROOT = Path(__file__).resolve().parent.parent

MERGE_HOLDING_A_SHARD = """
import sys
from orchestrator.pipeline import merge
from orchestrator.recipe import load_recipe
from orchestrator.runners.processes import WorkerProcesses
from tests.hooks import HoldShard

recipe, out, flag = sys.argv[1:]
merge(load_recipe(recipe), out, shards=2, runner=WorkerProcesses(workers=2, pause=HoldShard(index=0, after=1, flag=flag)))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kill is checked on Linux")
def test_workers_exit_within_seconds_when_the_merge_is_killed(family, tmp_path: Path) -> None:
    base, experts = family
    recipe = write_recipe(tmp_path / "recipe.yaml", gta_recipe("task_arithmetic", base, experts[:2]))
    flag = tmp_path / "held.pid"
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-c", textwrap.dedent(MERGE_HOLDING_A_SHARD), str(recipe), str(tmp_path / "out"), str(flag)]
    merge = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    children: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 180
        while not flag.exists() and merge.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert flag.exists(), f"the shard was never held: {merge.communicate(timeout=30)[1][-2000:]!r}"
        children = psutil.Process(merge.pid).children(recursive=True)
        held = psutil.Process(int(flag.read_text()))
        assert held in children  # the held shard runs in a worker process of the merge

        os.kill(merge.pid, signal.SIGKILL)
        merge.wait(timeout=30)
        _, alive = psutil.wait_procs(children, timeout=5)
        assert not alive, f"still running 5 s after the merge was killed: {[(p.pid, p.cmdline()[:3]) for p in alive]}"
    finally:
        for child in children:
            if child.is_running():
                child.kill()
        if merge.poll() is None:
            merge.kill()
            merge.wait(timeout=30)
