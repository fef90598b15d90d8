"""The container's entrypoint: one image runs the worker, the shard pods and the servers.

    python -m orchestrator.cluster.entrypoint ARGS...

- ``prefect ...``, ``mergefleet ...``, ``mlflow ...``, ``sh -c ...``: run that program in
  place of this process (what the worker's Job, the chart's Deployments and ``docker run``
  pass; Kubernetes gives a Job's command as ``args``, so it arrives here).
- ``healthcheck``: the image's HEALTHCHECK. The long-running roles answer on HTTP (the
  worker's ``--with-healthcheck`` server, the Prefect and MLflow servers); a one-shot shard
  container has nothing to probe and counts as healthy while it runs.
- no arguments: ``python -m mergefleet --help`` (the ``mergefleet`` command's help).

Standard library only: it starts before anything heavy is imported.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Sequence


def probe_url(cmdline: Sequence[str], environ: dict[str, str]) -> str | None:
    """The health URL of the role that ``cmdline`` (PID 1's arguments) runs, None for one-shot roles."""
    words = [Path(word).name for word in cmdline]

    def follows(*sequence: str) -> bool:
        return any(tuple(words[i : i + len(sequence)]) == sequence for i in range(len(words)))

    def option(name: str, default: str) -> str:
        return words[words.index(name) + 1] if name in words[:-1] else default

    if follows("worker", "start"):
        return f"http://127.0.0.1:{environ.get('PREFECT_WORKER_WEBSERVER_PORT', '8080')}/health"
    if follows("server", "start") and "prefect" in words:
        return f"http://127.0.0.1:{option('--port', '4200')}/api/health"
    if follows("mlflow", "server"):
        return f"http://127.0.0.1:{option('--port', '5000')}/health"
    return None


def healthcheck(cmdline: Sequence[str], environ: dict[str, str], timeout: float = 5.0) -> int:
    """0 when the container's service answers (or it has none), 1 otherwise."""
    url = probe_url(cmdline, environ)
    if url is None:
        return 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError):
        return 1


def _pid1_cmdline() -> list[str]:
    try:
        return [part for part in Path("/proc/1/cmdline").read_bytes().decode().split("\0") if part]
    except OSError:
        return []


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["healthcheck"]:
        return healthcheck(_pid1_cmdline(), dict(os.environ))
    if not args:
        args = ["python", "-m", "mergefleet", "--help"]
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvp(args[0], args)
    except OSError as error:
        sys.stderr.write(f"error: cannot run '{args[0]}': {error.strerror}; the image runs prefect, mergefleet, mlflow or a shell command\n")
        return 127
    return 0  # not reached: execvp replaces this process


if __name__ == "__main__":
    sys.exit(main())
