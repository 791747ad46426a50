"""--time-budget: durations parse or are refused in one line; a fake clock makes the calibration's choice exact;
a budget run is the run of --steps N for the N it chose, resumes without the clock, and all ranks agree on N;
a run that would take more than a day says so; the cpu-small preset resolves."""
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from run_helpers import Killed, kill_after_checkpoint, metrics_rows

import fixmatch
from fixmatch.cli import build_parser, main
from fixmatch.config import PRESETS, Config, ConfigError, check_config, resolve_config
from fixmatch.runs.checkpoint import load_checkpoint
from fixmatch.training import budget

QUICK = dict(dataset="synthetic", model="cnn_small", num_labels=40, batch_size=8, mu=2, lr=0.05, ema=0.9,
             eval_every=20, eval_batch_size=512, progress=False, device="cpu")
# With a clock that moves 1 s per reading, a 1m budget on QUICK is calibrated on 3 steps of 1 s (3 s is 5% of
# the budget), evaluations of 1 s (one batch of 512 covers the 500 test images) and 7 s since the start:
# 60 - 7 = 53 s, less the reserve (10% and 3 s) = 44.7 s. eval_every 20 would give 41 steps and fewer than 4
# evaluations, so about ten: 44.7 - 10 evaluations = 34 steps, evaluation every 4.
CHOSEN_STEPS, CHOSEN_EVAL_EVERY = 34, 4


class FakeClock:
    """Each reading is ``tick`` seconds after the previous one."""

    def __init__(self, tick: float = 1.0) -> None:
        self._times = itertools.count(0.0, tick)

    def __call__(self) -> float:
        return next(self._times)


def _flags(**config):
    flags = []
    for k, v in config.items():
        flags += ["--no-progress"] if k == "progress" else ["--" + k.replace("_", "-"), str(v)]
    return flags


BUDGET_ARGS = ["train", *_flags(**QUICK), "--time-budget", "1m"]




def _one_line_error(capsys):
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err


# ------------------------------------------------------------------------------------------ durations
@pytest.mark.parametrize("text, seconds", [("90s", 90), ("15m", 900), ("2h", 7200), ("1h30m", 5400),
                                           ("1h0m15s", 3615), ("0h5m", 300)])
def test_budgets_parse(text, seconds):
    assert budget.parse_budget(text) == seconds
    assert check_config(Config(**QUICK, time_budget=text)).time_budget == text


@pytest.mark.parametrize("value", ["", "15", "15x", "15M", "1m1h", "1.5h", " 15m", "-5m", "0s", "0h0m", "15m\n",
                                   "9" * 40 + "h", 15, 1.5, True, ["15m"]])
def test_bad_budgets_are_refused_in_one_line(value):
    with pytest.raises(ConfigError) as e:
        budget.parse_budget(value)
    assert "90s, 15m, 2h or 1h30m" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"invalid value for 'time_budget'.*expected a duration such as 90s"):
        check_config(Config(**QUICK, time_budget=value))


def test_bad_budget_on_the_command_line_and_in_a_file_is_one_line(tmp_path, capsys):
    assert main([*BUDGET_ARGS[:-1], "15x", "--out", str(tmp_path / "a")]) == 2
    err = _one_line_error(capsys)
    assert "invalid value for 'time_budget' in the command line: '15x'; expected a duration such as 90s" in err
    config = tmp_path / "c.yaml"
    config.write_text("time_budget: 90\n")  # a number of seconds is not a duration
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "b")]) == 2
    assert "invalid value for 'time_budget' in config file" in _one_line_error(capsys)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert build_parser().parse_args([*BUDGET_ARGS[:-1], "none"]).time_budget is None  # null: no budget


# ------------------------------------------------------------------------------------------ the choice
def test_fit_steps_is_the_largest_step_count_that_fits():
    for remaining, step_s, eval_s, every in [(549.9, 0.25, 2.0, 250), (100.0, 1.0, 0.0, 7), (10.0, 0.3, 5.0, 3),
                                             (1.0, 2.0, 0.0, 1)]:
        n = budget.fit_steps(remaining, step_s, eval_s, every, 2**20)
        cost = [k * step_s + math.ceil(k / every) * eval_s for k in (n, n + 1)]
        assert (n == 0 or cost[0] <= remaining) and cost[1] > remaining
    assert budget.fit_steps(549.9, 0.25, 2.0, 250, 2**20) == 2127
    assert budget.fit_steps(549.9, 0.25, 2.0, 250, 1000) == 1000  # steps is the upper bound


