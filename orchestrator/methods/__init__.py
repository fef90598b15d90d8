"""The merge methods, by the name a recipe's ``merge_method`` uses (mergekit's names).

Every method module looks alike: pure function(s) on tensors, then ``SPECS``, the
``MethodSpec`` of each method it registers. The engine calls ``get_method(name).merge``
with one ``TensorTask`` per tensor.
"""

from __future__ import annotations

from orchestrator.errors import RecipeError
from orchestrator.methods import (
    arcee_fusion,
    dam_apply,
    karcher,
    linear,
    model_stock,
    multislerp,
    nearswap,
    passthrough,
    ram,
    sce,
    slerp,
    task_arithmetic,
)
from orchestrator.methods.base import MethodSpec

_MODULES = (linear, task_arithmetic, slerp, multislerp, karcher, model_stock, sce, passthrough, nearswap, arcee_fusion, ram, dam_apply)
METHODS: dict[str, MethodSpec] = {spec.name: spec for module in _MODULES for spec in module.SPECS}


def get_method(name: str) -> MethodSpec:
    """The method registered under ``name``; a RecipeError listing the names otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        available = ", ".join(sorted(METHODS))
        raise RecipeError(f"unknown merge_method {name!r}; available: {available}") from None


__all__ = ["METHODS", "get_method"]
