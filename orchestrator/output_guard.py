"""What a merge may do to its output location before it writes: never point into an input,
and, with ``--overwrite``, delete only the files an earlier merge there recorded as its own.

Ownership is read from the records a merge leaves (its plan, receipts and manifest), never
guessed from file names: a file no record names is the user's, and a merge that would
write over one refuses instead.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable

from orchestrator.assemble import INDEX_FILE, MANIFEST_FILE, Manifest
from orchestrator.errors import OutputError
from orchestrator.plan import PLAN_FILE, Plan
from orchestrator.receipt import Receipt, receipt_file
from orchestrator.storage.base import OutputSink
from orchestrator.storage.s3.client import parse_s3_uri
from orchestrator.vocabulary import TOKENIZER_FILES

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"


def _location(ref: str) -> tuple[str, tuple[str, ...]]:
    """A reference as (place, path parts): ``("file", resolved parts)`` or ``("s3:bucket", key parts)``."""
    if ref.lower().startswith("s3://"):
        bucket, prefix = parse_s3_uri(ref, OutputError)
        return f"s3:{bucket}", tuple(part for part in prefix.split("/") if part)
    return "file", Path(os.path.realpath(Path(ref).expanduser())).parts


def refuse_output_over_inputs(output: str, inputs: Iterable[str]) -> None:
    """Refuse an output that is, contains, or lies inside an input checkpoint (local paths
    with symlinks resolved, S3 prefixes key by key); call it before writing anything."""
    place, out = _location(output)
    for ref in dict.fromkeys(inputs):
        if "://" in ref and not ref.lower().startswith("s3://"):
            continue  # not a location mergefleet reads from directly
        where, parts = _location(ref)
        shared = min(len(out), len(parts))
        if where != place or out[:shared] != parts[:shared]:
            continue
        relation = "is" if len(out) == len(parts) else ("lies inside" if len(out) > len(parts) else "contains")
        raise OutputError(
            f"output {output} {relation} the input checkpoint {ref}; a merge never writes into an "
            "input: choose an output location outside every input"
        )


def plan_locations(plan: Plan) -> list[str]:
    """Every place ``plan`` reads: each input as the recipe names it and where it is read from."""
    return [ref for planned in plan.inputs for ref in (planned.name, planned.ref)]


def _read_plan(sink: OutputSink) -> Plan | None:
    if not sink.exists(PLAN_FILE):
        return None
    try:
        return Plan.from_json(sink.read_file(PLAN_FILE))
    except ValueError:  # PlanError, or fields that do not validate
        return None


def recorded_files(sink: OutputSink, previous: Plan | None) -> set[str]:
    """Every file an earlier merge in ``sink`` recorded as its own (plan, receipts, manifest,
    model card)."""
    owned: set[str] = set()
    if previous is not None:
        owned |= {PLAN_FILE, INDEX_FILE, CONFIG_FILE, MANIFEST_FILE}
        for shard in previous.shards:
            owned |= {shard.file, receipt_file(shard.index)}
            if sink.exists(receipt_file(shard.index)):
                try:
                    owned.add(Receipt.model_validate_json(sink.read_file(receipt_file(shard.index))).file)
                except ValueError:
                    pass
        if previous.tokenizer_mode != "union":
            owned |= set(previous.tokenizer_files)
        if previous.chat_template is not None:
            owned.add("chat_template.jinja")
    if sink.exists(MANIFEST_FILE):
        try:
            manifest = Manifest.model_validate_json(sink.read_file(MANIFEST_FILE))
        except ValueError:
            manifest = None
        if manifest is not None:
            owned |= {PLAN_FILE, INDEX_FILE, CONFIG_FILE, MANIFEST_FILE}
            owned |= {f.file for f in manifest.files} | set(manifest.tokenizer_files) | set(manifest.card_files)
    return owned


def files_to_write(plan: Plan) -> set[str]:
    """Every top-level file this merge may write (a union tokenizer's files are not known in advance)."""
    names = {INDEX_FILE, CONFIG_FILE, MANIFEST_FILE} | {shard.file for shard in plan.shards}
    names |= set(TOKENIZER_FILES) if plan.tokenizer_mode == "union" else set(plan.tokenizer_files)
    if plan.chat_template is not None:
        names.add("chat_template.jinja")
    return names


def claim_output(plan: Plan, sink: OutputSink, *, overwrite: bool) -> None:
    """Make ``sink`` ready for ``plan``: resume the same merge, or (``overwrite``) delete only
    what the earlier merge recorded; refuse whenever a file not ours would be replaced."""
    previous = _read_plan(sink)
    if previous is not None and previous.plan_id == plan.plan_id:
        if previous != plan:  # same merge, other settings (e.g. fleet.storage): the plan on disk is this run's
            sink.write_file(PLAN_FILE, plan.to_json().encode())
        return
    present = set(sink.list_files())
    owned = recorded_files(sink, previous) & present
    if sink.exists(PLAN_FILE) and not overwrite:
        what = f"plan {previous.plan_id}, method {previous.method}" if previous else "an unreadable plan"
        raise OutputError(
            f"{plan.output} already holds a different merge ({what}); pass --overwrite to replace it, "
            "or choose another output directory"
        )
    foreign = sorted(
        name for name in present - owned
        if name in files_to_write(plan) or ("/" not in name and name.endswith(".safetensors"))
    )
    if foreign:
        hint = "--overwrite replaces only the files an earlier merge recorded as its own; " if overwrite else ""
        raise OutputError(
            f"{plan.output} already holds {foreign[0]}, which no earlier merge there recorded as its own; "
            f"{hint}move it away or choose another output directory"
        )
    if overwrite and owned:
        log.info("--overwrite: deleting %d file(s) the previous merge recorded in %s", len(owned), plan.output)
        for name in sorted(owned - {PLAN_FILE}) + [PLAN_FILE]:  # the plan last: it records the rest
            sink.delete(name)
    sink.write_file(PLAN_FILE, plan.to_json().encode())
