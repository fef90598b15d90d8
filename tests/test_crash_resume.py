"""A worker killed mid-shard: the re-run rewrites only what is missing and gives the same checkpoint.

The kill is deterministic: a pause hook holds one shard after its second tensor, with its
file half written, and the test kills that worker process there.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from mergefleet.fixtures.synthetic import LlamaShape, make_model_family
from tests.helpers import MERGEFLEET, gta_recipe, read_tensors, write_recipe

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
MEDIUM = LlamaShape(hidden=384, layers=6, intermediate=1024, vocab=512, heads=8, kv_heads=4)
HELD = 3  # the shard held, then killed

MERGE_HOLDING_A_SHARD = """
import sys
from orchestrator.pipeline import merge
from orchestrator.recipe import load_recipe
from orchestrator.runners.processes import WorkerProcesses
from tests.hooks import HoldShard

recipe, out, flag, held = sys.argv[1:]
merge(load_recipe(recipe), out, shards=6, runner=WorkerProcesses(workers=2, pause=HoldShard(index=int(held), after=2, flag=flag)))
"""


def shard_file(index: int) -> str:
    return f"model-{index + 1:05d}-of-00006.safetensors"


def mergefleet(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*MERGEFLEET, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


@pytest.fixture(scope="module")
def medium_family(tmp_path_factory: pytest.TempPathFactory):
    return make_model_family(tmp_path_factory.mktemp("medium"), experts=3, shape=MEDIUM, dtype=torch.float32, seed=3)


def test_killed_worker_then_rerun_rewrites_only_missing_shards(medium_family, tmp_path: Path) -> None:
    base, experts = medium_family
    recipe = write_recipe(tmp_path / "recipe.yaml", gta_recipe("dare_ties", base, experts))
    out, flag = tmp_path / "out", tmp_path / "held.pid"

    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-c", textwrap.dedent(MERGE_HOLDING_A_SHARD), str(recipe), str(out), str(flag), str(HELD)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 240
    while not flag.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert flag.exists(), f"shard {HELD} was never held: {process.communicate(timeout=60)[1][-3000:]}"
    held_file = shard_file(HELD)
    assert [p.name.split(".partial-")[0] for p in out.glob("*.partial-*")].count(held_file) == 1  # mid-write
    os.kill(int(flag.read_text()), signal.SIGKILL)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0
    assert "a shard worker process died" in stderr and "run the same command again" in stderr, stderr[-3000:]

    done_before = sorted(int(p.stem.removeprefix("shard-")) for p in (out / ".mergefleet").glob("shard-*.json"))
    assert 0 < len(done_before) < 6 and HELD not in done_before
    # The other worker may have been stopped between its file's rename and its receipt; such
    # a file is not known complete, and the re-run writes it again.
    files_done = {shard_file(i): (out / shard_file(i)).stat() for i in done_before}
    assert not (out / held_file).exists() and not (out / "mergefleet.json").exists()

    rerun = mergefleet("merge", str(recipe), str(out), "--shards", "6", "--workers", "2", "--json")
    stdout, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr
    assert not list(out.glob("*.partial-*"))
    for name, stat in files_done.items():
        assert (out / name).stat().st_ino == stat.st_ino and (out / name).stat().st_mtime_ns == stat.st_mtime_ns, name
    assert json.loads(stdout)["shards_skipped"] == len(done_before), stdout

    reference = tmp_path / "reference"
    clean = mergefleet("merge", str(recipe), str(reference), "--shards", "1", "--quiet")
    assert clean.wait(timeout=300) == 0
    expected = read_tensors(reference)
    got = read_tensors(out)
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
