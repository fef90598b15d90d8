"""mergefleet against mergekit 0.1.5 on the same recipe, in one run: time, peak RSS, ratio.

Builds (once, cached under --workdir) a Llama-shaped base and experts in bfloat16, warms
the page cache so both tools read from memory, then runs each tool per method as a
separate process and samples the whole process tree's resident memory. The recipes say
``dtype: bfloat16``: mergefleet runs its default match-mergekit precision (mergekit's
bytes), or ``--precision float32``. Each mergefleet mode is one row: ``default`` runs
``mergefleet merge RECIPE OUT`` with no flags, ``SxW`` adds ``--shards S --workers W``.

    python bench/bench_merge.py                      # 4 x 0.54 B bf16, linear and ties
    python bench/bench_merge.py --methods ties --layers 16 --modes 2x2
    python bench/bench_merge.py --hidden 1024 --intermediate 2816 --methods nearswap,arcee_fusion,ram,ramplus_tl
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import torch
import yaml

from mergefleet.fixtures.synthetic import LlamaShape, fine_tuned, random_weights, save_checkpoint

ROOT = Path(__file__).resolve().parent
MERGEFLEET = [sys.executable, "-m", "mergefleet"]


def build_inputs(workdir: Path, shape: LlamaShape, experts: int) -> tuple[Path, list[Path]]:
    tag = f"h{shape.hidden}-l{shape.layers}-i{shape.intermediate}-v{shape.vocab}-bf16"
    models = workdir / "models" / tag
    base_path = models / "base"
    expert_paths = [models / f"expert{i + 1}" for i in range(experts)]
    if all((p / "config.json").exists() for p in [base_path, *expert_paths]):
        return base_path, expert_paths
    print(f"building base and {experts} experts ({tag}) in {models} ...", flush=True)
    base = random_weights(shape, seed=0, dtype=torch.bfloat16)
    save_checkpoint(base_path, base, shape, max_file_bytes=2 * 10**9)
    for i, path in enumerate(expert_paths):
        if not (path / "config.json").exists():
            save_checkpoint(path, fine_tuned(base, seed=1000 + i), shape, max_file_bytes=2 * 10**9)
    return base_path, expert_paths


def warm_page_cache(paths: list[Path]) -> None:
    for path in paths:
        for file in path.glob("*.safetensors"):
            with open(file, "rb") as handle:
                while handle.read(64 << 20):
                    pass


_WEIGHTED = {"linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "ties_sv", "breadcrumbs",
             "breadcrumbs_ties", "della", "della_linear", "nuslerp", "multislerp"}
_SPARSIFYING = {"ties", "dare_ties", "dare_linear", "ties_sv", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"}
_NO_BASE = {"linear", "karcher", "passthrough"}
_ONE_OTHER = {"slerp", "passthrough", "nearswap", "arcee_fusion"}


def recipe_for(method: str, base: Path, experts: list[Path], density: float, *, precision: str | None = None) -> dict:
    """A valid recipe for ``method`` on these inputs: slerp, nearswap and arcee_fusion get the
    base and one expert, nuslerp two experts (and the base), passthrough one model; weights
    and densities only where the method takes them. ``precision`` other than the default
    goes into a ``fleet:`` section (mergekit ignores it: the benchmark gives it a copy without)."""
    chosen = experts[:1] if method in _ONE_OTHER else experts[:2] if method == "nuslerp" else experts
    models: list[dict] = [] if method in _NO_BASE else [{"model": str(base)}]
    for path in chosen:
        params: dict = {"weight": 1.0} if method in _WEIGHTED else {}
        if method in _SPARSIFYING:
            params["density"] = density
        models.append({"model": str(path), **({"parameters": params} if params else {})})
    recipe: dict = {"merge_method": method, "models": models, "dtype": "bfloat16"}
    if method not in _NO_BASE:
        recipe["base_model"] = str(base)
    shared = {"slerp": {"t": 0.5}, "sce": {"select_topk": density}, "nearswap": {"t": 0.001}}.get(method)
    if shared:
        recipe["parameters"] = shared
    if precision and precision != "match-mergekit":
        recipe["fleet"] = {"precision": precision}
    return recipe


def run_measured(command: list[str]) -> tuple[float, int, str]:
    """Wall seconds and peak RSS (bytes, summed over the process tree) of one command."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = 0
    root = psutil.Process(process.pid)
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            try:
                tree = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = process.communicate()
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"command failed ({process.returncode}): {' '.join(command)}\n{output[-3000:]}")
    return seconds, peak, output


def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark inputs' shape and how mergefleet runs them (shared by the bench scripts)."""
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--density", type=float, default=0.2)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=ROOT / "out")


