"""Helpers the tests share: tiny shapes, recipe builders, reading a merged checkpoint back."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open

from mergefleet.fixtures.synthetic import LlamaShape

MERGEFLEET = [sys.executable, "-m", "mergefleet"]
"""The command line, as the installed package runs it (whatever the console script points at)."""

ROOT = Path(__file__).resolve().parents[1]

_HOLD_LOCK = """
import sys, time
from orchestrator.storage.checkpoint import open_output
from orchestrator.storage.output_lock import hold_output_lock
with hold_output_lock(open_output(sys.argv[1])):
    print("held", flush=True)
    time.sleep(300)
"""


@contextlib.contextmanager
def hold_lock_elsewhere(location: Path | str) -> Iterator[subprocess.Popen[str]]:
    """Another process holding the output lock of ``location`` (as a second run would) while
    the block runs; killed afterwards, which leaves a dead holder's lock behind."""
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_HOLD_LOCK), str(location)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait()


TINY = LlamaShape(hidden=32, layers=8, intermediate=64, vocab=96, heads=4, kv_heads=2)


def write_recipe(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def gta_recipe(method: str, base: Path, experts: list[Path], **extra: Any) -> dict[str, Any]:
    """A recipe for the task-arithmetic family with distinct weights and densities."""
    models: list[dict[str, Any]] = [{"model": str(base)}]
    for i, path in enumerate(experts):
        params: dict[str, Any] = {"weight": [0.3 + 0.2 * i, 0.9 - 0.1 * i]}
        if method not in ("task_arithmetic", "linear"):
            params["density"] = 0.3 + 0.15 * i
        models.append({"model": str(path), "parameters": params})
    recipe = {"merge_method": method, "base_model": str(base), "models": models, "random_seed": 11}
    recipe.update(extra)
    return recipe


def read_tensors(output: Path) -> dict[str, torch.Tensor]:
    index = json.loads((output / "model.safetensors.index.json").read_text())
    tensors = {}
    for file in sorted(set(index["weight_map"].values())):
        with safe_open(output / file, "pt") as handle:
            for name in handle.keys():
                tensors[name] = handle.get_tensor(name)
    return tensors


def assert_same_tensors(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name].view(torch.uint8), tensor.view(torch.uint8)), name


def checkpoint_bytes(out: Path) -> dict[str, bytes]:
    names = [p.name for p in out.glob("*.safetensors")] + ["model.safetensors.index.json", "config.json"]
    return {name: (out / name).read_bytes() for name in sorted(names)}
