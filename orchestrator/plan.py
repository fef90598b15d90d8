"""Planning: check that the inputs fit together and cut the merge into layer-group shards.

Only safetensors headers and config files are read here, so a bad input is refused
before a single weight is loaded or an output file is written. The plan is a JSON
document that is all a shard needs.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import asdict
from typing import Any

from pydantic import BaseModel

from orchestrator.errors import CheckpointError, PlanError, RecipeError
from orchestrator.methods import get_method
from orchestrator.methods.base import MethodSpec
from orchestrator.parameters import (
    check_parameter_names,
    layer_index,
    layer_position,
    resolve_tensor_parameters,
)
from orchestrator.recipe import Recipe
from orchestrator.storage import checkpoint as ckpt
from orchestrator.storage.base import DTYPE_SIZES, CheckpointSource, TensorInfo
from orchestrator.storage.safetensors_format import dtype_code, parse_dtype_name

log = logging.getLogger(__name__)

PLAN_VERSION = 1
PLAN_FILE = ".mergefleet/plan.json"
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


class PlanInput(BaseModel):
    name: str  # as the recipe names it
    ref: str  # where it is read from (differs only for converted pickle checkpoints)
    role: str  # "base" or "expert"
    fingerprints: list[dict[str, Any]]


class TensorRead(BaseModel):
    """Where one input's copy of a tensor lives."""

    file: str
    begin: int
    end: int
    dtype: str


class PlannedTensor(BaseModel):
    name: str
    shape: list[int]
    out_dtype: str
    reads: list[TensorRead]  # aligned with Plan.inputs
    model_params: list[dict[str, Any]]  # aligned with Plan.merge_inputs()
    global_params: dict[str, Any]

    @property
    def out_bytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * DTYPE_SIZES[self.out_dtype]

    @property
    def in_bytes(self) -> int:
        return sum(read.end - read.begin for read in self.reads)


class PlannedShard(BaseModel):
    index: int
    file: str
    tensors: list[PlannedTensor]

    @property
    def out_bytes(self) -> int:
        return sum(tensor.out_bytes for tensor in self.tensors)

    @property
    def in_bytes(self) -> int:
        return sum(tensor.in_bytes for tensor in self.tensors)


class Plan(BaseModel):
    version: int = PLAN_VERSION
    plan_id: str
    recipe: dict[str, Any]
    recipe_hash: str
    method: str
    random_seed: int
    output: str
    inputs: list[PlanInput]
    base_index: int | None
    out_dtype: str
    config: dict[str, Any]
    tokenizer_source: int | None
    tokenizer_files: list[str]
    shards: list[PlannedShard]

    def shard(self, index: int) -> PlannedShard:
        if not 0 <= index < len(self.shards):
            raise PlanError(f"shard index {index} is out of range: this plan has shards 0..{len(self.shards) - 1}")
        return self.shards[index]

    def expert_indices(self) -> list[int]:
        """Inputs handed to the method as experts (all inputs when it takes no base)."""
        return [i for i in range(len(self.inputs)) if i != self.base_index]

    def to_json(self) -> str:
        return self.model_dump_json(indent=1)

    @classmethod
    def from_json(cls, text: str | bytes, *, source: str = "plan") -> "Plan":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise PlanError(f"{source} is not valid JSON ({error}); re-create it with 'mergefleet plan'") from None
        if data.get("version") != PLAN_VERSION:
            raise PlanError(f"{source} has plan version {data.get('version')}, this mergefleet reads {PLAN_VERSION}")
        return cls.model_validate(data)


def shard_metadata(plan: "Plan", index: int) -> dict[str, str]:
    """safetensors metadata of a shard file: the checkpoint carries its provenance."""
    return {
        "format": "pt",
        "mergefleet_plan_id": plan.plan_id,
        "mergefleet_recipe_sha256": plan.recipe_hash,
        "mergefleet_shard": f"{index + 1}/{len(plan.shards)}",
    }


def shard_file_name(index: int, count: int) -> str:
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def plan_layer_groups(sizes: list[int], count: int) -> list[tuple[int, int]]:
    """Cut a sequence of sizes into ``count`` contiguous non-empty ranges of near-equal sum.

    Minimises the largest range (binary search on the capacity, greedy fill), then splits
    multi-item ranges until there are exactly ``count``.
    """
    if count < 1 or count > len(sizes):
        raise ValueError(f"cannot cut {len(sizes)} items into {count} groups")

    def greedy(capacity: int) -> list[tuple[int, int]]:
        groups: list[tuple[int, int]] = []
        start, total = 0, 0
        for i, size in enumerate(sizes):
            if i > start and total + size > capacity:
                groups.append((start, i))
                start, total = i, 0
            total += size
        groups.append((start, len(sizes)))
        return groups

    low, high = max(sizes), sum(sizes)
    while low < high:
        middle = (low + high) // 2
        if len(greedy(middle)) <= count:
            high = middle
        else:
            low = middle + 1
    groups = greedy(low)
    while len(groups) < count:
        widest = max((g for g in groups if g[1] - g[0] > 1), key=lambda g: sum(sizes[g[0] : g[1]]))
        position = groups.index(widest)
        groups[position : position + 1] = [(widest[0], widest[1] - 1), (widest[1] - 1, widest[1])]
    return groups


