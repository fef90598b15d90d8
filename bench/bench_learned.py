"""The trained merges' claims at a larger scale than the tests (tests/test_learned_claims.py).

    python bench/bench_learned.py mix        # Merge to Mix with four skill datasets: every one
                                             # of the 15 subsets fine-tuned for real vs merged
                                             # (light fine-tunes: lr 1e-4, 200 steps; 400 examples)
    python bench/bench_learned.py dam        # DAM (two epochs) vs a CMA-ES search given DAM's wall time
    python bench/bench_learned.py ties_sv    # a longer drift (600 steps) of the language model

Each prints its figures as one JSON line. Models are trained here (cached under --workdir);
timings on a shared machine are indicative only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "60")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mergefleet.fixtures.skill_variants import fine_tune, write_skill_data  # noqa: E402
from mergefleet.fixtures.skills import SkillsConfig, build_skills, write_task  # noqa: E402
from orchestrator.evaluate.runner import evaluate_checkpoint  # noqa: E402
from orchestrator.learned.merge_to_mix import all_subsets, subset_label  # noqa: E402
from orchestrator.recipe import EvalSettings, parse_recipe  # noqa: E402


def _tasks(root: Path, skills: list[str], examples: int = 200) -> list[str]:
    return [str(write_task(root / "tasks", s, examples=examples, seed=10_000 + i)) for i, s in enumerate(skills)]


# Merge to Mix's setup (docs/learned.md, "The claims, reproduced here"): the base is pre-trained
# on all four skills' formats (with random answers), as the paper's base already knows the
# prompt format; every fine-tune, single or union, takes the same 200 steps of 32 examples
# (a union's batch shares them equally, so its loss is the mean of its datasets' losses, the
# mixture whose first-order update the average of the single models approximates), at a
# learning rate low enough to move the weights about 3 % (lr 1e-4): the light fine-tune of a
# well-trained base where averaging models stands in for mixing data.
MIX_SKILLS = ("add", "map", "next", "prev")
MIX_TARGET = ("add", "map", "next")
MIX_FINE_TUNE = {"steps": 200, "batch_size": 32, "lr": 1e-4}


def _train_seconds(path: Path) -> float:
    """The training time a fine-tune recorded (also when it was cached)."""
    return float(json.loads((Path(path) / "variant.json").read_text())["seconds"])


def bench_mix(workdir: Path, limit: int) -> dict[str, Any]:
    from scipy.stats import spearmanr

    from flows.merge_to_mix import merge_to_mix

    models = build_skills(workdir / "skills-4", SkillsConfig(skills=MIX_SKILLS))
    names = list(MIX_SKILLS)
    target = _tasks(workdir / "mix", list(MIX_TARGET), examples=max(limit, 200))
    eval_ = {"tasks": target, "limit": limit, "cache_dir": str(workdir / "eval-cache")}
    tag = f"lr{MIX_FINE_TUNE['lr']:g}-s{MIX_FINE_TUNE['steps']}"
    runs = workdir / "mix" / tag  # one directory per fine-tune, named by its datasets: "add", "add+map", ...
    singles = [str(fine_tune(models.base, [n], runs / n, **MIX_FINE_TUNE)) for n in names]
    single_seconds = sum(_train_seconds(Path(p)) for p in singles)
    started = time.perf_counter()
    fleet = {"eval": eval_, "output": str(runs / "mixtures"), "tracking_uri": f"sqlite:///{workdir / 'mlflow.db'}"}
    surrogate = merge_to_mix(parse_recipe({"merge_method": "linear", "models": singles, "dtype": "float32", "fleet": fleet}),
                             parallel=2, overwrite=True)
    merge_seconds = time.perf_counter() - started
    by_label = {row["subset"]: row["score"] for row in surrogate["ranking"]}
    real: dict[str, float] = {}
    real_scores: dict[str, dict[str, float]] = {}
    fine_tuning_seconds = 0.0
    for members in all_subsets(len(names)):
        label = subset_label(members, names)
        path = singles[members[0]] if len(members) == 1 else str(fine_tune(models.base, [names[i] for i in members], runs / label, **MIX_FINE_TUNE))
        evaluated = evaluate_checkpoint(path, EvalSettings(**eval_))
        fine_tuning_seconds += _train_seconds(Path(path)) + evaluated.seconds
        real_scores[label] = evaluated.scores
        real[label] = sum(evaluated.scores.values()) / len(evaluated.scores)
    labels = sorted(real)
    pick = surrogate["best"]
    best = max(real.values())
    return {
        "spearman": spearmanr([by_label[k] for k in labels], [real[k] for k in labels]).statistic,
        "pick": pick,
        "pick_real_rank": 1 + sum(score > real[pick] for score in real.values()),  # ties share the better rank
        "pick_real_ties": sorted(k for k, score in real.items() if score == real[pick] and k != pick),
        "real_best": sorted(k for k, score in real.items() if score == best),
        "surrogate_seconds": round(single_seconds + merge_seconds, 1),
        "fine_tune_every_subset_seconds": round(fine_tuning_seconds, 1),
        "note": ("surrogate: 4 single fine-tunes (their recorded training time) + the flow's 15 merges and evaluations (wall); "
                 "real: 15 fine-tunes (recorded training time) + their 15 evaluations"),
        "settings": {"fine_tune": MIX_FINE_TUNE, "base": "pre-trained on the formats of " + ", ".join(MIX_SKILLS),
                     "target": list(MIX_TARGET), "limit": limit},
        "surrogate": by_label,
        "real": real,
        "real_scores": real_scores,
    }


def bench_dam(workdir: Path, limit: int) -> dict[str, Any]:
    from flows.search import parameter_search
    from orchestrator.learned.coefficients import write_coefficients
    from orchestrator.learned.dam import train_dam
    from orchestrator.learned.runs import merge_evaluate_record
    from orchestrator.learned.settings import DamSettings

    models = build_skills(workdir / "skills", SkillsConfig(skills=("add", "map")))
    experts = [str(p) for p in models.experts.values()]
    data = {e: str(write_skill_data(workdir / f"dam-{n}.jsonl", n, examples=1280, seed=20 + i)) for i, (n, e) in enumerate(zip(models.experts, experts))}
    fleet = {"eval": {"tasks": [str(models.tasks_dir)], "limit": limit, "cache_dir": str(workdir / "eval-cache")}}
    started = time.perf_counter()
    result = train_dam(experts, DamSettings(data=data, dtype="float32", batch_size=16, max_length=32, epochs=2))
    path = write_coefficients(str(workdir / "dam.safetensors"), result.coefficients, experts, overwrite=True)
    dam = merge_evaluate_record(parse_recipe({"merge_method": "dam_apply", "models": experts, "parameters": {"coefficients": path},
                                              "fleet": fleet | {"output": str(workdir / "dam")}}), label="dam", record=False, overwrite=True)
    dam_seconds = time.perf_counter() - started
    search = parameter_search(parse_recipe({"merge_method": "ties", "base_model": str(models.base),
                                            "models": [{"model": e, "parameters": {"weight": 0.5, "density": 0.5}} for e in experts],
                                            "fleet": fleet | {"output": str(workdir / "search"), "tracking_uri": f"sqlite:///{workdir / 'mlflow.db'}"}}),
                              budget=200, parallel=2, time_budget=dam_seconds, overwrite=True)
    return {"dam_score": dam.score, "dam_scores": dam.scores, "dam_seconds": round(dam_seconds, 1), "search_best": search["best"]["score"],
            "search_trials": len(search["trials"]), "search_seconds": search["seconds"]}


def bench_ties_sv(workdir: Path, limit: int) -> dict[str, Any]:
    from orchestrator.learned.runs import merge_evaluate_record
    from mergefleet.fixtures.skill_variants import drift

    models = build_skills(workdir / "skills", SkillsConfig(skills=("add", "map")))
    language = drift(models.base, workdir / "language-600", formats=list(models.experts), steps=600, lr=3e-3)
    figures = {}
    for method in ("task_arithmetic", "ties", "ties_sv"):
        task = {"weight": 1.0} | ({} if method == "task_arithmetic" else {"density": 0.8, "protect": True})
        recipe = {"merge_method": method, "base_model": str(models.base),
                  "models": [{"model": str(language), "parameters": {"weight": 1.0} | ({} if method == "task_arithmetic" else {"density": 0.8})},
                             {"model": str(models.experts["add"]), "parameters": task}],
                  "parameters": {"slack": 0.3} if method == "ties_sv" else {},
                  "fleet": {"output": str(workdir / f"lowres-{method}"),
                            "eval": {"tasks": [str(models.tasks_dir / "skill_add.yaml")], "limit": limit, "cache_dir": str(workdir / "eval-cache")}}}
        result = merge_evaluate_record(parse_recipe(recipe), label=method, record=False, overwrite=True)
        figures[method] = {"skill_add": result.scores["skill_add"], "protected_drop_rate": (result.report.get("protected_drop_rate") or [None])[0]}
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("claim", choices=["mix", "dam", "ties_sv"])
    parser.add_argument("--workdir", default="bench/out/learned")
    parser.add_argument("--limit", type=int, default=None, help="evaluation examples per task (default: 400 for mix, 200 otherwise)")
    args = parser.parse_args()
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    limit = args.limit or (400 if args.claim == "mix" else 200)
    run = {"mix": bench_mix, "dam": bench_dam, "ties_sv": bench_ties_sv}[args.claim]
    if args.claim in ("mix", "dam"):
        from flows import embedded

        api = embedded.start()
        with embedded.connected(api):
            figures = run(workdir, limit)
    else:
        figures = run(workdir, limit)
    print(json.dumps({args.claim: figures}, default=lambda v: round(v, 4) if isinstance(v, float) else str(v)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
