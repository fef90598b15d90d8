"""Peak memory on a large vocabulary: 8 experts (and a base) of a 128k × 4096 embedding.

Each input holds two 128k × 4096 bfloat16 tensors (embedding and head, 1 GB each) and
one small layer, so the run is all about the tensors too large to load 9 copies of.
Prints mergefleet's time and peak RSS (whole process tree) against the 8 GB target.

    python bench/bench_large.py                 # ties, density 0.2
    python bench/bench_large.py --methods linear,ties --experts 8
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_merge import MERGEFLEET, ROOT, build_inputs, recipe_for, run_measured, warm_page_cache  # noqa: E402

from mergefleet.fixtures.synthetic import LlamaShape  # noqa: E402

TARGET_RSS = 8e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="ties")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=128_000)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--workdir", type=Path, default=ROOT / "out")
    args = parser.parse_args()

    shape = LlamaShape(hidden=args.hidden, layers=1, intermediate=256, vocab=args.vocab, heads=32, kv_heads=8)
    base, experts = build_inputs(args.workdir, shape, args.experts)
    warm_page_cache([base, *experts])
    print(f"\n{args.experts} experts + base, embedding and head {args.vocab} x {args.hidden} bf16 each")
    print(f"{'method':<10}{'seconds':>10}{'peak RSS':>12}{'target':>10}")
    worst = 0.0
    for method in args.methods.split(","):
        recipe = args.workdir / f"large-{method}.yaml"
        recipe.write_text(yaml.safe_dump(recipe_for(method, base, experts, 0.2), sort_keys=False))
        out = args.workdir / f"large-{method}-out"
        shutil.rmtree(out, ignore_errors=True)
        seconds, rss, _ = run_measured([*MERGEFLEET, "merge", str(recipe), str(out), "--quiet"])
        shutil.rmtree(out, ignore_errors=True)
        worst = max(worst, rss)
        print(f"{method:<10}{seconds:>10.1f}{rss / 1e9:>9.2f} GB{'< 8 GB' if rss < TARGET_RSS else 'OVER':>10}", flush=True)
    return 0 if worst < TARGET_RSS else 1


if __name__ == "__main__":
    sys.exit(main())
