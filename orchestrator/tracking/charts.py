"""Score charts (PNG): merged against base and experts per task, or several merges side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


def score_chart(
    series: dict[str, dict[str, float]],
    path: str | Path,
    *,
    title: str = "",
    owners: dict[str, str] | None = None,
    drop_rates: dict[str, dict[str, float]] | None = None,
) -> Path:
    """``score_figure`` as a PNG."""
    import matplotlib.pyplot as plt

    figure = score_figure(series, title=title, owners=owners, drop_rates=drop_rates)
    path = Path(path)
    figure.savefig(path)
    plt.close(figure)
    return path


def score_figure(
    series: dict[str, dict[str, float]],
    *,
    title: str = "",
    owners: dict[str, str] | None = None,
    drop_rates: dict[str, dict[str, float]] | None = None,
) -> Any:
    """A grouped bar chart: one group per task, one bar per series; ``owners`` (task ->
    series label) marks the expert trained for a task under its name. With ``drop_rates``
    (merge -> protected model -> rate), a second panel beside it shows each merge's
    protected drop rate (the share of a protected model's top-k entries the election discarded)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(task for scores in series.values() for task in scores))
    width = 0.8 / max(1, len(series))
    size = (max(6.0, 1.2 + 1.6 * len(tasks) * max(1, len(series)) * 0.45), 4.2)
    if drop_rates:
        figure, (axes, drops) = plt.subplots(1, 2, figsize=(size[0] + 4.0, size[1]), dpi=110, gridspec_kw={"width_ratios": [size[0], 4.0]})
        _drop_rate_panel(drops, drop_rates)
    else:
        figure, axes = plt.subplots(figsize=size, dpi=110)
    colours = plt.get_cmap("tab10")
    for n, (label, scores) in enumerate(series.items()):
        xs = [i + (n - (len(series) - 1) / 2) * width for i in range(len(tasks))]
        values = [scores.get(task, float("nan")) for task in tasks]
        colour = "black" if label == "merged" else ("0.65" if label == "base" else colours(n % 10))
        bars = axes.bar(xs, values, width * 0.92, label=label, color=colour)
        axes.bar_label(bars, labels=[f"{v:.2f}" if v == v else "" for v in values], fontsize=7, padding=1)
    axes.set_xticks(range(len(tasks)), [f"{t}\n(held in: {owners[t]})" if owners and t in owners else t for t in tasks])
    _finish_score_axes(figure, axes, list(series.values()), title)
    return figure


def _finish_score_axes(figure: Any, axes: Any, series: list[dict[str, float]], title: str) -> None:
    """Score axis from 0 to a little above the highest score, grid, legend outside, title."""
    axes.set_ylabel("score (primary metric)")
    top = max([v for scores in series for v in scores.values()] + [1.0])
    axes.set_ylim(0, top * 1.12)
    axes.grid(axis="y", alpha=0.3)
    axes.set_axisbelow(True)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    if title:
        axes.set_title(title, fontsize=10)
    figure.tight_layout()


def _drop_rate_panel(axes: Any, drop_rates: dict[str, dict[str, float]]) -> None:
    """One bar per (merge, protected model), grouped by merge."""
    labels, values = [], []
    for merge, rates in drop_rates.items():
        for model, rate in rates.items():
            labels.append(f"{merge}\n({model})" if len(rates) > 1 else merge)
            values.append(rate)
    bars = axes.bar(range(len(values)), values, 0.7, color="tab:red")
    axes.bar_label(bars, labels=[f"{v:.1%}" for v in values], fontsize=7, padding=1)
    axes.set_xticks(range(len(values)), labels, fontsize=7)
    axes.set_ylabel("protected drop rate")
    axes.set_ylim(0, max(values + [0.05]) * 1.2)
    axes.grid(axis="y", alpha=0.3)
    axes.set_axisbelow(True)
    axes.set_title("protected top-k entries lost to the election", fontsize=8)


def comparison_chart(
    merges: dict[str, dict[str, float]],
    references: dict[str, dict[str, float]],
    path: str | Path,
    *,
    title: str = "",
) -> Path:
    """``comparison_figure`` as a PNG."""
    import matplotlib.pyplot as plt

    figure = comparison_figure(merges, references, title=title)
    path = Path(path)
    figure.savefig(path)
    plt.close(figure)
    return path


def comparison_figure(merges: dict[str, dict[str, float]], references: dict[str, dict[str, float]], *, title: str = "") -> Any:
    """Every merge of an experiment side by side: per task, one bar per merge (its score),
    and each reference (base, experts) as a horizontal line across the task's bars, so a
    bar above a line beat that checkpoint."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(task for scores in [*merges.values(), *references.values()] for task in scores))
    width = 0.8 / max(1, len(merges))
    figure, axes = plt.subplots(figsize=(max(6.0, 1.5 + 0.5 * len(tasks) * max(2, len(merges))), 4.4), dpi=110)
    colours = plt.get_cmap("tab10")
    for n, (label, scores) in enumerate(merges.items()):
        xs = [i + (n - (len(merges) - 1) / 2) * width for i in range(len(tasks))]
        values = [scores.get(task, float("nan")) for task in tasks]
        bars = axes.bar(xs, values, width * 0.92, label=label, color=colours(n % 10))
        axes.bar_label(bars, labels=[f"{v:.2f}" if v == v else "" for v in values], fontsize=7, padding=1)
    styles = ["--", ":", "-.", (0, (5, 1, 1, 1))]
    for n, (label, scores) in enumerate(references.items()):
        colour = "0.35" if label == "base" else plt.get_cmap("Dark2")(n % 8)
        for i, task in enumerate(tasks):
            if task in scores:
                axes.hlines(
                    scores[task], i - 0.45, i + 0.45, colors=[colour], linestyles=styles[n % len(styles)], linewidth=1.6,
                    label=label if i == min(j for j, t in enumerate(tasks) if t in scores) else None,
                )
    axes.set_xticks(range(len(tasks)), tasks)
    _finish_score_axes(figure, axes, [*merges.values(), *references.values()], title)
    return figure
