"""Helpers shared by the tests that drive the command line or kill a run mid-way."""
from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from fixmatch.cli import main


class Killed(BaseException):
    """Stands for SIGKILL or the OOM killer: nothing after the raise runs, not even except-Exception handlers."""


def kill_after_checkpoint(monkeypatch: pytest.MonkeyPatch, step: int) -> Callable[[], None]:
    """Make training raise ``Killed`` right after it has written last.pt at ``step``; returns the undo."""
    train_module = sys.modules["fixmatch.training.loop"]
    real_save = train_module.save_checkpoint

    def save_then_die(state: dict[str, Any], path: Any) -> None:
        real_save(state, path)
        if path.name == "last.pt" and state["step"] == step:
            raise Killed

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_die)
    return lambda: monkeypatch.setattr(train_module, "save_checkpoint", real_save)


def one_line_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run ``fixmatch ARGV``; assert that it wrote exactly one line to stderr; return (exit code, stderr)."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err[:2000]
    return code, err


def metrics_rows(run: Path) -> list[dict[str, Any]]:
    """A run's metrics.jsonl rows without ``wall_s``: what two runs of the same computation share exactly."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("wall_s")
    return rows


def same_state(a: Any, b: Any) -> bool:
    """Exactly equal, tensors included (same dtype and values), through nested dicts, lists and tuples."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    return a == b
