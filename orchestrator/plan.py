"""Planning: check that the inputs fit together and cut the merge into layer-group shards.

Only safetensors headers and config files are read here, so a bad input is refused
before a single weight is loaded or an output file is written. The plan is a JSON
document that is all a shard needs: for every output tensor, the byte ranges of its
inputs and every parameter already resolved to a number.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass, replace
from typing import Any

from pydantic import BaseModel, ValidationError

from orchestrator.chat_templates import resolve_chat_template
from orchestrator.errors import CheckpointError, PlanError, RecipeError
from orchestrator.hashing import stable_hash
from orchestrator.methods import get_method
from orchestrator.methods.base import MethodSpec
from orchestrator.parameters import layer_index, resolve_tensor_parameters
from orchestrator.recipe import ModelTokenSource, Recipe, TokenSettings, ZeroTokenSource
from orchestrator.redact import redact_data
from orchestrator.slices import OutputTensor, output_slices, output_tensors
from orchestrator.storage.base import DTYPE_SIZES, CheckpointSource, OutputSink, StorageOptions, TensorInfo
from orchestrator.storage.checkpoint import fingerprints, open_output, read_config, read_tensor_index, shard_file_name
from orchestrator.storage.convert import open_checkpoint
from orchestrator.storage.safetensors_format import dtype_code, parse_dtype_name
from orchestrator.vocabulary import (
    TOKENIZER_FILES,
    FixedRow,
    build_output_tokenizer,
    check_tokenizer_source,
    is_vocabulary_tensor,
    load_tokenizer,
    vocabulary_maps,
)

log = logging.getLogger(__name__)

PLAN_VERSION = 1
PLAN_FILE = ".mergefleet/plan.json"
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}


class PlanInput(BaseModel):
    name: str  # as the recipe names it
    ref: str  # where it is read from (differs only for converted pickle checkpoints)
    fingerprints: list[dict[str, Any]]


class TensorRead(BaseModel):
    """Where one input's copy of a tensor lives."""

    input: int  # index into Plan.inputs
    name: str  # the tensor's name in that input (differs from the output's in slices)
    file: str
    begin: int
    end: int
    dtype: str


class PlannedTensor(BaseModel):
    name: str
    shape: list[int]
    out_dtype: str
    reads: list[TensorRead]
    base: int | None  # position in ``reads`` of the base; the other reads are the experts
    model_params: list[dict[str, Any]]  # one per expert, in ``reads`` order
    global_params: dict[str, Any]
    group: str
    vocab: bool = False  # rows are token ids: permuted into the output vocabulary first

    @property
    def out_bytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * DTYPE_SIZES[self.out_dtype]

    @property
    def in_bytes(self) -> int:
        return sum(read.end - read.begin for read in self.reads)

    def expert_reads(self) -> list[TensorRead]:
        return [read for i, read in enumerate(self.reads) if i != self.base]


class VocabularyPlan(BaseModel):
    """The output vocabulary's size and, per input, its row for each output token (-1: lacks it)."""

    size: int  # output rows: the tokens, then any padding (tokenizer.pad_to_multiple_of)
    rows: dict[int, list[int]]  # input index -> row map
    fixed: list[FixedRow] = []  # tokenizer.tokens rows; input indexes ``Plan.inputs``


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
    base: int | None  # index into ``inputs`` of the recipe's base_model
    out_dtype: str
    # The recipe's ``dtype`` (the inputs are cast to it before merging, as mergekit does), and
    # how the arithmetic runs in it (recipe.FleetSettings.precision, docs/methods.md).
    dtype: str | None = None
    precision: str = "match-mergekit"
    config: dict[str, Any]
    tokenizer_source: int | None  # input whose tokenizer files are copied
    tokenizer_files: list[str]
    tokenizer_mode: str | None = None  # "union" when assembly builds a tokenizer
    tokenizer_added: list[str] = []  # tokens (tokenizer.tokens) the output tokenizer gains
    vocabulary: "VocabularyPlan | None" = None
    chat_template: str | None = None
    shards: list[PlannedShard]
    storage: StorageOptions = StorageOptions()  # how every process opens s3:// inputs and output

    def compute_dtype(self, tensor: PlannedTensor) -> str | None:
        """The dtype ``tensor`` is merged in under the match-mergekit precision (the recipe's
        ``dtype``, else the inputs' own), or None under float32 precision."""
        if self.precision != "match-mergekit":
            return None
        return self.dtype or tensor.reads[0].dtype

    def shard(self, index: int) -> PlannedShard:
        if not 0 <= index < len(self.shards):
            raise PlanError(f"shard index {index} is out of range: this plan has shards 0..{len(self.shards) - 1}")
        return self.shards[index]

    def to_json(self) -> str:
        """The plan file's text, redacted (``orchestrator.redact``) like everything written."""
        return json.dumps(redact_data(self.model_dump(mode="json")), indent=1, ensure_ascii=False)

    def output_sink(self) -> OutputSink:
        """The output location, opened the way every shard of this plan opens it."""
        return open_output(self.output, storage=self.storage)

    @classmethod
    def from_json(cls, text: str | bytes, *, source: str = "plan") -> "Plan":
        try:
            data = json.loads(text)
        except ValueError as error:  # not JSON, or not UTF-8
            raise PlanError(f"{source} is not valid JSON ({error}); re-create it with 'mergefleet plan'", path=source) from None
        if not isinstance(data, dict) or data.get("version") != PLAN_VERSION:
            found = data.get("version") if isinstance(data, dict) else f"none (a JSON {type(data).__name__})"
            raise PlanError(
                f"{source} has plan version {found}, this mergefleet reads {PLAN_VERSION}; re-create it with 'mergefleet plan'",
                path=source,
            )
        try:
            return cls.model_validate(data)
        except ValidationError as error:
            where = ".".join(str(part) for part in error.errors()[0]["loc"])
            raise PlanError(
                f"{source} is not a plan this mergefleet can read ({where}: {error.errors()[0]['msg']}); "
                "re-create it with 'mergefleet plan'",
                path=source,
            ) from None


