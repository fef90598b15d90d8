"""Training data of a trained merge: local JSONL, one example per line.

    {"text": "any text"}                              every token is scored
    {"prompt": "add: 2+3 =", "completion": " 05"}    only the completion's tokens are scored

The prompt and the completion are tokenized apart and joined, so the boundary is exact.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from orchestrator.errors import TrainingError


@dataclass(frozen=True)
class TokenizedExample:
    ids: tuple[int, ...]
    first_scored: int  # the first token whose prediction counts (≥ 1: token 0 is never predicted)


@dataclass(frozen=True)
class Batch:
    ids: torch.Tensor  # (batch, length) token ids, right-padded
    attention: torch.Tensor  # (batch, length) 1 on real tokens
    scored: torch.Tensor  # (batch, length - 1) bool: the logits at position t predict a scored token t + 1

    @property
    def scored_tokens(self) -> int:
        return int(self.scored.sum())


def read_examples(path: str | Path) -> list[dict[str, str]]:
    """The examples of a JSONL file; names the file and line of the first bad one."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise TrainingError(f"training data {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise TrainingError(f"cannot read training data {path}: {error}") from None
    rows: list[dict[str, str]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row: Any = json.loads(line)
        except json.JSONDecodeError as error:
            raise TrainingError(f"{path}:{number} is not valid JSON ({error.msg}); one JSON object per line") from None
        text_only = isinstance(row, dict) and isinstance(row.get("text"), str)
        paired = isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str)
        if not (text_only or paired):
            raise TrainingError(
                f"{path}:{number}: each line needs a string 'text', or strings 'prompt' and 'completion'"
            )
        rows.append({"text": row["text"]} if text_only else {"prompt": row["prompt"], "completion": row["completion"]})
    if not rows:
        raise TrainingError(f"training data {path} holds no examples")
    return rows


def tokenize(rows: Sequence[dict[str, str]], tokenizer: Any, max_length: int, *, source: str = "data") -> list[TokenizedExample]:
    """Token ids per example, cut to ``max_length``; an example with nothing left to score is dropped."""
    examples = []
    for row in rows:
        if "text" in row:
            ids = list(tokenizer(row["text"]).input_ids)
            first = 1
        else:
            prompt = list(tokenizer(row["prompt"]).input_ids)
            completion = list(tokenizer(row["completion"], add_special_tokens=False).input_ids)
            ids, first = prompt + completion, max(1, len(prompt))
        ids = ids[:max_length]
        if len(ids) > first:
            examples.append(TokenizedExample(tuple(ids), first))
    if not examples:
        raise TrainingError(f"{source}: no example has a token to learn from within max_length {max_length}")
    return examples


def make_batches(examples: Sequence[TokenizedExample], batch_size: int, *, pad_id: int, seed: int) -> list[Batch]:
    """Shuffled (by ``seed``) batches, each padded to its longest example."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    batches = []
    for start in range(0, len(order), batch_size):
        chosen = [examples[i] for i in order[start : start + batch_size]]
        length = max(len(e.ids) for e in chosen)
        ids = torch.full((len(chosen), length), pad_id, dtype=torch.long)
        attention = torch.zeros((len(chosen), length), dtype=torch.long)
        scored = torch.zeros((len(chosen), length - 1), dtype=torch.bool)
        for row, example in enumerate(chosen):
            n = len(example.ids)
            ids[row, :n] = torch.tensor(example.ids)
            attention[row, :n] = 1
            scored[row, example.first_scored - 1 : n - 1] = True
        batches.append(Batch(ids, attention, scored))
    return batches
