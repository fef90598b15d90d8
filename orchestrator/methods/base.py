"""The contract every merge method keeps: a spec (name, parameters) and a pure merge function.

The engine resolves every parameter to a scalar per tensor before calling ``merge``, so a
method never sees gradients, filters or recipe structure: tensors in, tensor out.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from orchestrator.errors import MergeError

REQUIRED: Any = object()
"""Default of a parameter the recipe must set."""


@dataclass(frozen=True)
class ParamSpec:
    name: str
    kind: type  # float, bool, int or str
    default: Any = REQUIRED
    doc: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


HALF_DTYPES = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class TensorTask:
    """One tensor to merge. Input tensors keep their stored dtype; the method casts.

    ``model_params[i]`` belongs to ``experts[i]``. ``seed`` is already specific to this
    tensor (see ``tensor_seed``); methods that draw random numbers build their own
    ``torch.Generator`` on the CPU from it so results do not depend on the device.

    ``compute_dtype`` is the dtype mergekit 0.1.5 would cast the inputs to and compute in
    (the recipe's ``dtype``, else the inputs' own): the method follows mergekit's order of
    operations and roundings in it (docs/methods.md, "Precision"). None computes in float32
    (float64 for float64 inputs) and rounds once, when the engine casts the result.
    """

    name: str
    base: torch.Tensor | None
    experts: Sequence[torch.Tensor]
    model_params: Sequence[Mapping[str, Any]]
    global_params: Mapping[str, Any]
    seed: int = 0
    compute_dtype: torch.dtype | None = None

    @property
    def half(self) -> torch.dtype | None:
        """The half-precision dtype to follow mergekit in, or None."""
        return self.compute_dtype if self.compute_dtype in HALF_DTYPES else None


@dataclass
class MergeResult:
    """A merged tensor and a report. The tensor is float32 (float64 for float64 inputs), or,
    when the task has a ``compute_dtype``, whatever dtype mergekit's arithmetic ends in
    (the half dtype itself for most methods), holding exactly mergekit's values.

    ``report`` holds per-tensor figures a method wants surfaced, e.g. ties' protected
    drop rate: ``{"protected_dropped": [..per protected model..], "protected_topk": [..]}``.
    Values must be JSON-serialisable.
    """

    tensor: torch.Tensor
    report: dict[str, Any] = field(default_factory=dict)


MergeFunction = Callable[[TensorTask], MergeResult]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    merge: MergeFunction
    needs_base: bool
    # A base that is handed over as ``task.base`` when the recipe names one, and left
    # out otherwise (multislerp, nuslerp). When False and the method needs no base, a
    # named base is just another input among the experts (linear).
    optional_base: bool = False
    # The method reads its inputs only through contiguous slices of their flat views
    # (``x.reshape(-1)[a:b]``), so the engine may hand it tensors still in storage.
    streams_inputs: bool = False
    model_params: tuple[ParamSpec, ...] = ()
    global_params: tuple[ParamSpec, ...] = ()
    uses_randomness: bool = False
    sparsifies: bool = False  # warn when density is 1 everywhere
    min_experts: int = 1
    max_experts: int | None = None
    # Checks one tensor's resolved parameters when the plan is made, so a bad value stops the
    # merge before anything is written: check_params(where, model names, model_params,
    # global_params) raises RecipeError naming the tensor (``where``) and the model.
    check_params: Callable[[str, Sequence[str], Sequence[Mapping[str, Any]], Mapping[str, Any]], None] | None = None
    # Checks one tensor against what the method reads besides the models (a coefficient file)
    # when the plan is made: check_tensor(tensor name, shape, model names, global_params).
    check_tensor: Callable[[str, Sequence[int], Sequence[str], Mapping[str, Any]], None] | None = None
    # mergekit 0.1.5's arithmetic for this method ends in float32 whatever the inputs' dtype
    # (a float32 factor promotes the result), so without an ``out_dtype`` it writes float32
    # tensors; under the match-mergekit precision the plan does the same.
    mergekit_result_float32: bool = False
    doc: str = ""

    def param(self, name: str) -> ParamSpec | None:
        for spec in (*self.model_params, *self.global_params):
            if spec.name == name:
                return spec
        return None


def check_base_and_one_other(task: TensorTask, method: str) -> None:
    """MergeError unless ``task`` has the base and exactly one other model, of one shape."""
    if task.base is None or len(task.experts) != 1:
        raise MergeError(
            f"{method} needs the base and exactly one other model for '{task.name}', got "
            f"{'a' if task.base is not None else 'no'} base and {len(task.experts)} other(s)"
        )
    if task.experts[0].shape != task.base.shape:
        raise MergeError(
            f"{method}: tensor '{task.name}' has shape {tuple(task.experts[0].shape)} in the other model and "
            f"{tuple(task.base.shape)} in the base; the models must share one architecture"
        )


def tensor_seed(random_seed: int, tensor_name: str) -> int:
    """A 63-bit seed from (recipe seed, tensor name): independent of shard and order."""
    digest = hashlib.sha256(f"{random_seed}\x00{tensor_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64 (tests ask for it), else float32."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def working_dtype(task: TensorTask) -> torch.dtype:
    """The dtype a method's float path computes in: the task's ``compute_dtype`` when it is
    float32 or float64 (mergekit casts the inputs to it), else float32 (float64 inputs: float64)."""
    if task.compute_dtype in (torch.float32, torch.float64):
        return task.compute_dtype
    return compute_dtype(task.base, *task.experts)
