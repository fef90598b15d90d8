"""dam_apply: apply DAM coefficients (``mergefleet dam train``) as an ordinary per-tensor merge.

    θ = Σᵢ cᵢ ⊙ θᵢ      cᵢ along θ's last dimension: W·diag(cᵢ) for a linear layer's
                        input columns, per dimension for an embedding, per element for a norm

The coefficient file is named by the global parameter ``coefficients`` (a local path or
s3:// URI, read with the environment's S3 settings); the plan checks that it holds an
entry of the right shape for every tensor and was trained for these models in this order.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from orchestrator.errors import MergeError
from orchestrator.learned.coefficients import check_entry, check_experts, read_coefficients
from orchestrator.methods.base import REQUIRED, MergeResult, MethodSpec, ParamSpec, TensorTask, compute_dtype


def dam_merge(experts: Sequence[torch.Tensor], coefficients: torch.Tensor) -> torch.Tensor:
    """Σᵢ cᵢ ⊙ θᵢ in float32 (float64 for float64 inputs); ``coefficients`` is (experts, shape[-1])."""
    dtype = compute_dtype(*experts)
    scale = coefficients.to(dtype)
    out = torch.zeros(experts[0].shape, dtype=dtype, device=experts[0].device)
    for i, expert in enumerate(experts):
        out.addcmul_(expert.to(dtype), scale[i].to(expert.device))
    return out


def _merge(task: TensorTask) -> MergeResult:
    shape = tuple(task.experts[0].shape)
    for i, tensor in enumerate(task.experts):
        if tuple(tensor.shape) != shape:
            raise MergeError(f"tensor '{task.name}': model {i} has shape {tuple(tensor.shape)}, model 0 {shape}")
    coefficients = read_coefficients(str(task.global_params["coefficients"]))
    entry = check_entry(coefficients, task.name, shape, len(task.experts))
    return MergeResult(dam_merge(task.experts, entry))


def check_tensor(name: str, shape: Sequence[int], models: Sequence[str], global_params: Mapping[str, Any]) -> None:
    """At plan time: the file is there, trained for these models, with this tensor's entry."""
    coefficients = read_coefficients(str(global_params["coefficients"]))
    check_experts(coefficients, list(models))
    check_entry(coefficients, name, shape, len(models))


SPECS: tuple[MethodSpec, ...] = (
    MethodSpec(
        name="dam_apply",
        merge=_merge,
        needs_base=False,
        global_params=(ParamSpec("coefficients", str, REQUIRED, "the DAM coefficient file (local path or s3://)"),),
        check_tensor=check_tensor,
        doc="Σᵢ cᵢ ⊙ θᵢ with trained per-column coefficients",
    ),
)