def test_plan_keeps_eval_every_unless_it_gives_fewer_than_four_evaluations():
    # 600 s - 31 s of loading and calibration - the reserve (10% and 3 s) = 509.1 s for steps and evaluations
    plan = budget.plan_budget("10m", 31.0, 0.25, 2.0, 5, Config(eval_every=250))
    assert (plan.steps, plan.eval_every, plan.steps_per_s, plan.calibration_steps) == (1972, 250, 4.0, 5)
    assert plan.describe() == ("time budget 10m: 1972 steps at 4 steps/s (calibrated on 5 steps), evaluation "
                               "every 250 steps, 2.0 s each; 31 s of loading and calibration")
    few = budget.plan_budget("10m", 31.0, 0.25, 2.0, 5, Config(eval_every=1024))
    assert (few.steps, few.eval_every) == (1956, 196)  # 509.1 s - 10 evaluations of 2 s, every 1956 / 10 steps
    assert "evaluation every 196 steps (about 10 evaluations: eval_every 1024 would give fewer than 4)" in \
        few.describe()
    capped = budget.plan_budget("10m", 31.0, 0.25, 2.0, 5, Config(steps=500, eval_every=50))
    assert (capped.steps, capped.eval_every) == (500, 50) and "--steps 500 is the limit" in capped.describe()


def test_a_budget_too_short_to_train_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(budget, "clock", FakeClock(20.0))  # 20 s per step, 100 s gone: nothing fits in 1m
    assert main([*BUDGET_ARGS, "--out", str(tmp_path / "run")]) == 2
    err = _one_line_error(capsys)
    assert "time budget 1m leaves no time to train" in err and "longer --time-budget, or --steps N" in err
    assert not (tmp_path / "run" / "config.yaml").exists()


@pytest.mark.slow
def test_calibration_picks_the_steps_from_the_clock_and_records_them(tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.setattr(budget, "clock", FakeClock(1.0))
    run = tmp_path / "run"
    assert main([*BUDGET_ARGS, "--out", str(run)]) == 0
    out = capsys.readouterr().out
    line = (f"time budget 1m: {CHOSEN_STEPS} steps at 1 steps/s (calibrated on 3 steps), evaluation every "
            f"{CHOSEN_EVAL_EVERY} steps (about 10 evaluations: eval_every 20 would give fewer than 4), 1.0 s each; "
            f"7 s of loading and calibration")
    assert out.count(line) == 1
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["steps"], saved["eval_every"], saved["time_budget"]) == (CHOSEN_STEPS, CHOSEN_EVAL_EVERY, None)
    assert (run / "config.yaml").read_text().startswith(f"# {line}.\n")
    record = json.loads((run / "time_budget.json").read_text())
    assert record == dict(time_budget="1m", budget_s=60.0, setup_s=7.0, steps_per_s=1.0, eval_s=1.0,
                          calibration_steps=3, steps=CHOSEN_STEPS, eval_every=CHOSEN_EVAL_EVERY,
                          requested_steps=2**20, requested_eval_every=20)
    assert json.loads((run / "summary.json").read_text())["steps"] == CHOSEN_STEPS


# ------------------------------------------------------------------------------------------ the same run
@pytest.mark.slow
def test_a_budget_run_is_the_run_of_its_step_count(tmp_path, monkeypatch, one_thread):
    monkeypatch.setattr(budget, "clock", FakeClock(1.0))
    fixmatch.train(Config(**QUICK, time_budget="1m"), out=tmp_path / "budget")
    fixmatch.train(Config(**{**QUICK, "eval_every": CHOSEN_EVAL_EVERY}, steps=CHOSEN_STEPS), out=tmp_path / "steps")
    assert metrics_rows(tmp_path / "budget") == metrics_rows(tmp_path / "steps")
    assert [r["step"] for r in metrics_rows(tmp_path / "budget")][-1] == CHOSEN_STEPS
    a = load_checkpoint(tmp_path / "budget" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "steps" / "checkpoints" / "last.pt")
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    # A new run from the budget run's config.yaml (another seed, the same seed) trains its steps, not the clock's.
    assert resolve_config(config_file=tmp_path / "budget" / "config.yaml") == Config(
        **{**QUICK, "eval_every": CHOSEN_EVAL_EVERY}, steps=CHOSEN_STEPS)


