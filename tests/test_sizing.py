"""The shards and workers ``mergefleet merge`` picks when nobody says: the rule as a pure
function of cores, memory and the merge's size, then on a real merge."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.pipeline import merge
from orchestrator.plan import build_plan, recut
from orchestrator.recipe import parse_recipe
from orchestrator.sizing import (
    MEMORY_SHARE,
    MIN_READ_PER_WORKER,
    WORKER_BASE_BYTES,
    Machine,
    MergeSize,
    Told,
    available_memory,
    choose_layout,
    merge_size,
    usable_cores,
)
from tests.helpers import MERGEFLEET, gta_recipe, write_recipe

GB = 1_000_000_000
ROOMY = Machine(cores=2, available_bytes=64 * GB)
TIES_017B = MergeSize(bytes_read=1_700_000_000, peak_bytes=300_000_000, selects=True, max_shards=75)
LINEAR_017B = MergeSize(bytes_read=1_360_000_000, peak_bytes=300_000_000, selects=False, max_shards=75)


def test_one_worker_and_shard_per_core_when_memory_and_size_allow() -> None:
    layout = choose_layout(ROOMY, TIES_017B)
    assert (layout.shards, layout.workers, layout.limited_by) == (2, 2, "cores")
    assert (layout.shards_from, layout.workers_from) == ("machine", "machine")
    sixteen = choose_layout(Machine(cores=16, available_bytes=640 * GB), MergeSize(40 * GB, 10**9, False, 300))
    assert (sixteen.shards, sixteen.workers) == (16, 16)


def test_a_small_merge_stays_in_one_process() -> None:
    # 1.0 GB read by a weighted sum is below two workers' worth (2 × 0.6 GB); by TIES it is above (2 × 0.5 GB)
    assert 1_000_000_000 < 2 * MIN_READ_PER_WORKER["plain"] and 1_000_000_000 >= 2 * MIN_READ_PER_WORKER["select"]
    layout = choose_layout(ROOMY, MergeSize(bytes_read=1_000_000_000, peak_bytes=300_000_000, selects=False, max_shards=75))
    assert (layout.shards, layout.workers, layout.limited_by) == (1, 1, "size")
    assert choose_layout(ROOMY, MergeSize(bytes_read=1_000_000_000, peak_bytes=300_000_000, selects=True, max_shards=75)).workers == 2
    assert choose_layout(ROOMY, LINEAR_017B).workers == 2  # 4 experts x 0.17 B bf16, 1.36 GB: two workers' worth
    tiny = choose_layout(ROOMY, MergeSize(bytes_read=40_000, peak_bytes=10_000, selects=True, max_shards=20))
    assert (tiny.shards, tiny.workers) == (1, 1)


def test_memory_bounds_the_workers() -> None:
    peak = 2 * GB
    # 16 cores, memory for exactly 3 workers at the base cost plus the peak each
    available = int(3 * (WORKER_BASE_BYTES + peak) / MEMORY_SHARE) + 1000
    layout = choose_layout(Machine(cores=16, available_bytes=available), MergeSize(100 * GB, peak, True, 400))
    assert (layout.shards, layout.workers, layout.limited_by) == (3, 3, "memory")
    starved = choose_layout(Machine(cores=16, available_bytes=GB), MergeSize(100 * GB, peak, True, 400))
    assert (starved.workers, starved.limited_by) == (1, "memory")  # never fewer than one


def test_never_more_shards_than_tensors_and_one_worker_on_a_gpu() -> None:
    few = choose_layout(Machine(cores=8, available_bytes=640 * GB), MergeSize(40 * GB, GB, True, 3))
    assert (few.shards, few.workers, few.limited_by) == (3, 3, "tensors")
    gpu = choose_layout(Machine(cores=8, available_bytes=640 * GB), TIES_017B, device="cuda")
    assert (gpu.shards, gpu.workers, gpu.limited_by) == (1, 1, "device")


def test_told_counts_win_and_the_rest_follows_them() -> None:
    both = choose_layout(ROOMY, LINEAR_017B, shards=Told(4, "flags"), workers=Told(3, "recipe"))
    assert (both.shards, both.workers, both.shards_from, both.workers_from) == (4, 3, "flags", "recipe")
    workers_only = choose_layout(ROOMY, LINEAR_017B, workers=Told(2, "flags"))
    assert (workers_only.shards, workers_only.workers, workers_only.shards_from) == (2, 2, "flags")
    shards_only = choose_layout(ROOMY, TIES_017B, shards=Told(5, "output"))
    assert (shards_only.shards, shards_only.workers, shards_only.workers_from) == (5, 2, "machine")
    assert "2 workers (chosen for 2 cores and 64.0 GB available; limited by cores)" == shards_only.describe()


def test_the_machine_is_read_from_affinity_and_meminfo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert usable_cores() == len(os.sched_getaffinity(0))
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:         1000 kB\nMemAvailable:   17000000 kB\n")
    monkeypatch.setitem(sys.modules, "psutil", None)  # psutil not installed: /proc/meminfo
    assert available_memory(meminfo) == 17000000 * 1024
    assert available_memory(tmp_path / "absent") is None


def test_merge_size_of_a_plan_does_not_depend_on_its_cut(family, tmp_path: Path) -> None:
    base, experts = family
    plan = build_plan(parse_recipe(gta_recipe("ties", base, experts)), str(tmp_path / "out"))
    size = merge_size(plan)
    tensors = [t for shard in plan.shards for t in shard.tensors]
    assert size.bytes_read == sum(read.end - read.begin for t in tensors for read in t.reads)
    assert size.max_shards == len(tensors) and size.selects
    assert size.peak_bytes >= max(t.in_bytes for t in tensors)
    assert merge_size(recut(plan, 3)) == size


def test_no_flags_merge_reports_the_machines_choice(family, tmp_path: Path) -> None:
    base, experts = family
    recipe = write_recipe(tmp_path / "r.yaml", gta_recipe("ties", base, experts))
    done = subprocess.run([*MERGEFLEET, "merge", str(recipe), str(tmp_path / "out"), "--json"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    layout = result["layout"]
    # the family's checkpoints are far below one worker's worth of input: one shard, one process
    assert (result["shards"], result["workers"], layout["shards"], layout["workers"]) == (1, 1, 1, 1)
    assert (layout["shards_from"], layout["workers_from"], layout["limited_by"]) == ("machine", "machine", "size")
    assert layout["cores"] == len(os.sched_getaffinity(0)) and layout["available_bytes"] > 0
    shown = subprocess.run([*MERGEFLEET, "merge", str(recipe), str(tmp_path / "again")], capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert "in 1 shard(s) on 1 worker (chosen for" in " ".join(shown.stderr.split())


def test_a_resumed_merge_keeps_the_cut_in_its_output(family, tmp_path: Path) -> None:
    base, experts = family
    recipe = parse_recipe(gta_recipe("ties", base, experts))
    out = tmp_path / "out"
    first = merge(recipe, str(out), shards=3, workers=1)
    resumed = merge(recipe, str(out))
    assert resumed.plan_id == first.plan_id and resumed.shards == 3 and resumed.shards_skipped == 3
    assert resumed.layout is not None and resumed.layout.shards_from == "output"
    other = merge(parse_recipe(gta_recipe("ties", base, experts, random_seed=12)), str(out), overwrite=True)
    assert other.plan_id != first.plan_id and other.shards == 1
    assert other.layout is not None and other.layout.shards_from == "machine"