def shard_metadata(plan: "Plan", index: int) -> dict[str, str]:
    """safetensors metadata of a shard file: the checkpoint carries its provenance."""
    return {
        "format": "pt",
        "mergefleet_plan_id": plan.plan_id,
        "mergefleet_recipe_sha256": plan.recipe_hash,
        "mergefleet_shard": f"{index + 1}/{len(plan.shards)}",
    }


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


def _reference_dtype(tensors: dict[str, TensorInfo]) -> str:
    counts = Counter(info.dtype for info in tensors.values() if info.dtype in FLOAT_DTYPES)
    return counts.most_common(1)[0][0] if counts else "F32"


def _num_layers(config: dict[str, Any], index: dict[str, TensorInfo]) -> int:
    counted = 1 + max((layer_index(name) for name in index if layer_index(name) is not None), default=-1)
    return int(config.get("num_hidden_layers") or counted)


def _check_architectures(refs: list[str], configs: dict[str, dict[str, Any]], reference: str) -> None:
    expected = configs[reference].get("architectures")
    for ref in refs:
        if configs[ref].get("architectures") != expected:
            raise CheckpointError(
                f"{ref}/config.json has architectures {configs[ref].get('architectures')} but "
                f"{reference}/config.json has {expected}; only models of one architecture can be merged"
            )


def _check_tensor(tensor: OutputTensor, indexes: dict[str, dict[str, TensorInfo]], vocab: bool) -> TensorInfo:
    """The first input's header entry, after checking the others agree with it.

    A vocabulary tensor may differ in its row count when the vocabulary is permuted.
    """
    first_model, first_name = tensor.inputs[0]
    info = indexes[first_model][first_name]
    for model, name in tensor.inputs[1:]:
        other = indexes[model][name]
        compared = (other.shape[1:], info.shape[1:]) if vocab else (other.shape, info.shape)
        if compared[0] != compared[1]:
            raise CheckpointError(
                f"tensor '{name}' has shape {list(other.shape)} in {model} ({other.file}) but "
                f"{list(info.shape)} in {first_model} ({info.file})"
            )
        if other.dtype != info.dtype:
            raise CheckpointError(
                f"tensor '{name}' is {other.dtype} in {model} ({other.file}) but {info.dtype} in "
                f"{first_model} ({info.file}); convert the models to one dtype first"
            )
    if info.dtype not in FLOAT_DTYPES:
        raise CheckpointError(
            f"tensor '{first_name}' in {first_model} ({info.file}) is {info.dtype}; only floating-point tensors can be merged"
        )
    return info


def _base_position(method: MethodSpec, tensor: OutputTensor) -> int | None:
    """Where the base sits among a tensor's inputs, or None when the method sees none."""
    models = [model for model, _ in tensor.inputs]
    if method.needs_base:
        if tensor.base is None:
            raise RecipeError(
                f"merge_method '{method.name}' needs a base_model: add 'base_model: PATH' "
                "(the model the experts were fine-tuned from)"
            )
        if tensor.base not in models:
            raise RecipeError(f"base_model {tensor.base} must be one of the sources of the slice that makes '{tensor.name}'")
        return models.index(tensor.base)
    if method.optional_base and tensor.base in models:
        return models.index(tensor.base)
    return None


