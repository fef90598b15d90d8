"""Real merges of tiny checkpoints under faults: a kill -9 at seeded points of the shards and
of assembly, a full file system, a read-only output, two merges racing into one output, a
flipped byte and a truncation in a finished shard, an S3 link that drops uploads. After each,
the same merge run again without the fault gives a checkpoint byte-identical to a clean
merge, and (the ``family`` fixture's check in conftest) no input changed."""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Iterator

import pytest

from orchestrator.errors import MergefleetError, OutputError
from orchestrator.pipeline import merge
from orchestrator.recipe import parse_recipe
from orchestrator.storage.local import LocalOutput
from orchestrator.storage.writer import SafetensorsWriter
from tests.helpers import MERGEFLEET, checkpoint_bytes, gta_recipe, write_recipe
from tests.s3_server import FlakyProxy, s3_server  # noqa: F401 -- fixture

ROOT = Path(__file__).resolve().parents[1]
SHARDS = 4
ENV = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def recipe_of(family: tuple[Path, list[Path]], **fleet: Any) -> dict[str, Any]:
    base, experts = family
    return gta_recipe("ties", base, experts) | ({"fleet": fleet} if fleet else {})


@pytest.fixture(scope="module")
def clean(family, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, bytes], int, int]:
    """A clean merge's checkpoint bytes, and how many fault points (tensor writes, file
    writes) its shards and its whole run pass."""
    out = tmp_path_factory.mktemp("clean") / "out"
    counter = FaultPoints()
    with pytest.MonkeyPatch.context() as patch:
        counter.install(patch)
        merge(parse_recipe(recipe_of(family)), str(out), shards=SHARDS, workers=1)
    return checkpoint_bytes(out), counter.after_last_tensor, counter.count


class FaultPoints:
    """Counts the points where a kill can land: each tensor written into a shard file, and
    each file write's start and end; ``kill_at`` SIGKILLs this process at that point."""

    def __init__(self, kill_at: int = 0) -> None:
        self.kill_at, self.count, self.after_last_tensor = kill_at, 0, 0

    def point(self) -> None:
        self.count += 1
        if self.count == self.kill_at:
            os.kill(os.getpid(), 9)

    def install(self, patch: pytest.MonkeyPatch) -> None:
        write, open_write = SafetensorsWriter.write, LocalOutput.open_write
        points = self

        def counted_write(writer: SafetensorsWriter, name: str, tensor: Any) -> None:
            write(writer, name, tensor)
            points.point()
            points.after_last_tensor = points.count

        def counted_open(sink: LocalOutput, file: str) -> Any:
            class Counted:
                def __enter__(self) -> Any:
                    points.point()
                    self.inner = open_write(sink, file)
                    return self.inner.__enter__()

                def __exit__(self, *exc: Any) -> Any:
                    result = self.inner.__exit__(*exc)
                    points.point()
                    return result

            return Counted()

        patch.setattr(SafetensorsWriter, "write", counted_write)
        patch.setattr(LocalOutput, "open_write", counted_open)


KILLED_MERGE = """
import sys
import pytest
from mergefleet import cli
from tests.test_faults import FaultPoints

recipe, out, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
with pytest.MonkeyPatch.context() as patch:
    FaultPoints(kill_at).install(patch)
    sys.exit(cli.main(["merge", recipe, out, "--shards", "{shards}", "--workers", "1"]))
"""


def no_partials(out: Path) -> bool:
    return not [p for p in out.rglob("*") if ".partial-" in p.name]


@pytest.mark.parametrize(("seed", "phase"), [(1, "anywhere"), (5, "anywhere"), (9, "assembly")])
def test_kill_9_in_shards_or_assembly_then_rerun_is_identical(family, clean, tmp_path: Path, seed: int, phase: str) -> None:
    expected, after_last_tensor, total = clean
    rng = random.Random(seed)
    # "assembly": past the last tensor, its shard file's commit and its receipt (3 points),
    # before the manifest is complete
    kill_at = rng.randint(1, total) if phase == "anywhere" else rng.randint(after_last_tensor + 4, total - 1)
    recipe, out = write_recipe(tmp_path / "recipe.yaml", recipe_of(family)), tmp_path / "out"
    script = textwrap.dedent(KILLED_MERGE).replace("{shards}", str(SHARDS))
    killed = subprocess.run([sys.executable, "-c", script, str(recipe), str(out), str(kill_at)], env=ENV, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, f"kill point {kill_at} of {total} not reached: {killed.stderr[-2000:]}"
    assert not (out / "mergefleet.json").exists()  # killed before the manifest: nothing looks complete

    summary = merge(parse_recipe(recipe_of(family)), str(out), shards=SHARDS, workers=1)
    assert checkpoint_bytes(out) == expected
    assert no_partials(out)
    assert summary.shards_redone == []


def test_full_file_system_then_rerun_with_space_is_identical(family, clean, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill needs root")
    out = tmp_path / "small"
    out.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(out)], check=True)
    try:
        with pytest.raises((OSError, MergefleetError)):
            merge(parse_recipe(recipe_of(family)), str(out), shards=SHARDS, workers=1)
        assert not (out / "mergefleet.json").exists() and no_partials(out)
        subprocess.run(["mount", "-o", "remount,size=4m", str(out)], check=True)
        merge(parse_recipe(recipe_of(family)), str(out), shards=SHARDS, workers=1)
        assert checkpoint_bytes(out) == clean[0]
    finally:
        subprocess.run(["umount", str(out)], check=True)


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    """``path`` read-only for the block: a read-only remount as root (root ignores mode bits), else chmod."""
    if os.geteuid() == 0:
        subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        try:
            yield
        finally:
            subprocess.run(["mount", "-o", "remount,rw", str(path)], check=True)
    else:
        modes = {p: p.stat().st_mode for p in [path, *path.rglob("*")] if p.is_dir()}
        for folder in modes:
            folder.chmod(0o555)
        try:
            yield
        finally:
            for folder, mode in modes.items():
                folder.chmod(mode)


