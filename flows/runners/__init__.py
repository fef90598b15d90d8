"""The Prefect shard runners, one module each, and which ``fleet.target`` picks which.

Adding a runner: a module here with a class that implements
``orchestrator.runners.base.ShardRunner`` and a ``for_fleet`` constructor, one entry in
``RUNNERS``, and the target's name in ``FleetSettings.target`` (see CONTRIBUTING.md).
"""

from __future__ import annotations

from typing import Callable

from flows.runners.deployment import DeploymentRuns
from flows.runners.inline import InlineTasks
from orchestrator.recipe import FleetSettings
from orchestrator.runners.base import ShardRunner

RUNNERS: dict[str, Callable[[FleetSettings], ShardRunner]] = {
    "inline": InlineTasks.for_fleet,
    "deployment": DeploymentRuns.for_fleet,
}


def shard_runner(fleet: FleetSettings) -> ShardRunner:
    """The runner ``fleet.target`` names, set up from the recipe's ``fleet`` settings."""
    return RUNNERS[fleet.target](fleet)
