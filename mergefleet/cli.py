"""``mergefleet``: the command line. Errors become one line and a non-zero exit.

Progress goes to stderr on a terminal; ``--json`` prints one JSON object to stdout and
nothing else there; ``--debug`` shows the traceback of an error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable, NoReturn, Sequence

from rich.console import Console
from rich.logging import RichHandler

from mergefleet import cli_cluster, cli_learned, output_log
from mergefleet.progress import FlowView, MergeProgress, human_bytes
from mergefleet.tables import print_table, score_table
from orchestrator import __version__
from orchestrator.memory import keep_freed_memory
from orchestrator.redact import install_log_redaction, redact
from orchestrator.errors import Interrupted, MergefleetError, UsageError, from_os_error

if TYPE_CHECKING:
    from flows.merge_and_eval import MergeAndEvalResult
    from orchestrator.multidoc import MergeGraph
    from orchestrator.pipeline import MergeSummary

DEFAULT_CHART = "mergefleet-compare.png"
COMMANDS = tuple(sorted(("assemble", "compare", "deploy", "merge", "plan", "run", "shard") + cli_cluster.COMMANDS + cli_learned.COMMANDS))

INTERMEDIATE_HELP = "multi-document recipes: where the named intermediate merges go (default: fleet.intermediate_dir, else OUT.intermediates)"


def cmd_merge(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    from orchestrator.multidoc import IntermediateResult, load_graph, merge_graph
    from orchestrator.pipeline import merge

    graph = load_graph(args.recipe, strict=args.strict)
    output = graph.final.recipe.output_location(args.output)

    def report(result: IntermediateResult) -> None:
        if args.json or args.quiet:
            return
        if result.summary is None:
            console.print(f"intermediate {result.name}: already merged for plan {result.plan_id} in {result.output}", highlight=False)
        else:
            _print_summary(console, result.summary, run=f" (intermediate {result.name})")

    intermediates: list[IntermediateResult] = []
    with MergeProgress(console, enabled=args.show_progress) as progress:
        options = {
            "shards": args.shards,
            "workers": args.workers,
            "device": args.device,
            "overwrite": args.overwrite,
            "allow_pickle": args.allow_pickle or None,
            "on_plan": progress.start_plan,
            "on_tensor": progress.advance,
        }
        if graph.is_single:
            summary = merge(graph.final.recipe, output, **options)
        else:  # a multi-document recipe: its intermediates in dependency order, then the final merge
            intermediates, summary = merge_graph(graph, output, intermediates=args.intermediate_dir, on_intermediate=report, **options)
    if not args.json and not args.quiet:
        _print_summary(console, summary, where=f" on {summary.layout.describe()}" if summary.layout else "")
    result = summary.model_dump(mode="json")
    if not graph.is_single:
        result["intermediates"] = [item.as_json() for item in intermediates]
    return result


def _print_summary(console: Console, summary: MergeSummary, *, where: str = "", run: str = "") -> None:
    """What a merge did, in one line, and its method report. A rate only counts the bytes
    this run wrote: a re-run whose shards were all done merged nothing and says so."""
    console.print(merge_line(summary, where=where) + f"; plan {summary.plan_id}{run}", highlight=False)
    for why in summary.shards_redone:
        console.print(f"redone (did not match its receipt): {why}", highlight=False)
    _print_report(console, summary.report)


def merge_line(summary: MergeSummary, *, where: str = "") -> str:
    if summary.shards_skipped == summary.shards:
        return (
            f"all {summary.shards} shard{'s' if summary.shards != 1 else ''} already done; nothing merged into {summary.output} "
            f"({summary.tensors} tensors with {summary.method}, {human_bytes(summary.bytes_written)})"
        )
    rate = summary.bytes_merged / summary.seconds if summary.seconds else 0.0
    done = f" ({summary.shards_skipped} already done)" if summary.shards_skipped else ""
    return (
        f"merged {summary.tensors} tensors with {summary.method} into {summary.output}: "
        f"{human_bytes(summary.bytes_written)} in {summary.shards} shard(s){where}{done}, "
        f"{summary.seconds:.1f} s ({human_bytes(rate)}/s)"
    )


def _print_report(console: Console, report: dict[str, Any]) -> None:
    rates = report.get("protected_drop_rate")
    if rates:
        shown = ", ".join(f"{rate:.1%}" for rate in rates)
        console.print(f"protected drop rate (top-k entries discarded by the sign election): {shown}", highlight=False)


def cmd_plan(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    from orchestrator.explain import explain_plan
    from orchestrator.pipeline import prepare_output
    from orchestrator.multidoc import load_graph
    from orchestrator.plan import PLAN_FILE, build_plan

    graph = load_graph(args.recipe, strict=args.strict)
    recipe = graph.final.recipe
    output = recipe.output_location(args.output)
    if not graph.is_single:
        return _plan_documents(args, console, graph, output)
    plan = build_plan(recipe, output, shards=args.shards, allow_pickle=args.allow_pickle or None)
    if recipe.fleet.eval is not None:
        from orchestrator.evaluate.scores import check_evaluation

        check_evaluation(plan, recipe.fleet.eval)
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
                f"reads {human_bytes(shard['bytes_in'])}, writes {human_bytes(shard['bytes_out'])}",
                highlight=False,
            )
        if groups:
            print_table(
                console,
                ["group", "shard", "tensors", "reads", "writes", "peak memory"],
                [[row["group"], str(row["shard"]), str(row["tensors"]), human_bytes(row["bytes_read"]),
                  human_bytes(row["bytes_written"]), human_bytes(row["peak_bytes"])] for row in groups],
            )
            top = max(groups, key=lambda row: row["peak_bytes"])
            console.print(f"  expected peak memory of a shard: {human_bytes(top['peak_bytes'])} ({top['group']})", highlight=False)
    result = {"plan_id": plan.plan_id, "plan": f"{output}/{PLAN_FILE}", "method": plan.method, "shards": shards}
    if groups:
        result["groups"] = groups
    return result


def _plan_documents(args: argparse.Namespace, console: Console, graph: MergeGraph, output: str) -> dict[str, Any]:
    """Each document's plan as far as it can be made before merging; claims OUT once the final's is made."""
    from orchestrator.multidoc import plan_graph
    from orchestrator.pipeline import prepare_output

    nodes = plan_graph(graph, output, intermediates=args.intermediate_dir, shards=args.shards, allow_pickle=args.allow_pickle or None)
    final = nodes[-1]
    if final.plan is not None:
        prepare_output(final.plan, overwrite=args.overwrite)
    if not args.json and not args.quiet:
        for node in nodes:
            plan_id = f"plan {node.plan.plan_id}" if node.plan else "plan not known yet"
            console.print(f"{node.name or 'final'}: {node.method}, {plan_id}, {node.state} -> {node.output}", highlight=False)
    return {"documents": [node.as_json() for node in nodes], "plan_id": final.plan.plan_id if final.plan else None}


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
        console.print(f"shard {args.index}: {plan.output}/{receipt.file} {verb} ({human_bytes(receipt.bytes_written)})", highlight=False)
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

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        name = getattr(record, "task_run_name", None) or getattr(record, "flow_run_name", None)
        if name:
            record.message = f"{name}: {record.message}"
        return super().formatMessage(record)


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
    from orchestrator.errors import RecipeError
    from orchestrator.multidoc import load_graph

    graph = load_graph(args.recipe, strict=args.strict)  # a bad recipe fails here, before any flow runs
    recipe = graph.final.recipe
    output = recipe.output_location(args.output)
    overrides = {key: getattr(args, key) for key in ("shards", "workers", "device", "target", "work_pool", "intermediate_dir")}
    recipe = recipe.with_fleet(**{key: value for key, value in overrides.items() if value is not None})
    from flows.merge_and_eval import SkippedMerge, merge_and_eval
    from flows.merge_documents import merge_documents

    timeout = float(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"])
    view = FlowView(console, live=args.live_view, enabled=not (args.json or args.quiet))
    if not graph.is_single:
        if args.skip_unchanged:
            raise RecipeError(
                f"{args.recipe}: --skip-unchanged takes a single-document recipe; a multi-document recipe "
                "merges again only the intermediates whose plan changed (leave the flag out)"
            )
        documents = [recipe if node is graph.final else node.recipe for node in graph.nodes]
        with embedded.connected(api, timeout=timeout), view:
            merged = merge_documents(documents, output, overwrite=args.overwrite, source=args.recipe)
        if not args.json and not args.quiet:
            for item in merged.intermediates:
                state = "already merged" if item.cached else "merged"
                console.print(f"intermediate {item.name}: {state}, plan {item.plan_id}, MLflow run {item.run_id}", highlight=False)
            _print_flow_result(console, merged)
        return merged.model_dump(mode="json")
    with embedded.connected(api, timeout=timeout), view:
        result = merge_and_eval(recipe, output, overwrite=args.overwrite, skip_unchanged=args.skip_unchanged)
    if isinstance(result, SkippedMerge):
        if not args.json and not args.quiet:
            console.print(f"{result.output}: {result.reason}; nothing to do", highlight=False)
        return result.model_dump(mode="json")
    if not args.json and not args.quiet:
        _print_flow_result(console, result)
    return result.model_dump(mode="json")


def _print_flow_result(console: Console, result: MergeAndEvalResult) -> None:
    _print_summary(console, result, where=f" ({result.target})", run=f", flow run {result.flow_run_id}")
    if result.evaluation is not None:
        console.print("scores (primary metric per task; normalised: merged ÷ the task's expert, else ÷ base):", highlight=False)
        print_table(console, *score_table(result.evaluation))
    if result.tracking is not None:
        tracked = result.tracking
        console.print(f"recorded as MLflow run {tracked.run_id} in {tracked.url or tracked.tracking_uri}", highlight=False)
        console.print(f"open it: {mlflow_ui(tracked)}", highlight=False, markup=False, soft_wrap=True)


def mlflow_ui(tracked: Any) -> str:
    """The command that opens the MLflow UI on a merge's record (a server's run page as is);
    with this interpreter's ``mlflow`` when none is on the PATH."""
    from orchestrator.tracking.store import sqlite_path, ui_command

    if sqlite_path(tracked.tracking_uri) is None:
        return tracked.url or tracked.tracking_uri
    command = ui_command(tracked.tracking_uri)
    if shutil.which("mlflow") is None:
        command = f"{Path(sys.executable).parent}/{command}"
    return command