def test_read_only_output_after_planning_then_rerun_is_identical(capsys, family, clean, tmp_path: Path) -> None:
    from mergefleet import cli

    out = tmp_path / "ro"
    out.mkdir()
    if os.geteuid() == 0:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(out)], check=True)
    try:
        recipe = write_recipe(tmp_path / "recipe.yaml", recipe_of(family))
        assert cli.main(["plan", str(recipe), str(out), "--shards", str(SHARDS)]) == 0
        with read_only(out):
            with pytest.raises((OSError, MergefleetError)):
                merge(parse_recipe(recipe_of(family)), str(out), shards=SHARDS, workers=1)
        assert not (out / "mergefleet.json").exists() and not list(out.glob("*.safetensors"))
        merge(parse_recipe(recipe_of(family)), str(out), shards=SHARDS, workers=1)
        assert checkpoint_bytes(out) == clean[0]
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(out)], check=True)
    capsys.readouterr()


def test_two_merges_racing_into_one_output(family, clean, tmp_path: Path) -> None:
    recipe, out = write_recipe(tmp_path / "recipe.yaml", recipe_of(family)), tmp_path / "out"
    command = [*MERGEFLEET, "merge", str(recipe), str(out), "--shards", str(SHARDS), "--workers", "1"]
    racers = [subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(racer.wait(timeout=300), racer.stderr.read()) for racer in racers]  # type: ignore[union-attr]
    for status, stderr in results:
        assert status == 0 or (status == 6 and "another merge is writing to" in stderr and "pid" in stderr), stderr[-2000:]
    assert 0 in [status for status, _ in results]
    assert checkpoint_bytes(out) == clean[0] and no_partials(out)
    again = merge(parse_recipe(recipe_of(family)), str(out), shards=SHARDS, workers=1)
    assert again.shards_skipped == SHARDS and checkpoint_bytes(out) == clean[0]


def test_flipped_byte_and_truncation_in_finished_shards_are_redone(family, clean, tmp_path: Path) -> None:
    out = tmp_path / "out"
    merge(parse_recipe(recipe_of(family)), str(out), shards=SHARDS, workers=1)
    shards = sorted(out.glob("model-*.safetensors"))
    data = bytearray(shards[1].read_bytes())
    data[-5] ^= 0x01  # same size, one bit of a tensor flipped
    shards[1].write_bytes(bytes(data))
    shards[3].write_bytes(shards[3].read_bytes()[:-7])
    summary = merge(parse_recipe(recipe_of(family)), str(out), shards=SHARDS, workers=1)
    assert summary.shards_skipped == SHARDS - 2
    assert [why.split(":")[0] for why in summary.shards_redone] == [shards[1].name, shards[3].name]
    assert "content differs" in summary.shards_redone[0] and "size" in summary.shards_redone[1]
    assert checkpoint_bytes(out) == clean[0]


def test_s3_link_dropping_uploads_then_rerun_is_identical_and_a_replaced_object_is_redone(s3_server, family, clean, tmp_path: Path, monkeypatch) -> None:
    s3_server.bucket("faults")
    output = "s3://faults/dropped"
    with FlakyProxy(s3_server.endpoint, throttle_every=10**9, cut_every=10**9, drop_uploads=".safetensors") as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        with pytest.raises(OutputError, match="model-0000"):
            merge(parse_recipe(recipe_of(family, storage={"max_attempts": 2})), output, shards=SHARDS, workers=1)
        assert proxy.dropped >= 2
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    client = s3_server.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="faults").get("Contents", [])]
    assert not [k for k in keys if k.endswith(".safetensors") or k.endswith("mergefleet.json")], keys

    merge(parse_recipe(recipe_of(family)), output, shards=SHARDS, workers=1)
    assert checkpoint_bytes(s3_server.download(output, tmp_path / "got")) == clean[0]

    victim = "dropped/model-00002-of-00004.safetensors"
    data = bytearray(client.get_object(Bucket="faults", Key=victim)["Body"].read())
    data[-3] ^= 0x10
    client.put_object(Bucket="faults", Key=victim, Body=bytes(data))  # same size, another object
    summary = merge(parse_recipe(recipe_of(family)), output, shards=SHARDS, workers=1)
    assert summary.shards_skipped == SHARDS - 1 and "model-00002-of-00004.safetensors" in summary.shards_redone[0]
    assert checkpoint_bytes(s3_server.download(output, tmp_path / "again")) == clean[0]
