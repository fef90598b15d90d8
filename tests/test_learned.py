"""Trained merges, piece by piece: DAM's math against references written here, the
coefficient file and dam_apply, the memory check, the search and Merge to Mix drivers,
the protected drop rate in MLflow and the compare chart. The claims are in test_learned_claims.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from mergefleet import cli
from mergefleet.fixtures.skill_variants import write_skill_data
from orchestrator.errors import OutputError, RecipeError, TrainingError
from orchestrator.learned.coefficients import read_coefficients, write_coefficients
from orchestrator.learned.dam import (
    DamTrainer,
    ScaledSum,
    distillation_loss,
    initial_coefficients,
    inspect_experts,
    similarity_penalty,
    train_dam,
    training_batches,
)
from orchestrator.learned.data import make_batches, read_examples, tokenize
from orchestrator.learned.memory import ModelShape, estimate_memory
from orchestrator.learned.merge_to_mix import all_subsets, run_merge_to_mix, subset_recipe
from orchestrator.learned.runs import CandidateResult
from orchestrator.learned.search import run_search, search_space
from orchestrator.learned.settings import DamSettings, parse_bytes
from orchestrator.methods.dam_apply import dam_merge
from orchestrator.pipeline import merge
from orchestrator.recipe import parse_recipe

# ---------------------------------------------------------------- DAM's math


def test_scaled_sum_is_the_column_scaled_sum_and_its_gradient_is_exact() -> None:
    torch.manual_seed(0)
    experts = [torch.randn(5, 4, dtype=torch.float64) for _ in range(3)]
    coefficients = torch.rand(3, 4, dtype=torch.float64, requires_grad=True)
    merged = ScaledSum.apply(coefficients, *experts)
    reference = sum(w @ torch.diag(c) for w, c in zip(experts, coefficients))  # W·diag(c), as METHODS writes it
    assert torch.allclose(merged, reference)
    assert torch.autograd.gradcheck(lambda c: ScaledSum.apply(c, *experts), (coefficients,))
    norms = [torch.randn(6, dtype=torch.float64) for _ in range(2)]
    scales = torch.rand(2, 6, dtype=torch.float64)
    assert torch.allclose(ScaledSum.apply(scales, *norms), scales[0] * norms[0] + scales[1] * norms[1])


def test_dam_merge_equals_the_trainers_merged_weights() -> None:
    torch.manual_seed(1)
    experts = [torch.randn(7, 3) for _ in range(2)]
    coefficients = torch.rand(2, 3)
    expected = ScaledSum.apply(coefficients, *experts)
    assert torch.allclose(dam_merge(experts, coefficients), expected, atol=1e-6)
    assert torch.allclose(dam_merge(experts, coefficients), experts[0] * coefficients[0] + experts[1] * coefficients[1], atol=1e-6)


def test_distillation_loss_is_t_squared_kl_over_scored_positions() -> None:
    torch.manual_seed(2)
    teacher, student = torch.randn(2, 4, 5, dtype=torch.float64), torch.randn(2, 4, 5, dtype=torch.float64)
    scored = torch.tensor([[True, False, True], [False, False, True]])
    got = distillation_loss(teacher, student, scored, 2.0)
    total, count = 0.0, 0
    for b in range(2):
        for t in range(3):
            if scored[b, t]:
                p = torch.softmax(teacher[b, t] / 2, -1)
                q = torch.softmax(student[b, t] / 2, -1)
                total += float((p * (p.log() - q.log())).sum())
                count += 1
    assert float(got) == pytest.approx(4.0 * total / count, rel=1e-6)


def test_similarity_penalty_sums_the_mean_pairwise_cosine_per_tensor() -> None:
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # cosines 0, 1/√2, 1/√2
    b = torch.tensor([[2.0, 2.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 3.0]])  # cosines 1, 0, 0
    got = similarity_penalty({"a": a, "b": b, "single": torch.ones(1, 4)})
    assert float(got) == pytest.approx((2 / math.sqrt(2)) / 3 + 1 / 3)
    assert float(similarity_penalty(initial_coefficients({"w": (3, 4)}, 2))) == pytest.approx(1.0)  # 1/N everywhere


# ---------------------------------------------------------------- data and memory


def test_training_data_errors_name_the_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"prompt": "p"}\n')
    with pytest.raises(TrainingError, match=r"bad.jsonl:2: each line needs a string 'text', or strings 'prompt' and 'completion'"):
        read_examples(bad)
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(TrainingError, match=r"bad.jsonl:2 is not valid JSON"):
        read_examples(bad)
    with pytest.raises(TrainingError, match="does not exist"):
        read_examples(tmp_path / "missing.jsonl")


def test_prompt_tokens_are_context_and_completion_tokens_are_scored() -> None:
    from mergefleet.fixtures.skills import build_tokenizer, encode

    rows = [{"prompt": "add: 1+2 =", "completion": " 03\n"}, {"text": "abc"}]
    examples = tokenize(rows, build_tokenizer(), 64)
    assert examples[0].ids == tuple(encode("add: 1+2 = 03\n")) and examples[0].first_scored == len("add: 1+2 =")
    assert examples[1].first_scored == 1
    (batch,) = make_batches(examples, 2, pad_id=0, seed=0)
    row = [i for i in range(2) if batch.ids[i, 0] == encode("a")[0] and batch.ids[i, 1] == encode("d")[0]][0]
    # the logits at position t predict token t+1: the completion's 4 tokens, and nothing past them
    assert batch.scored[row].nonzero().flatten().tolist() == list(range(len("add: 1+2 =") - 1, len("add: 1+2 = 03\n") - 1))
    assert batch.scored_tokens == 4 + 2


def test_memory_estimate_counts_every_expert_once_and_training_fails_early(skill_models, tmp_path: Path) -> None:
    from safetensors import safe_open

    experts = [str(p) for p in skill_models.experts.values()]
    found = inspect_experts(experts)
    with safe_open(str(skill_models.experts["add"] / "model.safetensors"), "pt") as handle:
        elements = sum(math.prod(handle.get_slice(k).get_shape()) for k in handle.keys())
    settings = DamSettings(data={e: "unused.jsonl" for e in experts}, dtype="bfloat16", batch_size=4, max_length=16)
    estimate = estimate_memory(ModelShape.of(found.config, found.shapes), 2, settings)
    assert estimate.parts["experts"] == 2 * elements * 2 and estimate.parts["merged_weights"] == elements * 2
    config = found.config
    assert estimate.parts["logits"] == 6 * 4 * 16 * config["vocab_size"] * 4
    assert estimate.parts["activations"] == 4 * 16 * config["num_hidden_layers"] * (
        10 * config["hidden_size"] + 4 * config["intermediate_size"] + 2 * config["num_attention_heads"] * 16) * 2

    data = {e: str(write_skill_data(tmp_path / f"{i}.jsonl", "add", examples=4, seed=i)) for i, e in enumerate(experts)}
    small = DamSettings(data=data, memory_limit="100KB")
    with pytest.raises(TrainingError, match=r"DAM training needs about \d+\.\d\d GiB .* but 0\.00 GiB is available; lower fleet.dam.batch_size"):
        train_dam(experts, small)
    assert parse_bytes("2GiB") == 2 * 2**30 and parse_bytes("1.5GB") == 1_500_000_000


# ---------------------------------------------------------------- DAM end to end, dam_apply


@pytest.fixture(scope="module")
def trained(skill_models, tmp_path_factory):
    """Three steps of DAM on the two skill experts (float32), and its coefficient file."""
    root = tmp_path_factory.mktemp("dam")
    experts = [str(p) for p in skill_models.experts.values()]
    data = {e: str(write_skill_data(root / f"{name}.jsonl", name, examples=12, seed=i)) for i, (name, e) in enumerate(zip(skill_models.experts, experts))}
    settings = DamSettings(data=data, dtype="float32", batch_size=4, max_length=32, lr=0.05)
    result = train_dam(experts, settings)
    path = write_coefficients(str(root / "coefficients.safetensors"), result.coefficients, experts)
    return {"root": root, "experts": experts, "settings": settings, "result": result, "path": path}


def test_dam_training_changes_the_coefficients_and_lowers_the_loss(trained) -> None:
    result = trained["result"]
    assert result.steps == 3 and len(result.losses) == 3
    changed = [name for name, c in result.coefficients.items() if not torch.allclose(c, torch.full_like(c, 0.5))]
    assert "lm_head.weight" in changed and "model.embed_tokens.weight" in changed and "model.norm.weight" in changed
    assert result.coefficients["model.layers.0.mlp.down_proj.weight"].shape == (2, 192)  # per input column
    assert result.coefficients["model.embed_tokens.weight"].shape == (2, 64)  # per embedding dimension


def test_dam_apply_writes_the_weights_the_trainer_ran_and_transformers_loads_them(trained, skill_models, tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    recipe = parse_recipe({"merge_method": "dam_apply", "models": trained["experts"], "parameters": {"coefficients": trained["path"]}, "dtype": "float32"})
    merge(recipe, str(tmp_path / "merged"), shards=2)
    written: dict[str, torch.Tensor] = {}
    for file in sorted((tmp_path / "merged").glob("model-*.safetensors")):
        written |= load_file(file)

    trainer = DamTrainer(inspect_experts(trained["experts"]), trained["settings"])
    trainer.coefficients = {name: c.clone() for name, c in trained["result"].coefficients.items()}
    with torch.no_grad():
        used = trainer.merged()
    assert set(written) == set(used)
    for name, tensor in used.items():
        torch.testing.assert_close(written[name], tensor, rtol=1e-6, atol=1e-6, msg=name)

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    (batch, *_), _ = training_batches(inspect_experts(trained["experts"]), list(trained["settings"].data.values()), trained["settings"])
    with torch.no_grad():
        loaded = model(input_ids=batch.ids, attention_mask=batch.attention).logits
        functional = trainer.logits(used, batch)
    torch.testing.assert_close(loaded, functional, rtol=1e-4, atol=1e-4)


def test_dam_apply_refuses_coefficients_that_do_not_fit_at_plan_time(trained, tmp_path: Path) -> None:
    from orchestrator.plan import build_plan

    experts, coefficients = trained["experts"], dict(trained["result"].coefficients)
    path = str(tmp_path / "partial.safetensors")
    write_coefficients(path, {k: v for k, v in coefficients.items() if k != "model.norm.weight"}, experts)
    recipe = parse_recipe({"merge_method": "dam_apply", "models": experts, "parameters": {"coefficients": path}})
    with pytest.raises(RecipeError, match=rf"coefficients file {path} has no entry for tensor 'model.norm.weight'"):
        build_plan(recipe, str(tmp_path / "out"))
    coefficients["model.norm.weight"] = torch.ones(2, 3)
    write_coefficients(path, coefficients, experts, overwrite=True)
    with pytest.raises(RecipeError, match=r"tensor 'model.norm.weight' has coefficients of shape \[2, 3\], the merge needs \[2, 64\]"):
        build_plan(recipe, str(tmp_path / "out"))
    reordered = parse_recipe({"merge_method": "dam_apply", "models": experts[::-1], "parameters": {"coefficients": trained["path"]}})
    with pytest.raises(RecipeError, match="list them in that order"):
        build_plan(reordered, str(tmp_path / "out"))
    with pytest.raises(OutputError, match="already exists; pass --overwrite"):
        write_coefficients(path, coefficients, experts)
    assert read_coefficients(trained["path"]).experts == tuple(experts)


def test_dam_train_command(trained, tmp_path: Path, capsys) -> None:
    recipe = {"merge_method": "dam_apply", "models": trained["experts"], "parameters": {"coefficients": str(tmp_path / "c.safetensors")},
              "fleet": {"dam": trained["settings"].model_dump(mode="json") | {"batch_size": 12}, "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert cli.main(["dam", "train", str(path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["steps"] == 1 and Path(result["coefficients"]).is_file() and result["run_id"]

    from mlflow import MlflowClient

    run = MlflowClient(result["tracking_uri"]).get_run(result["run_id"])
    assert run.data.tags["mergefleet.kind"] == "dam"
    assert {"loss", "kl/add", "kl/map", "coefficients/add/mean", "memory/total_bytes"} <= set(run.data.metrics)
    assert {a.path for a in MlflowClient(result["tracking_uri"]).list_artifacts(result["run_id"])} == {"loss.png", "coefficient_statistics.json"}

    assert cli.main(["dam", "train", str(path)]) == 6  # the file is there: refused, nothing lost
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    del recipe["fleet"]["dam"]
    path.write_text(yaml.safe_dump(recipe))
    assert cli.main(["dam", "train", str(path)]) == 2
    assert "fleet: {dam: {data:" in capsys.readouterr().err


# ---------------------------------------------------------------- search and Merge to Mix drivers


def _result(label: str, score: float, output: str = "") -> CandidateResult:
    return CandidateResult(label=label, output=output, plan_id="", score=score, scores={"t": score}, merge_seconds=0.0, eval_seconds=0.0)


def test_the_search_climbs_towards_the_best_point_and_writes_a_plain_recipe(family) -> None:
    base, experts = family
    recipe = parse_recipe({"merge_method": "ties", "base_model": str(base),
                           "models": [{"model": str(base)}] + [{"model": str(e), "parameters": {"weight": 0.5, "density": 0.5}} for e in experts[:2]]})
    space = search_space(recipe, layer_groups=2)
    assert [d.name for d in space.dimensions] == ["m1.weight.g0", "m1.weight.g1", "m1.density.g0", "m1.density.g1",
                                                  "m2.weight.g0", "m2.weight.g1", "m2.density.g0", "m2.density.g1"]
    target = {d.name: 0.9 if d.parameter == "weight" else 0.2 for d in space.dimensions}

    def score(proposals):  # a stand-in evaluation: closeness to a known optimum, read from the recipe itself
        results = []
        for p in proposals:
            entry = p.recipe.models[1].parameters
            assert entry["weight"] == [round(p.values["m1.weight.g0"], 6), round(p.values["m1.weight.g1"], 6)]
            results.append(_result(p.label, -sum((p.values[k] - v) ** 2 for k, v in target.items())))
        return results

    result = run_search(recipe, space, score, output="/tmp/nowhere", budget=40, parallel=4, seed=3)
    start = -sum((0.5 - v) ** 2 for v in target.values())
    assert result.trials[0].values == {d.name: d.start for d in space.dimensions}  # the recipe itself first
    assert len(result.trials) == 40 and result.best.score > start / 2
    assert result.best_recipe["models"][1]["parameters"]["weight"] == [round(result.best.values["m1.weight.g0"], 6), round(result.best.values["m1.weight.g1"], 6)]
    assert "output" not in result.best_recipe.get("fleet", {})
    with pytest.raises(RecipeError, match="takes none of weight, density"):
        search_space(parse_recipe({"merge_method": "dam_apply", "models": [str(e) for e in experts], "parameters": {"coefficients": "c.safetensors"}}))


def test_merge_to_mix_tries_every_subset_or_grows_the_best_greedily(family) -> None:
    base, experts = family
    eval_ = {"tasks": ["t.jsonl"]}
    names = ["a", "b", "c"]
    value = {"a": 0.5, "b": 0.3, "c": -0.2}

    def score(subsets):  # additive stand-in: a + b is the best mixture
        return [_result(s.label, sum(value[names[i]] for i in s.members)) for s in subsets]

    recipe = parse_recipe({"merge_method": "linear", "base_model": str(base), "models": [str(base)] + [str(e) for e in experts], "fleet": {"eval": eval_}})
    result = run_merge_to_mix(recipe, score, output="/tmp/m2m", names=names)
    assert result.exhaustive and len(result.ranking) == 7 == len(all_subsets(3))
    assert [r.label for r in result.ranking[:3]] == ["a+b", "a+b+c", "a"]
    assert result.table()[0] == {"rank": 1, "subset": "a+b", "size": 2, "score": pytest.approx(0.8), "scores": {"t": pytest.approx(0.8)}, "run_id": None}
    greedy = run_merge_to_mix(recipe, score, output="/tmp/m2m", names=names, budget=5)
    assert not greedy.exhaustive and greedy.best.label == "a+b" and len(greedy.ranking) == 5  # a, b, c; a+b, a+c; (a+b+c would be 6)
    made = subset_recipe(recipe, [str(e) for e in experts], (0, 2), output="/tmp/m2m", label="a+c")
    assert made.merge_method == "linear" and made.base_model is None and made.fleet.output == "/tmp/m2m/a+c"
    assert [(m.model, m.parameters) for m in made.models] == [(str(experts[0]), {"weight": 1.0}), (str(experts[2]), {"weight": 1.0})]


# ---------------------------------------------------------------- the protected drop rate in MLflow and the chart


def test_the_protected_drop_rate_is_a_metric_per_protected_model_and_a_panel_of_the_compare_chart(family, tmp_path: Path) -> None:
    from orchestrator.plan_ref import open_plan
    from orchestrator.tracking.charts import score_figure
    from orchestrator.tracking.compare import compare_drop_rates, compare_rows, find_merge_runs
    from orchestrator.tracking.record import track_merge

    base, experts = family
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rates = {}
    for method in ("ties", "ties_sv"):
        models = [{"model": str(e), "parameters": {"weight": 1.0, "density": 0.5, "protect": i == 1}} for i, e in enumerate(experts)]
        recipe = parse_recipe({"merge_method": method, "base_model": str(base), "models": models, "name": method})
        summary = merge(recipe, str(tmp_path / method))
        rates[method] = summary.manifest.report["protected_drop_rate"]
        track_merge(open_plan(summary.plan_ref), summary.manifest, None, None, tracking_uri=uri, experiment="drops")
    assert len(rates["ties"]) == 1 and rates["ties_sv"][0] < rates["ties"][0]
    rows, _, _ = compare_rows(find_merge_runs(["drops"], tracking_uri=uri))
    label = experts[1].name
    assert {row["name"]: row["drop_rates"] for row in rows} == {"ties": {label: pytest.approx(rates["ties"][0])},
                                                                "ties_sv": {label: pytest.approx(rates["ties_sv"][0])}}
    figure = score_figure({"ties": {"t": 0.5}, "ties_sv": {"t": 0.6}}, drop_rates=compare_drop_rates(rows))
    heights = [bar.get_height() for bar in figure.axes[1].patches]
    assert heights == pytest.approx([rates["ties"][0], rates["ties_sv"][0]])


# ---------------------------------------------------------------- the flows and commands end to end


def _json_command(argv: list[str]) -> dict:
    """``mergefleet ... --json``'s object (stdout redirected here: capsys would close the stream
    Prefect's console logging holds past the test)."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(argv + ["--json"]) == 0
    return json.loads(out.getvalue())


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_the_dam_flow_the_search_and_merge_to_mix_commands(trained, skill_models, eval_cache: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from flows.dam import dam

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    eval_ = {"tasks": [str(skill_models.tasks_dir)], "limit": 20, "cache_dir": str(eval_cache)}
    recipe = {"merge_method": "dam_apply", "models": trained["experts"], "parameters": {"coefficients": str(tmp_path / "c.safetensors")},
              "dtype": "float32", "fleet": {"dam": trained["settings"].model_dump(mode="json") | {"batch_size": 12}, "tracking_uri": uri,
                                            "output": str(tmp_path / "dam-merged"), "eval": eval_}}
    result = dam(parse_recipe(recipe))
    assert result["training"]["steps"] == 1 and (tmp_path / "c.safetensors").is_file()
    assert set(result["merge"].evaluation.merged.scores) == {"skill_add", "skill_map"}

    search = {"merge_method": "task_arithmetic", "base_model": str(skill_models.base), "dtype": "float32",
              "models": [{"model": e, "parameters": {"weight": 0.5}} for e in trained["experts"]],
              "fleet": {"output": str(tmp_path / "search"), "tracking_uri": uri, "experiment": "search", "eval": eval_}}
    (tmp_path / "search.yaml").write_text(yaml.safe_dump(search))
    found = _json_command(["search", str(tmp_path / "search.yaml"), "--budget", "2", "--parallel", "2"])
    assert [t["values"] for t in found["trials"]][0] == {"m0.weight.g0": 0.5, "m1.weight.g0": 0.5}  # the recipe itself, then CMA-ES
    best = yaml.safe_load(Path(found["best_recipe"]).read_text())
    assert best["merge_method"] == "task_arithmetic" and best["models"][0]["parameters"]["weight"] == round(found["best"]["values"]["m0.weight.g0"], 6)
    client = MlflowClient(uri)
    children = client.search_runs([client.get_experiment_by_name("search").experiment_id], f"tags.`mlflow.parentRunId` = '{found['run_id']}'")
    assert sorted(r.info.run_name for r in children) == ["trial-000", "trial-001"]

    mix = {"merge_method": "linear", "models": trained["experts"], "dtype": "float32",
           "fleet": {"output": str(tmp_path / "mix"), "tracking_uri": uri, "experiment": "mix", "eval": eval_}}
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(mix))
    ranked = _json_command(["merge-to-mix", str(tmp_path / "mix.yaml")])
    assert sorted(row["subset"] for row in ranked["ranking"]) == ["add", "add+map", "map"]
    assert [row["score"] for row in ranked["ranking"]] == sorted((row["score"] for row in ranked["ranking"]), reverse=True)
    artifacts = {a.path for a in client.list_artifacts(ranked["run_id"])}
    assert artifacts == {"ranking.json", "ranking.md", "ranking.png"}
