"""Score charts (PNG): merged against base and experts per task, or several merges side by side."""

from __future__ import annotations

from pathlib import Path

from orchestrator.evaluate.scores import Evaluation


def score_series(evaluation: Evaluation, labels: dict[str, str] | None = None) -> dict[str, dict[str, float]]:
    """Primary scores per task of base, each expert and the merge, in that order."""
    series: dict[str, dict[str, float]] = {}
    if evaluation.base is not None:
        series["base"] = evaluation.base.scores
    for name, scores in evaluation.experts.items():
        series[(labels or {}).get(name, Path(name.rstrip("/")).name)] = scores.scores
    series["merged"] = evaluation.merged.scores
    return series


def score_chart(series: dict[str, dict[str, float]], path: str | Path, *, title: str = "", owners: dict[str, str] | None = None) -> Path:
    """A grouped bar chart (PNG): one group per task, one bar per series; ``owners`` (task ->
    series label) marks the expert trained for a task under its name."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(task for scores in series.values() for task in scores))
    width = 0.8 / max(1, len(series))
    figure, axes = plt.subplots(figsize=(max(6.0, 1.2 + 1.6 * len(tasks) * max(1, len(series)) * 0.45), 4.2), dpi=110)
    colours = plt.get_cmap("tab10")
    for n, (label, scores) in enumerate(series.items()):
        xs = [i + (n - (len(series) - 1) / 2) * width for i in range(len(tasks))]
        values = [scores.get(task, float("nan")) for task in tasks]
        colour = "black" if label == "merged" else ("0.65" if label == "base" else colours(n % 10))
        bars = axes.bar(xs, values, width * 0.92, label=label, color=colour)
        axes.bar_label(bars, labels=[f"{v:.2f}" if v == v else "" for v in values], fontsize=7, padding=1)
    axes.set_xticks(range(len(tasks)), [f"{t}\n(held in: {owners[t]})" if owners and t in owners else t for t in tasks])
    axes.set_ylabel("score (primary metric)")
    top = max([v for scores in series.values() for v in scores.values()] + [1.0])
    axes.set_ylim(0, top * 1.12)
    axes.grid(axis="y", alpha=0.3)
    axes.set_axisbelow(True)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    if title:
        axes.set_title(title, fontsize=10)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path)
    plt.close(figure)
    return path