def _check_expert_count(method: MethodSpec, tensor: OutputTensor, base: int | None) -> None:
    experts = len(tensor.inputs) - (base is not None)
    if experts < method.min_experts:
        raise RecipeError(
            f"merge_method '{method.name}' needs at least {method.min_experts} model(s) besides the base, got {experts}"
        )
    if method.max_experts is not None and experts > method.max_experts:
        raise RecipeError(
            f"merge_method '{method.name}' takes at most {method.max_experts} model(s) besides the base, got {experts}"
        )


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
    if method.needs_base and not recipe.base_model and not any(s.base_model for s in recipe.slices or []):
        raise RecipeError(
            f"merge_method '{method.name}' needs a base_model: add 'base_model: PATH' (the model the experts were fine-tuned from)"
        )

    refs = recipe.model_refs()
    allow = recipe.fleet.allow_pickle if allow_pickle is None else allow_pickle
    sources: dict[str, CheckpointSource] = {
        ref: open_checkpoint(ref, allow_pickle=allow, scratch=scratch, storage=recipe.fleet.storage) for ref in refs
    }
    configs = {ref: read_config(source) for ref, source in sources.items()}
    indexes = {ref: read_tensor_index(source) for ref, source in sources.items()}
    reference = recipe.base_model or refs[0]
    _check_architectures(refs, configs, reference)

    tokenizer = recipe.tokenizer_settings()
    check_tokenizer_source(tokenizer.source if tokenizer else None, refs, key="tokenizer.source" if recipe.tokenizer else "tokenizer_source")
    vocabulary, tokenizer_mode, tokenizer_added = _plan_vocabulary(recipe, refs, sources, configs, reference)
    slices = output_slices(recipe, {ref: _num_layers(configs[ref], indexes[ref]) for ref in refs})
    tensors = output_tensors(slices, {ref: list(index) for ref, index in indexes.items()}, recipe.parameters)
    out_dtype = (
        dtype_code(parse_dtype_name(recipe.out_dtype or recipe.dtype))
        if (recipe.out_dtype or recipe.dtype)
        else _reference_dtype(indexes[reference])
    )
    dtype = dtype_code(parse_dtype_name(recipe.dtype)) if recipe.dtype else None
    precision = recipe.fleet.precision

    position = {ref: i for i, ref in enumerate(refs)}
    planned: list[PlannedTensor] = []
    for tensor in tensors:
        vocab = vocabulary is not None and all(
            is_vocabulary_tensor(name, indexes[model][name].shape, configs[model].get("vocab_size"))
            for model, name in tensor.inputs
        )
        info = _check_tensor(tensor, indexes, vocab)
        base = _base_position(method, tensor)
        _check_expert_count(method, tensor, base)
        experts = [i for i in range(len(tensor.inputs)) if i != base]
        model_params, global_params = resolve_tensor_parameters(
            method,
            tensor.name,
            tensor.t,
            tensor.shared_settings,
            [(tensor.inputs[i][0], tensor.inputs[i][1], tensor.model_settings[i]) for i in experts],
        )
        if method.check_tensor is not None:
            method.check_tensor(tensor.name, tuple(info.shape), [tensor.inputs[i][0] for i in experts], global_params)
        reads = []
        for model, name in tensor.inputs:
            entry = indexes[model][name]
            reads.append(TensorRead(input=position[model], name=name, file=entry.file, begin=entry.begin, end=entry.end, dtype=entry.dtype))
        planned.append(
            PlannedTensor(
                name=tensor.name,
                shape=[vocabulary.size, *info.shape[1:]] if vocab else list(info.shape),
                out_dtype=_tensor_out_dtype(method, recipe, precision, dtype or info.dtype, out_dtype),
                reads=reads,
                base=base,
                model_params=model_params,
                global_params=global_params,
                group=tensor.group,
                vocab=vocab,
            )
        )

    if method.sparsifies and all(params.get("density", 1.0) >= 1.0 for t in planned for params in t.model_params):
        log.warning(
            "%s runs with density 1 for every tensor, so nothing is sparsified; set 'density' (e.g. 0.2) per model",
            method.name,
        )
    shard_count = shards or recipe.fleet.shards or 1
    planned_shards = cut_into_shards(planned, shard_count)

    inputs = [
        PlanInput(name=ref, ref=sources[ref].uri, fingerprints=[asdict(fp) for fp in fingerprints(sources[ref], verify=recipe.fleet.verify_inputs)])
        for ref in refs
    ]
    tokenizer_ref = tokenizer.source if tokenizer and tokenizer.source in refs else reference
    tokenizer_files = [name for name in TOKENIZER_FILES if sources[tokenizer_ref].exists(name)]
    layer_sources = [s.sources[0].start + offset for s in slices for offset in range(s.layers)]
    config = _output_config(configs[reference], out_dtype, layer_sources if recipe.slices else None)
    if vocabulary is not None:
        config["vocab_size"] = vocabulary.size
    plan_id = _plan_id(recipe.recipe_hash(), inputs, shard_count, out_dtype, precision)
    return Plan(
        plan_id=plan_id,
        recipe=recipe.model_dump(mode="json", exclude_defaults=True),
        recipe_hash=recipe.recipe_hash(),
        method=method.name,
        random_seed=recipe.random_seed,
        output=output,
        inputs=inputs,
        base=position.get(recipe.base_model) if recipe.base_model else None,
        out_dtype=out_dtype,
        dtype=dtype,
        precision=precision,
        config=config,
        tokenizer_source=position[tokenizer_ref] if tokenizer_files else None,
        tokenizer_files=tokenizer_files,
        tokenizer_mode=tokenizer_mode,
        tokenizer_added=tokenizer_added,
        vocabulary=VocabularyPlan(
            size=vocabulary.size,
            rows={position[r]: m for r, m in vocabulary.rows.items()},
            fixed=[replace(row, input=None if row.input is None else position[refs[row.input]]) for row in vocabulary.fixed],
        )
        if vocabulary is not None
        else None,
        chat_template=resolve_chat_template(
            recipe.chat_template,
            [sources[ref].read_file("tokenizer_config.json") if sources[ref].exists("tokenizer_config.json") else None for ref in refs],
        ),
        shards=planned_shards,
        storage=recipe.fleet.storage,
    )


