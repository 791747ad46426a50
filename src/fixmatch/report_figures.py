"""The report's PNG figures, drawn with matplotlib (Agg: files only) from the runs' metrics.jsonl rows.

Curves are the mean over a configuration's seeds at each evaluation step. Each function writes one file and
returns its caption; ``make_figures`` skips (with a note) the figures a study has nothing for, such as the
mask rate of a study of supervised runs only.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib
import torch

matplotlib.use("Agg")  # no display: files only
import matplotlib.pyplot as plt  # noqa: E402

from fixmatch.atomic import atomic_path  # noqa: E402
from fixmatch.evaluate import draw_confusion  # noqa: E402

if TYPE_CHECKING:
    from fixmatch.report import Group, Run

LINESTYLES = {"fixmatch": "-", "supervised": "--"}


def _save(fig: Any, path: Path) -> None:
    """Atomic: a reader (or a browser) never sees half a PNG."""
    try:
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=90)
    finally:
        plt.close(fig)


def mean_curve(runs: list[Run], key: str, transform: Callable[[Run, dict], float] | None = None
               ) -> tuple[list[int], list[float]]:
    """Mean over runs of ``key`` (or ``transform(run, row)``) at each evaluation step any run logged."""
    by_step: dict[int, list[float]] = {}
    for run in runs:
        for row in run.rows:
            value = transform(run, row) if transform else row.get(key)
            if value is not None:
                by_step.setdefault(row["step"], []).append(float(value))
    steps = sorted(by_step)
    return steps, [sum(by_step[s]) / len(by_step[s]) for s in steps]


def several_label_counts(groups: list[Group]) -> bool:
    """Whether the label count varies: else figures by label count say nothing and show configurations."""
    return len({g.config["num_labels"] for g in groups}) > 1


def best_mean_std(group: Group) -> tuple[float, float | None]:
    """Mean and sample std over the group's seeds of each run's best test accuracy."""
    from fixmatch.report import mean_std

    return mean_std([r.summary["test_acc_best"] for r in group.runs])


def _legend(ax: Any, n: int) -> None:
    if n:
        ax.legend(fontsize=7, loc="best")


def accuracy_vs_step(groups: list[Group], path: Path) -> str:
    models = sorted({g.config["model"] for g in groups})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.2), squeeze=False, sharey=True)
    labels = sorted({g.config["num_labels"] for g in groups})
    by_labels = several_label_counts(groups)

    def colour(g: Group) -> Any:
        if by_labels:
            return plt.get_cmap("viridis")(labels.index(g.config["num_labels"]) / (len(labels) - 1) * 0.9)
        return plt.get_cmap("tab10")(groups.index(g) % 10)

    for ax, model in zip(axes[0], models):
        members = [g for g in groups if g.config["model"] == model]
        for g in members:
            steps, acc = mean_curve(g.runs, "test_acc")
            ax.plot(steps, acc, LINESTYLES.get(g.config["method"], ":"), color=colour(g), label=g.label)
        ax.set_title(model)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        _legend(ax, len(members))
    axes[0][0].set_ylabel("test accuracy (%), mean over seeds")
    _save(fig, path)
    what = "number of labels" if by_labels else "configuration"
    return f"Test accuracy (EMA) against step; colour: {what}, solid: FixMatch, dashed: supervised."


def best_vs_labels(groups: list[Group], path: Path) -> str:
    """One line per configuration apart from the label count (method, model, ...), error bars = std over seeds."""
    series: dict[str, list[tuple[int, float, float]]] = {}
    for g in groups:
        name = ", ".join(f"{k}={v}" for k, v in g.values.items() if k != "num_labels") or g.config["method"]
        mean, std = best_mean_std(g)
        series.setdefault(name, []).append((g.config["num_labels"], mean, std or 0.0))
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, points in sorted(series.items()):
        points.sort()
        ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], marker="o",
                    capsize=3, label=name)
    ax.set_xscale("log")
    counts = sorted({p[0] for points in series.values() for p in points})
    ax.set_xticks(counts, [str(c) for c in counts])  # the label counts themselves, not powers of ten
    ax.minorticks_off()
    ax.set_xlabel("labeled images (log scale)")
    ax.set_ylabel("best test accuracy (%)")
    ax.grid(alpha=0.3, which="both")
    _legend(ax, len(series))
    _save(fig, path)
    return "Best test accuracy against the number of labels (mean ± std over seeds)."


def losses(groups: list[Group], path: Path) -> str:
    """Ls, Lu and the total Ls + lambda_u * Lu against step (top) and their change since the previous evaluation."""
    def total(run: Run, row: dict) -> float | None:
        if row["loss_s"] is None or row["loss_u"] is None:  # every step of that window was skipped
            return None
        return row["loss_s"] + run.config["lambda_u"] * row["loss_u"]

    curves = [("supervised loss Ls", "loss_s", None), ("unsupervised loss Lu", "loss_u", None),
              ("total Ls + lambda_u Lu", None, total)]
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    for col, (title, key, fn) in enumerate(curves):
        for g in groups:
            steps, values = mean_curve(g.runs, key or "", fn)
            style = LINESTYLES.get(g.config["method"], ":")
            axes[0][col].plot(steps, values, style, label=g.label)
            axes[1][col].plot(steps[1:], [b - a for a, b in zip(values, values[1:])], style, marker=".",
                              label=g.label)
        axes[0][col].set_title(title)
        axes[1][col].set_title(f"change of {title.split(' ')[0] if col < 2 else 'total'} per evaluation")
        axes[1][col].axhline(0, color="grey", lw=0.8)
        for row in (0, 1):
            axes[row][col].set_xlabel("step")
            axes[row][col].grid(alpha=0.3)
    _legend(axes[0][2], len(groups))
    _save(fig, path)
    return ("Training losses (averages over the steps since the previous evaluation) against step, and their "
            "change from one evaluation to the next.")


def _per_group(groups: list[Group], key: str, ylabel: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for g in groups:
        steps, values = mean_curve(g.runs, key)
        ax.plot(steps, values, LINESTYLES.get(g.config["method"], ":"), label=g.label)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    _legend(ax, len(groups))
    _save(fig, path)


def mask_rate(groups: list[Group], path: Path) -> str:
    _per_group(groups, "mask_rate", "mask rate (fraction of mu*B with confidence >= tau)", path)
    return "Mask rate: the fraction of unlabeled samples whose pseudo-label is used, against step (FixMatch runs)."


def pseudo_label_accuracy(groups: list[Group], path: Path) -> str:
    _per_group(groups, "pseudo_label_acc", "pseudo-label accuracy (%) of the masked samples", path)
    return ("Accuracy of the used pseudo-labels, measured with the unlabeled images' true labels (monitoring only), "
            "against step (FixMatch runs).")


def ema_vs_raw(groups: list[Group], path: Path) -> str:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, g in enumerate(groups):
        colour = plt.get_cmap("tab10")(i % 10)
        steps, ema = mean_curve(g.runs, "test_acc")
        _, raw = mean_curve(g.runs, "raw_test_acc")
        ax.plot(steps, ema, "-", color=colour, label=f"{g.label} (EMA)")
        ax.plot(steps, raw, ":", color=colour, label=f"{g.label} (raw)")
    ax.set_xlabel("step")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    _legend(ax, len(groups))
    _save(fig, path)
    return "Test accuracy of the EMA weights (solid) and of the raw weights (dotted) against step."


def confusion(run: Run, matrix: list[list[int]], class_names: list[str], path: Path) -> str:
    side = max(4.5, 0.55 * len(class_names) + 2.5)
    fig, ax = plt.subplots(figsize=(side, side))
    draw_confusion(ax, torch.tensor(matrix), class_names)
    ax.set_title(f"{run.path.name}: best checkpoint", fontsize=9)
    _save(fig, path)
    return (f"Confusion matrix (counts; colour: fraction of the true class) of the best run, {run.path.name}, "
            f"best checkpoint (EMA weights) on the test set.")


def _best_run_confusion(groups: list[Group], out: Path, notes: list[str]) -> tuple[str, str] | None:
    from fixmatch.evaluate import evaluate

    best = max((r for g in groups for r in g.runs), key=lambda r: r.summary["test_acc_best"])
    try:
        metrics = evaluate(best.path / "checkpoints" / "best.pt", device="cpu")
    except Exception as e:  # no checkpoint or no data set here: the page says so instead of failing
        notes.append(f"No confusion matrix: evaluating {best.path.name}'s best checkpoint failed "
                     f"({str(e).splitlines()[0] if str(e) else type(e).__name__}).")
        return None
    if "confusion" not in metrics:
        notes.append("No confusion matrix: the evaluation code does not return one.")
        return None
    names = list(metrics.get("per_class_acc") or [str(i) for i in range(len(metrics["confusion"]))])
    return "confusion_best.png", confusion(best, metrics["confusion"], names, out / "confusion_best.png")


def best_by_configuration(groups: list[Group], path: Path) -> str:
    """For a study with one label count: a bar per configuration, error bars = std over seeds."""
    stats = [(g.label, *best_mean_std(g)) for g in groups]
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(stats) + 1.4))
    y = list(range(len(stats)))
    ax.barh(y, [m for _, m, _ in stats], xerr=[sd or 0.0 for _, _, sd in stats], capsize=3,
            color=[plt.get_cmap("tab10")(i % 10) for i in y])
    for i, (_, m, _) in enumerate(stats):
        ax.text(m / 2, i, f"{m:.2f}", va="center", ha="center", fontsize=8, color="white")
    ax.set_yticks(y, [name for name, _, _ in stats], fontsize=8)
    ax.invert_yaxis()  # the table's order, top to bottom
    ax.set_xlabel("best test accuracy (%), mean ± std over seeds")
    ax.grid(alpha=0.3, axis="x")
    _save(fig, path)
    return "Best test accuracy of each configuration (mean ± std over seeds)."


def best_figure(groups: list[Group], out: Path) -> tuple[str, str]:
    """Best accuracy against the label count, or by configuration where the study has a single label count."""
    if several_label_counts(groups):
        return "best_vs_labels.png", best_vs_labels(groups, out / "best_vs_labels.png")
    return "best_by_configuration.png", best_by_configuration(groups, out / "best_by_configuration.png")


def make_figures(groups: list[Group], out: Path, notes: list[str]) -> list[tuple[str, str]]:
    """Write every figure the runs allow into ``out``; returns (file name, caption) in page order."""
    figures = [("accuracy_vs_step.png", accuracy_vs_step(groups, out / "accuracy_vs_step.png")),
               best_figure(groups, out),
               ("losses.png", losses(groups, out / "losses.png"))]
    semi = [g for g in groups if g.config["method"] == "fixmatch"]
    if semi:
        figures.append(("mask_rate.png", mask_rate(semi, out / "mask_rate.png")))
        figures.append(("pseudo_label_acc.png", pseudo_label_accuracy(semi, out / "pseudo_label_acc.png")))
    else:
        notes.append("No mask-rate or pseudo-label figures: no FixMatch runs.")
    figures.append(("ema_vs_raw.png", ema_vs_raw(groups, out / "ema_vs_raw.png")))
    cm = _best_run_confusion(groups, out, notes)
    if cm is not None:
        figures.append(cm)
    return figures
