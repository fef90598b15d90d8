"""Faults are errors, not tracebacks: a full disk, permission denied after planning, an
output directory that vanishes mid-shard, a malformed or unreadable plan, a closed stdout.

Each runs the real command line in a subprocess and checks: one line on stderr naming the
path, a non-zero exit, with ``--json`` exactly one JSON error object on stdout, and no
file that looks complete. Faults of the file system need root (a small tmpfs, ``chattr``,
a child run as ``nobody``); without it those tests skip and say why.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import textwrap
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.helpers import MERGEFLEET, gta_recipe, write_recipe

ROOT = Path(__file__).resolve().parent.parent
ENV = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs, chattr and setuid need root")


def mergefleet(*args: str, **popen: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MERGEFLEET, *args], capture_output=True, text=True, env=ENV, timeout=180, **popen)


def assert_one_error(result: subprocess.CompletedProcess[str], *, kind: str, exit_code: int, path: Path | None) -> dict[str, Any]:
    """One line on stderr, no traceback, the exit code, and one JSON error object on stdout."""
    assert result.returncode == exit_code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    stdout_lines = result.stdout.splitlines()
    assert len(stdout_lines) == 1, result.stdout
    error = json.loads(stdout_lines[0])
    assert error["kind"] == kind and error["exit_code"] == exit_code, error
    assert error["error"] == lines[0].removeprefix("error: ")
    if path is not None:
        assert error["path"] == str(path) and str(path) in lines[0], (error, lines[0])
    return error


def assert_nothing_looks_complete(out: Path) -> None:
    """No manifest, no index, and no temporary file left; a weight file only with its receipt."""
    assert not (out / "mergefleet.json").exists() and not (out / "model.safetensors.index.json").exists()
    assert not [p for p in out.rglob("*") if ".partial-" in p.name]
    for weights in out.glob("model-*.safetensors"):
        index = int(weights.name.split("-")[1]) - 1
        assert (out / ".mergefleet" / f"shard-{index}.json").exists(), weights


@pytest.fixture
def recipe(family, tmp_path: Path) -> Path:
    base, experts = family
    return write_recipe(tmp_path / "recipe.yaml", gta_recipe("task_arithmetic", base, experts[:2]))


@contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


@needs_root
def test_a_full_disk_is_one_line_naming_the_output_and_leaves_nothing_complete(recipe: Path, tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "200k") as small:
        out = small / "out"
        result = mergefleet("merge", str(recipe), str(out), "--shards", "2", "--json")
        error = assert_one_error(result, kind="disk_full", exit_code=6, path=None)
        assert error["path"].startswith(str(out)) and "free space" in error["error"], error
        assert_nothing_looks_complete(out)


@needs_root
def test_permission_denied_after_planning_is_one_line_naming_the_file(recipe: Path, tmp_path: Path) -> None:
    if shutil.which("chattr") is None:
        pytest.skip("chattr is not installed")
    out = tmp_path / "out"
    assert mergefleet("plan", str(recipe), str(out), "--shards", "2").returncode == 0
    locked = subprocess.run(["chattr", "+i", str(out)], capture_output=True, text=True)
    if locked.returncode != 0:
        pytest.skip(f"this file system has no immutable flag: {locked.stderr.strip()}")
    try:
        result = mergefleet("merge", str(recipe), str(out), "--shards", "2", "--json")
    finally:
        subprocess.run(["chattr", "-i", str(out)], check=True)
    error = assert_one_error(result, kind="permission_denied", exit_code=6, path=out / "model-00001-of-00002.safetensors")
    assert "writable" in error["error"]
    assert_nothing_looks_complete(out)


VANISH_MID_SHARD = """
import shutil, sys
from mergefleet import cli
from orchestrator.storage import writer

write = writer.SafetensorsWriter.write
def write_then_vanish(self, name, tensor):
    write(self, name, tensor)
    if self._next == 2:  # two tensors of the first shard are in its temporary file
        shutil.rmtree(sys.argv[2])
