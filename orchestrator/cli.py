"""``mergefleet``: the command line. Errors become one line and a non-zero exit.

Progress goes to stderr on a terminal; ``--json`` prints one JSON object to stdout and
nothing else there; ``--debug`` shows the traceback of an error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Callable, Sequence

from rich.console import Console
from rich.logging import RichHandler

from orchestrator import __version__
from orchestrator.errors import MergefleetError
from orchestrator.progress import MergeProgress

COMMANDS = ("assemble", "merge", "plan", "shard")


def _human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1000
    return f"{count:.1f} TB"


def _resolve_output(recipe: Any, output: str | None) -> str:
    from orchestrator.errors import RecipeError

    chosen = output or recipe.fleet.output
    if not chosen:
        raise RecipeError("no output location: give OUT on the command line or set 'fleet: {output: PATH}' in the recipe")
    return chosen


def cmd_merge(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    from orchestrator.pipeline import merge
    from orchestrator.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    output = _resolve_output(recipe, args.output)
    with MergeProgress(console, enabled=args.show_progress) as progress:
        summary = merge(
            recipe,
            output,
            shards=args.shards,
            workers=args.workers,
            device=args.device,
            overwrite=args.overwrite,
            allow_pickle=args.allow_pickle or None,
            on_plan=progress.start_plan,
            on_tensor=progress.advance,
        )
    result = summary.as_dict()
    if not args.json and not args.quiet:
        rate = summary.bytes_written / summary.seconds if summary.seconds else 0.0
        console.print(
            f"merged {summary.tensors} tensors with {summary.method} into {summary.output}: "
            f"{_human_bytes(summary.bytes_written)} in {summary.shards} shard(s)"
            + (f" ({summary.shards_skipped} already done)" if summary.shards_skipped else "")
            + f", {summary.seconds:.1f} s ({_human_bytes(rate)}/s); plan {summary.plan_id}",
            highlight=False,
        )
        _print_report(console, result["report"])
    return result


def _print_report(console: Console, report: dict[str, Any]) -> None:
    rates = report.get("protected_drop_rate")
    if rates:
        shown = ", ".join(f"{rate:.1%}" for rate in rates)
        console.print(f"protected drop rate (top-k entries discarded by the sign election): {shown}", highlight=False)


def cmd_plan(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    from orchestrator.pipeline import prepare_output
    from orchestrator.plan import PLAN_FILE, build_plan
    from orchestrator.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    output = _resolve_output(recipe, args.output)
    plan = build_plan(recipe, output, shards=args.shards, allow_pickle=args.allow_pickle or None)
    prepare_output(plan, overwrite=args.overwrite)
    shards = [
        {"index": s.index, "file": s.file, "tensors": len(s.tensors), "bytes_out": s.out_bytes, "bytes_in": s.in_bytes}
        for s in plan.shards
    ]
    if not args.json and not args.quiet:
        console.print(f"plan {plan.plan_id}: {plan.method}, {len(plan.inputs)} inputs, written to {output}/{PLAN_FILE}", highlight=False)
        for shard in shards:
            console.print(
                f"  shard {shard['index']}: {shard['file']}  {shard['tensors']} tensors, "
                f"reads {_human_bytes(shard['bytes_in'])}, writes {_human_bytes(shard['bytes_out'])}",
                highlight=False,
            )
    return {"plan_id": plan.plan_id, "plan": f"{output}/{PLAN_FILE}", "method": plan.method, "shards": shards}


def cmd_shard(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    from orchestrator.pipeline import load_plan
    from orchestrator.shard import run_shard

    plan = load_plan(args.plan)
    shard = plan.shard(args.index)
    with MergeProgress(console, enabled=args.show_progress) as progress:
        progress.start_shard(shard)
        receipt, skipped = run_shard(plan, args.index, device=args.device, on_tensor=progress.advance, force=args.force)
    result = receipt.model_dump() | {"skipped": skipped}
    if not args.json and not args.quiet:
        verb = "already done" if skipped else f"written in {receipt.seconds:.1f} s"
        console.print(f"shard {args.index}: {plan.output}/{receipt.file} {verb} ({_human_bytes(receipt.bytes_written)})", highlight=False)
    return result


def cmd_assemble(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    from orchestrator.assemble import assemble
    from orchestrator.pipeline import load_plan

    plan = load_plan(args.plan)
    manifest = assemble(plan)
    if not args.json and not args.quiet:
        console.print(f"assembled {plan.output}: {len(manifest['files'])} file(s), plan {plan.plan_id}", highlight=False)
        _print_report(console, manifest["report"])
    return manifest


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON object to stdout, no progress")
    common.add_argument("--quiet", "-q", action="store_true", help="no progress and no summary")
    common.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")

    parser = argparse.ArgumentParser(prog="mergefleet", description="Merge LLM checkpoints, sharded by layer groups.")
    parser.add_argument("--version", action="version", version=f"mergefleet {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    merge = commands.add_parser("merge", parents=[common], help="plan, run every shard and assemble")
    merge.add_argument("recipe", help="mergekit YAML recipe (with an optional fleet: section)")
    merge.add_argument("output", nargs="?", help="output directory (default: fleet.output)")
    merge.add_argument("--shards", type=int, help="number of layer-group shards (default: fleet.shards or 1)")
    merge.add_argument("--workers", type=int, help="shards run at once, each in its own process (default: fleet.workers or 1)")
    merge.add_argument("--device", choices=["cpu", "cuda"], help="where tensors are merged (default: fleet.device or cpu)")
    merge.add_argument("--overwrite", action="store_true", help="replace a different merge already in OUT")
    merge.add_argument("--allow-pickle", action="store_true", help="read .bin/.pt checkpoints with torch.load(weights_only=True)")
    merge.set_defaults(handler=cmd_merge)

    plan = commands.add_parser("plan", parents=[common], help="check the inputs and write OUT/.mergefleet/plan.json")
    plan.add_argument("recipe")
    plan.add_argument("output", nargs="?")
    plan.add_argument("--shards", type=int)
    plan.add_argument("--overwrite", action="store_true")
    plan.add_argument("--allow-pickle", action="store_true")
    plan.set_defaults(handler=cmd_plan)

    shard = commands.add_parser("shard", parents=[common], help="run one shard of a plan")
    shard.add_argument("plan", help="plan.json, or the output directory that holds .mergefleet/plan.json")
    shard.add_argument("--index", type=int, required=True)
    shard.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    shard.add_argument("--force", action="store_true", help="run even if the shard's receipt says it is done")
    shard.set_defaults(handler=cmd_shard)

    assemble = commands.add_parser("assemble", parents=[common], help="write index, config, tokenizer and manifest")
    assemble.add_argument("plan")
    assemble.set_defaults(handler=cmd_assemble)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(stderr=True, soft_wrap=True)
    args.show_progress = not (args.json or args.quiet) and console.is_terminal
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, show_time=False)],
    )
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3"):  # their debug logs show request headers
        logging.getLogger(noisy).setLevel(max(logging.INFO, logging.getLogger().level))
    for name in ("shards", "workers"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            console.print(f"error: --{name} must be at least 1, got {value}", highlight=False, markup=False)
            return 2
    handler: Callable[[argparse.Namespace, Console], dict[str, Any]] = args.handler
    try:
        result = handler(args, console)
    except MergefleetError as error:
        if args.debug:
            console.print_exception()
        console.print(f"error: {error}", highlight=False, markup=False)
        return error.exit_code
    except KeyboardInterrupt:
        console.print("interrupted; finished shards are kept and a re-run resumes", highlight=False)
        return 130
    if args.json:
        sys.stdout.write(json.dumps(result, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
