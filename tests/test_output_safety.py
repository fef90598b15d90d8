"""What a merge may do to its output: never point into an input, delete on --overwrite only
what the previous merge recorded, hold the output's lock, and trust a shard on resume (or
in assembly) only when its file matches its receipt."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mergefleet import cli
from orchestrator.assemble import assemble
from orchestrator.errors import OutputError, PlanError
from orchestrator.output_guard import refuse_output_over_inputs
from orchestrator.pipeline import merge
from orchestrator.plan_ref import PlanRef, open_plan
from orchestrator.recipe import parse_recipe
from orchestrator.storage.output_lock import LOCK_FILE, LockHolder, hold_output_lock
from orchestrator.storage.s3.sink import S3Output
from tests.helpers import gta_recipe, hold_lock_elsewhere, write_recipe
from tests.s3_server import s3_server  # noqa: F401 -- fixture

ROOT = Path(__file__).resolve().parent.parent


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    status = cli.main(list(args))
    return status, capsys.readouterr().err.strip()


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- output over an input


@pytest.mark.parametrize("command", ["merge", "plan"])
@pytest.mark.parametrize("where", ["is", "inside", "contains", "symlink"])
def test_output_over_an_input_is_refused_before_anything_is_written(capsys, family, tmp_path: Path, command: str, where: str) -> None:
    base, experts = family
    before = tree(base.parent)
    outputs = {
        "is": base,
        "inside": base / "merged",
        "contains": base.parent,
        "symlink": tmp_path / "link-to-expert" / "out",
    }
    (tmp_path / "link-to-expert").symlink_to(experts[0])
    recipe = write_recipe(tmp_path / "recipe.yaml", gta_recipe("ties", base, experts))
    for overwrite in ((), ("--overwrite",)):
        status, message = run_cli(capsys, command, str(recipe), str(outputs[where]), *overwrite)
        assert status == 6, message
        assert "a merge never writes into an input" in message and (str(base) in message or str(experts[0]) in message), message
    assert tree(base.parent) == before
    assert not (base / "merged").exists()


def test_s3_output_over_an_input_prefix_is_refused_and_neighbours_are_not() -> None:
    for output in ("s3://models/tiny/base", "s3://models/tiny/base/out", "s3://models/tiny", "s3://models"):
        with pytest.raises(OutputError, match="s3://models/tiny/base"):
            refuse_output_over_inputs(output, ["s3://models/tiny/base"])
    for output in ("s3://models/tiny/basement", "s3://other/tiny/base", "/tmp/tiny/base"):
        refuse_output_over_inputs(output, ["s3://models/tiny/base"])


# ---------------------------------------------------------------- --overwrite


def test_overwrite_deletes_only_what_the_previous_merge_recorded(capsys, family, tmp_path: Path) -> None:
    base, experts = family
    out = tmp_path / "out"
    first = write_recipe(tmp_path / "first.yaml", gta_recipe("ties", base, experts))
    assert run_cli(capsys, "merge", str(first), str(out), "--shards", "3")[0] == 0
    first_shards = sorted(p.name for p in out.glob("*.safetensors"))
    (out / "notes.md").write_text("mine")
    (out / "keep").mkdir()
    (out / "keep" / "model-00001-of-00003.safetensors").write_bytes(b"user data in a folder")

    second = write_recipe(tmp_path / "second.yaml", gta_recipe("task_arithmetic", base, experts))
    status, message = run_cli(capsys, "merge", str(second), str(out), "--shards", "2", "--overwrite")
    assert status == 0, message
    assert (out / "notes.md").read_text() == "mine"
    assert (out / "keep" / "model-00001-of-00003.safetensors").read_bytes() == b"user data in a folder"
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert not set(first_shards) & {p.name for p in out.glob("*.safetensors")}
    assert not (out / ".mergefleet" / "shard-2.json").exists()  # the first merge's third receipt went too


def test_overwrite_never_deletes_a_checkpoint_no_merge_recorded(capsys, family, tmp_path: Path) -> None:
    base, experts = family
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"someone's only copy")
    (out / "config.json").write_text("{}")
    recipe = write_recipe(tmp_path / "recipe.yaml", gta_recipe("ties", base, experts))
    for overwrite in ((), ("--overwrite",)):
        status, message = run_cli(capsys, "merge", str(recipe), str(out), *overwrite)
        assert status == 6 and "no earlier merge there recorded as its own" in message, message
    assert (out / "model.safetensors").read_bytes() == b"someone's only copy"
    assert (out / "config.json").read_text() == "{}"


def test_a_user_file_under_a_name_the_new_merge_writes_is_not_replaced(capsys, family, tmp_path: Path) -> None:
    base, experts = family
    out = tmp_path / "out"
    assert run_cli(capsys, "merge", str(write_recipe(tmp_path / "a.yaml", gta_recipe("ties", base, experts))), str(out), "--shards", "1")[0] == 0
    (out / "model-00002-of-00002.safetensors").write_bytes(b"user's")  # the next merge (2 shards) would write this name
    second = write_recipe(tmp_path / "b.yaml", gta_recipe("task_arithmetic", base, experts))
    status, message = run_cli(capsys, "merge", str(second), str(out), "--shards", "2", "--overwrite")
    assert status == 6 and "model-00002-of-00002.safetensors" in message, message
    assert (out / "model-00002-of-00002.safetensors").read_bytes() == b"user's"
    assert (out / "mergefleet.json").exists()  # refused before deleting anything of the first merge


# ---------------------------------------------------------------- the output's lock

def test_a_second_merge_is_refused_naming_the_holder_and_a_dead_holders_lock_is_taken(capsys, family, tmp_path: Path) -> None:
    base, experts = family
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "recipe.yaml", gta_recipe("ties", base, experts))
    with hold_lock_elsewhere(out) as holder:
        started = time.monotonic()
        status, message = run_cli(capsys, "merge", str(recipe), str(out))
        assert time.monotonic() - started < 5  # refused at once, not after waiting
        assert status == 6 and f"pid {holder.pid}" in message and socket.gethostname() in message, message
        assert not (out / "mergefleet.json").exists() and not list(out.glob("*.safetensors"))
    status, message = run_cli(capsys, "merge", str(recipe), str(out))  # the holder died: its lock is taken
    assert status == 0, message
    assert (out / LOCK_FILE).read_bytes() == b""  # released


def test_a_refused_merge_leaves_the_users_folder_as_it_was(capsys, family, tmp_path: Path) -> None:
    base, experts = family
    out = tmp_path / "someone's model"
    out.mkdir()
    (out / "config.json").write_text('{"mine": 1}')
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    recipe = write_recipe(tmp_path / "recipe.yaml", gta_recipe("ties", base, experts))
    status, message = run_cli(capsys, "merge", str(recipe), str(out))
    assert status == 6 and "config.json" in message, message
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # no .mergefleet/lock left behind
    assert (out / "config.json").read_text() == '{"mine": 1}'


LOCKERS = """
import os, sys, time
from orchestrator.errors import OutputError
from orchestrator.storage.local import LocalOutput
from orchestrator.storage.output_lock import hold_output_lock
out, inside, go, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
while not os.path.exists(go):
    time.sleep(0.001)
