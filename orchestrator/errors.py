"""Typed errors. Each message names the thing at fault and says what to do.

The CLI prints ``str(error)`` as one line and exits with the error's ``exit_code``;
nothing else in the library catches these. Exit codes: 2 recipe, 3 checkpoint, 4 plan,
5 merge, 6 output, 7 evaluation, 8 tracking, 9 configuration (a deployment that cannot be
registered is one), 10 cluster, 11 training.
"""

from __future__ import annotations


class MergefleetError(Exception):
    """Base of every error mergefleet raises on purpose."""

    exit_code = 1


class RecipeError(MergefleetError):
    """The recipe is malformed: a key, a value or a combination is not allowed."""

    exit_code = 2


class CheckpointError(MergefleetError):
    """An input checkpoint is unreadable, corrupt or does not fit the others."""

    exit_code = 3


class PlanError(MergefleetError):
    """A plan cannot be made, or an existing plan does not match what it describes."""

    exit_code = 4


class MergeError(MergefleetError):
    """Merging a tensor failed (for example it produced NaN or Inf)."""

    exit_code = 5


class OutputError(MergefleetError):
    """The output location refuses the write (holds another merge, not writable)."""

    exit_code = 6


class EvaluationError(MergefleetError):
    """A checkpoint cannot be evaluated: an unknown task, bad task data, a model that does not load."""

    exit_code = 7


class TrackingError(MergefleetError):
    """MLflow refuses the record, or a run or experiment to compare does not exist."""

    exit_code = 8


class ConfigurationError(MergefleetError):
    """What the run needs around it is not set up: a Prefect server, a work pool, a
    deployment, a concurrency limit, a device. Nothing is wrong with the recipe or the
    inputs; the message says what to start, create or set."""

    exit_code = 9


class DeploymentError(ConfigurationError):
    """A deployment cannot be registered: the Prefect server does not answer, a work pool is
    missing or cannot run the flows, or the schedule is not one Prefect accepts."""


class ClusterError(MergefleetError):
    """The cluster cannot run a merge: a missing Secret, no GPU node, no worker, no right to create Jobs."""

    exit_code = 10


class TrainingError(MergefleetError):
    """A trained merge cannot run: bad training data, a model that does not fit in memory."""

    exit_code = 11
