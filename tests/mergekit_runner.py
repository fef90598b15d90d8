"""Running mergekit 0.1.5 on many recipes at once, and comparing its tensors with ours.

mergekit's start-up (imports, architecture registry) costs more than a tiny merge, so the
recipes of a test module run in one subprocess, each through ``MergeConfiguration`` and
``run_merge`` - the path ``mergekit-yaml`` takes - with a failure recorded per recipe.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file

from tests.helpers import write_recipe

_DRIVER = """
import json, sys, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
options = MergeOptions(quiet=True, write_model_card=False, copy_tokenizer=False)
options.apply_global_options()
failures = {}
for recipe, out in json.loads(sys.argv[1]):
    try:
        with open(recipe) as handle:
            config = MergeConfiguration.model_validate(yaml.safe_load(handle))
        run_merge(config, out, options=options)
    except Exception as error:  # reported per recipe; the test that needs it fails
        failures[recipe] = f"{type(error).__name__}: {error}"
print(json.dumps(failures))
"""


def load_tensors(out: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(out).glob("*.safetensors")):
        tensors |= load_file(file)
    return tensors


def run_mergekit(recipes: Mapping[str, dict[str, Any]], root: Path) -> dict[str, Any]:
    """Every recipe merged by mergekit in one process: name → tensors, or the error (a str)."""
    jobs = [(str(write_recipe(root / f"{name}.yaml", recipe)), str(root / f"{name}-out")) for name, recipe in recipes.items()]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "-c", _DRIVER, json.dumps(jobs)], env=env, capture_output=True, text=True, timeout=900, check=True
    )
    failures = json.loads(done.stdout.strip().splitlines()[-1])
    return {name: failures.get(recipe) or load_tensors(Path(out)) for (recipe, out), name in zip(jobs, recipes)}


def _ordered(bits: torch.Tensor) -> torch.Tensor:
    """Sign-magnitude float bit patterns as integers whose difference counts units in the last place."""
    wide = bits.to(torch.int64)
    sign = 1 << (bits.element_size() * 8 - 1)
    return torch.where(wide < 0, -(wide + sign), wide)


_BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}


def assert_same_bytes(got: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], *, label: str) -> None:
    """Same names and dtypes; every value identical, except at most 1 element in 10⁴ that may
    differ by one unit in the last place."""
    assert got.keys() == expected.keys(), label
    differing = total = 0
    for name, want in expected.items():
        have = got[name]
        assert have.dtype == want.dtype, f"{label}: {name} is {have.dtype}, mergekit's {want.dtype}"
        total += want.numel()
        unequal = have.view(_BITS[want.dtype]) != want.view(_BITS[want.dtype])
        count = int(unequal.sum())
        if count:
            ulps = (_ordered(have.view(_BITS[want.dtype])) - _ordered(want.view(_BITS[want.dtype]))).abs()
            assert int(ulps.max()) <= 1, f"{label}: {name} differs by {int(ulps.max())} ulp at {count} element(s)"
            differing += count
    assert differing <= total / 10_000, f"{label}: {differing} of {total} elements differ"