held = 0
while held < rounds:
    try:
        with hold_output_lock(LocalOutput(out)):
            fd = os.open(inside, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # fails if another holder is inside
            os.close(fd)
            os.unlink(inside)
            held += 1
    except OutputError:
        pass
"""


def test_a_lock_removed_on_release_still_admits_one_holder_at_a_time(tmp_path: Path) -> None:
    """Each release finds only the lock in .mergefleet/ and removes it, while other processes
    open and lock the path as fast as they can: a run that locked the removed file must notice
    and lock the new one, or two runs would hold the output at once."""
    out, inside, go = tmp_path / "out", tmp_path / "inside", tmp_path / "go"
    out.mkdir()
    lockers = [subprocess.Popen([sys.executable, "-c", LOCKERS, str(out), str(inside), str(go), "300"], cwd=ROOT,
                                stderr=subprocess.PIPE, text=True) for _ in range(3)]
    go.touch()
    errors = [locker.communicate(timeout=120)[1] for locker in lockers]
    assert all(locker.returncode == 0 for locker in lockers), errors
    assert sorted(out.iterdir()) == []  # the last release removed the lock and its folder


def test_s3_lock_refuses_a_live_holder_and_takes_over_a_dead_ones(s3_server) -> None:
    s3_server.bucket("locks")
    sink = S3Output("s3://locks/out")
    client = s3_server.client()
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = LockHolder(socket.gethostname(), os.getpid(), time.time(), time.time() + 600)
    client.put_object(Bucket="locks", Key=f"out/{LOCK_FILE}", Body=live.to_json())
    with pytest.raises(OutputError, match=f"pid {os.getpid()}"), hold_output_lock(sink):
        pass
    stale = LockHolder(socket.gethostname(), dead.pid, time.time(), time.time() + 600)
    client.put_object(Bucket="locks", Key=f"out/{LOCK_FILE}", Body=stale.to_json())
    with hold_output_lock(sink) as holder:
        assert holder.pid == os.getpid()
        stored = LockHolder.parse(client.get_object(Bucket="locks", Key=f"out/{LOCK_FILE}")["Body"].read())
        assert stored is not None and stored.pid == os.getpid()
    assert "out/.mergefleet/lock" not in [o["Key"] for o in client.list_objects_v2(Bucket="locks").get("Contents", [])]
    expired = LockHolder("another-host", 1, time.time() - 900, time.time() - 1)
    client.put_object(Bucket="locks", Key=f"out/{LOCK_FILE}", Body=expired.to_json())
    with hold_output_lock(sink) as holder:
        assert holder.pid == os.getpid()


# ---------------------------------------------------------------- receipts against files
# (a resume that redoes a shard whose file does not match: tests/test_faults.py)


def test_assemble_refuses_a_shard_that_does_not_match_its_receipt(family, tmp_path: Path) -> None:
    base, experts = family
    out = tmp_path / "out"
    summary = merge(parse_recipe(gta_recipe("ties", base, experts)), str(out), shards=2, workers=1)
    plan = open_plan(PlanRef.locate(str(out / ".mergefleet" / "plan.json")))
    victim = out / plan.shards[1].file
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x80
    victim.write_bytes(bytes(data))
    with pytest.raises(PlanError, match=f"{plan.shards[1].file} does not match its receipt"):
        assemble(plan)
    manifest = json.loads((out / "mergefleet.json").read_text())
    assert manifest["plan_id"] == summary.plan_id  # the earlier manifest stays; nothing new claims the bad file