def _tensor_out_dtype(method: MethodSpec, recipe: Recipe, precision: str, compute: str, out_dtype: str) -> str:
    """The dtype a tensor is written in: ``out_dtype``, except where mergekit writes float32 for
    a method whose arithmetic promotes to it (MethodSpec.mergekit_result_float32) and the
    recipe sets no ``out_dtype``, under the match-mergekit precision."""
    if method.mergekit_result_float32 and precision == "match-mergekit" and not recipe.out_dtype and compute in ("BF16", "F16"):
        return "F32"
    return out_dtype


@dataclass
class _Vocabulary:
    size: int  # output rows: the tokens, then the padding rows
    rows: dict[str, list[int]]
    fixed: list[FixedRow]  # input positions are refs' indexes here
    added: list[str]  # tokens of tokenizer.tokens the output tokenizer gains


def _plan_vocabulary(
    recipe: Recipe,
    refs: list[str],
    sources: dict[str, CheckpointSource],
    configs: dict[str, dict[str, Any]],
    reference: str,
) -> tuple[_Vocabulary | None, str | None, list[str]]:
    """Row maps into the output vocabulary (None when every model already uses it as it is),
    "union" when assembly builds a union tokenizer, and the tokens the output tokenizer gains."""
    settings = recipe.tokenizer_settings()
    if settings is None:
        return None, None, []
    tokenizers = {ref: load_tokenizer(sources[ref]) for ref in refs}
    mode = reference if settings.source == "base" else settings.source
    tokens = settings.tokens or {}
    output = build_output_tokenizer(mode, tokenizers, reference, list(tokens))
    base_vocab = (build_output_tokenizer(mode, tokenizers, reference) if tokens else output).get_vocab()
    added = [token for token in tokens if token not in base_vocab]
    sizes = {ref: int(configs[ref].get("vocab_size") or len(tokenizers[ref])) for ref in refs}
    rows = vocabulary_maps(output, tokenizers, sizes)
    count = len(next(iter(rows.values())))
    size = count
    if settings.pad_to_multiple_of and count % settings.pad_to_multiple_of:
        size = count + settings.pad_to_multiple_of - count % settings.pad_to_multiple_of
    vocab = output.get_vocab()
    fixed = [_fixed_row(token, vocab[token], config, refs, rows, tokenizers, sizes) for token, config in tokens.items()]
    union = "union" if mode == "union" else None
    identity = list(range(count))
    if size == count and not any(row.force for row in fixed) and all(r == identity and sizes[ref] == count for ref, r in rows.items()):
        return None, union, added
    return _Vocabulary(size, rows, fixed, added), union, added


