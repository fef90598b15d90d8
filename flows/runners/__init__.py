"""The Prefect shard runners, one module each, and which ``fleet.target`` picks which.

Adding a runner: a module here with a class that implements
``orchestrator.runners.base.ShardRunner`` and a ``for_fleet`` constructor, one entry in
``RUNNERS``, and the target's name in ``FleetSettings.target`` (see CONTRIBUTING.md).

A runner's module is imported when its target is asked for: a shard's flow run (what a
pod runs) imports ``flows.runners.common`` and none of the runners.
"""

from __future__ import annotations

import importlib

from orchestrator.recipe import FleetSettings
from orchestrator.runners.base import ShardRunner

RUNNERS: dict[str, str] = {
    "inline": "flows.runners.inline:InlineTasks",
    "deployment": "flows.runners.deployment:DeploymentRuns",
}
"""Each target's runner class, as module:class."""


def shard_runner(fleet: FleetSettings) -> ShardRunner:
    """The runner ``fleet.target`` names, set up from the recipe's ``fleet`` settings."""
    module, name = RUNNERS[fleet.target].split(":")
    runner: ShardRunner = getattr(importlib.import_module(module), name).for_fleet(fleet)
    return runner
