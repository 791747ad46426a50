"""Helpers shared by the tests that drive the command line or kill a run mid-way."""
from __future__ import annotations

import json
import math
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


def assert_same_state(a: Any, b: Any, where: str = "state", rtol: float = 0.0) -> None:
    """Every tensor equal in dtype, shape and value; every other value equal and of the same type; the same keys
    at every level of nested dicts, lists and tuples. ``rtol`` > 0 lets floating-point values differ by that
    relative amount (and 1e-6 absolute), for runs computed on another CPU model. ``where`` names the failing path."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        if rtol and a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=rtol, atol=1e-6, msg=where)
        else:
            assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, set(a) ^ set(b))
        for k in a:
            assert_same_state(a[k], b[k], f"{where}[{k!r}]", rtol)
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]", rtol)
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    elif rtol and isinstance(a, float):
        assert isinstance(b, float) and b == pytest.approx(a, rel=rtol, abs=1e-6), (where, a, b)
    else:
        assert a == b and type(a) is type(b), (where, a, b)
