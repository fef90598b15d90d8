"""``mergefleet``: the command line. Errors become one line and a non-zero exit.

Progress goes to stderr on a terminal; ``--json`` prints one JSON object to stdout and
nothing else there; ``--debug`` shows the traceback of an error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import TYPE_CHECKING, Any, Callable, NoReturn, Sequence

from rich.console import Console
from rich.logging import RichHandler

from mergefleet import cli_cluster, cli_learned
from mergefleet.progress import MergeProgress
from orchestrator import __version__
from orchestrator.redact import install_log_redaction, redact
from orchestrator.errors import Interrupted, MergefleetError, UsageError, from_os_error

if TYPE_CHECKING:
    from orchestrator.pipeline import MergeSummary

COMMANDS = tuple(sorted(("assemble", "compare", "deploy", "merge", "plan", "run", "shard") + cli_cluster.COMMANDS + cli_learned.COMMANDS))


def _human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1000
    return f"{count:.1f} TB"


def cmd_merge(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    from orchestrator.pipeline import merge
    from orchestrator.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    output = recipe.output_location(args.output)
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
    if not args.json and not args.quiet:
        _print_summary(console, summary)
    return summary.model_dump(mode="json")


def _print_summary(console: Console, summary: MergeSummary, *, where: str = "", run: str = "") -> None:
    """What a merge did, in one line, and its method report."""
    rate = summary.bytes_written / summary.seconds if summary.seconds else 0.0
    console.print(
        f"merged {summary.tensors} tensors with {summary.method} into {summary.output}: "
        f"{_human_bytes(summary.bytes_written)} in {summary.shards} shard(s){where}"
        + (f" ({summary.shards_skipped} already done)" if summary.shards_skipped else "")
        + f", {summary.seconds:.1f} s ({_human_bytes(rate)}/s); plan {summary.plan_id}{run}",
        highlight=False,
    )
    _print_report(console, summary.report)


def _print_report(console: Console, report: dict[str, Any]) -> None:
    rates = report.get("protected_drop_rate")
    if rates:
        shown = ", ".join(f"{rate:.1%}" for rate in rates)
        console.print(f"protected drop rate (top-k entries discarded by the sign election): {shown}", highlight=False)


def cmd_plan(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    from orchestrator.explain import explain_plan
    from orchestrator.pipeline import prepare_output
    from orchestrator.plan import PLAN_FILE, build_plan
    from orchestrator.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    output = recipe.output_location(args.output)
    plan = build_plan(recipe, output, shards=args.shards, allow_pickle=args.allow_pickle or None)
    prepare_output(plan, overwrite=args.overwrite)
    shards = [
        {"index": s.index, "file": s.file, "tensors": len(s.tensors), "bytes_out": s.out_bytes, "bytes_in": s.in_bytes}
        for s in plan.shards
    ]
    groups = explain_plan(plan) if args.explain else []
    if not args.json and not args.quiet:
        console.print(f"plan {plan.plan_id}: {plan.method}, {len(plan.inputs)} inputs, written to {output}/{PLAN_FILE}", highlight=False)
        for shard in shards:
            console.print(
                f"  shard {shard['index']}: {shard['file']}  {shard['tensors']} tensors, "
                f"reads {_human_bytes(shard['bytes_in'])}, writes {_human_bytes(shard['bytes_out'])}",
                highlight=False,
            )
        if groups:
            console.print(f"  {'shard':>5}  {'group':<12}{'tensors':>8}{'reads':>12}{'writes':>12}{'peak memory':>14}", highlight=False)
            for row in groups:
                console.print(
                    f"  {row['shard']:>5}  {row['group']:<12}{row['tensors']:>8}{_human_bytes(row['bytes_read']):>12}"
                    f"{_human_bytes(row['bytes_written']):>12}{_human_bytes(row['peak_bytes']):>14}",
                    highlight=False,
                )
            top = max(groups, key=lambda row: row["peak_bytes"])
            console.print(f"  expected peak memory of a shard: {_human_bytes(top['peak_bytes'])} ({top['group']})", highlight=False)
    result = {"plan_id": plan.plan_id, "plan": f"{output}/{PLAN_FILE}", "method": plan.method, "shards": shards}
    if groups:
        result["groups"] = groups
    return result


def cmd_shard(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    from orchestrator.plan_ref import PlanRef, open_plan
    from orchestrator.shard import run_shard

    plan = open_plan(PlanRef.locate(args.plan))
    shard = plan.shard(args.index)
    with MergeProgress(console, enabled=args.show_progress) as progress:
        progress.start_shard(shard)
        outcome = run_shard(plan, args.index, device=args.device, on_tensor=progress.advance, force=args.force)
    receipt = outcome.receipt
    result = receipt.model_dump() | {"skipped": outcome.skipped}
    if not args.json and not args.quiet:
        verb = "already done" if outcome.skipped else f"written in {receipt.seconds:.1f} s"
        console.print(f"shard {args.index}: {plan.output}/{receipt.file} {verb} ({_human_bytes(receipt.bytes_written)})", highlight=False)
    return result


def cmd_assemble(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    from orchestrator.assemble import assemble
    from orchestrator.plan_ref import PlanRef, open_plan

    plan = open_plan(PlanRef.locate(args.plan))
    manifest = assemble(plan)
    if not args.json and not args.quiet:
        console.print(f"assembled {plan.output}: {len(manifest.files)} file(s), plan {plan.plan_id}", highlight=False)
        _print_report(console, manifest.report)
    return manifest.model_dump(mode="json")


class _RunNameFormatter(logging.Formatter):
    """Prefixes Prefect's run logs with the run's name (``shard-2: ...``)."""

    def format(self, record: logging.LogRecord) -> str:
        name = getattr(record, "task_run_name", None) or getattr(record, "flow_run_name", None)
        message = super().format(record)
        return f"{name}: {message}" if name else message


def _prefect_defaults(*, quiet: bool) -> None:
    """Settings for Prefect, set before it is imported; the user's environment wins."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "60")
    if quiet:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    for handler in logging.getLogger().handlers:
        if isinstance(handler, RichHandler):
            handler.setFormatter(_RunNameFormatter("%(message)s"))


