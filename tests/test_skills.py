"""Experts that really have skills: a merge keeps both, measured with lm-eval."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergefleet.fixtures.skills import SKILLS, SkillsConfig, build_skills, build_tokenizer
from orchestrator.evaluate.scores import evaluate_merge
from orchestrator.pipeline import merge
from orchestrator.plan_ref import open_plan
from orchestrator.recipe import parse_recipe


def test_the_tokenizer_is_character_level_and_round_trips() -> None:
    tokenizer = build_tokenizer()
    text = "add: 3+4 = 07\n"
    ids = tokenizer(text).input_ids
    assert len(ids) == len(text) and tokenizer.decode(ids) == text


def test_skill_examples_are_well_formed() -> None:
    import random

    rng = random.Random(0)
    for skill in SKILLS.values():
        for _ in range(20):
            prompt, answer, choices = skill.example(rng)
            assert prompt.endswith(" =") and answer in choices and len(set(choices)) == 4 == len(choices)
            assert len({len(c) for c in choices}) == 1  # equal lengths: no choice wins by being short


def test_training_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    config = SkillsConfig(skills=("add", "map"), base_steps=3, expert_steps=3, batch_size=8, eval_examples=5)
    one = build_skills(tmp_path / "one", config)
    two = build_skills(tmp_path / "two", config)
    for a, b in [(one.base, two.base), *zip(one.experts.values(), two.experts.values())]:
        assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert build_skills(tmp_path / "one", config).cached  # a second call reuses what is there
    assert (one.tasks_dir / "skill_add.jsonl").read_text() == (two.tasks_dir / "skill_add.jsonl").read_text()


@pytest.mark.parametrize("method", ["ties"])
def test_a_merge_of_two_skilled_experts_keeps_both_skills(method: str, skill_models, eval_cache: Path, tmp_path: Path) -> None:
    data = skill_models.recipe(method, output=tmp_path / "merged", shards=2)
    data["fleet"]["eval"]["cache_dir"] = str(eval_cache)
    recipe = parse_recipe(data)
    summary = merge(recipe, str(tmp_path / "merged"))
    evaluation = evaluate_merge(open_plan(summary.plan_ref), recipe.fleet.eval)

    merged, base = evaluation.merged.scores, evaluation.base.scores
    experts = {Path(name).name: scores.scores for name, scores in evaluation.experts.items()}
    report = f"merged {merged}, base {base}, experts {experts}"
    add, map_ = skill_models.tasks["add"], skill_models.tasks["map"]
    assert experts["add"][add] > 0.8 and experts["map"][map_] > 0.8, report  # each expert learnt its skill
    assert base[add] < 0.45 and base[map_] < 0.45, report  # the base did not (chance: 0.25)
    for task in (add, map_):
        assert merged[task] > base[task] + 0.1, report  # the merge has both skills...
    assert experts["add"][map_] < merged[map_] - 0.1, report  # ...which neither expert has alone
    assert experts["map"][add] < merged[add] - 0.1, report
    assert evaluation.normalised[add] == pytest.approx(merged[add] / experts["add"][add])
    assert evaluation.owners == {add: str(skill_models.experts["add"]), map_: str(skill_models.experts["map"])}
