"""Optimiser and schedule options: Adam/AdamW, warm-up, plateau, constant; their config keys; a plateau run
that is interrupted and resumed continues its schedule exactly; ema = 0 evaluates the raw weights."""
import math
import os
import signal
import sys

import pytest
import torch
from torch import nn

import fixmatch
from fixmatch.config import Config, ConfigError, resolve_config
from fixmatch.core.optim import LRSchedule, cosine_lr, make_optimizer


def test_cosine_without_warmup_is_the_paper_schedule():
    s = LRSchedule("cosine", 0.03, 1000)
    assert [s.lr(k) for k in (0, 500, 1000)] == [cosine_lr(k, 1000, 0.03) for k in (0, 500, 1000)]


def test_warmup_is_linear_then_the_cosine_restarts_from_lr0():
    s = LRSchedule("cosine", 0.1, 110, warmup=10)
    assert s.lr(0) == pytest.approx(0.01) and s.lr(4) == pytest.approx(0.05) and s.lr(9) == pytest.approx(0.1)
    assert s.lr(10) == pytest.approx(0.1)
    assert s.lr(110) == pytest.approx(0.1 * math.cos(7 * math.pi / 16))
    assert s.lr(60) == pytest.approx(0.1 * math.cos(7 * math.pi * 50 / (16 * 100)))
    c = LRSchedule("constant", 0.1, 110, warmup=4)
    assert [c.lr(k) for k in (0, 3, 4, 100)] == pytest.approx([0.025, 0.1, 0.1, 0.1])


def test_plateau_drops_after_patience_plus_one_evaluations_without_improvement():
    s = LRSchedule("plateau", 0.1, 1000, factor=0.5, patience=2)
    lrs = []
    for acc in [50, 60, 60, 59, 58, 70, 70, 70, 70, 70, 70]:
        s.observe(acc)
        lrs.append(s.lr(500))
    # 60 best; 60, 59 tolerated; 58 is the 3rd -> halve; 70 new best; three 70s -> halve; three more -> halve
    assert lrs == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05, 0.025, 0.025, 0.025])
    restored = LRSchedule("plateau", 0.1, 1000, factor=0.5, patience=2)
    restored.load_state_dict(s.state_dict())
    for acc in (70, 70, 70):
        s.observe(acc)
        restored.observe(acc)
        assert restored.lr(0) == s.lr(0)
    assert s.lr(0) == pytest.approx(0.0125)


def test_cosine_ignores_observed_accuracy():
    s = LRSchedule("cosine", 0.1, 100)
    for _ in range(10):
        s.observe(1.0)
    assert s.lr(0) == 0.1


def _one_step(name, wd, lr=0.1):
    net = nn.Linear(1, 1, bias=False)
    net.weight.data.fill_(2.0)
    opt = make_optimizer(net, lr=lr, momentum=0.9, nesterov=True, weight_decay=wd, name=name)
    net.weight.grad = torch.full_like(net.weight, 0.5)
    opt.step()
    return opt, net.weight.item()


def test_adam_and_adamw_updates_and_where_their_decay_goes():
    # Adam's first step moves each weight by lr * sign(g) (bias-corrected m / sqrt(v) = g / |g|).
    opt, w = _one_step("adam", wd=0.0)
    assert isinstance(opt, torch.optim.Adam) and w == pytest.approx(2.0 - 0.1, abs=1e-6)
    # coupled L2: g' = 0.5 + 1.0 * 2 = 2.5, still a step of lr * sign(g') -- decay inside the normalisation
    _, w = _one_step("adam", wd=1.0)
    assert w == pytest.approx(2.0 - 0.1, abs=1e-6)
    # decoupled: w <- w - lr * wd * w first (2 - 0.1 * 1.0 * 2 = 1.8), then the Adam step
    opt, w = _one_step("adamw", wd=1.0)
    assert isinstance(opt, torch.optim.AdamW) and w == pytest.approx(1.8 - 0.1, abs=1e-6)
    with pytest.raises(ValueError, match="optimizer"):
        _one_step("rmsprop", wd=0.0)


