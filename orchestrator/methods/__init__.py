"""The merge methods, by the name a recipe's ``merge_method`` uses (mergekit's names).

Every method module looks alike: pure function(s) on tensors, then ``SPECS``, the
``MethodSpec`` of each method it registers. The engine calls ``get_method(name).merge``
with one ``TensorTask`` per tensor.

A method's module is imported when the method is first asked for, so a worker process
that merges with one method does not pay for importing the others; ``METHODS`` (every
method) imports them all.
"""

from __future__ import annotations

import importlib
from typing import Any

from orchestrator.errors import RecipeError
from orchestrator.methods.base import MethodSpec

MODULE_OF: dict[str, str] = {
    "linear": "linear",
    **dict.fromkeys(
        (
            "task_arithmetic",
            "ties",
            "dare_ties",
            "dare_linear",
            "ties_sv",
            "breadcrumbs",
            "breadcrumbs_ties",
            "della",
            "della_linear",
        ),
        "task_arithmetic",
    ),
    "slerp": "slerp",
    "nuslerp": "slerp",
    "multislerp": "multislerp",
    "karcher": "karcher",
    "model_stock": "model_stock",
    "sce": "sce",
    "passthrough": "passthrough",
    "nearswap": "nearswap",
    "arcee_fusion": "arcee_fusion",
    "ram": "ram",
    "ramplus_tl": "ram",
    "dam_apply": "dam_apply",
}
"""Each method's module under orchestrator.methods (a test checks it against the modules' SPECS)."""


def _specs_of(module: str) -> dict[str, MethodSpec]:
    specs = importlib.import_module(f"{__name__}.{module}").SPECS
    return {spec.name: spec for spec in specs}


def get_method(name: str) -> MethodSpec:
    """The method registered under ``name``; a RecipeError listing the names otherwise."""
    module = MODULE_OF.get(name)
    if module is None:
        available = ", ".join(sorted(MODULE_OF))
        raise RecipeError(f"unknown merge_method {name!r}; available: {available}")
    return _specs_of(module)[name]


def __getattr__(attribute: str) -> Any:
    """``METHODS``: every method by name (imports every method module)."""
    if attribute == "METHODS":
        return {name: spec for module in dict.fromkeys(MODULE_OF.values()) for name, spec in _specs_of(module).items()}
    raise AttributeError(f"module {__name__!r} has no attribute {attribute!r}")


__all__ = ["METHODS", "MODULE_OF", "get_method"]
