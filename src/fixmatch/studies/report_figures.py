"""The report's PNG figures, drawn with matplotlib (Agg: files only) from the runs' metrics.jsonl rows.

Curves are the mean over a configuration's seeds at each evaluation step; every legend says over how many
seeds (n). Error bars are the sample std over seeds, drawn only where n >= 2. Each function writes one file
and returns its caption; ``make_figures`` skips (with a note) the figures a study has nothing for, such as the
mask rate of a study of supervised runs only.

Sizes: the wide figures are FIG_WIDTH inches at DPI, 1260 pixels, the width of the page's text column
(report.py), so that index.html shows them at their own size. Every figure uses matplotlib's constrained
layout, which keeps labels, legends and colour bars inside the image.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import matplotlib
import torch

matplotlib.use("Agg")  # no display: files only
import matplotlib.pyplot as plt  # noqa: E402

from fixmatch.core.atomic import atomic_path  # noqa: E402
from fixmatch.inference.evaluate import draw_confusion  # noqa: E402
from fixmatch.runs.rundir import RunDir  # noqa: E402
from fixmatch.studies.results import Group, Run, fmt, mean_std  # noqa: E402

LINESTYLES = {"fixmatch": "-", "supervised": "--"}
FIG_WIDTH = 12.6  # inches
DPI = 100
STYLE = {"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 9,
         "xtick.labelsize": 10, "ytick.labelsize": 10}
F = TypeVar("F", bound=Callable[..., str])


def _styled(draw: F) -> F:
    """Font sizes are read when each text is made: the whole drawing runs under STYLE."""
    @functools.wraps(draw)
    def wrapper(*args: Any, **kwargs: Any) -> str:
        with plt.rc_context(STYLE):
            return draw(*args, **kwargs)
    return wrapper  # type: ignore[return-value]


def _figure(nrows: int = 1, ncols: int = 1, height: float = 4.8, width: float = FIG_WIDTH, **kw: Any
            ) -> tuple[Any, Any]:
    return plt.subplots(nrows, ncols, figsize=(width, height), layout="constrained", squeeze=False, **kw)


def _save(fig: Any, path: Path) -> None:
    """Atomic: a reader (or a browser) never sees half a PNG."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=DPI)
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
    """Mean and sample std over the group's seeds of each run's best test accuracy (no std for one seed)."""
    return mean_std([r.summary["test_acc_best"] for r in group.runs])


def _name(group: Group, label: str | None = None) -> str:
    """A legend entry: the configuration and the number of seeds its numbers are the mean of."""
    return f"{label or group.label} (n={len(group.runs)})"


def _n_range(counts: list[int]) -> str:
    return f"n={min(counts)}" if min(counts) == max(counts) else f"n={min(counts)}-{max(counts)}"


