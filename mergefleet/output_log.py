"""Other libraries' output kept off the terminal, in a log file.

While a command runs, file descriptors 1 and 2 point at the log file, so that what other
code writes there lands in the log: tqdm's bars (lm-eval's, datasets', transformers'),
Python warnings, Prefect's and transformers' logs, and whatever a subprocess prints (git's
"not a repository"). The command's own output - its progress, summary, one-line errors
and ``--json`` - goes to the terminal through copies of the original descriptors, and the
command's own warnings (loggers of ``orchestrator``, ``flows`` and ``mergefleet``) are
shown there too. ``--verbose`` turns all of this off.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, TextIO

from rich.console import Console
from rich.logging import RichHandler

from orchestrator.cache import cache_dir

LOG_HELP = "$XDG_CACHE_HOME/mergefleet/logs/COMMAND-TIME.log, ~/.cache when unset"
KEEP_LOGS = 20
"""The default log directory keeps the newest this many command logs."""
OWN_LOGGERS = ("orchestrator", "flows", "mergefleet")


@dataclass(frozen=True)
class Terminal:
    """Where the command's own output goes while the rest goes to ``log``."""

    out: TextIO
    err: TextIO
    log: Path | None  # None: nothing is redirected (--verbose, or streams that are not files)


def default_log(command: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return cache_dir("logs") / f"{command}-{stamp}-{os.getpid()}.log"


def _prune(directory: Path, keep: int) -> None:
    """Remove the oldest command logs in the default directory (only files named like ours).
    Another command may be pruning at the same moment, so a log that vanishes between the
    listing and its ``stat`` is simply no longer there to remove."""
    dated: list[tuple[float, Path]] = []
    for log in directory.glob("*-*-*.log"):
        with contextlib.suppress(FileNotFoundError):
            dated.append((log.stat().st_mtime, log))
    dated.sort(reverse=True)
    for _, old in dated[keep:]:
        with contextlib.suppress(OSError):
            old.unlink()


def _descriptor(stream: TextIO) -> int | None:
    """The OS file descriptor behind ``stream``, or None (a test's in-memory stream)."""
    try:
        return stream.fileno()
    except (AttributeError, ValueError, io.UnsupportedOperation):
        return None


@contextlib.contextmanager
def unless_verbose(verbose: bool, log: Path | None, *, command: str) -> Iterator[Terminal]:
    """Send descriptors 1 and 2 to ``log`` (default: a new file under the cache directory)
    while the block runs; yields the streams that still reach the terminal. Does nothing
    when ``verbose``, or when stdout and stderr are not OS files (an in-process caller that
    captures them itself)."""
    out_fd, err_fd = _descriptor(sys.stdout), _descriptor(sys.stderr)
    if verbose or out_fd != 1 or err_fd != 2:
        yield Terminal(out=sys.stdout, err=sys.stderr, log=None)
        return
    path = log or default_log(command)
    path.parent.mkdir(parents=True, exist_ok=True)
    if log is None:
        _prune(path.parent, KEEP_LOGS - 1)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    out = open(os.dup(1), "w", encoding=sys.stdout.encoding, errors="backslashreplace", buffering=1)
    err = open(os.dup(2), "w", encoding=sys.stderr.encoding, errors="backslashreplace", buffering=1)
    log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        yield Terminal(out=out, err=err, log=path)
    finally:
        for stream in (sys.stdout, sys.stderr, out, err):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        os.close(log_fd)
        out.close()
        err.close()
        if log is None and path.stat().st_size == 0:  # nothing went there: leave no empty log behind
            path.unlink()


@contextlib.contextmanager
def own_warnings_on(console: Console) -> Iterator[None]:
    """Warnings and errors of mergefleet's own loggers on the terminal's ``console`` while
    the rest goes to the log (they reach the log too, through the root logger)."""
    handler = RichHandler(console=console, show_path=False, show_time=False)
    handler.setLevel(logging.WARNING)
    loggers = [logging.getLogger(name) for name in OWN_LOGGERS]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
