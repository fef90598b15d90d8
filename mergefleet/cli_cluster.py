"""``mergefleet cluster``: check a cluster before a merge, register its work pool.

The command-line layer over ``orchestrator.cluster`` (Kubernetes) and ``flows.cluster``
(the Prefect work pool and worker). Names default to what the Helm chart installs for a
release (``--release``, default ``mergefleet``).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from rich.console import Console

from orchestrator.errors import ClusterError

CHART = "mergefleet"
COMMANDS = ("cluster",)


def chart_fullname(release: str) -> str:
    """The chart's ``mergefleet.fullname`` for a release (its objects' name prefix)."""
    name = release if CHART in release else f"{release}-{CHART}"
    return name[:63].rstrip("-")


def _names(args: argparse.Namespace) -> dict[str, str]:
    full = chart_fullname(args.release)
    return {
        "configmap": getattr(args, "configmap", None) or f"{full}-endpoints",
        "template": f"{full}-job-template",
        "service_account": getattr(args, "service_account", None) or f"{full}-worker",
    }


def cmd_check(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    from orchestrator.cluster.check import Finding, check_cluster, connect

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    names = _names(args)
    if os.environ.get("PREFECT_API_URL"):
        from flows.cluster import check_pool

        prefect, template = check_pool(args.pool, max_heartbeat_age=args.max_heartbeat_age)
    else:
        template = None
        prefect = [Finding("work pool", False, "PREFECT_API_URL is not set: the work pool and its worker were not checked",
                           "export PREFECT_API_URL=http://127.0.0.1:4200/api (kubectl port-forward svc/<release>-mergefleet-prefect 4200)")]
    api = connect(args.kubeconfig, args.context)
    try:
        findings = check_cluster(
            api, namespace=args.namespace, secret=args.secret, configmap=names["configmap"],
            service_account=None if args.as_me else names["service_account"], template=template,
        ) + prefect
    finally:
        api.close()
    problems = [f for f in findings if not f.ok and f.blocking]
    result = {"ok": not problems, "namespace": args.namespace, "pool": args.pool, "findings": [f.as_dict() for f in findings]}
    if not args.json and not args.quiet:
        for finding in findings:
            mark = "ok  " if finding.ok else ("FAIL" if finding.blocking else "warn")
            console.print(f"{mark} {finding.check}: {finding.message}", highlight=False, markup=False)
            if finding.fix and not finding.ok:
                console.print(f"     fix: {finding.fix}", highlight=False, markup=False)
    if problems:
        error = ClusterError(f"{len(problems)} problem(s) would stop a merge on pool '{args.pool}': " + "; ".join(f.check for f in problems))
        error.details = result  # with --json, the one error object carries the findings
        raise error
    return result


def cmd_create_pool(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    from orchestrator.cluster.template import from_file

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if args.template:
        template = from_file(args.template)
    else:
        from orchestrator.cluster.check import connect, read_template

        api = connect(args.kubeconfig, args.context)
        try:
            template = read_template(api, args.namespace, _names(args)["template"])
        finally:
            api.close()
    from flows.cluster import create_pool

    pool = args.pool or template.pool or "gpu"
    result = create_pool(pool, template, update=not args.no_update)
    if not args.json and not args.quiet:
        console.print(f"{result['action']} work pool '{pool}' (kubernetes) on {result['api']} with the job template of {template.source}",
                      highlight=False)
    return result


def register(commands: Any, common: argparse.ArgumentParser) -> None:
    """The ``cluster`` command group, added to the top-level parser."""
    cluster = commands.add_parser("cluster", help="check a Kubernetes cluster, register its work pool")
    sub = cluster.add_subparsers(dest="cluster_command", required=True, metavar="COMMAND", help="what to do")

    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--namespace", "-n", default=os.environ.get("MERGEFLEET_NAMESPACE", CHART), help="the chart's namespace (default: %(default)s)")
    where.add_argument("--release", default=CHART, help="the Helm release name (default: %(default)s)")
    where.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, or in-cluster)")
    where.add_argument("--context", help="kubeconfig context")

    check = sub.add_parser("check", parents=[common, where], help="can this cluster run a merge? every problem with its fix")
    check.add_argument("--pool", default="gpu", help="the kubernetes work pool (default: %(default)s)")
    check.add_argument("--secret", default=f"{CHART}-s3", help="the Secret with S3 credentials (default: %(default)s)")
    check.add_argument("--configmap", help="the endpoints ConfigMap (default: <release>-mergefleet-endpoints)")
    check.add_argument("--service-account", help="whose rights to check (default: the worker's, <release>-mergefleet-worker)")
    check.add_argument("--as-me", action="store_true", help="check this account's rights instead (no impersonation)")
    check.add_argument("--max-heartbeat-age", type=float, default=120.0, help="seconds since the worker's last heartbeat (default: %(default)s)")
    check.set_defaults(handler=cmd_check)

    create = sub.add_parser("create-pool", parents=[common, where], help="register the kubernetes work pool with the chart's job template")
    create.add_argument("--pool", help="work pool name (default: the chart's workPool.name)")
    create.add_argument("--template", help="the chart's job-template ConfigMap (helm template ... --show-only "
                                           "templates/configmap-job-template.yaml) or the template's JSON; default: read it from the cluster")
    create.add_argument("--no-update", action="store_true", help="refuse to change an existing pool's template")
    create.set_defaults(handler=cmd_create_pool)
