"""What a finished shard leaves behind: its receipt (``.mergefleet/shard-{i}.json``), and
the outcome every shard runner returns (the receipt, and whether the shard was already done).

A receipt is written after its shard file is complete, so a receipt that matches the plan
and whose file exists means the shard need not run again.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel

from orchestrator.plan import Plan
from orchestrator.storage.base import OutputSink

log = logging.getLogger(__name__)


class Receipt(BaseModel):
    plan_id: str
    index: int
    file: str
    tensors: list[str]
    bytes_written: int
    sha256: str
    seconds: float
    bytes_read: int
    tensor_bytes: int
    device: str
    tensors_streamed: int = 0  # tensors whose inputs were read a window at a time
    finished_at: float | None = None  # Unix time the shard's file was complete (MLflow shows its span)
    report: dict[str, Any] = {}


class ShardOutcome(BaseModel):
    """One shard's result, as every runner returns it."""

    receipt: Receipt
    skipped: bool  # already done (its receipt matched the plan): nothing was merged


def receipt_file(index: int) -> str:
    return f".mergefleet/shard-{index}.json"


def load_receipt(sink: OutputSink, index: int) -> Receipt | None:
    name = receipt_file(index)
    if not sink.exists(name):
        return None
    try:
        return Receipt.model_validate_json(sink.read_file(name))
    except ValueError:
        log.warning("receipt %s/%s is unreadable; the shard will run again", sink.uri, name)
        return None


def finished_receipt(plan: Plan, sink: OutputSink, index: int) -> Receipt | None:
    """The receipt of a shard already done for this plan, if its file is still there."""
    receipt = load_receipt(sink, index)
    shard = plan.shard(index)
    if receipt is None or receipt.plan_id != plan.plan_id or receipt.file != shard.file:
        return None
    if not sink.exists(shard.file):
        return None
    return receipt


def add_report(total: dict[str, Any], report: dict[str, Any]) -> None:
    """Sum a tensor's (or shard's) method report into a running total, list-wise."""
    for key, value in report.items():
        if isinstance(value, list):
            current = total.setdefault(key, [0] * len(value))
            total[key] = [a + b for a, b in zip(current, value)]
        elif isinstance(value, (int, float)):
            total[key] = total.get(key, 0) + value
