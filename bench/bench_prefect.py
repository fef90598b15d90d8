"""Prefect's overhead on a merge: `mergefleet merge` against `mergefleet run` (the
merge_and_eval flow on an ephemeral Prefect, inline shards) on the same recipe.

Uses the inputs bench_merge.py builds (4 x 0.54 B bf16 by default, cached under
--workdir). Each command runs --repeat times as a separate process; the minimum counts,
as the machine is shared. The target: run <= merge + 20 s.

    python bench/bench_prefect.py                    # linear, 2 shards, 2 at once
    python bench/bench_prefect.py --methods linear,ties --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import MERGEFLEET, add_input_arguments, prepare_inputs, recipe_for, run_measured  # noqa: E402



def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="linear")
    add_input_arguments(parser)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    params, base, experts = prepare_inputs(args)
    # Prefect's database lives here, not in the user's ~/.prefect; the first run creates it.
    os.environ.setdefault("PREFECT_HOME", str(args.workdir / "prefect-home"))
    print(f"{args.experts} experts x {params / 1e9:.2f} B params, bf16, {args.shards} shards, {args.workers} at once, "
          f"{os.cpu_count()} CPUs; min of {args.repeat} runs")
    print(f"{'method':<10}{'merge s':>10}{'run s':>10}{'overhead s':>12}{'target':>10}   (plan..assemble: merge / run)")
    rows = []
    for method in args.methods.split(","):
        recipe_path = args.workdir / f"{method}.yaml"
        recipe_path.write_text(yaml.safe_dump(recipe_for(method, base, experts, args.density), sort_keys=False))
        row: dict = {"method": method, "merge_s": [], "run_s": [], "merge_inner_s": [], "run_inner_s": []}
        for _ in range(args.repeat):
            for command, key in (("merge", "merge_s"), ("run", "run_s")):
                out = args.workdir / f"prefect-bench-{command}-{method}"
                shutil.rmtree(out, ignore_errors=True)
                seconds, _, output = run_measured(
                    [*MERGEFLEET, command, str(recipe_path), str(out), "--json", "--shards", str(args.shards), "--workers", str(args.workers)]
                )
                row[key].append(round(seconds, 2))
                summary = json.loads([line for line in output.splitlines() if line.startswith("{")][-1])
                row[key.replace("_s", "_inner_s")].append(summary["seconds"])  # plan to assemble
                shutil.rmtree(out, ignore_errors=True)
        row["overhead_s"] = round(min(row["run_s"]) - min(row["merge_s"]), 2)
        row["ok"] = row["overhead_s"] <= 20
        rows.append(row)
        inner = f"{min(row['merge_inner_s']):.1f} / {min(row['run_inner_s']):.1f} s"
        print(f"{method:<10}{min(row['merge_s']):>10.1f}{min(row['run_s']):>10.1f}{row['overhead_s']:>12.1f}{'<= 20 s' if row['ok'] else 'MISSED':>10}   ({inner})", flush=True)
    if args.json:
        print(json.dumps(rows))
    return 0 if all(row["ok"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
