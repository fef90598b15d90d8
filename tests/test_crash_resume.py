"""A worker killed mid-shard: the re-run rewrites only what is missing and gives the same checkpoint."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from mergefleet.fixtures.synthetic import LlamaShape, make_model_family
from tests.helpers import gta_recipe, read_tensors, write_recipe

MEDIUM = LlamaShape(hidden=384, layers=6, intermediate=1024, vocab=512, heads=8, kv_heads=4)


def mergefleet(*args: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "mergefleet", *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


@pytest.fixture(scope="module")
def medium_family(tmp_path_factory: pytest.TempPathFactory):
    return make_model_family(tmp_path_factory.mktemp("medium"), experts=3, shape=MEDIUM, dtype=torch.float32, seed=3)


def test_killed_worker_then_rerun_rewrites_only_missing_shards(medium_family, tmp_path: Path) -> None:
    base, experts = medium_family
    recipe = write_recipe(tmp_path / "recipe.yaml", gta_recipe("dare_ties", base, experts))
    out = tmp_path / "out"

    process = mergefleet("merge", str(recipe), str(out), "--shards", "6", "--workers", "2", "--quiet")
    victim = None
    deadline = time.monotonic() + 120
    while victim is None and time.monotonic() < deadline and process.poll() is None:
        receipts = list((out / ".mergefleet").glob("shard-*.json")) if out.exists() else []
        partials = [p for p in out.glob("*.partial-*")] if out.exists() else []
        if receipts and partials:
            children = psutil.Process(process.pid).children(recursive=True)
            workers = [c for c in children if "spawn_main" in " ".join(c.cmdline())]
            if workers:
                victim = workers[-1]
                victim.send_signal(signal.SIGKILL)
                break
        time.sleep(0.005)
    assert victim is not None, "the merge finished before a worker could be killed mid-shard"
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0
    assert "worker" in stderr and "again" in stderr, stderr

    done_before = {p.name: p.stat() for p in (out / ".mergefleet").glob("shard-*.json")}
    assert 0 < len(done_before) < 6
    files_before = {p.name: p.stat() for p in out.glob("model-*.safetensors")}
    assert not (out / "mergefleet.json").exists()

    rerun = mergefleet("merge", str(recipe), str(out), "--shards", "6", "--workers", "2", "--json")
    stdout, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr
    assert not list(out.glob("*.partial-*"))
    for name, stat in files_before.items():
        assert (out / name).stat().st_ino == stat.st_ino and (out / name).stat().st_mtime_ns == stat.st_mtime_ns, name
    rewritten = [p.name for p in out.glob("model-*.safetensors") if p.name not in files_before]
    assert len(rewritten) == 6 - len(files_before)

    reference = tmp_path / "reference"
    clean = mergefleet("merge", str(recipe), str(reference), "--shards", "1", "--quiet")
    assert clean.wait(timeout=300) == 0
    expected = read_tensors(reference)
    got = read_tensors(out)
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
