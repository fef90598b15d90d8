"""``make demo``: experts with real skills, merged, evaluated and recorded in MLflow.

1. train (or reuse) a tiny Llama base and three experts fine-tuned from it on distinct
   synthetic skills, with an lm-eval task per skill (``mergefleet/fixtures/skills.py``);
2. ``mergefleet run``: the merge_and_eval Prefect flow merges the experts (ties, 3 shards,
   2 at once), evaluates base, experts and merge with lm-eval, and records the merge as
   an MLflow run in ``demo-out/mlflow.db``;
3. the run prints the scores and the command that opens it in the MLflow UI.

Everything is local and built here; nothing is downloaded.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's and datasets' progress bars; before anything imports tqdm

import argparse
import sys
import time
from pathlib import Path

import yaml

from mergefleet import cli
from mergefleet.fixtures.skills import SkillModels, SkillsConfig, build_skills

DEMO_SKILLS = SkillsConfig(skills=("add", "map", "next"))
EXPERIMENT = "mergefleet-demo"


def write_demo_recipe(workdir: Path, models: SkillModels) -> tuple[Path, str]:
    tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
    recipe = models.recipe(
        "ties",
        output=workdir / "merged",
        parameters={"weight": 1.0, "density": 0.3},
        shards=3,
        workers=2,
        tracking_uri=tracking_uri,
        experiment=EXPERIMENT,
    )
    recipe["name"] = "demo-ties"
    recipe["fleet"]["eval"]["cache_dir"] = str(workdir / "eval-cache")
    path = workdir / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path, tracking_uri


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", default="demo-out")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    print(f"1/3 training a tiny Llama base and experts for {', '.join(DEMO_SKILLS.skills)} in {workdir}/skills (cached after the first time)")
    models = build_skills(workdir / "skills", DEMO_SKILLS, on_step=lambda line: print(f"    {line}", flush=True))
    if models.cached:
        print(f"    reusing the models trained earlier in {models.root}")
    recipe, tracking_uri = write_demo_recipe(workdir, models)

    print(f"2/3 mergefleet run {recipe} --overwrite   (merge_and_eval flow: ties, 3 shards, 2 at once; lm-eval; MLflow)", flush=True)
    status = cli.main(["run", str(recipe), "--overwrite"])
    if status != 0:
        return status
    print("3/3 the scores above: accuracy on 4-way multiple choice (chance 0.25); normalised: merged ÷ the expert for its skill")
    print(f"compare merges: mergefleet compare {EXPERIMENT} --tracking-uri {tracking_uri}")
    print(f"demo finished in {time.perf_counter() - started:.1f} s; recipe at {recipe}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