def cmd_deploy(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    from pathlib import Path

    from orchestrator.errors import RecipeError
    from orchestrator.multidoc import load_graph
    from orchestrator.schedule import portable_recipe

    graph = load_graph(args.recipe, strict=args.strict)
    if not graph.is_single:
        raise RecipeError(
            f"{args.recipe} holds {len(graph.nodes)} documents; deploy takes a single-document recipe "
            "(run a multi-document recipe with 'mergefleet run' or 'mergefleet merge')"
        )
    recipe = graph.final.recipe
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
    from orchestrator.tracking.compare import compare_drop_rates, compare_rows, compare_series, find_merge_runs, log_comparison
    from orchestrator.tracking.store import compare_tracking_uri

    uri = compare_tracking_uri(args.tracking_uri)
    runs = find_merge_runs(args.refs, tracking_uri=uri)
    rows, params, tasks = compare_rows(runs)
    drop_rates = compare_drop_rates(rows)
    chart_path = args.chart or (None if args.json else DEFAULT_CHART)  # --json writes no file it was not asked for
    chart = None
    if tasks and chart_path:
        chart = str(score_chart(compare_series(rows), chart_path, title=f"{len(rows)} merge(s)", drop_rates=drop_rates))
    logged = log_comparison(runs, tracking_uri=uri) if args.log else []
    if not args.json and not args.quiet:
        def number(value: Any, digits: int = 3) -> str:
            return "" if value is None else f"{value:.{digits}f}"

        columns = ["run", "method", *(p.removeprefix("parameters.") for p in params), *tasks, "normalised", "seconds"]
        table_rows = []
        for row in rows:
            scores = [
                number(row["scores"][t]) + (f" ({row['normalised'][t]:.2f})" if row["normalised"].get(t) is not None else "")
                for t in tasks
            ]
            table_rows.append([
                row["name"] or row["run_id"][:8],
                row["method"] or "",
                *[str(row["params"].get(p) or "") for p in params],
                *scores,
                number(row["normalised_mean"], 2),
                number(row["seconds"], 1),
            ])
        print_table(console, columns, table_rows, left=2)
        console.print(f"scores: primary metric per task (normalised in brackets); runs in {uri}", highlight=False)
        for name, rates in drop_rates.items():
            shown = ", ".join(f"{model} {rate:.1%}" for model, rate in rates.items())
            console.print(f"protected drop rate of {name}: {shown}", highlight=False)
        if chart:
            console.print(f"chart: {chart}", highlight=False)
        for run_id in logged:
            console.print(f"comparison logged to MLflow run {run_id} (artifact comparison.png)", highlight=False)
    return {"tracking_uri": uri, "tasks": tasks, "params": params, "runs": rows, "chart": chart, "comparison_runs": logged}


RECIPE_HELP = "mergekit YAML recipe (with an optional fleet: section)"
OUTPUT_HELP = "output directory or s3:// prefix (default: fleet.output)"
SHARDS_HELP = "number of layer-group shards (default: fleet.shards or 1)"
OVERWRITE_HELP = "replace a different merge already in the output"
PICKLE_HELP = "read .bin/.pt checkpoints with torch.load(weights_only=True)"
DEVICE_HELP = "where tensors are merged (default: fleet.device or cpu)"
PLAN_HELP = "plan.json, or the output directory that holds .mergefleet/plan.json"


class _Formatter(argparse.HelpFormatter):
    """Room for the longest command name (merge-to-mix), so that each command's help stays
    on its line (argparse measures the names one indent short)."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30)
        self._action_max_length = len("    merge-to-mix")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON object to stdout and nothing else")
    common.add_argument("--quiet", "-q", action="store_true", help="no progress and no summary")
    common.add_argument("--verbose", "-v", action="store_true", help="show other libraries' logs and progress bars instead of logging them")
    common.add_argument("--log-file", metavar="PATH", help=f"where other libraries' output goes (default: {output_log.LOG_HELP})")
    common.add_argument("--debug", action="store_true", help="show tracebacks and debug logs (implies --verbose)")
    reads_recipe = argparse.ArgumentParser(add_help=False)
    reads_recipe.add_argument(
        "--strict", action="store_true", help="refuse unknown keys and unused parameters in the recipe (default: warn and ignore them, as mergekit does)"
    )

    parser = _Parser(prog="mergefleet", description="Merge LLM checkpoints, sharded by layer groups.", formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"mergefleet {__version__}", help="print the version and exit")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    merge = commands.add_parser("merge", parents=[common, reads_recipe], help="plan, run every shard and assemble, here")
    merge.add_argument("recipe", help=RECIPE_HELP)
    merge.add_argument("output", nargs="?", help=OUTPUT_HELP)
    merge.add_argument("--shards", type=int, help="number of layer-group shards (default: fleet.shards, else one per worker)")
    merge.add_argument(
        "--workers",
        type=int,
        help="shards run at once, each in a thread of this process (default: fleet.workers, else chosen from the cores, "
        "the available memory and the merge's size)",
    )
    merge.add_argument("--device", choices=["cpu", "cuda"], help=DEVICE_HELP)
    merge.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    merge.add_argument("--allow-pickle", action="store_true", help=PICKLE_HELP)
    merge.add_argument("--intermediate-dir", help=INTERMEDIATE_HELP)
    merge.set_defaults(handler=cmd_merge)

    plan = commands.add_parser("plan", parents=[common, reads_recipe], help="check the inputs, write OUT/.mergefleet/plan.json")
    plan.add_argument("recipe", help=RECIPE_HELP)
    plan.add_argument("output", nargs="?", help=OUTPUT_HELP)
    plan.add_argument("--shards", type=int, help=SHARDS_HELP)
    plan.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    plan.add_argument("--allow-pickle", action="store_true", help=PICKLE_HELP)
    plan.add_argument("--intermediate-dir", help=INTERMEDIATE_HELP)
    plan.add_argument("--explain", action="store_true", help="per tensor group: bytes read and written, expected peak memory")
    plan.set_defaults(handler=cmd_plan)

    shard = commands.add_parser("shard", parents=[common], help="run one shard of a plan")
    shard.add_argument("plan", help=PLAN_HELP)
    shard.add_argument("--index", type=int, required=True, help="which shard, from 0 (see mergefleet plan)")
    shard.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where tensors are merged (default: %(default)s)")
    shard.add_argument("--force", action="store_true", help="run even if the shard's receipt says it is done")
    shard.set_defaults(handler=cmd_shard)

    assemble = commands.add_parser("assemble", parents=[common], help="write index, config, tokenizer and manifest")
    assemble.add_argument("plan", help=PLAN_HELP)
    assemble.set_defaults(handler=cmd_assemble)

    run = commands.add_parser("run", parents=[common, reads_recipe], help="merge, evaluate and record: the Prefect flow")
    run.add_argument("recipe", help=RECIPE_HELP)
    run.add_argument("output", nargs="?", help=OUTPUT_HELP)
    run.add_argument("--shards", type=int, help=SHARDS_HELP)
    run.add_argument("--workers", type=int, help="inline target: shards run at once (default: fleet.workers or 1)")
    run.add_argument("--device", choices=["cpu", "cuda"], help=DEVICE_HELP)
    run.add_argument("--target", choices=["inline", "deployment"], help="where shards run (default: fleet.target or inline)")
    run.add_argument("--work-pool", help="deployment target: the work pool of the merge-shard deployment")
    run.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    run.add_argument("--intermediate-dir", help=INTERMEDIATE_HELP)
    run.add_argument("--skip-unchanged", action="store_true", help="do nothing if no input changed since the last merge")
    run.set_defaults(handler=cmd_run)

    deploy = commands.add_parser("deploy", parents=[common, reads_recipe], help="register the flows with Prefect, on a schedule")
    deploy.add_argument("recipe", help=RECIPE_HELP)
    deploy.add_argument("output", nargs="?", help=OUTPUT_HELP)
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
    compare.add_argument(
        "--chart", help=f"where the chart goes, a PNG (default: {DEFAULT_CHART} here; none with --json unless given)"
    )
    compare.add_argument(
        "--log", action="store_true",
        help="also record the chart and table in MLflow: a run named 'comparison' in each experiment, refreshed each time",
    )
    compare.set_defaults(handler=cmd_compare)

    cli_cluster.register(commands, common)
    cli_learned.register(commands, common, reads_recipe)
    return parser


class _Parser(argparse.ArgumentParser):
    """Command-line mistakes become a ``UsageError``, so they fail like every other error
    (one line, or the JSON error object with ``--json``)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}; see '{self.prog} --help'")