def prepare_inputs(args: argparse.Namespace) -> tuple[int, Path, list[Path]]:
    """Build (once) and warm the inputs ``add_input_arguments`` describes; returns the parameter count too."""
    shape = LlamaShape(hidden=args.hidden, layers=args.layers, intermediate=args.intermediate, vocab=args.vocab, heads=16, kv_heads=16)
    params = sum(torch.Size(s).numel() for s in shape.tensor_shapes().values())
    base, experts = build_inputs(args.workdir, shape, args.experts)
    warm_page_cache([base, *experts])
    return params, base, experts


def mode_flags(mode: str) -> list[str]:
    """``default`` (no flags) or ``SxW`` (``--shards S --workers W``)."""
    if mode == "default":
        return []
    shards, _, workers = mode.partition("x")
    return ["--shards", shards, "--workers", workers]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="linear,ties")
    add_input_arguments(parser)
    parser.add_argument("--modes", default="default,2x2", help="mergefleet runs per method: default (no flags), SxW (--shards S --workers W)")
    parser.add_argument("--precision", default="match-mergekit", choices=["match-mergekit", "float32"])
    parser.add_argument("--skip-mergekit", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    params, base, experts = prepare_inputs(args)
    bindir = Path(sys.executable).parent
    rows = []
    load_before = os.getloadavg()
    for method in args.methods.split(","):
        recipe_path = args.workdir / f"{method}.yaml"
        recipe_path.write_text(yaml.safe_dump(recipe_for(method, base, experts, args.density, precision=args.precision), sort_keys=False))
        mergekit_recipe = args.workdir / f"{method}-mergekit.yaml"
        mergekit_recipe.write_text(yaml.safe_dump(recipe_for(method, base, experts, args.density), sort_keys=False))
        reference: dict = {}
        if not args.skip_mergekit:
            out = args.workdir / f"mergekit-{method}"
            shutil.rmtree(out, ignore_errors=True)
            reference["mergekit_s"], reference["mergekit_rss"], _ = run_measured([str(bindir / "mergekit-yaml"), str(mergekit_recipe), str(out), "--quiet"])
            shutil.rmtree(out, ignore_errors=True)
        for mode in args.modes.split(","):
            row: dict = {"method": method, "mode": mode, "precision": args.precision, **reference}
            out = args.workdir / f"mergefleet-{method}"
            shutil.rmtree(out, ignore_errors=True)
            command = [*MERGEFLEET, "merge", str(recipe_path), str(out), "--json", *mode_flags(mode)]
            row["mergefleet_s"], row["mergefleet_rss"], output = run_measured(command)
            summary = json.loads(output.strip().splitlines()[-1])
            row["mergefleet_report"] = summary.get("report", {})
            row["layout"] = summary.get("layout")
            shutil.rmtree(out, ignore_errors=True)
            if "mergekit_s" in row:
                row["speedup"] = row["mergekit_s"] / row["mergefleet_s"]
            rows.append(row)
            print_row(row, header=len(rows) == 1, params=params, experts=args.experts)
    load_after = os.getloadavg()
    print(f"load average (1, 5, 15 min) before {tuple(round(x, 2) for x in load_before)}, after {tuple(round(x, 2) for x in load_after)}")
    if args.json:
        print(json.dumps(rows))
    return 0


def print_row(row: dict, *, header: bool, params: int, experts: int) -> None:
    if header:
        print(f"\n{experts} experts x {params / 1e9:.2f} B params, bf16, {os.cpu_count()} CPUs, torch {torch.__version__}, precision {row['precision']}")
        print(f"{'method':<16}{'mode':>8}{'mergekit s':>12}{'mergefleet s':>14}{'speedup':>9}{'RSS mergekit':>14}{'RSS mergefleet':>16}")
    gb = 1e9
    mk_s = f"{row['mergekit_s']:.1f}" if "mergekit_s" in row else "-"
    mk_rss = f"{row['mergekit_rss'] / gb:.2f} GB" if "mergekit_rss" in row else "-"
    speedup = f"{row['speedup']:.2f}x" if "speedup" in row else "-"
    print(f"{row['method']:<16}{row['mode']:>8}{mk_s:>12}{row['mergefleet_s']:>14.1f}{speedup:>9}{mk_rss:>14}{row['mergefleet_rss'] / gb:>13.2f} GB", flush=True)
    layout = row.get("layout")
    if layout:
        print(f"{'':<16}{'':>8}  {layout['shards']} shard(s), {layout['workers']} worker(s): shards from {layout['shards_from']}, "
              f"workers from {layout['workers_from']} (limited by {layout['limited_by']})", flush=True)


if __name__ == "__main__":
    sys.exit(main())
