"""The recipe: a mergekit YAML file, unchanged, plus an optional ``fleet:`` section.

mergekit reads what it knows and ignores the rest; so does mergefleet, but loudly: an
unknown key (a typo, usually) is dropped with a warning naming the closest known key,
and ``strict=True`` (``--strict`` on the command line) makes it an error. Every error
names the key at fault and what is allowed.
"""

from __future__ import annotations

import difflib
import logging
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from orchestrator.errors import RecipeError
from orchestrator.hashing import stable_hash
from orchestrator.learned.settings import DamSettings
from orchestrator.redact import MASK, redact, redact_data, redacted_keys, url_userinfo_key
from orchestrator.storage.base import _CREDENTIAL_WORDS, StorageOptions

log = logging.getLogger(__name__)

log = logging.getLogger(__name__)

Scalar = Union[bool, int, float, str]


class ConditionalValue(BaseModel):
    """One entry of a filtered parameter list: the first entry whose filter matches wins."""

    model_config = ConfigDict(extra="forbid")

    filter: str | None = None
    value: Union[Scalar, list[Scalar]]


ParameterValue = Union[Scalar, list[Scalar], list[ConditionalValue]]


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    parameters: dict[str, ParameterValue] = Field(default_factory=dict)

    @field_validator("model")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("model reference is empty; give a local path or s3://bucket/prefix")
        if "+" in value and not value.startswith("s3://"):
            raise ValueError(f"'{value}': LoRA references (model+lora) are not supported; merge the adapter first")
        return value


class SliceSource(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, ParameterValue] = Field(default_factory=dict)


class SliceEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sources: list[SliceSource]
    base_model: str | None = None
    parameters: dict[str, ParameterValue] = Field(default_factory=dict)


class ModelTokenSource(BaseModel):
    """A token's row taken from another token of one model (``kind: model_token``)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["model_token"]
    model: str
    token_id: int | None = Field(default=None, ge=0)
    token: str | None = None

    @model_validator(mode="after")
    def _one_token(self) -> "ModelTokenSource":
        if (self.token_id is None) == (self.token is None):
            raise ValueError("a model_token source names exactly one of 'token' or 'token_id'")
        return self


class ZeroTokenSource(BaseModel):
    """A row of zeros (``kind: zero``)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["zero"]


class TokenSettings(BaseModel):
    """``tokenizer.tokens.<token>``: where that token's embedding and head rows come from.

    ``source`` is a model of the recipe (its row for the token), a ``model_token`` or
    ``zero`` source; ``force`` gives every model that row, not only those lacking the token.
    """

    model_config = ConfigDict(extra="forbid")

    source: ModelTokenSource | ZeroTokenSource | str | None = None
    force: bool = False


class TokenizerSettings(BaseModel):
    """mergekit's ``tokenizer:`` section: the output vocabulary and how its rows are filled."""

    model_config = ConfigDict(extra="forbid")

    source: str = "union"  # union, base, or one of the recipe's models
    tokens: dict[str, TokenSettings] | None = None
    pad_to_multiple_of: int | None = Field(default=None, ge=1)


class EvalSettings(BaseModel):
    """``fleet.eval``: what lm-eval runs on the merged checkpoint (and, optionally, its inputs)."""

    model_config = ConfigDict(extra="forbid")

    # lm-eval task names, task YAML files, directories of task YAMLs, or JSONL files
    # ({"prompt", "choices", "answer"} or {"prompt", "completion"} per line)
    tasks: list[str] = Field(min_length=1)
    num_fewshot: int | None = Field(default=None, ge=0)
    limit: int | float | None = Field(default=None, gt=0)  # examples per task (a fraction below 1)
    batch_size: int = Field(default=16, ge=1)
    device: str = "cpu"  # cpu, cuda, cuda:1, ...
    evaluate_inputs: bool = False  # also the base and every expert, cached by fingerprint
    owners: dict[str, str] = Field(default_factory=dict)  # task -> the expert (as the recipe names it) trained for it
    cache_dir: str | None = None  # default: $XDG_CACHE_HOME/mergefleet/eval

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value != "cpu" and not value.startswith("cuda") and value != "mps":
            raise ValueError(f"device '{value}' is not supported; use cpu, cuda or cuda:N")
        return value


Precision = Literal["match-mergekit", "float32"]


