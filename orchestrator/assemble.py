"""Assembly: turn finished shards into a checkpoint ``transformers`` loads as is.

No tensor data moves here: the shards already are the checkpoint's files. Assembly
checks each receipt against the plan and writes the small files around them. The
manifest ``mergefleet.json`` is written last; its presence marks a complete merge.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from orchestrator import __version__
from orchestrator.errors import PlanError
from orchestrator.model_card import write_card_files
from orchestrator.plan import Plan, PlanInput, shard_metadata
from orchestrator.receipt import Receipt, add_report, file_mismatch, load_receipt, receipt_file
from orchestrator.redact import redact_data
from orchestrator.storage.base import OutputSink
from orchestrator.storage.checkpoint import open_source
from orchestrator.storage.safetensors_format import build_header
from orchestrator.vocabulary import build_output_tokenizer, load_tokenizer

MANIFEST_FILE = "mergefleet.json"
INDEX_FILE = "model.safetensors.index.json"


class ManifestFile(BaseModel):
    file: str
    sha256: str
    bytes: int
    tensors: int


class ManifestShard(BaseModel):
    index: int
    seconds: float
    bytes_read: int
    bytes_written: int
    device: str


class Manifest(BaseModel):
    """``mergefleet.json``: what the checkpoint is and how it was made; written last."""

    mergefleet_version: str
    plan_id: str
    recipe_sha256: str
    recipe: dict[str, Any]
    method: str
    out_dtype: str
    inputs: list[PlanInput]
    files: list[ManifestFile]
    shards: list[ManifestShard]
    tokenizer_files: list[str]
    report: dict[str, Any]
    card_files: list[str] = []  # README.md and mergekit_config.yml, when this merge wrote them

    def to_json(self) -> str:
        return json.dumps(redact_data(self.model_dump(mode="json")), indent=2)


def collect_receipts(plan: Plan) -> list[Receipt]:
    """Every shard's receipt, checked against the plan, and its file against the receipt (size
    and content hash: one read); names the first shard that is not done or does not match."""
    sink = plan.output_sink()
    receipts = []
    for shard in plan.shards:
        name = receipt_file(shard.index)
        if not sink.exists(name):
            raise PlanError(
                f"shard {shard.index} ({shard.file}) has not finished: no receipt in {plan.output}/.mergefleet; "
                f"run 'mergefleet shard {plan.output}/.mergefleet/plan.json --index {shard.index}'"
            )
        try:
            receipt = Receipt.model_validate_json(sink.read_file(name))
        except ValueError:
            raise PlanError(
                f"the receipt {plan.output}/{name} of shard {shard.index} is malformed; "
                f"run 'mergefleet shard {plan.output} --index {shard.index} --force' to redo the shard",
                path=f"{plan.output}/{name}",
            ) from None
        if receipt.plan_id != plan.plan_id:
            raise PlanError(
                f"shard {shard.index}'s receipt belongs to plan {receipt.plan_id}, not {plan.plan_id}; run the shard again"
            )
        if receipt.tensors != [t.name for t in shard.tensors] or receipt.bytes_written != _expected_size(plan, shard.index):
            raise PlanError(f"shard {shard.index}'s receipt does not match the plan (tensors or size differ); run the shard again")
        why = file_mismatch(sink, receipt)
        if why is not None:
            raise PlanError(
                f"{plan.output}/{shard.file} does not match its receipt: {why}; run the merge again "
                f"(it redoes that shard) or 'mergefleet shard {plan.output}/.mergefleet/plan.json --index {shard.index} --force'"
            )
        receipts.append(receipt)
    return receipts


def _expected_size(plan: Plan, index: int) -> int:
    shard = plan.shard(index)
    header, _ = build_header([(t.name, t.out_dtype, tuple(t.shape)) for t in shard.tensors], shard_metadata(plan, index))
    return len(header) + shard.out_bytes



def write_tokenizer(plan: Plan, sink: OutputSink) -> list[str]:
    """Copy the tokenizer source's files, or save the tokenizer built from them (a union, or with
    tokens added); apply the chat template."""
    files: dict[str, bytes] = {}
    if plan.tokenizer_mode == "union" or (plan.tokenizer_added and plan.tokenizer_source is not None):
        chosen = plan.inputs if plan.tokenizer_mode == "union" else [plan.inputs[plan.tokenizer_source]]  # type: ignore[index]
        tokenizers = {inp.name: load_tokenizer(open_source(inp.ref, storage=plan.storage)) for inp in chosen}
        base = plan.inputs[plan.base if plan.base is not None else 0].name
        mode = "union" if plan.tokenizer_mode == "union" else chosen[0].name
        with tempfile.TemporaryDirectory(prefix="mergefleet-tokenizer-") as scratch:
            build_output_tokenizer(mode, tokenizers, base, plan.tokenizer_added).save_pretrained(scratch)
            files = {path.name: path.read_bytes() for path in Path(scratch).iterdir() if path.is_file()}
    elif plan.tokenizer_source is not None:
        source = open_source(plan.inputs[plan.tokenizer_source].ref, storage=plan.storage)
        files = {name: source.read_file(name) for name in plan.tokenizer_files}
    if plan.chat_template is not None:
        files["chat_template.jinja"] = plan.chat_template.encode()
        if "tokenizer_config.json" in files:
            config = json.loads(files["tokenizer_config.json"])
            config["chat_template"] = plan.chat_template
            files["tokenizer_config.json"] = json.dumps(config, indent=2).encode()
    for name, data in files.items():
        sink.write_file(name, data)
    return sorted(files)


def assemble(plan: Plan) -> Manifest:
    """Write index, config, tokenizer files, model card and the manifest; return the manifest."""
    receipts = collect_receipts(plan)
    sink = plan.output_sink()

    weight_map = {name: receipt.file for receipt in receipts for name in receipt.tensors}
    total_size = sum(t.out_bytes for shard in plan.shards for t in shard.tensors)
    index = {"metadata": {"total_size": total_size, "mergefleet_plan_id": plan.plan_id}, "weight_map": weight_map}
    sink.write_file(INDEX_FILE, json.dumps(index, indent=2).encode())
    sink.write_file("config.json", json.dumps(plan.config, indent=2).encode())

    copied = write_tokenizer(plan, sink)
    card_files = write_card_files(plan, sink)

    report: dict[str, Any] = {}
    for receipt in receipts:
        add_report(report, receipt.report)
    if report.get("protected_topk"):
        report["protected_drop_rate"] = [
            (dropped / topk if topk else 0.0)
            for dropped, topk in zip(report["protected_dropped"], report["protected_topk"])
        ]

    manifest = Manifest(
        mergefleet_version=__version__,
        plan_id=plan.plan_id,
        recipe_sha256=plan.recipe_hash,
        recipe=plan.recipe,
        method=plan.method,
        out_dtype=plan.out_dtype,
        inputs=plan.inputs,
        files=[ManifestFile(file=r.file, sha256=r.sha256, bytes=r.bytes_written, tensors=len(r.tensors)) for r in receipts],
        shards=[
            ManifestShard(index=r.index, seconds=r.seconds, bytes_read=r.bytes_read, bytes_written=r.bytes_written, device=r.device)
            for r in receipts
        ],
        tokenizer_files=copied,
        report=report,
        card_files=card_files,
    )
    sink.write_file(MANIFEST_FILE, manifest.to_json().encode())
    return manifest
