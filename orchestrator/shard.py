"""One shard: read its tensors from every input, merge them, stream the result out.

The shard file appears under its final name only once it is complete, and a receipt
(``.mergefleet/shard-{i}.json``, ``orchestrator/receipt.py``) records what was written. A
shard whose receipt matches the plan is not run again, so a re-run after a crash does only
missing work. Where shards run (this process, worker processes, Prefect, pods) is a shard
runner's business (``orchestrator/runners/``); this module is what each of them calls.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import replace
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import torch

from orchestrator.errors import ConfigurationError, PlanError
from orchestrator.methods import get_method
from orchestrator.methods.base import MethodSpec, TensorTask, tensor_seed
from orchestrator.plan import Plan, PlannedShard, PlannedTensor, shard_metadata
from orchestrator.receipt import Receipt, ShardOutcome, add_report, check_finished, receipt_file
from orchestrator.redact import redact_data
from orchestrator.storage.base import DTYPE_SIZES, CheckpointSource, TensorInfo
from orchestrator.storage.checkpoint import describe_version, fingerprints, open_source, verify_level
from orchestrator.storage.safetensors_format import torch_dtype
from orchestrator.storage.tensors import prefetch, read_tensor
from orchestrator.storage.writer import SafetensorsWriter
from orchestrator.streaming import StoredTensor, StreamingPolicy
from orchestrator.vocabulary import FixedRow, permute_rows

log = logging.getLogger(__name__)

OnTensor = Callable[[str, int], None]
"""Progress callback: (tensor name, output bytes written)."""

PauseHook = Callable[[int, int], None]
"""Called after each tensor is written, with the shard's index and the tensors written so
far, while the shard file is still open: a test holds a shard here to interrupt it mid-write."""


def check_inputs_unchanged(plan: Plan, sources: list[CheckpointSource]) -> None:
    """Refuse to merge inputs that changed after planning: the plan's offsets would lie."""
    for planned, source in zip(plan.inputs, sources):
        current = {fp.file: fp for fp in fingerprints(source, verify=verify_level(planned.fingerprints))}
        for recorded in planned.fingerprints:
            now = current.get(recorded["file"])
            if now is None or now.size != recorded["size"] or now.version != recorded["version"]:
                raise PlanError(
                    f"input {planned.ref} changed after planning ({recorded['file']}: "
                    f"planned size {recorded['size']} {describe_version(recorded['version'])}, now "
                    f"{'missing' if now is None else f'size {now.size} {describe_version(now.version)}'}); "
                    "run 'mergefleet plan' again (or 'mergefleet merge --overwrite')"
                )
            for part, what in (("header", "safetensors header"), ("content", "content")):
                if part in recorded and recorded[part] != getattr(now, part):  # plans before the field lack it
                    raise PlanError(
                        f"input {planned.ref} changed after planning: the {what} of {recorded['file']} differs from "
                        "the planned one although its size and mtime match; run 'mergefleet plan' again "
                        "(or 'mergefleet merge --overwrite')"
                    )