class FleetSettings(BaseModel):
    """Orchestration settings; none of them but ``precision`` changes the merged weights."""

    model_config = ConfigDict(extra="forbid")

    output: str | None = None
    # Multi-document recipes (orchestrator/multidoc.py): where the named intermediate merges
    # go, one directory each; default: <output>.intermediates beside the output.
    intermediate_dir: str | None = None
    # How the arithmetic runs (docs/methods.md, "Precision"): "match-mergekit" casts the inputs
    # to the recipe's dtype and rounds where mergekit 0.1.5 rounds, so half-precision recipes
    # give mergekit's bytes; "float32" computes in float32 and rounds once, at the end.
    precision: Precision = "match-mergekit"
    # Unset: `mergefleet merge` chooses them from this machine's cores and memory and the
    # merge's size (orchestrator/sizing.py); the flows and `mergefleet plan` use 1.
    shards: int | None = Field(default=None, ge=1)
    workers: int | None = Field(default=None, ge=1)
    device: Literal["cpu", "cuda"] = "cpu"
    allow_pickle: bool = False
    # How a local input's version is checked between planning and each shard: size, mtime and
    # the safetensors header's hash ("metadata"), or also the hash of every byte ("content",
    # computed once per file version and cached in $XDG_CACHE_HOME/mergefleet/fingerprints).
    verify_inputs: Literal["metadata", "content"] = "metadata"
    storage: StorageOptions = Field(default_factory=StorageOptions)  # S3 endpoint, region, cache; never credentials
    # Where the shards of `mergefleet run` (the merge_and_eval flow) run: in the flow's own
    # process, or as runs of the merge-shard deployment on a Prefect work pool.
    target: Literal["inline", "deployment"] = "inline"
    work_pool: str | None = None
    shard_deployment: str | None = None  # default: merge-shard/<work_pool>
    shard_retries: int = Field(default=2, ge=0)
    # A Prefect global concurrency limit each shard holds one slot of while it runs (e.g.
    # 'gpu'); with concurrency_slots the flow creates it or sets its size.
    concurrency_limit: str | None = None
    concurrency_slots: int | None = Field(default=None, ge=1)
    # Evaluation and lineage (orchestrator/evaluate/, orchestrator/tracking/)
    eval: EvalSettings | None = None
    tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite beside the output
    experiment: str = "mergefleet"
    register_model: str | None = None  # register the merged checkpoint under this model name
    dam: DamSettings | None = None  # how `mergefleet dam train` learns the coefficients dam_apply reads

    @model_validator(mode="after")
    def _target_is_complete(self) -> "FleetSettings":
        if self.target == "deployment" and not (self.work_pool or self.shard_deployment):
            raise ValueError(
                "target 'deployment' runs shards on a Prefect work pool: set 'work_pool: NAME' "
                "(the pool that 'mergefleet deploy --pool NAME' registered merge-shard on)"
            )
        if self.concurrency_slots is not None and not self.concurrency_limit:
            raise ValueError("concurrency_slots needs a limit name: set 'concurrency_limit: NAME' (e.g. gpu)")
        return self

    def shard_deployment_name(self) -> str:
        """The deployment the ``deployment`` target fans shards out to."""
        return self.shard_deployment or f"merge-shard/{self.work_pool}"


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, hide_input_in_errors=True)

    # What parsing found and let pass (unknown keys, unused parameters): one line each.
    _warnings: list[str] = PrivateAttr(default_factory=list)

    merge_method: str
    models: list[ModelEntry] = Field(default_factory=list)
    slices: list[SliceEntry] | None = None
    base_model: str | None = None
    parameters: dict[str, ParameterValue] = Field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    random_seed: int = 0
    tokenizer_source: str | None = None
    tokenizer: TokenizerSettings | None = None
    chat_template: str | None = None
    name: str | None = None
    fleet: FleetSettings = Field(default_factory=FleetSettings)

    @field_validator("models", mode="before")
    @classmethod
    def _bare_model_strings(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"model": v} if isinstance(v, str) else v for v in value]
        return value

    @model_validator(mode="after")
    def _has_inputs(self) -> "Recipe":
        if not self.models and not self.slices:
            raise ValueError("the recipe names no models: add a 'models:' list")
        if self.models and self.slices:
            raise ValueError("give either 'models:' or 'slices:', not both")
        if self.tokenizer_source and self.tokenizer:
            raise ValueError("give either 'tokenizer_source:' or 'tokenizer:', not both (mergekit refuses both too)")
        return self

    @model_validator(mode="after")
    def _no_model_twice(self) -> "Recipe":
        """mergekit refuses a merge whose inputs repeat a model ("Duplicate merge inputs")."""
        groups = [("models", [entry.model for entry in self.models])]
        groups += [(f"slices[{i}].sources", [s.model for s in slice_.sources]) for i, slice_ in enumerate(self.slices or [])]
        for where, names in groups:
            for index, name in enumerate(names):
                if name in names[:index]:
                    raise ValueError(
                        f"{where}[{index}] ({name}) repeats {where}[{names.index(name)}]; a model may be listed once "
                        "(mergekit refuses it too): merge the two entries' parameters into one"
                    )
        return self

    @property
    def warnings(self) -> list[str]:
        """What parsing let pass (unknown keys, parameters the method does not use)."""
        return list(self._warnings)

    def with_fleet(self, **overrides: Any) -> "Recipe":
        """This recipe with some ``fleet:`` settings replaced (command-line flags), validated."""
        try:
            fleet = FleetSettings.model_validate(self.fleet.model_dump(exclude_defaults=True) | overrides)
        except ValidationError as error:
            raise RecipeError(_describe(error, "fleet", [])) from None
        return self.model_copy(update={"fleet": fleet})

    def tokenizer_settings(self) -> TokenizerSettings | None:
        """The ``tokenizer:`` section, or the older ``tokenizer_source`` as one; None for neither."""
        if self.tokenizer is not None:
            return self.tokenizer
        return TokenizerSettings(source=self.tokenizer_source) if self.tokenizer_source else None

    def model_refs(self) -> list[str]:
        """Every model the merge reads, base first when there is one, without repeats."""
        named = [self.base_model] + [entry.model for entry in self.models]
        for slice_ in self.slices or []:
            named += [slice_.base_model] + [source.model for source in slice_.sources]
        refs: list[str] = []
        for ref in named:
            if ref and ref not in refs:
                refs.append(ref)
        return refs

    def recipe_hash(self) -> str:
        """Hash of what changes the weights: everything but ``fleet``."""
        return stable_hash(self.model_dump(mode="json", exclude={"fleet"}))

    def output_location(self, explicit: str | None = None) -> str:
        """Where the merge goes: ``explicit`` (OUT or ``--output`` on the command line,
        ``output=`` in Python), else ``fleet.output``."""
        chosen = explicit or self.fleet.output
        if chosen and url_userinfo_key(chosen):
            raise RecipeError(
                "the output location holds a URL with a user name or password; credentials never go in a recipe "
                "or on the command line: set them in the environment (AWS_ACCESS_KEY_ID, AWS_PROFILE, ...)",
                key="fleet.output" if not explicit else "output",
            )
        if not chosen:
            raise RecipeError(
                "no output location: give OUT (or --output) on the command line (output= in Python) or set "
                "'fleet: {output: PATH}' in the recipe"
            )
        return chosen