def _error_object(error: MergefleetError) -> dict[str, Any]:
    """What ``--json`` prints for a failure: message, kind, exit code, and the path or key at fault."""
    found: dict[str, Any] = dict(getattr(error, "details", None) or {})  # what the command found, e.g. cluster check's findings
    found |= {"error": _one_line(error), "kind": error.kind, "exit_code": error.exit_code}
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


def _print_json(document: dict[str, Any], out: IO[str]) -> bool:
    """Write one JSON object to ``out`` (the command's stdout); ``False`` when it is closed (a broken pipe)."""
    try:
        out.write(json.dumps(document, default=str) + "\n")
        out.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())  # no second error when Python exits
        return False
    return True


BROKEN_PIPE = 141
"""Exit status when stdout closed before the result was written (128 + SIGPIPE, as a shell reports it)."""


def main(argv: Sequence[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else list(argv)
    keep_freed_memory()  # before any thread starts: see orchestrator.memory
    try:
        args = build_parser().parse_args(arguments)
        for name in ("shards", "workers"):
            value = getattr(args, name, None)
            if value is not None and value < 1:
                raise UsageError(f"--{name} must be at least 1, got {value}")
    except UsageError as error:
        return _fail(error, Console(stderr=True, soft_wrap=True), sys.stdout, json_output="--json" in arguments, debug=False)
    verbose = args.verbose or args.debug
    log_file = Path(args.log_file).expanduser() if args.log_file else None
    with output_log.unless_verbose(verbose, log_file, command=args.command) as terminal:
        return _run_command(args, terminal)


def _console(terminal: output_log.Terminal) -> Console:
    """The terminal's console, as wide as the terminal it writes to (its descriptor 2 may
    point at the log now, so rich cannot ask it)."""
    console = Console(file=terminal.err, soft_wrap=True)
    if console.is_terminal and "COLUMNS" not in os.environ:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            console.width = os.get_terminal_size(terminal.err.fileno()).columns
    return console


def _run_command(args: argparse.Namespace, terminal: output_log.Terminal) -> int:
    console = _console(terminal)
    args.stdout = terminal.out  # the command's stdout, for --json (descriptor 1 may point at the log)
    args.show_progress = not (args.json or args.quiet) and console.is_terminal
    args.live_view = args.show_progress and terminal.log is not None  # with --verbose, libraries write there too
    if terminal.log is None:
        handler: logging.Handler = RichHandler(console=console, show_path=False, show_time=False)
    else:
        # the log file itself, not descriptor 2: Prefect's services log their last words at
        # interpreter exit, after descriptor 2 is the terminal again
        handler = logging.FileHandler(terminal.log, encoding="utf-8")
        handler.setFormatter(_RunNameFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(message)s", handlers=[handler])
    install_log_redaction()
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3"):  # their debug logs show request headers
        logging.getLogger(noisy).setLevel(max(logging.INFO, logging.getLogger().level))
    command: Callable[[argparse.Namespace, Console], dict[str, Any]] = args.handler
    own = output_log.own_warnings_on(console) if terminal.log is not None else contextlib.nullcontext()
    try:
        with own:
            result = command(args, console)
    except KeyboardInterrupt:
        _name_the_log(console, terminal, args)  # before the error, so the error is the last line
        return _fail(Interrupted("interrupted; finished shards are kept and a re-run resumes"), console, terminal.out, json_output=args.json, debug=False)
    except Exception as error:  # noqa: BLE001 -- the one place every failure becomes one line
        _name_the_log(console, terminal, args)  # before the error, so the error is the last line
        return _fail(_as_error(error), console, terminal.out, json_output=args.json, debug=args.debug)
    if args.json and not _print_json(result, terminal.out):
        console.print(
            "error: standard output was closed before the result was written (broken pipe); "
            "the command finished: read its result from the output location, or run it again without closing the pipe",
            highlight=False,
            markup=False,
        )
        return BROKEN_PIPE
    _name_the_log(console, terminal, args)
    return 0


def _name_the_log(console: Console, terminal: output_log.Terminal, args: argparse.Namespace) -> None:
    """Where other libraries' output went, when anything went there."""
    sys.stdout.flush()
    sys.stderr.flush()
    if terminal.log is not None and not args.quiet and terminal.log.is_file() and terminal.log.stat().st_size:
        console.print(f"other libraries' output (progress bars, warnings, logs): {terminal.log}", highlight=False, markup=False)


def _fail(error: MergefleetError, console: Console, out: IO[str], *, json_output: bool, debug: bool) -> int:
    if debug:
        console.print_exception()
    console.print(f"error: {_one_line(error)}", highlight=False, markup=False)
    if json_output:
        _print_json(_error_object(error), out)
    return error.exit_code


if __name__ == "__main__":
    sys.exit(main())
