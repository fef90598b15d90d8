"""Shards in threads (orchestrator/runners/threads.py), what ``mergefleet merge`` runs by
default: the same bytes as one shard after another, progress for every tensor, and a shard
that fails stops the others, leaves no temporary file and keeps the finished shards."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from orchestrator.errors import MergeError
from orchestrator.pipeline import merge
from orchestrator.plan_ref import open_plan
from orchestrator.receipt import finished_receipt
from orchestrator.recipe import parse_recipe
from orchestrator.runners.processes import WorkerProcesses
from orchestrator.runners.threads import WorkerThreads
from orchestrator.storage.local import PARTIAL_MARK
from tests.helpers import checkpoint_bytes, gta_recipe


def test_threads_write_the_bytes_of_one_shard_after_another_and_report_every_tensor(family, tmp_path: Path) -> None:
    recipe = parse_recipe(gta_recipe("ties", *family))
    merge(recipe, str(tmp_path / "serial"), shards=4, runner=WorkerProcesses(workers=1))
    seen: list[tuple[str, str]] = []
    report = lambda name, nbytes: seen.append((threading.current_thread().name, name))  # noqa: E731
    summary = merge(recipe, str(tmp_path / "threads"), shards=4, runner=WorkerThreads(workers=2, on_tensor=report))
    assert checkpoint_bytes(tmp_path / "threads") == checkpoint_bytes(tmp_path / "serial")
    tensors = [tensor.name for shard in open_plan(summary.plan_ref).shards for tensor in shard.tensors]
    assert sorted(name for _, name in seen) == sorted(tensors)
    assert len({thread for thread, _ in seen}) == 2  # the shards ran side by side


class FailShard:
    """A pause hook: shard ``index`` fails after its first tensor; the others wait for that."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.failed = threading.Event()

    def __call__(self, index: int, written: int) -> None:
        if index == self.index:
            self.failed.set()
            raise MergeError(f"shard {index} broke on purpose")
        self.failed.wait(timeout=30)


def test_a_failing_shard_stops_the_others_and_leaves_no_partial_file(family, tmp_path: Path) -> None:
    recipe = parse_recipe(gta_recipe("task_arithmetic", *family))
    out = tmp_path / "out"
    first = merge(recipe, str(out), shards=4, runner=WorkerProcesses(workers=1))
    for file in ("model-00002-of-00004.safetensors", "model-00003-of-00004.safetensors"):
        (out / file).unlink()  # shards 1 and 2 are to redo
    with pytest.raises(MergeError, match="shard 2 broke on purpose"):
        merge(recipe, str(out), shards=4, runner=WorkerThreads(workers=2, pause=FailShard(2)))
    assert not [p.name for p in out.iterdir() if PARTIAL_MARK in p.name]
    assert not (out / "model-00002-of-00004.safetensors").exists()  # shard 1 stopped mid-write
    plan = open_plan(first.plan_ref)
    assert all(finished_receipt(plan, plan.output_sink(), i) is not None for i in (0, 3))
    again = merge(recipe, str(out), shards=4, runner=WorkerThreads(workers=2))  # a re-run finishes it
    assert again.shards_skipped == 2
    assert checkpoint_bytes(out) == checkpoint_bytes_of_a_fresh_merge(recipe, tmp_path / "fresh")


def checkpoint_bytes_of_a_fresh_merge(recipe, out: Path) -> dict[str, bytes]:
    merge(recipe, str(out), shards=4, runner=WorkerProcesses(workers=1))
    return checkpoint_bytes(out)
