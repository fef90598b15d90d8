"""Each trained merge's claim, reproduced on small models trained here (seeded; the direction,
not absolute numbers). Longer variants: bench/bench_learned.py.

- DAM: lower KL to each expert than the plain average, a score on every skill at least the
  average's, and within 0.02 of (or above) the parameter search's best on the same wall time.
- Merge to Mix: the ranking of mixtures by merged surrogate follows the ranking by real
  fine-tuning on each subset's union (Spearman ≥ 0.6); its pick is in the real top two.
- ties_sv: with a model that drifted far from the base, a lower protected drop rate than
  ties and more of the protected model's skill kept; the compare chart shows the rates.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from mergefleet.fixtures.skill_variants import drift, fine_tune, write_skill_data
from orchestrator.learned.coefficients import write_coefficients
from orchestrator.learned.dam import DamTrainer, inspect_experts, train_dam, training_batches
from orchestrator.learned.merge_to_mix import all_subsets, subset_label
from orchestrator.learned.runs import merge_evaluate_record
from orchestrator.learned.settings import DamSettings
from orchestrator.recipe import parse_recipe

pytestmark = pytest.mark.slow
LIMIT = 100  # examples per task: enough to rank, a few seconds per evaluation


def _eval(skill_models, eval_cache: Path, tasks: list[str] | None = None) -> dict:
    specs = [str(skill_models.tasks_dir / f"skill_{t}.yaml") for t in tasks] if tasks else [str(skill_models.tasks_dir)]
    return {"tasks": specs, "limit": LIMIT, "cache_dir": str(eval_cache)}


def _report(name: str, figures: dict) -> None:
    print(f"\n[{name}] " + json.dumps(figures, default=lambda v: round(v, 4) if isinstance(v, float) else str(v)))


@pytest.mark.usefixtures("prefect_harness")
def test_dam_beats_the_average_and_matches_the_search_on_the_same_budget(skill_models, eval_cache: Path, tmp_path: Path) -> None:
    from flows.search import parameter_search

    names = list(skill_models.experts)
    experts = [str(skill_models.experts[n]) for n in names]
    data = {e: str(write_skill_data(tmp_path / f"{n}.jsonl", n, examples=1280, seed=20 + i)) for i, (n, e) in enumerate(zip(names, experts))}
    settings = DamSettings(data=data, dtype="float32", batch_size=16, max_length=32)
    started = time.perf_counter()
    result = train_dam(experts, settings)
    coefficients = write_coefficients(str(tmp_path / "dam.safetensors"), result.coefficients, experts)
    fleet = {"eval": _eval(skill_models, eval_cache)}
    dam = merge_evaluate_record(parse_recipe({"merge_method": "dam_apply", "models": experts, "parameters": {"coefficients": coefficients},
                                              "dtype": "float32", "fleet": fleet | {"output": str(tmp_path / "dam")}}), label="dam", record=False)
    dam_seconds = time.perf_counter() - started
    average = merge_evaluate_record(parse_recipe({"merge_method": "linear", "models": [{"model": e, "parameters": {"weight": 1.0}} for e in experts],
                                                  "dtype": "float32", "fleet": fleet | {"output": str(tmp_path / "average")}}), label="average", record=False)

    # KL to each expert on held-out examples of its own skill: trained coefficients vs 1/N
    held_out = [str(write_skill_data(tmp_path / f"held-{n}.jsonl", n, examples=64, seed=90 + i)) for i, n in enumerate(names)]
    found = inspect_experts(experts)
    batches = training_batches(found, held_out, settings)
    trainer = DamTrainer(found, settings)
    kl: dict[str, dict[str, float]] = {}
    for label, values in (("average", None), ("dam", result.coefficients)):
        if values is not None:
            trainer.coefficients = {k: v.clone() for k, v in values.items()}
        with torch.no_grad():
            kl[label] = {n: sum(float(trainer.kl(i, b)) for b in batches[i]) / len(batches[i]) for i, n in enumerate(names)}

    search_recipe = {"merge_method": "ties", "base_model": str(skill_models.base),
                     "models": [{"model": e, "parameters": {"weight": 0.5, "density": 0.5}} for e in experts], "dtype": "float32",
                     "fleet": fleet | {"output": str(tmp_path / "search"), "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}}
    search = parameter_search(parse_recipe(search_recipe), budget=32, parallel=2, time_budget=dam_seconds)
    best = search["best"]["score"]
    _report("dam", {"kl_average": kl["average"], "kl_dam": kl["dam"], "scores_average": average.scores, "scores_dam": dam.scores,
                    "dam_score": dam.score, "search_best": best, "search_trials": len(search["trials"]), "dam_steps": result.steps,
                    "dam_wall_s": dam_seconds, "dam_train_s": result.seconds, "search_wall_s": search["seconds"]})
    for n in names:
        assert kl["dam"][n] < kl["average"][n], kl
    for task, score in average.scores.items():
        assert dam.scores[task] >= score, (dam.scores, average.scores)
    assert dam.score >= best - 0.02, (dam.score, search["best"])
    assert search["seconds"] >= dam_seconds * 0.8  # the search had (about) the same wall time, or more
    assert Path(search["best_recipe"]).is_file()


@pytest.mark.usefixtures("prefect_harness")
def test_merge_to_mix_ranks_mixtures_like_real_fine_tuning(skill_models, eval_cache: Path, tmp_path_factory) -> None:
    from scipy.stats import spearmanr

    from flows.merge_to_mix import merge_to_mix
    from orchestrator.evaluate.runner import evaluate_checkpoint
    from orchestrator.recipe import EvalSettings

    root = tmp_path_factory.mktemp("mix")
    names = ["add", "map", "next"]
    steps = {"steps": 120, "batch_size": 32}
    started = time.perf_counter()
    singles = [str(fine_tune(skill_models.base, [n], root / f"ft-{n}", **steps)) for n in names]
    single_seconds = time.perf_counter() - started
    fleet = {"eval": _eval(skill_models, eval_cache, ["add", "map"]), "output": str(root / "mixtures"),
             "tracking_uri": f"sqlite:///{root / 'mlflow.db'}"}
    started = time.perf_counter()
    surrogate = merge_to_mix(parse_recipe({"merge_method": "linear", "models": singles, "dtype": "float32", "fleet": fleet}), parallel=2)
    surrogate_seconds = time.perf_counter() - started
    by_label = {row["subset"]: row["score"] for row in surrogate["ranking"]}

    settings = EvalSettings(**fleet["eval"])
    real: dict[str, float] = {}
    started = time.perf_counter()
    for members in all_subsets(3):
        label = subset_label(members, [f"ft-{n}" for n in names])
        path = singles[members[0]] if len(members) == 1 else str(fine_tune(skill_models.base, [names[i] for i in members], root / f"ft-{label}", **steps))
        scores = evaluate_checkpoint(path, settings).scores
        real[label] = sum(scores.values()) / len(scores)
    real_seconds = time.perf_counter() - started + single_seconds
    labels = sorted(real)
    rho = spearmanr([by_label[label] for label in labels], [real[label] for label in labels]).statistic
    top_two = sorted(real.values(), reverse=True)[1]
    _report("merge_to_mix", {"surrogate": by_label, "real": real, "spearman": rho, "pick": surrogate["best"],
                             "surrogate_s": surrogate_seconds, "fine_tuning_s": real_seconds})
    assert rho >= 0.6
    assert real[surrogate["best"]] >= top_two  # the pick is in the real top two


def test_ties_sv_keeps_the_protected_skill_when_the_other_model_drifts(skill_models, eval_cache: Path, tmp_path: Path) -> None:
    from orchestrator.tracking.charts import score_figure
    from orchestrator.tracking.compare import compare_drop_rates, compare_rows, find_merge_runs

    language = drift(skill_models.base, tmp_path / "language", formats=list(skill_models.experts), steps=300, lr=3e-3)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    results = {}
    for method in ("ties", "ties_sv"):
        recipe = parse_recipe({
            "merge_method": method, "base_model": str(skill_models.base), "dtype": "float32", "name": method,
            "models": [{"model": str(language), "parameters": {"weight": 1.0, "density": 0.8}},
                       {"model": str(skill_models.experts["add"]), "parameters": {"weight": 1.0, "density": 0.8, "protect": True}}],
            "parameters": {"slack": 0.3} if method == "ties_sv" else {},
            "fleet": {"eval": _eval(skill_models, eval_cache, ["add"]), "output": str(tmp_path / method), "tracking_uri": uri, "experiment": "lowres"},
        })
        results[method] = merge_evaluate_record(recipe, label=method)
    rates = {method: r.report["protected_drop_rate"][0] for method, r in results.items()}
    scores = {method: r.scores["skill_add"] for method, r in results.items()}
    _report("ties_sv", {"drop_rate": rates, "skill_add": scores})
    assert rates["ties_sv"] < rates["ties"]
    assert scores["ties_sv"] > scores["ties"]
    rows, _, _ = compare_rows(find_merge_runs(["lowres"], tracking_uri=uri))
    assert {row["name"]: row["drop_rates"] for row in rows} == {m: {"add": pytest.approx(rate)} for m, rate in rates.items()}
    figure = score_figure({m: {"skill_add": s} for m, s in scores.items()}, drop_rates=compare_drop_rates(rows))
    assert [bar.get_height() for bar in figure.axes[1].patches] == pytest.approx([rates["ties"], rates["ties_sv"]])
