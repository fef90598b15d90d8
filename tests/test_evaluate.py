"""Evaluation with lm-eval on real (tiny) checkpoints and local tasks: task resolution,
clear errors, the score cache, normalisation."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from orchestrator.errors import EvaluationError
from orchestrator.evaluate.runner import evaluate_checkpoint
from orchestrator.evaluate.scores import normalise
from orchestrator.evaluate.tasks import resolve_tasks, task_manager
from orchestrator.recipe import EvalSettings, parse_recipe


def settings(tasks: list[str], cache: Path, **extra) -> EvalSettings:
    return EvalSettings(tasks=[str(t) for t in tasks], cache_dir=str(cache), batch_size=32, **extra)


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def test_normalised_scores_use_the_owner_expert_else_the_base() -> None:
    merged = {"add": 0.8, "map": 0.6, "held_out": 0.5}
    base = {"add": 0.25, "map": 0.3, "held_out": 0.4}
    experts = {"e_add": {"add": 1.0, "map": 0.2}, "e_map": {"add": 0.3, "map": 0.0}}
    result = normalise(merged, base, experts, {"add": "e_add", "map": "e_map"})
    assert result == {"add": pytest.approx(0.8), "held_out": pytest.approx(1.25)}  # map: its owner scored 0


def test_tasks_resolve_from_a_directory_yaml_and_jsonl(skill_models, tmp_path: Path) -> None:
    jsonl = write_jsonl(tmp_path / "mine.jsonl", [{"prompt": "add: 1+1 =", "choices": ["02", "03"], "answer": 0}])
    yaml_file = skill_models.tasks_dir / "skill_map.yaml"
    tasks = resolve_tasks([str(skill_models.tasks_dir), str(jsonl)], cache_dir=tmp_path)
    assert tasks.names == ["skill_add", "skill_map", "mine"] and tasks.local
    assert tasks.specs[2]["output_type"] == "multiple_choice"
    again = resolve_tasks([str(yaml_file), "skill_add", str(jsonl)], cache_dir=tmp_path)
    assert again.names == ["skill_map", "skill_add", "mine"] and again.local  # a name found in a local directory
    write_jsonl(jsonl, [{"prompt": "add: 1+1 =", "choices": ["02", "04"], "answer": 0}])
    assert resolve_tasks([str(jsonl)], cache_dir=tmp_path).digest != resolve_tasks([str(skill_models.tasks_dir)], cache_dir=tmp_path).digest


@pytest.mark.parametrize(
    "rows, message",
    [
        (['{"prompt": "a", "choices": ["x", "y"], "answer": 0}', "{not json"], r"bad\.jsonl:2 is not valid JSON"),
        (['["a", "b"]'], r"bad\.jsonl:1 is a JSON list, not an object"),
        ([{"prompt": "a", "choices": ["x", "y"]}], r"example 1 lacks 'answer'"),
        ([{"prompt": "a", "choices": ["x", "y"], "answer": 2}], r"'answer' must be the index of the right choice, 0\.\.1"),
        ([{"prompt": "a", "choices": "xy", "answer": 0}], r"'choices' must be a list of at least two strings"),
        ([], r"holds no examples"),
    ],
)
def test_a_malformed_jsonl_task_is_a_clear_error(rows, message: str, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(EvaluationError, match=message):
        resolve_tasks([str(path)], cache_dir=tmp_path)


def test_a_task_yaml_reading_malformed_jsonl_is_a_clear_error(skill_models, tmp_path: Path) -> None:
    tasks = tmp_path / "tasks"
    shutil.copytree(skill_models.tasks_dir, tasks)
    config = (tasks / "skill_add.yaml").read_text()
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "add: 1+1 =", "choices": ["02", "03"], "answer": 0}\n{"prompt": \n')
    (tasks / "skill_add.yaml").write_text(config.replace(str(skill_models.tasks_dir / "skill_add.jsonl"), str(broken)))
    with pytest.raises(EvaluationError, match=r"broken\.jsonl:2 is not valid JSON"):
        resolve_tasks([str(tasks)], cache_dir=tmp_path)


def test_missing_task_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(EvaluationError, match=r"task file .*nowhere\.jsonl does not exist"):
        resolve_tasks([str(tmp_path / "nowhere.jsonl")])
    with pytest.raises(EvaluationError, match=r"task path .*/nowhere does not exist"):
        resolve_tasks([str(tmp_path / "nowhere")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvaluationError, match=r"holds no task YAML"):
        resolve_tasks([str(tmp_path / "empty")])


def test_an_unknown_task_name_is_a_clear_error(skill_models, tmp_path: Path) -> None:
    tasks = resolve_tasks([str(skill_models.tasks_dir), "skill_ad"], cache_dir=tmp_path)
    assert not tasks.local  # not found locally: lm-eval's bundled tasks are searched too
    with pytest.raises(EvaluationError, match=r"unknown task 'skill_ad': it is not in the task directories .* nor lm-eval's \d+ bundled tasks; did you mean skill_add"):
        task_manager(tasks)


def test_a_checkpoint_that_cannot_load_is_a_clear_error(skill_models, eval_cache: Path, tmp_path: Path) -> None:
    chosen = settings([skill_models.tasks_dir], eval_cache)
    with pytest.raises(EvaluationError, match=r"cannot evaluate .*/missing"):
        evaluate_checkpoint(str(tmp_path / "missing"), chosen)
    broken = tmp_path / "broken"
    shutil.copytree(skill_models.base, broken)
    (broken / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(EvaluationError, match=r"cannot load .*/broken for evaluation: \w+"):
        evaluate_checkpoint(str(broken), chosen)
    (broken / "config.json").unlink()
    with pytest.raises(EvaluationError, match=r"cannot load .*/broken for evaluation: it has no config.json"):
        evaluate_checkpoint(str(broken), chosen)


def test_scores_are_cached_by_fingerprint(skill_models, eval_cache: Path, tmp_path: Path) -> None:
    copy = tmp_path / "base"
    shutil.copytree(skill_models.base, copy)
    chosen = settings([skill_models.tasks_dir], eval_cache, limit=40)
    first = evaluate_checkpoint(str(copy), chosen)
    assert not first.cached and set(first.scores) == {"skill_add", "skill_map"}
    assert first.primary == {"skill_add": "acc", "skill_map": "acc"}
    assert 0.0 <= first.scores["skill_add"] <= 1.0 and "acc_stderr" in first.metrics["skill_add"]
    second = evaluate_checkpoint(str(copy), chosen)
    assert second.cached and second.scores == first.scores
    (copy / "config.json").write_text((copy / "config.json").read_text() + "\n")  # a new version of the checkpoint
    assert not evaluate_checkpoint(str(copy), chosen).cached


def test_eval_settings_are_strict() -> None:
    from orchestrator.errors import RecipeError

    base = {"merge_method": "linear", "models": [{"model": "a"}, {"model": "b"}]}
    with pytest.raises(RecipeError, match=r"unknown key 'fleet\.eval\.task'; did you mean 'fleet\.eval\.tasks'\?"):
        parse_recipe(base | {"fleet": {"eval": {"tasks": ["x"], "task": ["x"]}}}, strict=True)
    with pytest.raises(RecipeError, match=r"fleet\.eval\.tasks"):
        parse_recipe(base | {"fleet": {"eval": {"tasks": []}}})
    recipe = parse_recipe(base | {"fleet": {"eval": {"tasks": ["x"], "limit": 0.5}, "tracking_uri": "http://h:5000"}})
    assert recipe.fleet.eval.limit == 0.5 and recipe.fleet.tracking_uri == "http://h:5000"


def test_local_tasks_run_offline_and_the_environment_is_restored(monkeypatch) -> None:
    import huggingface_hub.constants

    from orchestrator.evaluate.offline import offline

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    before = huggingface_hub.constants.HF_HUB_OFFLINE
    with offline():
        with offline():  # nested (a sweep's threads): the outer block still holds
            pass
        assert os.environ["HF_HUB_OFFLINE"] == "1" == os.environ["HF_DATASETS_OFFLINE"]
        assert huggingface_hub.constants.HF_HUB_OFFLINE is True
    assert "HF_HUB_OFFLINE" not in os.environ and huggingface_hub.constants.HF_HUB_OFFLINE == before