def _legend_outside(fig: Any, axes: list[Any]) -> None:
    """One legend for the figure, below the panels: it never hides a curve nor narrows the panels, whatever
    the number and length of the entries (as many columns as fit the width)."""
    handles: dict[str, Any] = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    if not handles:
        return
    size = matplotlib.font_manager.FontProperties(size=plt.rcParams["legend.fontsize"]).get_size_in_points()
    entry = max(map(len, handles)) * 0.55 * size / 72 + 0.8  # inches: text (about 0.55 em a character) + line
    ncols = max(1, min(len(handles), int(fig.get_figwidth() * 0.95 // entry)))
    fig.set_figheight(fig.get_figheight() + 0.23 * -(-len(handles) // ncols))  # room for the legend's rows
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=ncols, frameon=False)


@_styled
def accuracy_vs_step(groups: list[Group], path: Path) -> str:
    models = sorted({g.config["model"] for g in groups})
    fig, axes = _figure(1, len(models), height=5.2, sharey=True)
    labels = sorted({g.config["num_labels"] for g in groups})
    by_labels = several_label_counts(groups)

    def colour(g: Group) -> Any:
        if by_labels:
            return plt.get_cmap("viridis")(labels.index(g.config["num_labels"]) / (len(labels) - 1) * 0.9)
        return plt.get_cmap("tab10")(groups.index(g) % 10)

    for ax, model in zip(axes[0], models):
        for g in (g for g in groups if g.config["model"] == model):
            steps, acc = mean_curve(g.runs, "test_acc")
            ax.plot(steps, acc, LINESTYLES.get(g.config["method"], ":"), color=colour(g), label=_name(g))
        ax.set_title(model)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%), mean over seeds")
    _legend_outside(fig, list(axes[0]))
    _save(fig, path)
    what = "number of labels" if by_labels else "configuration"
    return (f"Test accuracy (EMA) against step, mean over the n seeds; colour: {what}, solid: FixMatch, "
            f"dashed: supervised.")


@_styled
def best_vs_labels(groups: list[Group], path: Path) -> str:
    """One line per configuration apart from the label count (method, model, ...); error bars = std over
    seeds, only at the label counts with two or more seeds."""
    series: dict[str, list[tuple[int, float, float | None, int]]] = {}
    for g in groups:
        name = ", ".join(f"{k}={v}" for k, v in g.values.items() if k != "num_labels") or g.config["method"]
        series.setdefault(name, []).append((g.config["num_labels"], *best_mean_std(g), len(g.runs)))
    fig, axes = _figure(height=5.2)
    ax = axes[0][0]
    for i, (name, points) in enumerate(sorted(series.items())):
        points.sort()
        colour = plt.get_cmap("tab10")(i % 10)
        ax.plot([p[0] for p in points], [p[1] for p in points], "-o", color=colour,
                label=f"{name} ({_n_range([p[3] for p in points])})")
        spread = [p for p in points if p[2] is not None]  # a single seed has no std: no bar, not a zero one
        if spread:
            ax.errorbar([p[0] for p in spread], [p[1] for p in spread], yerr=[p[2] for p in spread], fmt="none",
                        ecolor=colour, capsize=4)
    ax.set_xscale("log")
    counts = sorted({p[0] for points in series.values() for p in points})
    ax.set_xticks(counts, [str(c) for c in counts])  # the label counts themselves, not powers of ten
    ax.minorticks_off()
    ax.set_xlabel("labeled images (log scale)")
    ax.set_ylabel("best test accuracy (%)")
    ax.grid(alpha=0.3, which="both")
    _legend_outside(fig, [ax])
    _save(fig, path)
    return ("Best test accuracy against the number of labels: mean over the n seeds, error bars ± sample std "
            "where n ≥ 2.")


@_styled
def losses(groups: list[Group], path: Path) -> str:
    """Ls, Lu and the total Ls + lambda_u * Lu against step (top) and their change since the previous evaluation."""
    def total(run: Run, row: dict) -> float | None:
        if row["loss_s"] is None or row["loss_u"] is None:  # every step of that window was skipped
            return None
        return row["loss_s"] + run.config["lambda_u"] * row["loss_u"]

    curves = [("supervised loss Ls", "loss_s", None), ("unsupervised loss Lu", "loss_u", None),
              ("total Ls + λu Lu", None, total)]
    fig, axes = _figure(2, 3, height=8.0)
    for col, (title, key, fn) in enumerate(curves):
        for g in groups:
            steps, values = mean_curve(g.runs, key or "", fn)
            style = LINESTYLES.get(g.config["method"], ":")
            axes[0][col].plot(steps, values, style, label=_name(g))
            axes[1][col].plot(steps[1:], [b - a for a, b in zip(values, values[1:])], style, marker=".",
                              label=_name(g))
        axes[0][col].set_title(title)
        axes[1][col].set_title(f"change of {title.split(' ')[0] if col < 2 else 'total'} per evaluation")
        axes[1][col].axhline(0, color="grey", lw=0.8)
        for row in (0, 1):
            axes[row][col].set_xlabel("step")
            axes[row][col].grid(alpha=0.3)
    _legend_outside(fig, [axes[0][0]])
    _save(fig, path)
    return ("Training losses (averages over the steps since the previous evaluation, mean over the n seeds) "
            "against step, and their change from one evaluation to the next.")


# Curves of one logged quantity per configuration against step, for the FixMatch runs: (metrics.jsonl key, file,
# title, y label, caption). The axis label stays short (a long one runs past the top and bottom of the image); the
# title explains.
SEMI_CURVES = [
    ("mask_rate", "mask_rate.png", "Fraction of the μB unlabeled images of a step with confidence ≥ τ", "mask rate",
     "Mask rate: the fraction of unlabeled samples whose pseudo-label is used, against step (FixMatch runs, "
     "mean over the n seeds)."),
    ("pseudo_label_acc", "pseudo_label_acc.png", "Accuracy of the pseudo-labels of the masked samples",
     "pseudo-label accuracy (%)",
     "Accuracy of the used pseudo-labels, measured with the unlabeled images' true labels (monitoring only), "
     "against step (FixMatch runs, mean over the n seeds)."),
]


@_styled
def per_group_curve(groups: list[Group], key: str, title: str, ylabel: str, caption: str, path: Path) -> str:
    """The mean curve of ``key`` of each group against step; returns ``caption``."""
    fig, axes = _figure()
    ax = axes[0][0]
    for g in groups:
        steps, values = mean_curve(g.runs, key)
        ax.plot(steps, values, LINESTYLES.get(g.config["method"], ":"), label=_name(g))
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    _legend_outside(fig, [ax])
    _save(fig, path)
    return caption


@_styled
def ema_vs_raw(groups: list[Group], path: Path) -> str:
    fig, axes = _figure(height=5.2)
    ax = axes[0][0]
    for i, g in enumerate(groups):
        colour = plt.get_cmap("tab10")(i % 10)
        steps, ema = mean_curve(g.runs, "test_acc")
        _, raw = mean_curve(g.runs, "raw_test_acc")
        ax.plot(steps, ema, "-", color=colour, label=_name(g, f"{g.label}, EMA"))
        ax.plot(steps, raw, ":", color=colour, label=_name(g, f"{g.label}, raw"))
    ax.set_xlabel("step")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    _legend_outside(fig, [ax])
    _save(fig, path)
    return ("Test accuracy of the EMA weights (solid) and of the raw weights (dotted) against step, mean over the "
            "n seeds.")


@_styled
def confusion(run: Run, matrix: list[list[int]], class_names: list[str], path: Path) -> str:
    n = len(class_names)
    side = min(FIG_WIDTH - 1.6, max(5.0, 0.6 * n + 3.0))  # many classes: no wider than the page, smaller names
    fig, axes = _figure(height=side, width=side + 1.6)
    ax = axes[0][0]
    draw_confusion(ax, torch.tensor(matrix), class_names)
    if n > 16:
        ax.tick_params(labelsize=max(4.0, min(10.0, 160 / n)))
    fig.colorbar(ax.images[0], ax=ax, shrink=0.8, label="fraction of the true class")
    ax.set_title(f"{run.path.name}: best checkpoint")
    _save(fig, path)
    return (f"Confusion matrix (counts; colour: fraction of the true class) of the best run, {run.path.name}, "
            f"best checkpoint (EMA weights) on the test set.")


def _best_run_confusion(groups: list[Group], out: Path, notes: list[str]) -> tuple[str, str] | None:
    from fixmatch.inference.evaluate import evaluate

    best = max((r for g in groups for r in g.runs), key=lambda r: r.summary["test_acc_best"])
    try:
        metrics = evaluate(RunDir(best.path).best_checkpoint, device="cpu")
    except Exception as e:  # no checkpoint or no data set here: the page says so instead of failing
        notes.append(f"No confusion matrix: evaluating {best.path.name}'s best checkpoint failed "
                     f"({str(e).splitlines()[0] if str(e) else type(e).__name__}).")
        return None
    if "confusion" not in metrics:
        notes.append("No confusion matrix: the evaluation code does not return one.")
        return None
    names = list(metrics.get("per_class_acc") or [str(i) for i in range(len(metrics["confusion"]))])
    return "confusion_best.png", confusion(best, metrics["confusion"], names, out / "confusion_best.png")


def _threshold_curves(runs: list[Run]) -> tuple[list[int], list[list[float]]]:
    """Steps and, per class (SoftMatch: one, its mu_t), the mean over runs of the logged threshold."""
    by_step: dict[int, list[list[float]]] = {}
    for run in runs:
        for row in run.rows:
            if row.get("thresholds"):
                by_step.setdefault(row["step"], []).append(row["thresholds"])
    steps = sorted(by_step)
    width = min((len(t) for s in steps for t in by_step[s]), default=0)
    curves = [[sum(t[c] for t in by_step[s]) / len(by_step[s]) for s in steps] for c in range(width)]
    return steps, curves


def threshold_groups(groups: list[Group]) -> list[Group]:
    """The groups whose runs logged per-class thresholds (FlexMatch, FreeMatch, SoftMatch)."""
    return [g for g in groups if any(row.get("thresholds") for r in g.runs for row in r.rows)]


@_styled
def thresholds(groups: list[Group], path: Path) -> str:
    """One panel per configuration: each class's confidence threshold against step (mean over the seeds)."""
    ncols = min(3, len(groups))
    nrows = -(-len(groups) // ncols)
    fig, axes = _figure(nrows, ncols, height=3.6 * nrows, sharey=True)
    for ax in axes.flat[len(groups):]:
        ax.set_visible(False)
    curves_of = [_threshold_curves(g.runs) for g in groups]
    most = max(len(curves) for _, curves in curves_of)
    # Up to 10 classes: one distinct colour each and a legend; more: a colour ramp, no legend.
    colour = (lambda c: plt.get_cmap("tab10")(c)) if most <= 10 else (lambda c: plt.get_cmap("viridis")(c / (most - 1)))
    for ax, g, (steps, curves) in zip(axes.flat, groups, curves_of):
        for c, values in enumerate(curves):
            label = "μ_t (SoftMatch)" if len(curves) == 1 else f"class {c}"
            ax.plot(steps, values, color=colour(c), lw=1.2, label=label)
        ax.set_title(_name(g), fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for row in axes:
        row[0].set_ylabel("threshold")
    if most <= 10:
        _legend_outside(fig, list(axes.flat))
    _save(fig, path)
    return ("Confidence threshold of each class against step (FlexMatch's curriculum thresholds, FreeMatch's "
            "self-adaptive ones; SoftMatch: its mean confidence μ_t, above which a sample has weight 1), mean over "
            "the n seeds of each configuration. A class whose threshold stays high gets few pseudo-labels.")


@_styled
def best_by_configuration(groups: list[Group], path: Path) -> str:
    """For a study with one label count: a bar per configuration; error bars = std over seeds where n >= 2."""
    stats = [(_name(g), *best_mean_std(g)) for g in groups]
    fig, axes = _figure(height=0.5 * len(stats) + 1.6)
    ax = axes[0][0]
    y = list(range(len(stats)))
    ax.barh(y, [m for _, m, _ in stats], color=[plt.get_cmap("tab10")(i % 10) for i in y])
    spread = [(i, m, sd) for i, (_, m, sd) in enumerate(stats) if sd is not None]  # one seed: no std, no bar
    if spread:
        ax.errorbar([m for _, m, _ in spread], [i for i, _, _ in spread], xerr=[sd for _, _, sd in spread],
                    fmt="none", ecolor="black", capsize=4)
    for i, (_, m, sd) in enumerate(stats):  # the number right of the bar and of its error bar
        ax.annotate(fmt(m, sd), (m + (sd or 0.0), i), xytext=(6, 0), textcoords="offset points", va="center",
                    fontsize=9)
    ax.margins(x=0.12)  # room for those numbers inside the axes
    ax.set_yticks(y, [name for name, _, _ in stats])
    ax.invert_yaxis()  # the table's order, top to bottom
    ax.set_xlabel("best test accuracy (%): mean over the n seeds, ± sample std where n ≥ 2")
    ax.grid(alpha=0.3, axis="x")
    _save(fig, path)
    return "Best test accuracy of each configuration: mean over the n seeds, error bars ± sample std where n ≥ 2."


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
        figures += [(file, per_group_curve(semi, key, title, ylabel, caption, out / file))
                    for key, file, title, ylabel, caption in SEMI_CURVES]
    else:
        notes.append("No mask-rate or pseudo-label figures: no FixMatch runs.")
    adaptive = threshold_groups(groups)
    if adaptive:
        figures.append(("thresholds.png", thresholds(adaptive, out / "thresholds.png")))
    figures.append(("ema_vs_raw.png", ema_vs_raw(groups, out / "ema_vs_raw.png")))
    cm = _best_run_confusion(groups, out, notes)
    if cm is not None:
        figures.append(cm)
    return figures
