"""What the Prefect and MLflow UIs show of a merge, built from a real plan: shard names by
layer range, short parameter names, the scores table and the comparison chart."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from orchestrator.evaluate.runner import CheckpointScores
from orchestrator.evaluate.scores import Evaluation
from orchestrator.plan import build_plan
from orchestrator.recipe import parse_recipe
from orchestrator.report import input_labels, markdown_table, score_rows, shard_name, short_params
from tests.helpers import TINY, gta_recipe


@pytest.fixture(scope="module")
def plan(family, tmp_path_factory):
    base, experts = family
    data = gta_recipe("ties", base, experts, parameters={"normalize": False}, name="tiny")
    return build_plan(parse_recipe(data), str(tmp_path_factory.mktemp("report") / "out"), shards=3)


def test_shards_are_named_by_the_blocks_they_write_and_cover_every_block_once(plan) -> None:
    seen: list[int] = []
    others = 0
    for shard in plan.shards:
        match = re.fullmatch(rf"shard-{shard.index} \((?:layers? (\d+)(?:-(\d+))?( \+ other)?|embeddings and head)\)", shard_name(plan, shard.index))
        assert match, shard_name(plan, shard.index)
        if match[1] is not None:
            seen += range(int(match[1]), int(match[2] or match[1]) + 1)
        others += bool(match[3]) or match[1] is None
        blocks = {int(m[1]) for t in shard.tensors if (m := re.search(r"layers\.(\d+)\.", t.name))}
        assert blocks == set(range(int(match[1]), int(match[2] or match[1]) + 1)) if match[1] else not blocks
    assert sorted(seen) == list(range(TINY.layers))
    assert others >= 1  # embeddings, the final norm and the head go somewhere


def test_short_params_name_each_setting_once(plan, family) -> None:
    _, experts = family
    params = short_params(plan, input_labels(plan))
    assert params["method"] == "ties" and params["experts"] == "3" and params["shards"] == "3"
    assert params["normalize"] == "False"
    for i, expert in enumerate(experts):
        assert params[f"density.{expert.name}"] == str(0.3 + 0.15 * i)
        assert params[f"weight.{expert.name}"] == str([0.3 + 0.2 * i, 0.9 - 0.1 * i])


def _scores(model: str, values: dict[str, float]) -> CheckpointScores:
    return CheckpointScores(model=model, fingerprint="f", scores=values, primary={t: "acc" for t in values}, metrics={}, seconds=1.0)


def test_the_scores_table_has_base_each_expert_merged_and_normalised(plan, family) -> None:
    base, experts = family
    evaluation = Evaluation(
        tasks=["a", "b"],
        merged=_scores("out", {"a": 0.6, "b": 0.9}),
        base=_scores(str(base), {"a": 0.3, "b": 0.5}),
        experts={str(experts[0]): _scores(str(experts[0]), {"a": 0.8, "b": 0.4})},
        normalised={"a": 0.75, "b": 1.8},
    )
    rows = score_rows(evaluation, input_labels(plan))
    assert rows == [
        {"task": "a", "base": 0.3, experts[0].name: 0.8, "merged": 0.6, "normalised": 0.75},
        {"task": "b", "base": 0.5, experts[0].name: 0.4, "merged": 0.9, "normalised": 1.8},
    ]
    table = markdown_table(rows).splitlines()
    assert table[0] == f"| task | base | {experts[0].name} | merged | normalised |"
    assert table[2] == "| a | 0.300 | 0.800 | 0.600 | 0.750 |"


def test_the_comparison_chart_draws_merges_as_bars_and_inputs_as_lines(tmp_path: Path) -> None:
    from orchestrator.tracking.charts import comparison_chart, comparison_figure

    merges = {"ties": {"a": 0.7, "b": 0.9}, "linear": {"a": 0.6, "b": 0.8}}
    references = {"base": {"a": 0.38, "b": 0.32}, "add": {"a": 0.98, "b": 0.27}}
    figure = comparison_figure(merges, references)
    axes = figure.axes[0]
    assert sorted(round(bar.get_height(), 3) for bar in axes.patches) == [0.6, 0.7, 0.8, 0.9]
    lines = sorted(round(float(segment[0][1]), 3) for collection in axes.collections for segment in collection.get_segments())
    assert lines == [0.27, 0.32, 0.38, 0.98]
    assert comparison_chart(merges, references, tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
