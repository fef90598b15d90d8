"""What a finished shard leaves behind: its receipt (``.mergefleet/shard-{i}.json``), and
the outcome every shard runner returns (the receipt, and whether the shard was already done).

A receipt is written after its shard file is complete and records its size and hashes, so
a receipt that matches the plan and whose file still has that size and content hash (on
S3: size, ETag and stored checksum) means the shard need not run again.
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
    xxh3: str = ""  # xxh3-128 of the file, computed as it was written: what a resume checks
    stored_checksum: str = ""  # what the backend stored with the file (S3: ETag and checksums)
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
    redone_because: str = ""  # why a shard with a receipt ran again (its file did not match)


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


def file_mismatch(sink: OutputSink, receipt: Receipt) -> str | None:
    """Why the receipt's file is not the file its shard wrote (``None``: it is, size and hash)."""
    if not receipt.xxh3:
        return "its receipt records no content hash (written by an older mergefleet)"
    return sink.mismatch(receipt.file, receipt.bytes_written, receipt.xxh3, receipt.stored_checksum)


def finished_receipt(plan: Plan, sink: OutputSink, index: int) -> Receipt | None:
    """The receipt of a shard already done for this plan whose file still matches it."""
    return check_finished(plan, sink, index)[0]


def check_finished(plan: Plan, sink: OutputSink, index: int) -> tuple[Receipt | None, str]:
    """The receipt of a shard already done for this plan whose file is still exactly what was
    written (size and content hash), or ``None`` and why the shard must run again ("" when it
    never finished)."""
    receipt = load_receipt(sink, index)
    shard = plan.shard(index)
    if receipt is None or receipt.plan_id != plan.plan_id or receipt.file != shard.file:
        return None, ""
    why = file_mismatch(sink, receipt)
    if why is not None:
        log.warning("shard %d runs again: %s/%s %s", index, sink.uri, shard.file, why)
        return None, f"{shard.file}: {why}"
    return receipt, ""


def add_report(total: dict[str, Any], report: dict[str, Any]) -> None:
    """Sum a tensor's (or shard's) method report into a running total, list-wise."""
    for key, value in report.items():
        if isinstance(value, list):
            current = total.setdefault(key, [0] * len(value))
            total[key] = [a + b for a, b in zip(current, value)]
        elif isinstance(value, (int, float)):
            total[key] = total.get(key, 0) + value
