"""The command line of the trained merges: ``dam train``, ``search``, ``merge-to-mix``.

``mergefleet.cli`` registers these with ``register(commands, common)``; errors and
``--json`` are handled there like every other command's.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Callable

from rich.console import Console

COMMANDS = ("dam", "merge-to-mix", "search")


def cmd_dam_train(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    from orchestrator.learned.dam_run import run_dam_training
    from orchestrator.recipe import load_recipe

    recipe = load_recipe(args.recipe, strict=args.strict)
    overrides = {"dtype": args.dtype, "batch_size": args.batch_size, "max_length": args.max_length,
                 "device": args.device, "memory_limit": args.memory_limit}

    def progress(step: Any) -> None:
        if args.show_progress and step.step % 10 == 0:
            console.print(f"step {step.step}: loss {step.total:.4f}", highlight=False)

    result = run_dam_training(recipe, coefficients=args.coefficients, overwrite=args.overwrite, track=not args.no_track,
                              overrides=overrides, on_step=progress)
    if not args.json and not args.quiet:
        console.print(
            f"trained DAM coefficients for {len(result['experts'])} experts in {result['steps']} steps, {result['seconds']:.1f} s: "
            f"loss {result['first_loss']:.4f} -> {result['final_loss']:.4f}; written to {result['coefficients']}",
            highlight=False,
        )
        if result.get("run_id"):
            console.print(f"recorded as MLflow run {result['run_id']} in {result['tracking_uri']}", highlight=False)
    return result


def _run_flow(args: argparse.Namespace, start: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run a flow on the embedded Prefect API (unless a server is configured), as ``mergefleet run`` does."""
    from flows import embedded
    from mergefleet.cli import _prefect_defaults

    _prefect_defaults(quiet=args.json or args.quiet)
    api = embedded.start()
    with embedded.connected(api, timeout=float(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"])):
        return start()


def cmd_search(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    from orchestrator.recipe import load_recipe

    recipe = load_recipe(args.recipe, strict=args.strict)  # a bad recipe fails before Prefect starts

    def start() -> dict[str, Any]:
        from flows.search import parameter_search

        return parameter_search(recipe, budget=args.budget, parallel=args.parallel, output=args.output, layer_groups=args.layer_groups,
                                parameters=args.parameters.split(","), time_budget=args.time_budget, objective=args.objective, seed=args.seed,
                                overwrite=args.overwrite)

    result = _run_flow(args, start)
    if not args.json and not args.quiet:
        best = result["best"]
        console.print(f"{len(result['trials'])} trials in {result['seconds']:.1f} s; best {best['label']}: score {best['score']:.4f} "
                      f"{best['values']}", highlight=False)
        console.print(f"best recipe: {result['best_recipe']}; MLflow run {result['run_id']} in {result['tracking_uri']}", highlight=False)
    return result


def cmd_merge_to_mix(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    from orchestrator.recipe import load_recipe

    recipe = load_recipe(args.recipe, strict=args.strict)

    def start() -> dict[str, Any]:
        from flows.merge_to_mix import merge_to_mix

        return merge_to_mix(recipe, output=args.output, parallel=args.parallel, budget=args.budget, objective=args.objective,
                            overwrite=args.overwrite)

    result = _run_flow(args, start)
    if not args.json and not args.quiet:
        for row in result["ranking"]:
            console.print(f"{row['rank']:>3}  {row['score']:.4f}  {row['subset']}", highlight=False)
        console.print(f"best mixture: {result['best']}; MLflow run {result['run_id']} in {result['tracking_uri']}", highlight=False)
    return result


def register(commands: Any, common: argparse.ArgumentParser, reads_recipe: argparse.ArgumentParser) -> None:
    dam = commands.add_parser("dam", help="Differentiable Adaptive Merging: learn coefficients")
    steps = dam.add_subparsers(dest="dam_command", required=True, metavar="STEP", help="what to do")
    train = steps.add_parser("train", parents=[common, reads_recipe], help="learn the coefficients a dam_apply recipe reads (fleet.dam: data and settings)")
    train.add_argument("recipe", help="a dam_apply recipe with fleet.dam")
    train.add_argument("--coefficients", help="where the coefficient file goes (default: the recipe's parameters.coefficients)")
    train.add_argument("--overwrite", action="store_true", help="replace an existing coefficient file")
    train.add_argument("--no-track", action="store_true", help="do not record the training in MLflow")
    train.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="the experts as held in memory (default: fleet.dam.dtype)")
    train.add_argument("--batch-size", type=int, help="examples per expert per step (default: fleet.dam.batch_size)")
    train.add_argument("--max-length", type=int, help="tokens per example (default: fleet.dam.max_length)")
    train.add_argument("--device", help="cpu, cuda, cuda:N (default: fleet.dam.device)")
    train.add_argument("--memory-limit", help="fail early above this much memory, e.g. 24GB (default: what the device has free)")
    train.set_defaults(handler=cmd_dam_train)

    search = commands.add_parser("search", parents=[common, reads_recipe], help="search weights and densities with CMA-ES",
                                 description="search a method's weights and densities with CMA-ES, scored with fleet.eval")
    search.add_argument("recipe", help="the recipe to tune; its fleet.eval scores each trial")
    search.add_argument("--budget", type=int, default=16, help="trials (merge + evaluation) at most (default: %(default)s)")
    search.add_argument("--parallel", type=int, default=2, help="trials at once (default: %(default)s)")
    search.add_argument("--output", help="where trials and best-recipe.yaml go (default: fleet.output)")
    search.add_argument("--layer-groups", type=int, default=1, help="one value per group of layers (default: %(default)s, one per expert)")
    search.add_argument("--parameters", default="weight,density", help="what to search, of weight,density (default: %(default)s)")
    search.add_argument("--time-budget", type=float, help="stop starting trials after this many seconds")
    search.add_argument("--objective", choices=["mean", "normalised"], default="mean", help="mean score over the tasks, or mean normalised score")
    search.add_argument("--seed", type=int, default=0, help="seed of the search (default: %(default)s)")
    search.add_argument("--overwrite", action="store_true", help="replace the trial merges of an earlier search in the output")
    search.set_defaults(handler=cmd_search)

    mix = commands.add_parser("merge-to-mix", parents=[common, reads_recipe], help="rank data mixtures by merging fine-tuned models",
                              description="rank data mixtures by merging the models fine-tuned on each dataset")
    mix.add_argument("recipe", help="one fine-tuned model per candidate dataset under models; the target task in fleet.eval")
    mix.add_argument("--output", help="where each subset's merge goes (default: fleet.output)")
    mix.add_argument("--parallel", type=int, default=2, help="subsets merged and evaluated at once (default: %(default)s)")
    mix.add_argument("--budget", type=int, help="merges at most; below 2^N - 1 (or above 8 candidates) the search is greedy")
    mix.add_argument("--objective", choices=["mean", "normalised"], default="mean", help="mean score over the tasks, or mean normalised score")
    mix.add_argument("--overwrite", action="store_true", help="replace the subset merges of an earlier run in the output")
    mix.set_defaults(handler=cmd_merge_to_mix)
