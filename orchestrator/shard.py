"""One shard: read its tensors from every input, merge them, stream the result out.

The shard file appears under its final name only once it is complete, and a receipt
(``.mergefleet/shard-{i}.json``) records what was written. A shard whose receipt
matches the plan is not run again, so a re-run after a crash does only missing work.
"""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import torch
from pydantic import BaseModel

from orchestrator.errors import MergeError, PlanError
from orchestrator.methods import get_method
from orchestrator.methods.base import MethodSpec, TensorTask, tensor_seed
from orchestrator.plan import Plan, PlannedShard, PlannedTensor, shard_metadata
from orchestrator.storage import checkpoint as ckpt
from orchestrator.storage.base import DTYPE_SIZES, CheckpointSource, OutputSink, TensorInfo
from orchestrator.storage.safetensors_format import torch_dtype
from orchestrator.streaming import StoredTensor
from orchestrator.vocabulary import permute_rows

log = logging.getLogger(__name__)

OnTensor = Callable[[str, int], None]
"""Progress callback: (tensor name, output bytes written)."""


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
    report: dict[str, Any] = {}


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


def check_inputs_unchanged(plan: Plan, sources: list[CheckpointSource]) -> None:
    """Refuse to merge inputs that changed after planning: the plan's offsets would lie."""
    for planned, source in zip(plan.inputs, sources):
        current = {fp.file: fp for fp in ckpt.fingerprints(source)}
        for recorded in planned.fingerprints:
            now = current.get(recorded["file"])
            if now is None or now.size != recorded["size"] or now.version != recorded["version"]:
                raise PlanError(
                    f"input {planned.ref} changed after planning ({recorded['file']}: "
                    f"planned size {recorded['size']} {ckpt.describe_version(recorded['version'])}, now "
                    f"{'missing' if now is None else f'size {now.size} {ckpt.describe_version(now.version)}'}); "
                    "run 'mergefleet plan' again (or 'mergefleet merge --overwrite')"
                )


EAGER_INPUT_BYTES = 2 << 30
"""Above this many input bytes for one tensor, a streaming method reads its inputs a window
at a time (``StoredTensor``) instead of loading them, so memory does not grow with the tensor."""


def should_stream(method: MethodSpec, tensor: PlannedTensor, device: str, *, limit: int = EAGER_INPUT_BYTES) -> bool:
    return method.streams_inputs and device == "cpu" and not tensor.vocab and tensor.in_bytes > limit


def _read_inputs(sources: list[CheckpointSource], tensor: PlannedTensor, stream: bool) -> list[torch.Tensor]:
    inputs: list[Any] = []
    for read in tensor.reads:
        shape = tuple(tensor.shape)
        if tensor.vocab:  # each input has its own vocabulary size
            row_bytes = math.prod(shape[1:]) * DTYPE_SIZES[read.dtype]
            shape = ((read.end - read.begin) // row_bytes, *shape[1:])
        info = TensorInfo(read.name, read.dtype, shape, read.file, read.begin, read.end)
        source = sources[read.input]
        inputs.append(StoredTensor(source, info) if stream else ckpt.read_tensor(source, info))
    return inputs


def merge_tensor(
    plan: Plan, method: MethodSpec, tensor: PlannedTensor, inputs: list[torch.Tensor], device: str
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Merge one tensor's inputs and cast the result to the output dtype, on the CPU.

    The writer's guard refuses NaN/Inf, after the cast, so an overflow in the cast is caught too.
    """
    if tensor.vocab and plan.vocabulary is not None:
        maps = [torch.tensor(plan.vocabulary.rows[read.input]) for read in tensor.reads]
        inputs = permute_rows(inputs, maps, tensor.base)
    if device != "cpu":
        inputs = [t.to(device, non_blocking=True) for t in inputs]
    base = inputs[tensor.base] if tensor.base is not None else None
    experts = [t for i, t in enumerate(inputs) if i != tensor.base]
    task = TensorTask(
        name=tensor.name,
        base=base,
        experts=experts,
        model_params=tensor.model_params,
        global_params=tensor.global_params,
        seed=tensor_seed(plan.random_seed, tensor.name),
        compute_dtype=torch_dtype(compute) if (compute := plan.compute_dtype(tensor)) else None,
    )
    result = method.merge(task)
    merged = result.tensor.to(torch_dtype(tensor.out_dtype))
    if merged.device.type != "cpu":
        merged = merged.cpu()
    return merged.contiguous(), result.report


def add_report(total: dict[str, Any], report: dict[str, Any]) -> None:
    """Sum a tensor's (or shard's) method report into a running total, list-wise."""
    for key, value in report.items():
        if isinstance(value, list):
            current = total.setdefault(key, [0] * len(value))
            total[key] = [a + b for a, b in zip(current, value)]
        elif isinstance(value, (int, float)):
            total[key] = total.get(key, 0) + value


def run_shard(
    plan: Plan,
    index: int,
    *,
    device: str = "cpu",
    on_tensor: OnTensor | None = None,
    force: bool = False,
) -> tuple[Receipt, bool]:
    """Run shard ``index`` of ``plan``; returns its receipt and whether it was skipped."""
    shard: PlannedShard = plan.shard(index)
    sink = ckpt.open_output(plan.output, storage=plan.storage)
    if not force:
        done = finished_receipt(plan, sink, index)
        if done is not None:
            for tensor in shard.tensors if on_tensor else ():
                on_tensor(tensor.name, tensor.out_bytes)
            return done, True
    if device == "cuda" and not torch.cuda.is_available():
        raise MergeError("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False); use --device cpu")

    method = get_method(plan.method)
    sources = [ckpt.open_source(inp.ref, storage=plan.storage) for inp in plan.inputs]
    check_inputs_unchanged(plan, sources)
    for position, source in enumerate(sources):
        source.bytes_read = 0
        ckpt.prefetch(source, [(r.file, r.begin, r.end) for t in shard.tensors for r in t.reads if r.input == position])

    started = time.perf_counter()
    report: dict[str, Any] = {}
    entries = [(t.name, t.out_dtype, tuple(t.shape)) for t in shard.tensors]
    metadata = shard_metadata(plan, index)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as prefetch:
        def read(tensor: PlannedTensor) -> Any:
            return prefetch.submit(_read_inputs, sources, tensor, should_stream(method, tensor, device))

        pending = read(shard.tensors[0]) if shard.tensors else None
        with ckpt.SafetensorsWriter(sink, shard.file, entries, metadata) as writer:
            for position, tensor in enumerate(shard.tensors):
                inputs = pending.result()
                if position + 1 < len(shard.tensors):
                    pending = read(shard.tensors[position + 1])
                merged, tensor_report = merge_tensor(plan, method, tensor, inputs, device)
                del inputs
                add_report(report, tensor_report)
                writer.write(tensor.name, merged)
                if on_tensor:
                    on_tensor(tensor.name, tensor.out_bytes)
        sha256, written = writer.sha256, writer.bytes_written

    receipt = Receipt(
        plan_id=plan.plan_id,
        index=index,
        file=shard.file,
        tensors=[t.name for t in shard.tensors],
        bytes_written=written,
        sha256=sha256,
        seconds=round(time.perf_counter() - started, 4),
        bytes_read=sum(source.bytes_read for source in sources),
        tensor_bytes=shard.in_bytes,
        device=device,
        report=report,
    )
    sink.write_file(receipt_file(index), receipt.model_dump_json(indent=1).encode())
    return receipt, False
