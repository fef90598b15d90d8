"""Typed errors. Each message names the thing at fault and says what to do.

The CLI prints ``str(error)`` as one line and exits with the error's ``exit_code``;
nothing else in the library catches these. Exit codes: 2 recipe, 3 checkpoint, 4 plan,
5 merge, 6 output, 7 evaluation, 8 tracking, 9 configuration (a deployment that cannot be
registered is one), 10 cluster, 11 training.

An error may carry the ``path`` (a file or directory) or ``key`` (a recipe key) at fault;
``mergefleet --json`` prints them in its error object. ``from_os_error`` turns an
``OSError`` met at an I/O edge (disk full, permission denied, a directory that vanished)
into one of these, naming the path and what to do.
"""

from __future__ import annotations

import errno


class MergefleetError(Exception):
    """Base of every error mergefleet raises on purpose."""

    exit_code = 1
    kind = "error"
    """A short name of the failure for scripts (``--json`` prints it)."""

    def __init__(self, message: str, *, path: str | None = None, key: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.key = key


class RecipeError(MergefleetError):
    """The recipe is malformed: a key, a value or a combination is not allowed."""

    kind = "recipe"

    exit_code = 2


class CheckpointError(MergefleetError):
    """An input checkpoint is unreadable, corrupt or does not fit the others."""

    kind = "checkpoint"

    exit_code = 3


class PlanError(MergefleetError):
    """A plan cannot be made, or an existing plan does not match what it describes."""

    kind = "plan"

    exit_code = 4


class MergeError(MergefleetError):
    """Merging a tensor failed (for example it produced NaN or Inf)."""

    kind = "merge"

    exit_code = 5


class OutputError(MergefleetError):
    """The output location refuses the write (holds another merge, not writable)."""

    kind = "output"

    exit_code = 6


class EvaluationError(MergefleetError):
    """A checkpoint cannot be evaluated: an unknown task, bad task data, a model that does not load."""

    kind = "evaluation"

    exit_code = 7


class TrackingError(MergefleetError):
    """MLflow refuses the record, or a run or experiment to compare does not exist."""

    kind = "tracking"

    exit_code = 8


class ConfigurationError(MergefleetError):
    """What the run needs around it is not set up: a Prefect server, a work pool, a
    deployment, a concurrency limit, a device. Nothing is wrong with the recipe or the
    inputs; the message says what to start, create or set."""

    kind = "configuration"

    exit_code = 9


class DeploymentError(ConfigurationError):
    """A deployment cannot be registered: the Prefect server does not answer, a work pool is
    missing or cannot run the flows, or the schedule is not one Prefect accepts."""

    kind = "deployment"


class ClusterError(MergefleetError):
    """The cluster cannot run a merge: a missing Secret, no GPU node, no worker, no right to create Jobs."""

    kind = "cluster"

    exit_code = 10


class TrainingError(MergefleetError):
    """A trained merge cannot run: bad training data, a model that does not fit in memory."""

    kind = "training"

    exit_code = 11


class UsageError(MergefleetError):
    """The command line is wrong: an unknown option, a missing argument, a value out of range."""

    exit_code = 2
    kind = "usage"


class Interrupted(MergefleetError):
    """The user stopped the command (Ctrl-C); finished shards are kept."""

    exit_code = 130
    kind = "interrupted"


class DiskFullError(OutputError):
    """The device an output is written to is full (or the user's quota is spent)."""

    kind = "disk_full"


class OutputPermissionError(OutputError):
    """The output location refuses writes: permission bits, an immutable or read-only file system."""

    kind = "permission_denied"


class OutputVanishedError(OutputError):
    """The output directory, or a file in it, disappeared while the merge used it."""

    kind = "output_vanished"


class InputUnreadableError(CheckpointError):
    """An input file exists but cannot be read (permissions, an I/O error)."""

    kind = "input_unreadable"


_RESUME = "then run the same command again (finished shards are kept)"


def from_os_error(exc: OSError, path: str, *, reading_input: bool = False) -> MergefleetError:
    """The typed error for an ``OSError`` met while reading an input (``reading_input``)
    or while writing or reading the output, naming ``path`` and what to do."""
    reason = exc.strerror or str(exc)
    if reading_input:
        return InputUnreadableError(
            f"cannot read input {path}: {reason}; make it readable by this user (or fix the disk) and run again", path=path
        )
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(
            f"no space left on the device of {path}; free space there or give another output, {_RESUME}", path=path
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputPermissionError(
            f"cannot write {path}: {reason}; make the output writable by this user or give another output, {_RESUME}",
            path=path,
        )
    if exc.errno == errno.ENOENT:
        return OutputVanishedError(
            f"{path} vanished while the merge used it (was the output directory deleted or unmounted?); {_RESUME}",
            path=path,
        )
    return OutputError(f"cannot write {path}: {reason}; {_RESUME}", path=path)
