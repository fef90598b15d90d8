"""The one handle on a plan that travels: ``PlanRef``.

Every task, flow run, worker process and pod that needs the plan receives a ``PlanRef``
(where ``plan.json`` is, the storage settings that open it, and the plan's id) and opens
it with ``open_plan``, exactly as ``mergefleet merge`` does: so an S3 endpoint given only
in the recipe's ``fleet.storage`` reaches every process, and nothing depends on the
environment a worker happens to have. Credentials are never part of it (``StorageOptions``
refuses them); they come from each process's environment.

A process opens a given plan once: ``open_plan`` keeps the plans it opened (and the ones
this process built, ``remember``), keyed by the whole reference, plan id included. A
reference with a plan id is checked against the plan it finds, so a plan replaced by
another merge is an error, never a silent switch.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from pydantic import BaseModel, ConfigDict

from orchestrator.errors import OutputError, PlanError
from orchestrator.plan import PLAN_FILE, Plan
from orchestrator.storage.base import StorageOptions
from orchestrator.storage.checkpoint import open_output

OPENED_PLANS = 16
"""Plans a process keeps open at most (a sweep holds one per grid point)."""


class PlanRef(BaseModel):
    """Where a plan is and how to open it; small enough to be a Prefect parameter."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    uri: str
    """The plan file: ``<output>/.mergefleet/plan.json`` (a local path or ``s3://...``)."""
    storage: StorageOptions = StorageOptions()
    """How to open ``uri`` (and, once read, the plan's own ``storage`` opens inputs and output)."""
    plan_id: str | None = None
    """The plan expected there; ``None`` takes whatever plan is there (the ``shard`` and
    ``assemble`` commands, given a location by a person)."""

    @classmethod
    def of(cls, plan: Plan) -> "PlanRef":
        """The reference to ``plan`` at its output location."""
        return cls(uri=f"{plan.output.rstrip('/')}/{PLAN_FILE}", storage=plan.storage, plan_id=plan.plan_id)

    @classmethod
    def locate(cls, location: str, *, storage: StorageOptions | None = None) -> "PlanRef":
        """A reference from what a person types: a plan's JSON file, or the output location
        that holds ``.mergefleet/plan.json``."""
        uri = location if location.endswith(".json") else f"{location.rstrip('/') or '.'}/{PLAN_FILE}"
        return cls(uri=uri, storage=storage or StorageOptions())


_opened: OrderedDict[PlanRef, Plan] = OrderedDict()
_opened_lock = threading.Lock()


def _keep(ref: PlanRef, plan: Plan) -> None:
    with _opened_lock:
        _opened[ref] = plan
        _opened.move_to_end(ref)
        while len(_opened) > OPENED_PLANS:
            _opened.popitem(last=False)


def read_plan(ref: PlanRef) -> Plan:
    """Read and parse the plan file ``ref`` names (no cache)."""
    directory, _, name = ref.uri.rpartition("/")
    directory = directory or "."
    if directory.endswith("/.mergefleet") or directory == ".mergefleet":
        directory, name = directory[: -len(".mergefleet")].rstrip("/") or ".", f".mergefleet/{name}"
    sink = open_output(directory, storage=ref.storage)
    if not sink.exists(name):
        raise OutputError(f"no plan at {sink.uri}/{name}; create one with 'mergefleet plan RECIPE OUT'")
    return Plan.from_json(sink.read_file(name), source=f"{sink.uri}/{name}")


def open_plan(ref: PlanRef) -> Plan:
    """The plan ``ref`` names: read once per process, then served from memory."""
    if ref.plan_id is not None:
        with _opened_lock:
            cached = _opened.get(ref)
        if cached is not None:
            return cached
    plan = read_plan(ref)
    if ref.plan_id is not None:
        if plan.plan_id != ref.plan_id:
            raise PlanError(
                f"{ref.uri} holds plan {plan.plan_id}, not {ref.plan_id}: another merge replaced it "
                "while this one ran; run this merge again (or give it another output)"
            )
        _keep(ref, plan)
    return plan


def remember(plan: Plan) -> PlanRef:
    """The reference to a plan this process built and wrote: opening it reads nothing."""
    ref = PlanRef.of(plan)
    _keep(ref, plan)
    return ref
