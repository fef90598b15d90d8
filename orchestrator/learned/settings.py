"""Recipe settings of the trained merges: ``fleet.dam`` (see docs/learned.md)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*$", re.IGNORECASE)


def parse_bytes(value: int | str) -> int:
    """``8GB`` (10⁹), ``8GiB`` (2³⁰), ``512MB`` or a plain number of bytes."""
    if isinstance(value, int):
        return value
    match = _SIZE.match(value)
    if match is None:
        raise ValueError(f"'{value}' is not a size; write e.g. 24GB, 24GiB or 512MB")
    number, unit, binary = float(match.group(1)), match.group(2).upper(), bool(match.group(3))
    power = "_KMGT".index(unit) if unit else 0
    return int(number * (1024 if binary else 1000) ** power)


class DamSettings(BaseModel):
    """``fleet.dam``: how ``mergefleet dam train`` learns the coefficients that ``dam_apply`` applies.

    ``data`` maps every expert (as the recipe names it) to a local JSONL file of that
    expert's own data: one ``{"text": ...}`` or ``{"prompt": ..., "completion": ...}`` per line.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    data: dict[str, str] = Field(min_length=1)
    temperature: float = Field(default=2.0, gt=0)
    similarity_weight: float = Field(default=0.01, ge=0)  # λ_sim on the mean pairwise cosine per tensor
    l1: float = Field(default=0.0, ge=0)
    l2: float = Field(default=0.0, ge=0)
    lr: float = Field(default=1e-3, gt=0)
    epochs: int = Field(default=1, ge=1)
    batch_size: int = Field(default=8, ge=1)
    max_length: int = Field(default=512, ge=2)
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"  # the experts as held in memory
    device: str = "cpu"
    seed: int = 0
    memory_limit: int | str | None = None  # default: the memory available on the device

    @field_validator("memory_limit")
    @classmethod
    def _size(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, str):
            parse_bytes(value)
        return value

    def memory_limit_bytes(self) -> int | None:
        return None if self.memory_limit is None else parse_bytes(self.memory_limit)
