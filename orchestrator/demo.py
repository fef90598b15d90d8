"""``make demo``: build a small base and experts, merge them, load the result, summarise.

Everything is local and built here; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import yaml

from orchestrator import cli
from orchestrator.synthetic import LlamaShape, make_model_family

DEMO_SHAPE = LlamaShape(hidden=256, layers=6, intermediate=688, vocab=2048, heads=8, kv_heads=4)


def write_demo_recipe(workdir: Path, base: Path, experts: list[Path]) -> Path:
    recipe = {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [{"model": str(base)}]
        + [{"model": str(path), "parameters": {"weight": 1.0, "density": 0.3}} for path in experts],
        "parameters": {"normalize": True},
        "dtype": "bfloat16",
        "fleet": {"output": str(workdir / "merged"), "shards": 3, "workers": 2},
    }
    path = workdir / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def summarise(output: Path, base: Path) -> dict:
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(output, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tokens = torch.arange(16).unsqueeze(0)
    with torch.no_grad():
        logits = merged(tokens).logits
        base_logits = reference(tokens).logits
    manifest = json.loads((output / "mergefleet.json").read_text())
    return {
        "checkpoint": str(output),
        "files": [f["file"] for f in manifest["files"]],
        "parameters": sum(p.numel() for p in merged.parameters()),
        "logits_finite": bool(torch.isfinite(logits).all()),
        "mean_abs_logit_change_vs_base": float((logits - base_logits).abs().mean()),
        "plan_id": manifest["plan_id"],
        "protected_drop_rate": manifest["report"].get("protected_drop_rate"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", default="demo-out")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    print(f"1/3 building a base and 3 experts ({DEMO_SHAPE.layers} layers, hidden {DEMO_SHAPE.hidden}) in {workdir}/models")
    base, experts = make_model_family(workdir / "models", experts=3, shape=DEMO_SHAPE, dtype=torch.bfloat16)
    recipe = write_demo_recipe(workdir, base, experts)

    print(f"2/3 mergefleet run {recipe} --overwrite   (the merge_and_eval Prefect flow: ties, 3 shards, 2 at once)")
    status = cli.main(["run", str(recipe), "--overwrite"])
    if status != 0:
        return status

    print("3/3 loading the merged checkpoint with transformers")
    summary = summarise(workdir / "merged", base)
    for key, value in summary.items():
        print(f"  {key}: {value}")
    print(f"demo finished in {time.perf_counter() - started:.1f} s; recipe at {recipe}")
    return 0 if summary["logits_finite"] else 1


if __name__ == "__main__":
    sys.exit(main())
