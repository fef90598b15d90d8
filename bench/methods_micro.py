"""Micro-benchmark of the merge methods on one tensor: seconds per 5632×2048 tensor.

    python bench/methods_micro.py [--experts 4] [--rows 5632] [--cols 2048] [--repeat 3] [--mergekit]

The inputs are bfloat16, like a real checkpoint: a base ~ N(0, 0.02) and experts that
differ from it by ~ N(0, 0.002) (so task vectors are quantised and have exact ties).
Timings include the bf16 → float32 upcasts. ``--mergekit`` also times mergekit 0.1.5's
own sparsifier and sign-mask functions on the same data, as its ties would run them.
"""

from __future__ import annotations

import argparse
import time

import torch

from orchestrator.methods import get_method
from orchestrator.methods.base import TensorTask, tensor_seed

CASES = {
    "linear": ({}, {}),
    "task_arithmetic": ({}, {}),
    "ties": ({"density": 0.2}, {}),
    "dare_ties": ({"density": 0.2}, {}),
    "dare_linear": ({"density": 0.2}, {}),
    "ties_sv": ({"density": 0.2}, {"slack": 0.1}),
}


def make_inputs(experts: int, rows: int, cols: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    base = (torch.randn(rows, cols, generator=generator) * 0.02).bfloat16()
    others = [
        (base.float() + torch.randn(rows, cols, generator=generator) * 0.002).bfloat16() for _ in range(experts)
    ]
    return base, others


def time_method(name: str, base: torch.Tensor, experts: list[torch.Tensor], repeat: int) -> float:
    method = get_method(name)
    model_extra, global_params = CASES[name]
    params = [{"weight": 1.0 / len(experts), **model_extra} for _ in experts]
    if name == "ties_sv":
        params[0]["protect"] = True
    if method.needs_base:
        task = TensorTask("model.layers.0.mlp.up_proj.weight", base, experts, params, global_params, tensor_seed(0, "x"))
    else:
        task = TensorTask("model.layers.0.mlp.up_proj.weight", None, experts, params, global_params)
    method.merge(task)  # warm up
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        method.merge(task)
        best = min(best, time.perf_counter() - started)
    return best


def time_mergekit_ties(base: torch.Tensor, experts: list[torch.Tensor], density: float) -> float:
    """mergekit 0.1.5's ties steps on one tensor: upcast, magnitude sparsify, sign mask, sum."""
    from mergekit.merge_methods.generalized_task_arithmetic import get_mask
    from mergekit.sparsify import magnitude

    started = time.perf_counter()
    base32 = base.float()
    deltas = torch.stack([magnitude(e.float() - base32, density) for e in experts])
    weights = torch.full((len(experts), 1, 1), 1.0 / len(experts))
    deltas.mul_(weights)
    mask = get_mask(deltas, method="sum", mask_dtype=deltas.dtype)
    mixed = (deltas * mask).sum(dim=0)
    divisor = (weights * mask).sum(dim=0)
    divisor[divisor == 0] = 1
    mixed /= divisor
    _ = base32 + mixed
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--rows", type=int, default=5632)
    parser.add_argument("--cols", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--mergekit", action="store_true", help="also time mergekit's ties functions")
    parser.add_argument("--methods", default=",".join(CASES))
    args = parser.parse_args()

    base, experts = make_inputs(args.experts, args.rows, args.cols)
    print(f"{args.experts} bf16 experts of {args.rows}×{args.cols}, torch threads {torch.get_num_threads()}")
    for name in args.methods.split(","):
        seconds = time_method(name, base, experts, args.repeat)
        print(f"{name:16s} {seconds:7.3f} s/tensor")
    if args.mergekit:
        seconds = time_mergekit_ties(base, experts, 0.2)
        print(f"{'mergekit ties':16s} {seconds:7.3f} s/tensor (its functions, one run)")


if __name__ == "__main__":
    main()
