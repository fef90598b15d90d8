"""Charts of the trained merges: DAM's loss curve, a ranking of candidates."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(plt, figure, axes, path: str | Path, title: str) -> Path:  # type: ignore[no-untyped-def]
    if title:
        axes.set_title(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return Path(path)


def loss_chart(steps: Sequence[int], series: dict[str, Sequence[float]], path: str | Path, *, title: str = "") -> Path:
    """One line per series (total loss, each expert's KL) against the training step."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    for label, values in series.items():
        axes.plot(list(steps), list(values), label=label, linewidth=1.4 if label == "total" else 1.0)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, frameon=False)
    return _save(plt, figure, axes, path, title)


def ranking_chart(labels: Sequence[str], scores: Sequence[float], path: str | Path, *, title: str = "", highlight: int = 0) -> Path:
    """Horizontal bars, best first; bar ``highlight`` (the pick) in black."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6.4, max(2.4, 0.32 * len(labels) + 1.2)), dpi=110)
    positions = list(range(len(labels)))[::-1]
    colours = ["black" if i == highlight else "tab:blue" for i in range(len(labels))]
    bars = axes.barh(positions, list(scores), color=colours)
    axes.bar_label(bars, labels=[f"{s:.3f}" for s in scores], fontsize=7, padding=2)
    axes.set_yticks(positions, list(labels), fontsize=8)
    axes.set_xlabel("score on the target task(s)")
    axes.set_xlim(0, max(list(scores) + [1.0]) * 1.12)
    axes.grid(axis="x", alpha=0.3)
    return _save(plt, figure, axes, path, title)