def order_tensors(names: list[str]) -> list[list[str]]:
    """Tensors in checkpoint order, as atoms: embeddings first, each layer, then the rest."""
    front = sorted(n for n in names if layer_index(n) is None and _is_embedding(n))
    back = sorted(n for n in names if layer_index(n) is None and not _is_embedding(n))
    layers: dict[int, list[str]] = {}
    for name in names:
        index = layer_index(name)
        if index is not None:
            layers.setdefault(index, []).append(name)
    atoms = [front] if front else []
    atoms += [sorted(layers[i]) for i in sorted(layers)]
    if back:
        atoms.append(back)
    return atoms


def _is_embedding(name: str) -> bool:
    return any(part in name for part in ("embed", "wte", "wpe", "word_embeddings"))


def _reference_dtype(tensors: dict[str, TensorInfo]) -> str:
    counts = Counter(info.dtype for info in tensors.values() if info.dtype in FLOAT_DTYPES)
    return counts.most_common(1)[0][0] if counts else "F32"


def _open_inputs(recipe: Recipe, *, allow_pickle: bool, scratch: str | None) -> list[CheckpointSource]:
    sources = []
    for ref in recipe.model_refs():
        sources.append(ckpt.open_checkpoint(ref, allow_pickle=allow_pickle, scratch=scratch))
    return sources


def _check_compatible(
    refs: list[str],
    configs: list[dict[str, Any]],
    indexes: list[dict[str, TensorInfo]],
    reference: int,
) -> None:
    ref_arch = configs[reference].get("architectures")
    for i, config in enumerate(configs):
        if config.get("architectures") != ref_arch:
            raise CheckpointError(
                f"{refs[i]}/config.json has architectures {config.get('architectures')} but "
                f"{refs[reference]}/config.json has {ref_arch}; only models of one architecture can be merged"
            )
    expected = indexes[reference]
    for i, index in enumerate(indexes):
        if i == reference:
            continue
        missing = sorted(set(expected) - set(index))
        if missing:
            raise CheckpointError(
                f"{refs[i]} lacks tensor '{missing[0]}' that {refs[reference]} has"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + "; the models must have the same tensors"
            )
        extra = sorted(set(index) - set(expected))
        if extra:
            raise CheckpointError(
                f"{refs[i]} has tensor '{extra[0]}' that {refs[reference]} lacks"
                + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                + "; the models must have the same tensors"
            )
        for name, info in expected.items():
            other = index[name]
            if other.shape != info.shape:
                raise CheckpointError(
                    f"tensor '{name}' has shape {list(other.shape)} in {refs[i]} ({other.file}) but "
                    f"{list(info.shape)} in {refs[reference]} ({info.file})"
                )
            if other.dtype != info.dtype:
                raise CheckpointError(
                    f"tensor '{name}' is {other.dtype} in {refs[i]} ({other.file}) but {info.dtype} in "
                    f"{refs[reference]} ({info.file}); convert the models to one dtype first"
                )
    for name, info in expected.items():
        if info.dtype not in FLOAT_DTYPES:
            raise CheckpointError(
                f"tensor '{name}' in {refs[reference]} ({info.file}) is {info.dtype}; only floating-point tensors can be merged"
            )


def _merge_inputs(recipe: Recipe, method: MethodSpec, refs: list[str]) -> tuple[int | None, list[str]]:
    """The base's position among the inputs (None if the method takes none) and the roles."""
    if method.needs_base:
        if not recipe.base_model:
            raise RecipeError(
                f"merge_method '{method.name}' needs a base_model: add 'base_model: PATH' (the model the experts were fine-tuned from)"
            )
        return 0, ["base"] + ["expert"] * (len(refs) - 1)
    return None, ["expert"] * len(refs)