def _read_inputs(sources: list[CheckpointSource], tensor: PlannedTensor, stream: bool, window_bytes: int) -> list[torch.Tensor]:
    inputs: list[Any] = []
    for read in tensor.reads:
        shape = tuple(tensor.shape)
        if tensor.vocab:  # each input has its own vocabulary size
            row_bytes = math.prod(shape[1:]) * DTYPE_SIZES[read.dtype]
            shape = ((read.end - read.begin) // row_bytes, *shape[1:])
        info = TensorInfo(read.name, read.dtype, shape, read.file, read.begin, read.end)
        source = sources[read.input]
        inputs.append(StoredTensor(source, info, window_bytes=window_bytes) if stream else read_tensor(source, info))
    return inputs


def _fixed_rows(fixed: list[FixedRow], tensor: PlannedTensor) -> list[FixedRow]:
    """The configured tokens' rows with inputs renumbered to this tensor's reads."""
    position = {read.input: i for i, read in enumerate(tensor.reads)}
    renumbered = []
    for row in fixed:
        if row.input is not None and row.input not in position:
            raise PlanError(
                f"{tensor.name}: a tokenizer.tokens source is a model this tensor does not read; "
                "name a model of the slice that provides it"
            )
        renumbered.append(replace(row, input=None if row.input is None else position[row.input]))
    return renumbered


def merge_tensor(
    plan: Plan, method: MethodSpec, tensor: PlannedTensor, inputs: list[torch.Tensor], device: str
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Merge one tensor's inputs and cast the result to the output dtype, on the CPU.

    The writer's guard refuses NaN/Inf, after the cast, so an overflow in the cast is caught too.
    """
    if tensor.vocab and plan.vocabulary is not None:
        maps = [torch.tensor(plan.vocabulary.rows[read.input]) for read in tensor.reads]
        # mergekit prefers the base model's row as a stand-in whether or not the method reads the base
        base = tensor.base if tensor.base is not None else next((i for i, r in enumerate(tensor.reads) if r.input == plan.base), None)
        inputs = permute_rows(inputs, maps, base, fixed=_fixed_rows(plan.vocabulary.fixed, tensor), size=plan.vocabulary.size)
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


def run_shard(
    plan: Plan,
    index: int,
    *,
    device: str = "cpu",
    on_tensor: OnTensor | None = None,
    force: bool = False,
    streaming: StreamingPolicy = StreamingPolicy(),
    pause: PauseHook | None = None,
) -> ShardOutcome:
    """Run shard ``index`` of ``plan`` (skipped when its receipt says it is done, unless ``force``)."""
    shard: PlannedShard = plan.shard(index)
    sink = plan.output_sink()
    redone_because = ""
    if not force:
        done, redone_because = check_finished(plan, sink, index)
        if done is not None:
            for tensor in shard.tensors if on_tensor else ():
                on_tensor(tensor.name, tensor.out_bytes)
            return ShardOutcome(receipt=done, skipped=True)
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigurationError("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False); use --device cpu")

    method = get_method(plan.method)
    sources = [open_source(inp.ref, storage=plan.storage) for inp in plan.inputs]
    check_inputs_unchanged(plan, sources)
    for position, source in enumerate(sources):
        source.bytes_read = 0
        prefetch(source, [(r.file, r.begin, r.end) for t in shard.tensors for r in t.reads if r.input == position])

    started = time.perf_counter()
    report: dict[str, Any] = {}
    streamed = [streaming.streams(method, tensor, device) for tensor in shard.tensors]
    entries = [(t.name, t.out_dtype, tuple(t.shape)) for t in shard.tensors]
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as reader:

        def read(position: int) -> Any:
            return reader.submit(_read_inputs, sources, shard.tensors[position], streamed[position], streaming.window_bytes)

        pending = read(0) if shard.tensors else None
        with SafetensorsWriter(sink, shard.file, entries, shard_metadata(plan, index)) as writer:
            for position, tensor in enumerate(shard.tensors):
                inputs = pending.result()
                if position + 1 < len(shard.tensors):
                    pending = read(position + 1)
                merged, tensor_report = merge_tensor(plan, method, tensor, inputs, device)
                del inputs
                add_report(report, tensor_report)
                writer.write(tensor.name, merged)
                if on_tensor:
                    on_tensor(tensor.name, tensor.out_bytes)
                if pause:
                    pause(index, position + 1)
        sha256, written = writer.sha256, writer.bytes_written

    receipt = Receipt(
        plan_id=plan.plan_id,
        index=index,
        file=shard.file,
        tensors=[t.name for t in shard.tensors],
        bytes_written=written,
        sha256=sha256,
        xxh3=writer.xxh3 or "",
        stored_checksum=writer.stored_checksum,
        seconds=round(time.perf_counter() - started, 4),
        bytes_read=sum(source.bytes_read for source in sources),
        tensor_bytes=shard.in_bytes,
        device=device,
        tensors_streamed=sum(streamed),
        report=report,
        finished_at=round(time.time(), 3),
    )
    sink.write_file(receipt_file(index), json.dumps(redact_data(receipt.model_dump(mode="json")), indent=1).encode())
    return ShardOutcome(receipt=receipt, skipped=False, redone_because=redone_because)
