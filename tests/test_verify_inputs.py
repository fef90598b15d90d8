"""Inputs that change are noticed between planning and a shard, even with their mtime put
back: a changed safetensors header by default, changed bytes with ``fleet.verify_inputs: content``."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import MERGEFLEET, gta_recipe, write_recipe

ROOT = Path(__file__).resolve().parent.parent


def rewrite_keeping_mtime(path: Path, change) -> None:
    """Rewrite ``path`` in place with ``change(bytes) -> bytes`` (same size), then restore its times."""
    before = path.stat()
    data = path.read_bytes()
    changed = change(data)
    assert len(changed) == len(data) and changed != data
    path.write_bytes(changed)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def swap_two_names(data: bytes) -> bytes:
    """Swap q_proj and o_proj in the header: same length, a different (still valid) header."""
    length = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + length].replace(b"q_proj", b"\0").replace(b"o_proj", b"q_proj").replace(b"\0", b"o_proj")
    return data[:8] + header + data[8 + length :]


def flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0x01])


@pytest.fixture
def setup(family, tmp_path: Path):
    base, experts = family
    copied = shutil.copytree(experts[0], tmp_path / "expert")  # the session's family stays untouched
    env = os.environ | {
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
    }

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*MERGEFLEET, *args], capture_output=True, text=True, env=env, timeout=180)

    def recipe(**fleet: str) -> Path:
        data = gta_recipe("task_arithmetic", base, [copied]) | ({"fleet": fleet} if fleet else {})
        return write_recipe(tmp_path / "recipe.yaml", data)

    return copied, run, recipe, tmp_path


def test_a_header_rewritten_with_its_mtime_restored_is_caught_by_default(setup) -> None:
    expert, run, recipe, tmp_path = setup
    out = tmp_path / "out"
    assert run("plan", str(recipe()), str(out)).returncode == 0
    rewrite_keeping_mtime(expert / "model.safetensors", swap_two_names)
    result = run("shard", str(out), "--index", "0")
    assert result.returncode == 4, result.stderr
    assert "safetensors header of model.safetensors" in result.stderr and str(expert) in result.stderr, result.stderr
    assert not list(out.glob("*.safetensors"))


def test_content_rewritten_with_its_mtime_restored_is_caught_with_verify_inputs_content(setup) -> None:
    expert, run, recipe, tmp_path = setup
    out = tmp_path / "out"
    content = recipe(verify_inputs="content")
    assert run("plan", str(content), str(out)).returncode == 0
    cache = tmp_path / "cache" / "mergefleet" / "fingerprints"
    hashed = sorted(p.name for p in cache.iterdir())
    assert len(hashed) >= 4  # two inputs' weights and configs, each hashed once
    assert run("plan", str(content), str(out)).returncode == 0
    assert sorted(p.name for p in cache.iterdir()) == hashed  # unchanged files: served from the cache

    rewrite_keeping_mtime(expert / "model.safetensors", flip_last_byte)
    result = run("shard", str(out), "--index", "0")
    assert result.returncode == 4, result.stderr
    assert "content of model.safetensors" in result.stderr and str(expert) in result.stderr, result.stderr
    assert not list(out.glob("*.safetensors"))
