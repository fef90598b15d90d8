"""Micro-benchmark of every method, per tensor, against mergekit 0.1.5 in-process.

    python bench/methods_micro_more.py [--experts 4] [--rows 5632] [--cols 2048] [--repeat 2] [--threads 1]
                                       [--dtype bfloat16|float32] [--cpu] [--no-mergekit] [--methods ties,ram]

Seconds per 5632×2048 bfloat16 tensor with a base and ``--experts`` experts (slerp,
nearswap, arcee_fusion: the base and one; nuslerp: two; passthrough: one), for
mergefleet's method and for mergekit's, called in-process on the same tensors (its
``MergeMethod`` on one ``TensorGroup``). ``--dtype`` is the recipe's dtype: mergekit casts
to it and computes in it; mergefleet runs its match-mergekit arithmetic in it (column
"match"), and its float32 precision (column "float32"). ``--cpu`` reports the process's
CPU seconds instead of wall seconds: on a loaded machine they vary far less. Inputs as
``methods_micro.py``.
"""

from __future__ import annotations

import argparse
import time

import torch

from orchestrator.methods import get_method
from orchestrator.methods.base import TensorTask, tensor_seed

# method: (per-model parameters, shared parameters, inputs: "base+n" | "base+1" | "n" | "2" | "1")
CASES = {
    "linear": ({"weight": 0.25}, {}, "n"),
    "task_arithmetic": ({"weight": 0.25}, {}, "base+n"),
    "ties": ({"weight": 0.25, "density": 0.2}, {}, "base+n"),
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
    "nearswap": ({}, {"t": 0.001}, "base+1"),
    "arcee_fusion": ({}, {}, "base+1"),
    "ram": ({}, {}, "base+n"),
    "ramplus_tl": ({}, {}, "base+n"),
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


def best_of(repeat: int, run, *, cpu: bool = False) -> float:
    clock = time.process_time if cpu else time.perf_counter
    run()  # warm up
    best = float("inf")
    for _ in range(repeat):
        started = clock()
        run()
        best = min(best, clock() - started)
    return best


def time_ours(name: str, base, experts, repeat: int, *, compute_dtype: torch.dtype | None, cpu: bool) -> float:
    per_model, shared, _ = CASES[name]
    spec = get_method(name)
    model_params = [{p.name: p.default for p in spec.model_params if not p.required} | per_model for _ in experts]
    global_params = {p.name: p.default for p in spec.global_params if not p.required} | shared
    task = TensorTask("model.layers.0.mlp.up_proj.weight", base, experts, model_params, global_params, tensor_seed(0, "x"), compute_dtype)
    return best_of(repeat, lambda: spec.merge(task), cpu=cpu)


def time_mergekit(name: str, base, experts, repeat: int, *, dtype: torch.dtype, cpu: bool) -> float:
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup

    per_model, shared, _ = CASES[name]
    tensors = ([base] if base is not None else []) + list(experts)
    group = TensorGroup.from_tensors(tensors, base_index=0 if base is not None else None, name="model.layers.0.mlp.up_proj.weight")
    method = registry.get(name)
    known = {p.name for p in method.spec.parameters}
    parameters = {k: v for k, v in {**per_model, **shared}.items() if k in known}
    return best_of(repeat, lambda: method([group], parameters=parameters, dtype=dtype), cpu=cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--rows", type=int, default=5632)
    parser.add_argument("--cols", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--methods", default=",".join(CASES))
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--cpu", action="store_true", help="CPU seconds of this process instead of wall seconds")
    parser.add_argument("--no-mergekit", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (a merge worker of 2 on 2 cores runs 1)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    base, experts = make_inputs(args.experts, args.rows, args.cols)
    base, experts = base.to(dtype), [e.to(dtype) for e in experts]
    clock = "CPU s" if args.cpu else "s"
    print(f"{args.experts} {args.dtype} experts of {args.rows}×{args.cols} (+ base), torch threads {torch.get_num_threads()}, {clock} per tensor")
    print(f"{'method':18s}{'match':>10s}{'float32':>10s}{'mergekit':>10s}{'ratio':>8s}")
    for name in args.methods.split(","):
        b, e = inputs_for(CASES[name][2], base, experts)
        match = time_ours(name, b, e, args.repeat, compute_dtype=dtype, cpu=args.cpu)
        float32 = time_ours(name, b, e, args.repeat, compute_dtype=None, cpu=args.cpu)
        theirs = float("nan") if args.no_mergekit else time_mergekit(name, b, e, 1, dtype=dtype, cpu=args.cpu)
        print(f"{name:18s}{match:10.3f}{float32:10.3f}{theirs:10.3f}{theirs / max(match, 1e-9):>7.1f}x", flush=True)


if __name__ == "__main__":
    main()