@pytest.mark.slow
def test_a_budget_run_resumes_with_its_steps_without_calibrating_again(tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.setattr(budget, "clock", FakeClock(1.0))
    straight = tmp_path / "straight"
    assert main([*BUDGET_ARGS, "--out", str(straight)]) == 0

    run = tmp_path / "run"
    undo = kill_after_checkpoint(monkeypatch, step=12)
    with pytest.raises(Killed):
        main([*BUDGET_ARGS, "--out", str(run)])
    undo()

    def no_calibration(*args, **kwargs):
        raise AssertionError("a resume calibrated again")

    monkeypatch.setattr(budget, "calibrate", no_calibration)
    monkeypatch.setattr(budget, "clock", FakeClock(0.01))  # a clock this fast would choose far more steps
    capsys.readouterr()
    # The command line the run was started with, plus --resume: the budget resolves to the recorded steps.
    assert main([*BUDGET_ARGS, "--out", str(run), "--resume"]) == 0
    assert f"{CHOSEN_STEPS} steps on cpu" in capsys.readouterr().out
    assert metrics_rows(run) == metrics_rows(straight)
    # Another budget, or other steps, on resume: refused in one line that says how to resume.
    for flags, key in ((["--time-budget", "2m"], "time_budget"), (["--steps", "100"], "steps")):
        assert main([*BUDGET_ARGS, *flags, "--out", str(run), "--resume"]) == 2
        err = _one_line_error(capsys)
        assert f"cannot change '{key}' when resuming a time-budget run" in err
        assert f"resume with: fixmatch train --out {run} --resume" in err


def test_a_budget_is_refused_on_resume_of_a_run_without_one(tmp_path, capsys, one_thread):
    run = tmp_path / "run"
    fixmatch.train(Config(**QUICK, steps=4), out=run)
    assert main([*BUDGET_ARGS, "--out", str(run), "--resume"]) == 2
    assert "it was not started with a time budget" in _one_line_error(capsys)
    (run / "time_budget.json").write_text("[1, 2")
    assert main([*BUDGET_ARGS, "--out", str(run), "--resume"]) == 2
    assert "time_budget.json is damaged" in _one_line_error(capsys)


@pytest.mark.slow
def test_every_rank_trains_the_steps_that_rank_0_chose(tmp_path):
    # Rank 1's clock runs 4 times slower: on its own it would choose fewer steps, and the ranks would deadlock.
    port = str(_free_port())
    run = tmp_path / "run"
    code = ("import itertools, sys; from fixmatch.training import budget; t = itertools.count(0.0, float(sys.argv[1])); "
            "budget.clock = lambda: next(t); from fixmatch.cli import main; sys.exit(main(sys.argv[2:]))")
    procs = []
    for rank, tick in ((0, "1.0"), (1, "4.0")):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", code, tick, *BUDGET_ARGS, "--out", str(run)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        outputs = [p.communicate(timeout=300) for p in procs]
    finally:  # ranks that disagree deadlock in a collective: never leave them behind
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert outputs[0][0].count("time budget 1m:") == 1 and "time budget" not in outputs[1][0]
    assert json.loads((run / "summary.json").read_text())["steps"] == CHOSEN_STEPS


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------ more than a day
def test_a_run_that_would_take_more_than_a_day_says_so_in_one_line(tmp_path, monkeypatch, capsys, one_thread):
    fixmatch.train(Config(**QUICK, steps=12), out=tmp_path / "fast")
    assert "warning" not in capsys.readouterr().out
    # 10,000 s per step: step 2 alone is timed (past 20 s), then 8 steps left take 22 hours and 9 take 25.
    monkeypatch.setattr(budget, "clock", FakeClock(10_000.0))
    fixmatch.train(Config(**QUICK, steps=10), out=tmp_path / "a-day")
    assert "warning" not in capsys.readouterr().out
    fixmatch.train(Config(**QUICK, steps=11), out=tmp_path / "more")
    warnings = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert warnings == ["warning: 9 more steps at 0.0001 steps/s would take about 25 hours; to finish sooner give "
                        "--time-budget (e.g. --time-budget 2h), fewer --steps, or on a CPU --preset cpu-small"]


def test_the_slow_run_warning_times_steps_after_the_first():
    lines = []
    readings = iter([0.0, 100.0])  # step 2 takes 100 s: past max_s (20 s), so the clock is read no more
    watch = budget.SlowRunWarning(2000, 0, torch.device("cpu"), lines.append)
    original, budget.clock = budget.clock, lambda: next(readings)
    try:
        for step in range(1, 6):
            watch.step_done(step)
    finally:
        budget.clock = original
    assert watch.done and len(lines) == 1 and "1998 more steps at 0.01 steps/s would take about 2 days" in lines[0]
    quiet = budget.SlowRunWarning(3, 0, torch.device("cpu"), lines.append)  # the first step and one more
    readings = iter([0.0, 100.0])
    budget.clock = lambda: next(readings)
    try:
        for step in range(1, 4):
            quiet.step_done(step)
    finally:
        budget.clock = original
    assert quiet.done and len(lines) == 1


# ------------------------------------------------------------------------------------------ the preset
def test_the_cpu_preset_resolves_for_a_folder(tmp_path, capsys):
    config = check_config(resolve_config("cpu-small", overrides={"dataset": f"folder:{tmp_path}", "num_labels": 40}))
    assert (config.model, config.image_size, config.time_budget) == ("cnn_small", 32, "15m")
    assert (config.batch_size, config.weak_no_grad, config.ema) == (32, True, 0.99)
    assert set(PRESETS["cpu-small"]) <= set(Config().to_dict())
    assert main(["presets"]) == 0
    assert "cpu-small:\n" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--time-budget" in capsys.readouterr().out


def test_the_cpu_preset_trains_a_folder_within_its_budget(tmp_path, monkeypatch, one_thread):
    from folder_images import make_folder
    root = make_folder(tmp_path / "pets", per_class=6, unlabeled=40, test_per_class=2)
    monkeypatch.setattr(budget, "clock", FakeClock(0.5))
    config = resolve_config("cpu-small", overrides=dict(dataset=f"folder:{root}", num_labels=4, batch_size=4, mu=2,
                                                       progress=False, device="cpu", time_budget="20s",
                                                       data_dir=str(tmp_path / "data")))
    summary = fixmatch.train(config, out=tmp_path / "run")
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert summary["steps"] == saved["steps"] >= 1 and saved["image_size"] == 32
    assert Path(tmp_path / "run" / "time_budget.json").is_file()