def test_adam_keeps_biases_and_norms_out_of_decay():
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    opt = make_optimizer(net, 0.1, 0.9, True, 5e-4, "adamw")
    decays = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decays[id(net[0].weight)] == 5e-4
    assert decays[id(net[0].bias)] == decays[id(net[1].weight)] == decays[id(net[1].bias)] == 0.0


@pytest.mark.parametrize("key,bad", [("optimizer", "rmsprop"), ("schedule", "step"), ("warmup", -1),
                                     ("lu_norm", "batch"), ("T", -0.5), ("plateau_factor", 1.0),
                                     ("plateau_patience", 1.5)])
def test_bad_option_values_are_one_line_errors(key, bad):
    with pytest.raises(ConfigError, match=f"invalid value for '{key}'"):
        resolve_config(overrides={key: bad})


def test_option_flags_reach_the_config():
    from fixmatch.cli import build_parser
    args = build_parser().parse_args(["train", "--optimizer", "adamw", "--schedule", "plateau", "--warmup", "5",
                                      "--ema", "0", "--lu-norm", "masked", "--T", "0.5"])
    assert (args.optimizer, args.schedule, args.warmup, args.ema, args.lu_norm, args.T) == \
        ("adamw", "plateau", 5, 0.0, "masked", 0.5)


QUICK = dict(dataset="synthetic", model="cnn_small", num_labels=40, batch_size=16, mu=3, lr=0.05,
             ema=0.9, eval_every=10, eval_batch_size=512, progress=False, device="cpu")
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py; for every test of this file


@pytest.mark.slow
def test_plateau_run_interrupted_and_resumed_continues_its_schedule(tmp_path, monkeypatch):
    # supervised: the cheapest step. A tiny lr keeps the accuracy flat, and with patience 0 every evaluation
    # that does not beat the best halves the lr: the resumed run must restore that state to match.
    cfg = Config(**{**QUICK, "method": "supervised", "schedule": "plateau", "plateau_patience": 0,
                    "plateau_factor": 0.5, "optimizer": "adam", "lr": 1e-6, "warmup": 3, "eval_every": 2},
                 steps=12)
    fixmatch.train(cfg, out=tmp_path / "straight")

    train_module = sys.modules["fixmatch.training.loop"]  # the package attribute fixmatch.training.loop is the function
    real_evaluation = train_module.RunLogger.evaluation

    def interrupt_after_step_6(self, row):
        real_evaluation(self, row)
        if row["step"] == 6:
            os.kill(os.getpid(), signal.SIGINT)  # caught by the loop: it checkpoints and stops

    monkeypatch.setattr(train_module.RunLogger, "evaluation", interrupt_after_step_6)
    with pytest.raises(train_module.TrainingInterrupted):
        fixmatch.train(cfg, out=tmp_path / "resumed")
    monkeypatch.setattr(train_module.RunLogger, "evaluation", real_evaluation)
    fixmatch.train(None, out=tmp_path / "resumed", resume=True)

    from fixmatch.runs.log import read_metrics
    straight, resumed = read_metrics(tmp_path / "straight" / "metrics.jsonl"), \
        read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    drop = lambda rows: [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]  # noqa: E731
    assert drop(resumed) == drop(straight)
    lrs = [r["lr"] for r in straight]
    # the plateau dropped the lr at the evaluation where the run was interrupted (6) and after it
    assert lrs[3] == pytest.approx(1e-6 / 2) and lrs[-1] <= 1e-6 / 4 * (1 + 1e-9)
    from fixmatch.runs.checkpoint import load_checkpoint
    a = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    assert a["schedule"] == b["schedule"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.slow
def test_ema_zero_evaluates_the_raw_weights(tmp_path):
    fixmatch.train(Config(**{**QUICK, "ema": 0.0, "T": 0.5, "lu_norm": "masked"}, steps=20), out=tmp_path / "r")
    from fixmatch.runs.log import read_metrics
    rows = read_metrics(tmp_path / "r" / "metrics.jsonl")
    assert all(r["test_acc"] == r["raw_test_acc"] for r in rows)
    assert fixmatch.evaluate(tmp_path / "r", device="cpu", weights="raw")["test_acc"] == \
        pytest.approx(rows[-1]["test_acc"])
