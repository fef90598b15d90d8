"""How a flow run that had nothing to do ends.

A scheduled merge that finds no change does no work; it still ends ``Completed`` (it did
what it should), but in a state named ``Skipped`` whose message says why, so that the
Prefect UI and ``prefect flow-run ls`` tell it apart from a run that merged.
"""

from __future__ import annotations

from typing import TypeVar

from prefect.client.schemas.objects import State
from prefect.states import Completed

SKIPPED = "Skipped"

Result = TypeVar("Result")


def skipped(result: Result, reason: str) -> State[Result]:
    """The final state of a run that did nothing; calling the flow still returns ``result``."""
    return Completed(name=SKIPPED, message=reason, data=result)
