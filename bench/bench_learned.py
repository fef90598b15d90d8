"""The trained merges' claims at a larger scale than the tests (tests/test_learned_claims.py).

    python bench/bench_learned.py mix        # Merge to Mix with four skill datasets: every one
                                             # of the 15 subsets fine-tuned for real vs merged
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


def _tasks(root: Path, skills: list[str]) -> list[str]:
    return [str(write_task(root / "tasks", s, examples=200, seed=10_000 + i)) for i, s in enumerate(skills)]


def bench_mix(workdir: Path, limit: int) -> dict[str, Any]:
    from scipy.stats import spearmanr

    from flows.merge_to_mix import merge_to_mix

    models = build_skills(workdir / "skills", SkillsConfig(skills=("add", "map")))
    names = ["add", "map", "next", "prev"]
    target = _tasks(workdir, ["add", "map", "next"])  # the target: three of the four skills
    eval_ = {"tasks": target, "limit": limit, "cache_dir": str(workdir / "eval-cache")}
    steps = {"steps": 200, "batch_size": 32}
    seconds: dict[str, float] = {}
    singles = []
    for n in names:
        started = time.perf_counter()
        singles.append(str(fine_tune(models.base, [n], workdir / f"ft-{n}", **steps)))
        seconds[n] = time.perf_counter() - started
    started = time.perf_counter()
    fleet = {"eval": eval_, "output": str(workdir / "mixtures"), "tracking_uri": f"sqlite:///{workdir / 'mlflow.db'}"}
    surrogate = merge_to_mix(parse_recipe({"merge_method": "linear", "models": singles, "fleet": fleet}), parallel=2, overwrite=True)
    surrogate_seconds = time.perf_counter() - started
    by_label = {row["subset"]: row["score"] for row in surrogate["ranking"]}
    real: dict[str, float] = {}
    fine_tuning_seconds = sum(seconds.values())
    for members in all_subsets(len(names)):
        label = subset_label(members, [f"ft-{n}" for n in names])
        started = time.perf_counter()
        path = singles[members[0]] if len(members) == 1 else str(fine_tune(models.base, [names[i] for i in members], workdir / f"ft-{label}", **steps))
        fine_tuning_seconds += time.perf_counter() - started if len(members) > 1 else 0.0
        started = time.perf_counter()
        scores = evaluate_checkpoint(path, EvalSettings(**eval_)).scores
        fine_tuning_seconds += time.perf_counter() - started
        real[label] = sum(scores.values()) / len(scores)
    labels = sorted(real)
    order = sorted(real, key=lambda k: -real[k])
    return {
        "spearman": spearmanr([by_label[k] for k in labels], [real[k] for k in labels]).statistic,
        "pick": surrogate["best"],
        "pick_real_rank": order.index(surrogate["best"]) + 1,
        "real_best": order[0],
        "surrogate_seconds": round(surrogate_seconds + sum(seconds.values()), 1),
        "fine_tune_every_subset_seconds": round(fine_tuning_seconds, 1),
        "note": "surrogate: 4 single fine-tunes + 15 merges and evaluations; real: 15 fine-tunes and evaluations; cached models count 0 s",
        "surrogate": by_label,
        "real": real,
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
    parser.add_argument("--limit", type=int, default=200, help="evaluation examples per task")
    args = parser.parse_args()
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    run = {"mix": bench_mix, "dam": bench_dam, "ties_sv": bench_ties_sv}[args.claim]
    if args.claim in ("mix", "dam"):
        from flows import embedded

        api = embedded.start()
        with embedded.connected(api):
            figures = run(workdir, args.limit)
    else:
        figures = run(workdir, args.limit)
    print(json.dumps({args.claim: figures}, default=lambda v: round(v, 4) if isinstance(v, float) else str(v)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
