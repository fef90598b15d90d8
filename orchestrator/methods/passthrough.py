"""passthrough: the single input as it is, optionally multiplied by its ``scale``.

For recipes that copy tensors (typically ``slices:`` frankenmerges): exactly one model per
tensor, base or not. Without ``scale`` the input is returned as it is, in its stored dtype
(unlike the other methods, which return float32): an upcast would be exact and the
engine's cast to the output dtype would only undo it. With ``scale`` the product is taken
in float32 (float64 stays) and rounded once. Under the match-mergekit precision the input
is first cast to the recipe's dtype, and the product rounded to it, as mergekit does.
"""

from __future__ import annotations

import torch

from orchestrator.errors import MergeError
from orchestrator.methods.base import MergeResult, MethodSpec, ParamSpec, TensorTask, compute_dtype


def passthrough(tensor: torch.Tensor, scale: float | None = None, *, input_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The tensor, times ``scale``. With ``input_dtype`` (mergekit's ``dtype``) it is cast to
    that dtype first and the product is rounded to it, as in mergekit."""
    if input_dtype is not None:
        tensor = tensor.to(input_dtype)
        return tensor if scale is None else tensor * float(scale)
    if scale is None:
        return tensor
    return tensor.to(compute_dtype(tensor), copy=True).mul_(float(scale))


def _merge(task: TensorTask) -> MergeResult:
    if len(task.experts) != 1 or task.base is not None:
        count = len(task.experts) + (task.base is not None)
        raise MergeError(
            f"passthrough takes exactly one model per tensor, got {count} for '{task.name}'; "
            "use 'slices:' with one source per slice"
        )
    return MergeResult(passthrough(task.experts[0], task.model_params[0].get("scale"), input_dtype=task.compute_dtype))


SPECS: tuple[MethodSpec, ...] = (
    MethodSpec(
        name="passthrough",
        merge=_merge,
        needs_base=False,
        model_params=(ParamSpec("scale", float, None, "multiply this model's tensor by it (none: unchanged)"),),
        min_experts=1,
        max_experts=1,
        doc="copy the single input, optionally scaled",
    ),
)