def cmd_run(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    from flows import embedded

    _prefect_defaults(quiet=args.json or args.quiet)
    api = embedded.start()  # without a configured server: starts while the code below imports
    from orchestrator.recipe import load_recipe, parse_recipe

    recipe = load_recipe(args.recipe)  # a bad recipe fails here, before any flow runs
    output = recipe.output_location(args.output)
    data = recipe.model_dump(mode="json", exclude_defaults=True)
    overrides = {key: getattr(args, key) for key in ("shards", "workers", "device", "target", "work_pool")}
    data["fleet"] = data.get("fleet", {}) | {key: value for key, value in overrides.items() if value is not None}
    recipe = parse_recipe(data, source=args.recipe)
    from flows.merge_and_eval import SkippedMerge, merge_and_eval

    with embedded.connected(api, timeout=float(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"])):
        result = merge_and_eval(recipe, output, overwrite=args.overwrite, skip_unchanged=args.skip_unchanged)
    if isinstance(result, SkippedMerge):
        if not args.json and not args.quiet:
            console.print(f"{result.output}: {result.reason}; nothing to do", highlight=False)
        return result.model_dump(mode="json")
    if not args.json and not args.quiet:
        _print_summary(console, result, where=f" ({result.target})", run=f", flow run {result.flow_run_id}")
        if result.evaluation is not None:
            scores = result.evaluation.merged.scores
            console.print("scores: " + ", ".join(f"{task} {value:.3f}" for task, value in scores.items()), highlight=False)
        if result.tracking is not None:
            tracked = result.tracking
            console.print(f"recorded as MLflow run {tracked.run_id} in {tracked.url or tracked.tracking_uri}", highlight=False)
    return result.model_dump(mode="json")


def cmd_deploy(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    from pathlib import Path

    from orchestrator.errors import RecipeError
    from orchestrator.recipe import load_recipe
    from orchestrator.schedule import portable_recipe

    recipe = load_recipe(args.recipe)
    pool = args.pool or recipe.fleet.work_pool
    if not pool:
        raise RecipeError("no work pool: give --pool NAME or set 'fleet: {work_pool: NAME}' in the recipe")
    data = portable_recipe(recipe, root=Path.cwd(), output=recipe.output_location(args.output))
    _prefect_defaults(quiet=args.json or args.quiet)
    from flows.deploy import deploy, summary
    from flows.preflight import parse_schedule

    schedule = parse_schedule(cron=args.cron, interval=args.interval, timezone=args.timezone)
    name = args.name or recipe.name or Path(args.recipe).stem
    result = deploy(
        data, name=name, pool=pool, flow_pool=args.flow_pool, schedule=schedule, image=args.image, create_pools=args.create_pool
    )
    if not args.json and not args.quiet:
        for line in summary(result):
            console.print(line, highlight=False, markup=False)
    return result


def cmd_compare(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    from orchestrator.tracking.charts import score_chart
    from orchestrator.tracking.compare import compare_drop_rates, compare_rows, compare_series, find_merge_runs
    from orchestrator.tracking.store import compare_tracking_uri

    uri = compare_tracking_uri(args.tracking_uri)
    runs = find_merge_runs(args.refs, tracking_uri=uri)
    rows, params, tasks = compare_rows(runs)
    drop_rates = compare_drop_rates(rows)
    chart = str(score_chart(compare_series(rows), args.chart, title=f"{len(rows)} merge(s)", drop_rates=drop_rates)) if tasks else None
    if not args.json and not args.quiet:
        from rich.table import Table

        table = Table(show_edge=False, pad_edge=False)
        for column in ["run", "method", *params, *tasks, "normalised", "seconds"]:
            table.add_column(column.removeprefix("parameters."), justify="left" if column in ("run", "method") else "right")

        def number(value: Any, digits: int = 3) -> str:
            return "" if value is None else f"{value:.{digits}f}"

        for row in rows:
            scores = [
                number(row["scores"][t]) + (f" ({row['normalised'][t]:.2f})" if row["normalised"].get(t) is not None else "")
                for t in tasks
            ]
            table.add_row(
                row["name"] or row["run_id"][:8],
                row["method"] or "",
                *[str(row["params"].get(p) or "") for p in params],
                *scores,
                number(row["normalised_mean"], 2),
                number(row["seconds"], 1),
            )
        console.print(table)
        console.print(f"scores: primary metric per task (normalised in brackets); runs in {uri}", highlight=False)
        for name, rates in drop_rates.items():
            shown = ", ".join(f"{model} {rate:.1%}" for model, rate in rates.items())
            console.print(f"protected drop rate of {name}: {shown}", highlight=False)
        if chart:
            console.print(f"chart: {chart}", highlight=False)
    return {"tracking_uri": uri, "tasks": tasks, "params": params, "runs": rows, "chart": chart}


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON object to stdout, no progress")
    common.add_argument("--quiet", "-q", action="store_true", help="no progress and no summary")
    common.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")

    parser = _Parser(prog="mergefleet", description="Merge LLM checkpoints, sharded by layer groups.")
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
    plan.add_argument("--explain", action="store_true", help="per tensor group: bytes read and written, expected peak memory")
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

    run = commands.add_parser("run", parents=[common], help="run the merge_and_eval Prefect flow (ephemeral Prefect by default)")
    run.add_argument("recipe", help="mergekit YAML recipe (with an optional fleet: section)")
    run.add_argument("output", nargs="?", help="output directory (default: fleet.output)")
    run.add_argument("--shards", type=int, help="number of layer-group shards (default: fleet.shards or 1)")
    run.add_argument("--workers", type=int, help="inline target: shards run at once (default: fleet.workers or 1)")
    run.add_argument("--device", choices=["cpu", "cuda"], help="where tensors are merged (default: fleet.device or cpu)")
    run.add_argument("--target", choices=["inline", "deployment"], help="where shards run (default: fleet.target or inline)")
    run.add_argument("--work-pool", help="deployment target: the work pool of the merge-shard deployment")
    run.add_argument("--overwrite", action="store_true", help="replace a different merge already in OUT")
    run.add_argument("--skip-unchanged", action="store_true", help="do nothing if no input changed since the last merge")
    run.set_defaults(handler=cmd_run)

    deploy = commands.add_parser("deploy", parents=[common], help="register merge-shard and a scheduled merge-and-eval with Prefect")
    deploy.add_argument("recipe")
    deploy.add_argument("output", nargs="?", help="output directory (default: fleet.output)")
    deploy.add_argument("--pool", help="work pool of the merge-shard deployment (default: fleet.work_pool)")
    deploy.add_argument("--flow-pool", help="work pool of the merge-and-eval deployment (default: --pool)")
    when = deploy.add_mutually_exclusive_group()
    when.add_argument("--cron", help="schedule, e.g. '0 2 * * *' (nightly; a run skips when nothing changed)")
    when.add_argument("--interval", type=float, metavar="SECONDS", help="schedule: a run every SECONDS")
    deploy.add_argument("--timezone", default="UTC", help="time zone of --cron, an IANA name (default: %(default)s)")
    deploy.add_argument("--create-pool", action="store_true", help="create a missing work pool as a process pool")
    deploy.add_argument("--name", help="name of the merge-and-eval deployment (default: the recipe's name or file name)")
    deploy.add_argument("--image", help="container image for container-based pools (kubernetes)")
    deploy.set_defaults(handler=cmd_deploy)

    compare = commands.add_parser("compare", parents=[common], help="a table and a chart of merges recorded in MLflow")
    compare.add_argument("refs", nargs="+", metavar="RUN_OR_EXPERIMENT", help="MLflow run ids, or experiment names or ids (all their merges)")
    compare.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)")
    compare.add_argument("--chart", default="mergefleet-compare.png", help="where the chart goes (PNG; default: %(default)s)")
    compare.set_defaults(handler=cmd_compare)

    cli_cluster.register(commands, common)
    cli_learned.register(commands, common)
    return parser


class _Parser(argparse.ArgumentParser):
    """Command-line mistakes become a ``UsageError``, so they fail like every other error
    (one line, or the JSON error object with ``--json``)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}; see '{self.prog} --help'")


def _error_object(error: MergefleetError) -> dict[str, Any]:
    """What ``--json`` prints for a failure: message, kind, exit code, and the path or key at fault."""
    found: dict[str, Any] = {"error": _one_line(error), "kind": error.kind, "exit_code": error.exit_code}
    found.update({name: redact(value) for name in ("path", "key") if (value := getattr(error, name)) is not None})
    return found


def _one_line(error: BaseException) -> str:
    return redact("; ".join(line.strip() for line in str(error).splitlines() if line.strip()))


def _as_error(error: BaseException) -> MergefleetError:
    """Any failure as a typed error: an ``OSError`` names its path; anything else is ours to fix."""
    if isinstance(error, MergefleetError):
        return error
    if isinstance(error, OSError) and error.filename is not None:
        return from_os_error(error, os.fsdecode(error.filename))
    internal = MergefleetError(
        f"internal error ({type(error).__name__}: {error}); run again with --debug for the traceback, and report it"
    )
    internal.kind = "internal"
    return internal


def _print_json(document: dict[str, Any]) -> bool:
    """Write one JSON object to stdout; ``False`` when stdout is closed (a broken pipe)."""
    try:
        sys.stdout.write(json.dumps(document, default=str) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python exits
        return False
    return True


BROKEN_PIPE = 141
"""Exit status when stdout closed before the result was written (128 + SIGPIPE, as a shell reports it)."""


def main(argv: Sequence[str] | None = None) -> int:
    console = Console(stderr=True, soft_wrap=True)
    arguments = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(arguments)
        for name in ("shards", "workers"):
            value = getattr(args, name, None)
            if value is not None and value < 1:
                raise UsageError(f"--{name} must be at least 1, got {value}")
    except UsageError as error:
        return _fail(error, console, json_output="--json" in arguments, debug=False)
    args.show_progress = not (args.json or args.quiet) and console.is_terminal
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, show_time=False)],
    )
    install_log_redaction()
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3"):  # their debug logs show request headers
        logging.getLogger(noisy).setLevel(max(logging.INFO, logging.getLogger().level))
    handler: Callable[[argparse.Namespace, Console], dict[str, Any]] = args.handler
    try:
        result = handler(args, console)
    except KeyboardInterrupt:
        stopped = Interrupted("interrupted; finished shards are kept and a re-run resumes")
        return _fail(stopped, console, json_output=args.json, debug=False)
    except Exception as error:  # noqa: BLE001 -- the one place every failure becomes one line
        return _fail(_as_error(error), console, json_output=args.json, debug=args.debug)
    if args.json and not _print_json(result):
        console.print(
            "error: standard output was closed before the result was written (broken pipe); "
            "the command finished: read its result from the output location, or run it again without closing the pipe",
            highlight=False,
            markup=False,
        )
        return BROKEN_PIPE
    return 0


def _fail(error: MergefleetError, console: Console, *, json_output: bool, debug: bool) -> int:
    if debug:
        console.print_exception()
    console.print(f"error: {_one_line(error)}", highlight=False, markup=False)
    if json_output:
        _print_json(_error_object(error))
    return error.exit_code


if __name__ == "__main__":
    sys.exit(main())