def _describe(error: ValidationError, source: str, unknown: list[_UnknownKey]) -> str:
    """The first validation error as one line; a missing key names the misspelt key that the
    recipe has instead, when one of the ``unknown`` keys is closest to it."""
    first = error.errors()[0]
    location = ".".join(str(part) for part in first["loc"]) or "(top level)"
    kind = first["type"]
    if kind == "missing":
        misspelt = next((key for key in unknown if key.closest == location), None)
        return f"{source}: missing required key '{location}'" + (f": {misspelt.message}" if misspelt else "")
    message = first["msg"].removeprefix("Value error, ")
    return f"{source}: {location}: {message}" if first["loc"] else f"{source}: {message}"


_LEAVE_TO_VALIDATION = {StorageOptions: _CREDENTIAL_WORDS}  # refused there with its own message, never dropped


def _nested_model(annotation: Any) -> tuple[str, type[BaseModel]] | None:
    """('one', M), ('list', M) or ('dict', M) when a field holds M in that way (Optional or not)."""
    args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "one", annotation
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType) and len(args) == 1:
        return _nested_model(args[0])
    if origin is list and len(args) == 1 and isinstance(args[0], type) and issubclass(args[0], BaseModel):
        return "list", args[0]
    if origin is dict and len(args) == 2 and isinstance(args[1], type) and issubclass(args[1], BaseModel):
        return "dict", args[1]
    return None


@dataclass(frozen=True)
class _UnknownKey:
    """A key of the recipe no model field knows: where it is, the closest known key there
    (its full path; None when nothing is close) and the keys allowed there."""

    where: str
    closest: str | None
    known: list[str]

    @classmethod
    def at(cls, path: str, key: str, known: list[str]) -> _UnknownKey:
        close = difflib.get_close_matches(key, known, n=1)
        prefix = f"{path}." if path else ""
        return cls(f"{prefix}{key}", f"{prefix}{close[0]}" if close else None, known)

    @property
    def message(self) -> str:
        if self.closest:
            return f"unknown key '{self.where}'; did you mean '{self.closest}'?"
        return f"unknown key '{self.where}'; allowed here: {', '.join(sorted(self.known))}"