writer.SafetensorsWriter.write = write_then_vanish
sys.exit(cli.main(["merge", sys.argv[1], sys.argv[2], "--json"]))
"""


def test_an_output_directory_that_vanishes_mid_shard_is_one_line(recipe: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = [sys.executable, "-c", textwrap.dedent(VANISH_MID_SHARD), str(recipe), str(out)]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=180)
    error = assert_one_error(result, kind="output_vanished", exit_code=6, path=out / "model-00001-of-00001.safetensors")
    assert "run the same command again" in error["error"]
    assert not out.exists() or not list(out.glob("*.safetensors"))


@pytest.mark.parametrize(
    ("text", "command"), [(b"\xff\xfe not a plan", "shard"), (b"[]", "assemble"), (b'{"version": 1, "plan_id": 3}', "shard")]
)
def test_a_malformed_plan_is_one_line_naming_it(recipe: Path, tmp_path: Path, text: bytes, command: str) -> None:
    out = tmp_path / "out"
    assert mergefleet("plan", str(recipe), str(out)).returncode == 0
    plan = out / ".mergefleet" / "plan.json"
    version = json.loads(plan.read_text())["version"]
    plan.write_bytes(text.replace(b'"version": 1', f'"version": {version}'.encode()))
    arguments = ["shard", str(out), "--index", "0"] if command == "shard" else ["assemble", str(out)]
    error = assert_one_error(mergefleet(*arguments, "--json"), kind="plan", exit_code=4, path=plan)
    assert "mergefleet plan" in error["error"]
    assert_nothing_looks_complete(out)


@needs_root
def test_an_unreadable_plan_is_one_line_naming_it(recipe: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    scratch = Path(tempfile.mkdtemp(prefix="mergefleet-unreadable-", dir="/tmp"))
    try:
        scratch.chmod(0o755)
        out = scratch / "out"
        assert mergefleet("plan", str(recipe), str(out)).returncode == 0
        for folder in (out, out / ".mergefleet"):
            folder.chmod(0o755)
        plan = out / ".mergefleet" / "plan.json"
        plan.chmod(0o600)  # root's, unreadable for nobody

        def as_nobody() -> None:
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)

        try:
            probe = subprocess.run([sys.executable, "-c", "import mergefleet.cli"], env=ENV, preexec_fn=as_nobody, capture_output=True, text=True)
        except PermissionError as exc:
            pytest.skip(f"user nobody cannot run this Python ({exc.filename}); a root-owned file is readable by root")
        if probe.returncode != 0:
            pytest.skip(f"user nobody cannot import mergefleet here: {probe.stderr.strip()[-200:]}")
        result = mergefleet("shard", str(out), "--index", "0", "--json", preexec_fn=as_nobody, cwd=scratch)
        error = assert_one_error(result, kind="output", exit_code=6, path=plan)
        assert "readable" in error["error"]
    finally:
        shutil.rmtree(scratch)


def test_a_closed_stdout_is_one_line_and_a_non_zero_exit(recipe: Path, tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # like `mergefleet ... | head -0`: nobody reads the result
    try:
        result = subprocess.run(
            [*MERGEFLEET, "plan", str(recipe), str(tmp_path / "out"), "--json"],
            stdout=write_end, stderr=subprocess.PIPE, text=True, env=ENV, timeout=180,
        )
    finally:
        os.close(write_end)
    assert result.returncode == 141, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "broken pipe" in lines[0] and "Traceback" not in result.stderr, result.stderr


def test_a_command_line_mistake_with_json_is_a_json_error(recipe: Path, tmp_path: Path) -> None:
    error = assert_one_error(mergefleet("merge", str(recipe), str(tmp_path / "o"), "--shards", "0", "--json"), kind="usage", exit_code=2, path=None)
    assert "--shards" in error["error"]
    error = assert_one_error(mergefleet("merge", str(recipe), "--no-such-option", "--json"), kind="usage", exit_code=2, path=None)
    assert "--no-such-option" in error["error"]


def test_a_malformed_receipt_is_one_line_naming_it(recipe: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert mergefleet("plan", str(recipe), str(out)).returncode == 0
    receipt = out / ".mergefleet" / "shard-0.json"
    receipt.write_bytes(b"{ not a receipt")
    error = assert_one_error(mergefleet("assemble", str(out), "--json"), kind="plan", exit_code=4, path=receipt)
    assert "--force" in error["error"]
    assert_nothing_looks_complete(out)