def _fixed_row(
    token: str,
    row: int,
    config: TokenSettings,
    refs: list[str],
    rows: dict[str, list[int]],
    tokenizers: dict[str, Any],
    sizes: dict[str, int],
) -> FixedRow:
    """Where ``tokenizer.tokens.<token>`` takes its row, checked against the models."""
    where = f"tokenizer.tokens.{token}.source"
    source = config.source
    if source is None:
        raise RecipeError(f"{where} is not set: name one of the recipe's models, or a 'model_token' or 'zero' source")
    if isinstance(source, ZeroTokenSource):
        return FixedRow(row=row, input=None, source_row=0, force=config.force)
    model = source.model if isinstance(source, ModelTokenSource) else source
    if model not in refs:
        raise RecipeError(f"{where}: '{model}' is not one of the recipe's models ({', '.join(refs)})")
    if isinstance(source, ModelTokenSource):
        if source.token is not None:
            source_row = tokenizers[model].get_vocab().get(source.token, -1)
            if source_row < 0:
                raise RecipeError(f"{where}: {model}'s tokenizer has no token {source.token!r}")
        else:
            source_row = int(source.token_id or 0)
        if source_row >= sizes[model]:
            raise RecipeError(f"{where}: token id {source_row} is outside {model}'s {sizes[model]} rows")
    else:
        source_row = rows[model][row]
        if source_row < 0:
            raise RecipeError(f"{where}: {model}'s tokenizer has no token {token!r}; use a 'model_token' source to take another token's row")
    return FixedRow(row=row, input=refs.index(model), source_row=source_row, force=config.force)


def _plan_id(recipe_hash: str, inputs: list[PlanInput], shards: int, out_dtype: str, precision: str) -> str:
    """What makes a merge the same merge: its recipe, its inputs' contents, its cut and its arithmetic."""
    identity = {
        "version": PLAN_VERSION,
        "recipe": recipe_hash,
        "inputs": [inp.model_dump() for inp in inputs],
        "shards": shards,
        "out_dtype": out_dtype,
        "precision": precision,
    }
    return stable_hash(identity, length=16)


def recut(plan: Plan, count: int) -> Plan:
    """The same merge cut into ``count`` shards (a new plan id, as for ``build_plan(shards=count)``)."""
    if count == len(plan.shards):
        return plan
    tensors = [tensor for shard in plan.shards for tensor in shard.tensors]
    return plan.model_copy(
        update={
            "shards": cut_into_shards(tensors, count),
            "plan_id": _plan_id(plan.recipe_hash, plan.inputs, count, plan.out_dtype, plan.precision),
        }
    )


def cut_into_shards(tensors: list[PlannedTensor], count: int) -> list[PlannedShard]:
    """Layer groups of near-equal output bytes; a layer is split only when shards outnumber layers."""
    atoms: list[list[PlannedTensor]] = []
    for tensor in tensors:
        if atoms and atoms[-1][0].group == tensor.group:
            atoms[-1].append(tensor)
        else:
            atoms.append([tensor])
    if count > len(atoms):
        atoms = [[tensor] for tensor in tensors]
        if count > len(atoms):
            raise RecipeError(f"--shards {count} is more than the {len(atoms)} tensors of the model; use at most {len(atoms)}")
    groups = plan_layer_groups([sum(t.out_bytes for t in atom) for atom in atoms], count)
    return [
        PlannedShard(
            index=i,
            file=shard_file_name(i, count),
            tensors=[tensor for atom in atoms[start:stop] for tensor in atom],
        )
        for i, (start, stop) in enumerate(groups)
    ]


_CONFIG_DTYPE_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


def _output_config(config: dict[str, Any], out_dtype: str, layer_sources: list[int] | None) -> dict[str, Any]:
    """The reference config with the output dtype and, for slices, the output's layers."""
    result = dict(config)
    name = _CONFIG_DTYPE_NAMES[out_dtype]
    result["torch_dtype"] = name
    if "dtype" in result or "transformers_version" in result:
        result["dtype"] = name
    if layer_sources is not None:
        result["num_hidden_layers"] = len(layer_sources)
        types = result.get("layer_types")
        if isinstance(types, list) and len(types) > max(layer_sources):
            result["layer_types"] = [types[i] for i in layer_sources]
    return result