def _drop_unknown_keys(model: type[BaseModel], data: Any, path: str, found: list[_UnknownKey]) -> Any:
    """``data`` without the keys ``model`` does not know (recursively); each of them in ``found``."""
    if not isinstance(data, dict):
        return data
    known = list(model.model_fields)
    kept: dict[Any, Any] = {}
    for key, value in data.items():
        field = model.model_fields.get(key) if isinstance(key, str) else None
        if field is None:
            words = _LEAVE_TO_VALIDATION.get(model, ())
            if any(word in str(key).lower() for word in words):
                kept[key] = value
            else:
                found.append(_UnknownKey.at(path, str(key), known))
            continue
        nested = _nested_model(field.annotation)
        where = f"{path}.{key}" if path else key
        if nested is None:
            kept[key] = value
        elif nested[0] == "one":
            kept[key] = _drop_unknown_keys(nested[1], value, where, found)
        elif nested[0] == "list" and isinstance(value, list):
            kept[key] = [_drop_unknown_keys(nested[1], item, f"{where}[{i}]", found) for i, item in enumerate(value)]
        elif nested[0] == "dict" and isinstance(value, dict):
            kept[key] = {name: _drop_unknown_keys(nested[1], item, f"{where}.{name}", found) for name, item in value.items()}
        else:
            kept[key] = value
    return kept


def parse_recipe(data: Any, *, source: str = "recipe", strict: bool = False, warn: bool = True) -> Recipe:
    """The recipe in ``data`` (one YAML document).

    Unknown keys are dropped and parameters the method does not use kept, as mergekit does,
    each with a line in ``Recipe.warnings`` (logged unless ``warn`` is false: a recipe parsed
    again from one already parsed); ``strict`` refuses them instead.
    """
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping with at least 'merge_method' and 'models'")
    key = url_userinfo_key(data)
    if key is not None:
        raise RecipeError(
            f"{source}: '{key}' holds a URL with a user name or password; credentials never go in a recipe: "
            "remove them from the URL and set them in the environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
            "AWS_PROFILE) or use the pod's role",
            key=key,
        )
    redacted = redacted_keys(data)
    if redacted:
        log.warning(
            "%s: %s hold(s) something credential-shaped (a key id, token, password or secret); it is replaced by %s "
            "in everything mergefleet writes. Credentials never go in a recipe: set them in the environment",
            source, ", ".join(redacted), MASK,
        )
        data = redact_data(data)
    unknown: list[_UnknownKey] = []
    cleaned = _drop_unknown_keys(Recipe, data, "", unknown)
    if unknown and strict:
        raise RecipeError(f"{source}: {unknown[0].message} (--strict refuses keys mergekit would ignore)")
    try:
        recipe = Recipe.model_validate(cleaned)
    except ValidationError as error:
        key = ".".join(str(part) for part in error.errors()[0]["loc"]) or None
        raise RecipeError(_describe(error, source, unknown), key=key) from None
    from orchestrator.parameters import unused_parameters  # parameters reads this module's types

    unused = unused_parameters(recipe)
    if unused and strict:
        raise RecipeError(f"{source}: {unused} (--strict refuses parameters mergekit would ignore)")
    for key in unknown:
        recipe._warnings.append(f"{source}: {key.message} (ignored; --strict refuses it)")
    if unused:
        recipe._warnings.append(f"{source}: {unused}")
    for message in recipe._warnings if warn else ():
        log.warning("%s", message)
    return recipe


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")


def recipe_file(path: str | Path) -> Path:
    """The recipe's local path; a URL is refused before ``Path`` folds its ``//`` and before
    its text (which may carry a secret in its user part) reaches a message unredacted."""
    text = str(path)
    if _URL.match(text):
        raise RecipeError(f"recipe {redact(text)} is a URL; recipes are read from a local file: copy it here first and pass its path")
    return Path(path)


def load_recipe(path: str | Path, *, strict: bool = False) -> Recipe:
    path = recipe_file(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RecipeError(f"recipe file {path} does not exist") from None
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as error:
        raise RecipeError(_yaml_error(path, error)) from None
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: not valid YAML: {' '.join(str(error).split())}") from None
    return parse_recipe(data, source=str(path), strict=strict)


def _yaml_error(path: Path, error: yaml.MarkedYAMLError) -> str:
    """``file:line:column: not valid YAML: problem`` - one line, where editors jump to."""
    mark = error.problem_mark or error.context_mark
    problem = " ".join(str(error.problem or error.context or "syntax error").split())
    if mark is None:
        return f"{path}: not valid YAML: {problem}"
    return f"{path}:{mark.line + 1}:{mark.column + 1}: not valid YAML: {problem}"
