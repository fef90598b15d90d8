"""mergekit's own example recipes, adapted to tiny checkpoints, against mergekit 0.1.5.

The recipes under tests/mergekit_examples/ are mergekit's ``examples/`` and the complete
recipes of its docs, each with a line saying where it came from; only the model names (the
placeholders below, resolved to tiny local checkpoints in the recipe's own dtype) and the
layer ranges changed. Deterministic ones must give mergekit's bytes (identical, or one unit
in the last place for at most 1 element in 10⁴); random ones must run and keep what their
density asks. The multi-document example runs its named intermediates first, as
mergekit-multi does.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from orchestrator.multidoc import load_graph, merge_graph
from orchestrator.pipeline import merge
from orchestrator.recipe import parse_recipe
from mergefleet.fixtures.synthetic import fine_tuned, random_weights, save_checkpoint
from tests.helpers import TINY
from tests.mergekit_runner import assert_same_bytes, load_tensors, run_mergekit

EXAMPLES = Path(__file__).parent / "mergekit_examples"
PLACEHOLDERS = ("base", "expert-a", "expert-b", "expert-c")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

DETERMINISTIC = ["arcee_fusion", "bio-merge", "gradient-slerp", "linear", "orcamini-platy-44layer", "ties"]
MULTI_DOCUMENT = ["multimerge"]  # named intermediate merges feeding a random final merge


def test_every_example_is_classified() -> None:
    assert sorted(p.stem for p in EXAMPLES.glob("*.yaml")) == sorted([*DETERMINISTIC, *MULTI_DOCUMENT])
    for path in EXAMPLES.glob("*.yaml"):
        assert re.match(r"# from arcee-ai/mergekit \S+ ", path.read_text()), f"{path.name}: say where it came from"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """dtype → placeholder → a tiny checkpoint: a base and three experts fine-tuned from it."""
    root = tmp_path_factory.mktemp("example-models")
    families: dict[str, dict[str, Path]] = {}
    for name, dtype in DTYPES.items():
        weights = random_weights(TINY, seed=31, dtype=dtype)
        family = {"base": save_checkpoint(root / name / "base", weights, TINY)}
        for i, placeholder in enumerate(PLACEHOLDERS[1:]):
            family[placeholder] = save_checkpoint(root / name / placeholder, fine_tuned(weights, seed=60 + i), TINY)
        families[name] = family
    return families


def _resolve(value: Any, paths: dict[str, Path]) -> Any:
    """The recipe with every placeholder model name replaced by its checkpoint's path."""
    if isinstance(value, dict):
        return {key: _resolve(item, paths) for key, item in value.items()}
    if isinstance(value, list):
        return [_resolve(item, paths) for item in value]
    return str(paths[value]) if isinstance(value, str) and value in paths else value


def adapted(name: str, checkpoints: dict[str, dict[str, Path]]) -> dict[str, Any]:
    recipe = yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text())
    return _resolve(recipe, checkpoints[recipe.get("dtype", "float32")])


@pytest.fixture(scope="module")
def mergekit_outputs(checkpoints, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    recipes = {name: adapted(name, checkpoints) for name in DETERMINISTIC}
    return run_mergekit(recipes, tmp_path_factory.mktemp("mergekit-examples"))


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_example_gives_mergekits_bytes(name: str, checkpoints, mergekit_outputs, tmp_path: Path) -> None:
    expected = mergekit_outputs[name]
    assert isinstance(expected, dict), f"mergekit failed on {name}: {expected}"
    recipe = adapted(name, checkpoints)
    merge(parse_recipe(recipe), str(tmp_path / "out"), shards=2)
    got = load_tensors(tmp_path / "out")
    assert_same_bytes(got, expected, label=name)
    first = recipe.get("base_model") or (recipe.get("models") or recipe["slices"][0]["sources"])[0]["model"]
    reference = load_tensors(Path(first))
    changed = sum(int((t.float() != reference[n].float()).sum()) for n, t in expected.items() if n in reference)
    assert changed > sum(t.numel() for t in expected.values()) / 200, f"{name}: the merge changed nothing"


def test_multi_document_example_runs(checkpoints, tmp_path: Path) -> None:
    """The intermediate merges feed the final dare_ties (random): it must run, be finite, and
    change about as many entries as its densities keep (0.6 and 0.8: 1 − 0.4·0.2 = 0.92 at
    most, fewer where the election cancels)."""
    text = (EXAMPLES / "multimerge.yaml").read_text()
    documents = [_resolve(doc, checkpoints["float32"]) for doc in yaml.safe_load_all(text)]
    path = tmp_path / "multimerge.yaml"
    path.write_text(yaml.safe_dump_all(documents, sort_keys=False))
    merge_graph(load_graph(path), str(tmp_path / "out"))
    got = load_tensors(tmp_path / "out")
    base = load_tensors(checkpoints["float32"]["base"])
    changed = total = 0
    for name, tensor in got.items():
        assert bool(torch.isfinite(tensor).all()), name
        changed += int((tensor != base[name]).sum())
        total += tensor.numel()
    assert 0.5 < changed / total < 0.95
