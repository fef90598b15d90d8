"""Tables for the terminal that stay readable however narrow it is, or when piped.

A table that fits the console's width is printed as columns. One that does not becomes
one block per row, ``column: value`` per line, instead of squeezing every cell to a
letter or two.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from orchestrator.evaluate.scores import Evaluation

PADDING = 2
"""Spaces between two columns."""


def natural_width(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> int:
    """Characters a table needs to show every header and cell on one line."""
    widths = [max([len(name), *(len(row[i]) for row in rows)]) for i, name in enumerate(columns)]
    return sum(widths) + PADDING * (len(columns) - 1)


def print_table(console: Console, columns: Sequence[str], rows: Sequence[Sequence[str]], *, left: int = 1) -> None:
    """Print ``rows`` under ``columns``; the first ``left`` columns are left-aligned (names),
    the rest right-aligned (numbers). Too wide for the console: one block per row, its first
    cell as the block's title."""
    if natural_width(columns, rows) <= console.width:
        table = Table(show_edge=False, pad_edge=False, box=None, padding=(0, PADDING // 2), header_style="bold")
        for i, name in enumerate(columns):
            table.add_column(name, justify="left" if i < left else "right", no_wrap=True)
        for row in rows:
            table.add_row(*row)
        console.print(table)
        return
    label = max(len(name) for name in columns[1:]) if len(columns) > 1 else 0
    for row in rows:
        console.print(f"{columns[0]} {row[0]}", highlight=False, markup=False, soft_wrap=False)
        for name, cell in zip(columns[1:], row[1:]):
            console.print(f"  {name:<{label}}  {cell}", highlight=False, markup=False, soft_wrap=False)


def score_table(evaluation: Evaluation) -> tuple[list[str], list[list[str]]]:
    """Columns and rows of a merge's scores: one row per task; base, each expert (by its
    directory name when those differ), the merge, and the merge normalised by its reference."""
    short = {name: name.rstrip("/").rsplit("/", 1)[-1] or name for name in evaluation.experts}
    unique = len(set(short.values())) == len(short)
    experts = {(short[name] if unique else name): scores.scores for name, scores in evaluation.experts.items()}
    base = evaluation.base.scores if evaluation.base else None
    columns = ["task", *(["base"] if base is not None else []), *experts, "merged", "normalised"]
    rows = []
    for task in evaluation.tasks:
        normalised = evaluation.normalised.get(task)
        rows.append([
            task,
            *([_score(base.get(task))] if base is not None else []),
            *(_score(scores.get(task)) for scores in experts.values()),
            _score(evaluation.merged.scores.get(task)),
            "" if normalised is None else f"{normalised:.2f}",
        ])
    return columns, rows


def _score(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"
