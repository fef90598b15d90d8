"""Micro-benchmark of the methods beyond the task-arithmetic core, against mergekit 0.1.5.

    python bench/methods_micro_more.py [--experts 4] [--rows 5632] [--cols 2048] [--repeat 2] [--threads 1] [--no-mergekit]

Seconds per 5632×2048 bfloat16 tensor with a base and ``--experts`` experts (slerp: the
base and one; nuslerp: two; passthrough: one), the bf16 → float32 upcasts included, for
mergefleet's method and for mergekit's, called in-process on the same tensors (its
``MergeMethod`` on one ``TensorGroup``, dtype float32). Inputs as ``methods_micro.py``.
"""

from __future__ import annotations

import argparse
import time

import torch

from orchestrator.methods import get_method
from orchestrator.methods.base import TensorTask, tensor_seed

# method: (per-model parameters, shared parameters, inputs: "base+n" | "base+1" | "n" | "2" | "1")
CASES = {
    "breadcrumbs": ({"weight": 0.25, "density": 0.2}, {}, "base+n"),
    "breadcrumbs_ties": ({"weight": 0.25, "density": 0.2}, {}, "base+n"),
    "della": ({"weight": 0.25, "density": 0.2}, {}, "base+n"),
    "della_linear": ({"weight": 0.25, "density": 0.2}, {}, "base+n"),
    "slerp": ({}, {"t": 0.3}, "base+1"),
    "nuslerp": ({"weight": 0.5}, {}, "base+2"),
    "multislerp": ({"weight": 0.25}, {}, "base+n"),
    "karcher": ({}, {}, "n"),
    "model_stock": ({}, {}, "base+n"),
    "sce": ({}, {"select_topk": 0.2}, "base+n"),
    "passthrough": ({}, {}, "1"),
}


def make_inputs(experts: int, rows: int, cols: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    base = (torch.randn(rows, cols, generator=generator) * 0.02).bfloat16()
    others = [(base.float() + torch.randn(rows, cols, generator=generator) * 0.002).bfloat16() for _ in range(experts)]
    return base, others


def inputs_for(kind: str, base: torch.Tensor, experts: list[torch.Tensor]) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    return {
        "base+n": (base, experts),
        "base+1": (base, experts[:1]),
        "base+2": (base, experts[:2]),
        "n": (None, experts),
        "1": (None, experts[:1]),
    }[kind]


def best_of(repeat: int, run) -> float:
    run()  # warm up
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


def time_ours(name: str, base, experts, repeat: int) -> float:
    per_model, shared, _ = CASES[name]
    spec = get_method(name)
    task = TensorTask("model.layers.0.mlp.up_proj.weight", base, experts, [dict(per_model) for _ in experts], shared, tensor_seed(0, "x"))
    return best_of(repeat, lambda: spec.merge(task))


def time_mergekit(name: str, base, experts, repeat: int) -> float:
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup

    per_model, shared, _ = CASES[name]
    tensors = ([base] if base is not None else []) + list(experts)
    group = TensorGroup.from_tensors(tensors, base_index=0 if base is not None else None, name="model.layers.0.mlp.up_proj.weight")
    method = registry.get(name)
    known = {p.name for p in method.spec.parameters}
    parameters = {k: v for k, v in {**per_model, **shared}.items() if k in known}
    return best_of(repeat, lambda: method([group], parameters=parameters, dtype=torch.float32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--rows", type=int, default=5632)
    parser.add_argument("--cols", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--methods", default=",".join(CASES))
    parser.add_argument("--no-mergekit", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (a merge worker of 2 on 2 cores runs 1)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    base, experts = make_inputs(args.experts, args.rows, args.cols)
    print(f"{args.experts} bf16 experts of {args.rows}×{args.cols} (+ base), torch threads {torch.get_num_threads()}")
    print(f"{'method':18s}{'mergefleet s':>14s}{'mergekit s':>12s}{'ratio':>8s}")
    for name in args.methods.split(","):
        b, e = inputs_for(CASES[name][2], base, experts)
        ours = time_ours(name, b, e, args.repeat)
        if args.no_mergekit:
            print(f"{name:18s}{ours:14.3f}", flush=True)
            continue
        theirs = time_mergekit(name, b, e, 1)
        print(f"{name:18s}{ours:14.3f}{theirs:12.3f}{theirs / max(ours, 1e-9):>9.1f}x", flush=True)


if __name__ == "__main__":
    main()