def build_plan(
    recipe: Recipe,
    output: str,
    *,
    shards: int | None = None,
    allow_pickle: bool | None = None,
    scratch: str | None = None,
) -> Plan:
    """Read the inputs' headers and configs, validate, resolve parameters, cut into shards."""
    method = get_method(recipe.merge_method)
    refs = recipe.model_refs()
    base_index, roles = _merge_inputs(recipe, method, refs)
    expert_refs = [ref for ref, role in zip(refs, roles) if role == "expert"]
    if len(expert_refs) < method.min_experts:
        raise RecipeError(f"merge_method '{method.name}' needs at least {method.min_experts} model(s) besides the base")
    if method.max_experts is not None and len(expert_refs) > method.max_experts:
        raise RecipeError(f"merge_method '{method.name}' takes at most {method.max_experts} model(s) besides the base")

    per_model_settings = {entry.model: entry.parameters for entry in recipe.models}
    check_parameter_names(method, recipe.parameters, per_model_settings)

    allow = recipe.fleet.allow_pickle if allow_pickle is None else allow_pickle
    sources = _open_inputs(recipe, allow_pickle=allow, scratch=scratch)
    configs = [ckpt.read_config(source) for source in sources]
    indexes = [ckpt.read_tensor_index(source) for source in sources]
    reference = base_index if base_index is not None else 0
    _check_compatible(refs, configs, indexes, reference)

    out_dtype = (
        dtype_code(parse_dtype_name(recipe.out_dtype or recipe.dtype))
        if (recipe.out_dtype or recipe.dtype)
        else _reference_dtype(indexes[reference])
    )
    num_layers = int(configs[reference].get("num_hidden_layers") or 0) or (
        1 + max((layer_index(n) or 0) for n in indexes[reference])
    )
    atoms = order_tensors(list(indexes[reference]))
    shard_count = shards if shards is not None else recipe.fleet.shards
    atom_sizes = [sum(indexes[reference][n].nbytes for n in atom) for atom in atoms]
    if shard_count > len(atoms):
        atoms = [[name] for atom in atoms for name in atom]
        atom_sizes = [indexes[reference][atom[0]].nbytes for atom in atoms]
        if shard_count > len(atoms):
            raise RecipeError(f"--shards {shard_count} is more than the {len(atoms)} tensors of the model; use at most {len(atoms)}")
    groups = plan_layer_groups(atom_sizes, shard_count)

    expert_settings = [(refs[i], per_model_settings.get(refs[i], {})) for i in range(len(refs)) if roles[i] == "expert"]
    planned_shards: list[PlannedShard] = []
    for shard_index, (start, stop) in enumerate(groups):
        tensors = []
        for atom in atoms[start:stop]:
            for name in atom:
                model_params, global_params = resolve_tensor_parameters(
                    method, name, layer_position(name, num_layers), recipe.parameters, expert_settings
                )
                info = indexes[reference][name]
                tensors.append(
                    PlannedTensor(
                        name=name,
                        shape=list(info.shape),
                        out_dtype=out_dtype,
                        reads=[
                            TensorRead(file=ix[name].file, begin=ix[name].begin, end=ix[name].end, dtype=ix[name].dtype)
                            for ix in indexes
                        ],
                        model_params=model_params,
                        global_params=global_params,
                    )
                )
        planned_shards.append(PlannedShard(index=shard_index, file=shard_file_name(shard_index, shard_count), tensors=tensors))

    if method.sparsifies and all(
        params.get("density", 1.0) >= 1.0 for shard in planned_shards for t in shard.tensors for params in t.model_params
    ):
        log.warning(
            "%s runs with density 1 for every tensor, so nothing is sparsified; set 'density' (e.g. 0.2) per model",
            method.name,
        )

    inputs = [
        PlanInput(name=ref, ref=source.uri, role=role, fingerprints=[asdict(fp) for fp in ckpt.fingerprints(source)])
        for ref, role, source in zip(refs, roles, sources)
    ]
    tokenizer_source = reference
    tokenizer_files = [name for name in TOKENIZER_FILES if sources[tokenizer_source].exists(name)]
    config = _output_config(configs[reference], out_dtype)
    recipe_data = recipe.model_dump(mode="json", exclude_defaults=True)
    identity = {
        "version": PLAN_VERSION,
        "recipe": recipe.recipe_hash(),
        "inputs": [inp.model_dump() for inp in inputs],
        "shards": shard_count,
        "out_dtype": out_dtype,
    }
    plan_id = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return Plan(
        plan_id=plan_id,
        recipe=recipe_data,
        recipe_hash=recipe.recipe_hash(),
        method=method.name,
        random_seed=recipe.random_seed,
        output=output,
        inputs=inputs,
        base_index=base_index,
        out_dtype=out_dtype,
        config=config,
        tokenizer_source=tokenizer_source if tokenizer_files else None,
        tokenizer_files=tokenizer_files,
        shards=planned_shards,
    )


_CONFIG_DTYPE_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


def _output_config(config: dict[str, Any], out_dtype: str) -> dict[str, Any]:
    result = dict(config)
    name = _CONFIG_DTYPE_NAMES[out_dtype]
    result["torch_dtype"] = name
    if "dtype" in result or "transformers_version" in result:
        result["dtype"] = name
    return result
