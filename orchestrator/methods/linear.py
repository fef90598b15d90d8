"""linear: θ = Σ wᵢθᵢ, divided by Σ wᵢ when ``normalize`` (default true). No base needed:
every model the recipe lists, the base too if it is listed, is one of ``task.experts``.

As in mergekit the divisor is used as it is: weights summing to 0 with ``normalize``
give non-finite values, which the engine refuses with a message naming the tensor.
The sum runs chunk by chunk (``CHUNK`` elements) so the float32 accumulator stays in
cache while the inputs stream through once, upcast on the way.
"""

from __future__ import annotations

from typing import Sequence

import torch

from orchestrator.errors import MergeError, RecipeError
from orchestrator.methods.base import MergeResult, MethodSpec, ParamSpec, TensorTask, compute_dtype
from orchestrator.methods.sparsify import chunk_bounds


def linear_merge(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    normalize: bool = True,
    input_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Σ wᵢθᵢ (/ Σ wᵢ), in float32 (float64 for float64 inputs), the inputs' shape.

    ``input_dtype`` (mergekit's ``dtype``) casts each input to it first and rounds the result
    to it, as mergekit 0.1.5 does; the sum itself stays float32 (float64 for float64).
    """
    if not tensors:
        raise ValueError("linear_merge needs at least one tensor")
    if input_dtype is None:
        dtype = compute_dtype(*tensors)
    else:
        dtype = torch.float64 if input_dtype == torch.float64 else torch.float32
    flat = [t.reshape(-1) for t in tensors]
    weights = [float(w) for w in weights]
    divisor = float(torch.tensor(weights, dtype=dtype).sum())
    out = torch.empty(flat[0].numel(), dtype=dtype, device=flat[0].device)  # (n,)

    def piece(tensor: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        values = tensor[start:stop]
        return values if input_dtype is None else values.to(input_dtype)

    for start, stop in chunk_bounds(out.numel()):
        chunk = out[start:stop]
        chunk.copy_(piece(flat[0], start, stop)).mul_(weights[0])
        for tensor, weight in zip(flat[1:], weights[1:]):
            chunk.add_(piece(tensor, start, stop), alpha=weight)
        if normalize:
            chunk.div_(divisor)
    result = out.view(tensors[0].shape)
    return result if input_dtype in (None, dtype) else result.to(input_dtype)


def _merge(task: TensorTask) -> MergeResult:
    shape = task.experts[0].shape
    for i, tensor in enumerate(task.experts):
        if tensor.shape != shape:
            raise MergeError(
                f"tensor '{task.name}': model {i} has shape {tuple(tensor.shape)}, model 0 {tuple(shape)}; "
                "the models must share one architecture"
            )
    weights = []
    for params in task.model_params:
        if "weight" not in params:
            raise RecipeError(f"linear: parameter 'weight' is required for every model (tensor '{task.name}')")
        weights.append(float(params["weight"]))
    normalize = bool(task.global_params.get("normalize", True))
    return MergeResult(linear_merge(task.experts, weights, normalize=normalize, input_dtype=task.compute_dtype))


SPECS: tuple[MethodSpec, ...] = (
    MethodSpec(
        name="linear",
        merge=_merge,
        needs_base=False,
        streams_inputs=True,
        model_params=(ParamSpec("weight", float, doc="this model's weight wᵢ"),),
        global_params=(ParamSpec("normalize", bool, True, "divide by the sum of the weights"),),
        doc="Σ wᵢθᵢ / Σ wᵢ",
    ),
)
