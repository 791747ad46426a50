"""A study's finished runs as the report reads them, grouped by configuration, and how their numbers are shown.

Shared by report.py (tables, page) and report_figures.py (plots), so that neither imports the other.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Run", "Group", "mean_std", "fmt"]


@dataclass
class Run:
    path: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    rows: list[dict[str, Any]]   # metrics.jsonl
    macro_f1: float | None = None  # of the best evaluation, the one checkpoints/best.pt holds


@dataclass
class Group:
    """Runs with the same configuration except their seed."""
    key: tuple
    runs: list[Run]
    values: dict[str, Any] = field(default_factory=dict)  # the keys that vary between groups, for labels

    @property
    def config(self) -> dict[str, Any]:
        return self.runs[0].config

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.values.items()) or "all runs"


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1); no std for a single value."""
    if not values:
        return math.nan, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def fmt(mean: float, std: float | None, digits: int = 2) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return ""
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"
