"""The recipe: a mergekit YAML file, unchanged, plus an optional ``fleet:`` section.

Parsing is strict (unknown keys are errors, as silently ignored keys are a known source
of wrong merges) and every error names the key at fault and what is allowed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from orchestrator.errors import RecipeError
from orchestrator.hashing import stable_hash
from orchestrator.learned.settings import DamSettings
from orchestrator.redact import MASK, redact_data, redacted_keys, url_userinfo_key
from orchestrator.storage.base import StorageOptions

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
    # How the arithmetic runs (docs/methods.md, "Precision"): "match-mergekit" casts the inputs
    # to the recipe's dtype and rounds where mergekit 0.1.5 rounds, so half-precision recipes
    # give mergekit's bytes; "float32" computes in float32 and rounds once, at the end.
    precision: Precision = "match-mergekit"
    shards: int = Field(default=1, ge=1)
    workers: int = Field(default=1, ge=1)
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

    merge_method: str
    models: list[ModelEntry] = Field(default_factory=list)
    slices: list[SliceEntry] | None = None
    base_model: str | None = None
    parameters: dict[str, ParameterValue] = Field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    random_seed: int = 0
    tokenizer_source: str | None = None
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
        return self

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


def _describe(error: ValidationError, source: str) -> str:
    first = error.errors()[0]
    location = ".".join(str(part) for part in first["loc"]) or "(top level)"
    kind = first["type"]
    if kind == "extra_forbidden":
        allowed = _allowed_keys(first["loc"])
        return f"{source}: unknown key '{location}'" + (f"; allowed here: {allowed}" if allowed else "")
    if kind == "missing":
        return f"{source}: missing required key '{location}'"
    message = first["msg"].removeprefix("Value error, ")
    return f"{source}: {location}: {message}"


def _allowed_keys(location: tuple[Any, ...]) -> str:
    model: type[BaseModel] = Recipe
    nested = {"fleet": FleetSettings, "eval": EvalSettings, "dam": DamSettings, "storage": StorageOptions, "models": ModelEntry, "slices": SliceEntry, "sources": SliceSource}
    for part in location[:-1]:
        if isinstance(part, str) and part in nested:
            model = nested[part]
    return ", ".join(sorted(model.model_fields))


def parse_recipe(data: Any, *, source: str = "recipe") -> Recipe:
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
    try:
        return Recipe.model_validate(data)
    except ValidationError as error:
        key = ".".join(str(part) for part in error.errors()[0]["loc"]) or None
        raise RecipeError(_describe(error, source), key=key) from None


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RecipeError(f"recipe file {path} does not exist") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise RecipeError(f"{path} is not valid YAML: {error}") from None
    return parse_recipe(data, source=str(path))
