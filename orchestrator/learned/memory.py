"""How much memory DAM training needs, estimated from headers and config before any
weight is read (docs/learned.md gives the formula), and the check that stops it early."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from orchestrator.errors import TrainingError
from orchestrator.learned.settings import DamSettings

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes DAM training holds at its peak, by part (docs/learned.md gives the formula)."""

    parts: dict[str, int]
    available: int | None  # the limit it was checked against

    @property
    def total(self) -> int:
        return sum(self.parts.values())


@dataclass(frozen=True)
class ModelShape:
    parameters: int  # elements of every tensor of one expert
    largest: int  # elements of its largest tensor
    coefficients: int  # Σ of every tensor's last dimension
    layers: int
    hidden: int
    intermediate: int
    heads: int
    vocab: int

    @classmethod
    def of(cls, config: Mapping[str, Any], shapes: Mapping[str, Sequence[int]]) -> "ModelShape":
        sizes = [math.prod(shape) for shape in shapes.values()]
        hidden = int(config.get("hidden_size") or config.get("n_embd") or config.get("d_model") or 0)
        return cls(
            parameters=sum(sizes),
            largest=max(sizes, default=0),
            coefficients=sum(int(shape[-1]) if shape else 1 for shape in shapes.values()),
            layers=int(config.get("num_hidden_layers") or config.get("n_layer") or 0),
            hidden=hidden,
            intermediate=int(config.get("intermediate_size") or config.get("n_inner") or 4 * hidden),
            heads=int(config.get("num_attention_heads") or config.get("n_head") or 1),
            vocab=int(config.get("vocab_size") or 0),
        )


def estimate_memory(shape: ModelShape, experts: int, settings: DamSettings, *, available: int | None = None) -> MemoryEstimate:
    """Peak bytes of training: every expert once, the merged weights of one forward (kept for
    its backward), float32 scratch for the largest tensor, the coefficients with their
    gradients and AdamW's two moments, the activations of one batch and its logits."""
    weight = DTYPE_BYTES[settings.dtype]
    batch, length = settings.batch_size, settings.max_length
    per_token_layer = 10 * shape.hidden + 4 * shape.intermediate + 2 * shape.heads * length
    parts = {
        "experts": experts * shape.parameters * weight,
        "merged_weights": shape.parameters * weight,
        "float32_scratch": 3 * shape.largest * 4,
        "coefficients": 4 * experts * shape.coefficients * 4,
        "activations": batch * length * shape.layers * per_token_layer * weight,
        "logits": 6 * batch * length * shape.vocab * 4,
    }
    return MemoryEstimate(parts=parts, available=available)


def available_memory(device: str) -> int | None:
    """Free memory on ``device``: CUDA's free bytes, or the host's MemAvailable."""
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainingError(f"device {device}: no CUDA device is visible; use device: cpu")
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def _gib(count: int) -> str:
    return f"{count / 2**30:.2f} GiB"


def check_memory(estimate: MemoryEstimate) -> None:
    if estimate.available is not None and estimate.total > estimate.available:
        largest = ", ".join(f"{name} {_gib(size)}" for name, size in sorted(estimate.parts.items(), key=lambda kv: -kv[1])[:3])
        raise TrainingError(
            f"DAM training needs about {_gib(estimate.total)} ({largest}, ...) but {_gib(estimate.available)} is available; "
            "lower fleet.dam.batch_size or max_length, hold the experts in bfloat16 (fleet.dam.dtype), "
            "or raise fleet.dam.memory_limit if more is free"
        )
