"""``mergefleet plan --explain``: per shard and tensor group, the bytes read and written and
the memory a shard is expected to hold at its peak."""

from __future__ import annotations

from typing import Any

from orchestrator.methods import get_method
from orchestrator.methods.base import MethodSpec
from orchestrator.plan import Plan, PlannedTensor
from orchestrator.storage.base import DTYPE_SIZES
from orchestrator.streaming import StreamingPolicy

WORKING_SET_BYTES = 64 << 20
"""Method scratch beyond the tensors themselves (chunk buffers, histograms): a generous bound."""


def tensor_peak_bytes(
    tensor: PlannedTensor, following: PlannedTensor | None, method: MethodSpec, streaming: StreamingPolicy = StreamingPolicy()
) -> int:
    """Memory a shard holds while merging ``tensor``: its inputs (or their read windows when
    streamed), the next tensor's inputs (read ahead), the float32 result, its cast copy and
    the method's working set."""

    def held(t: PlannedTensor) -> int:
        return streaming.window_bytes * len(t.reads) if streaming.streams(method, t, "cpu") else t.in_bytes

    elements = tensor.out_bytes // DTYPE_SIZES[tensor.out_dtype]
    ahead = held(following) if following is not None else 0
    permuted = tensor.out_bytes * len(tensor.reads) if tensor.vocab else 0
    return held(tensor) + ahead + permuted + elements * 4 + tensor.out_bytes + WORKING_SET_BYTES


def explain_plan(plan: Plan, streaming: StreamingPolicy = StreamingPolicy()) -> list[dict[str, Any]]:
    """Per shard and tensor group: tensors, bytes read, bytes written and the expected peak memory."""
    method = get_method(plan.method)
    rows: list[dict[str, Any]] = []
    for shard in plan.shards:
        tensors = shard.tensors
        for position, tensor in enumerate(tensors):
            following = tensors[position + 1] if position + 1 < len(tensors) else None
            peak = tensor_peak_bytes(tensor, following, method, streaming)
            if rows and rows[-1]["shard"] == shard.index and rows[-1]["group"] == tensor.group:
                row = rows[-1]
            else:
                row = {"shard": shard.index, "group": tensor.group, "tensors": 0, "bytes_read": 0, "bytes_written": 0, "peak_bytes": 0}
                rows.append(row)
            row["tensors"] += 1
            row["bytes_read"] += tensor.in_bytes
            row["bytes_written"] += tensor.out_bytes
            row["peak_bytes"] = max(row["peak_bytes"], peak)
    return rows
