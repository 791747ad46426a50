"""End-to-end training on the synthetic data set: it learns, it resumes exactly, it reports."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from run_helpers import Killed, kill_after_checkpoint, metrics_rows

import fixmatch
from fixmatch.config import Config
from fixmatch.runs.checkpoint import CheckpointError, load_checkpoint

QUICK = dict(dataset="synthetic", model="cnn_small", num_labels=40, batch_size=8, mu=2, lr=0.05,
             ema=0.9, eval_every=20, eval_batch_size=512, progress=False, device="cpu")
# Batch 8, mu 2: as cheap as a step gets while 60 steps still reach 70-95% (chance 10%) with each strong policy.
# In-process runs on one torch thread (conftest.py); the `fixmatch train` processes below get OMP_NUM_THREADS=1,
# so that their results match this process's bit for bit.
pytestmark = pytest.mark.usefixtures("one_thread")
ONE_THREAD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


_metrics = metrics_rows


@pytest.mark.slow
def test_fixmatch_learns_and_writes_the_run_directory(tmp_path):
    run = tmp_path / "run"
    summary = fixmatch.train(Config(**QUICK, steps=120), out=run)
    assert summary["test_acc_last"] > 60.0  # chance is 10%
    assert summary["steps"] == 120
    for key in ("steps", "test_acc_last", "test_acc_best", "test_acc_median_last20", "wall_s", "steps_per_s"):
        assert key in summary
    assert json.loads((run / "summary.json").read_text()) == summary
    rows = _metrics(run)
    assert [r["step"] for r in rows] == [20, 40, 60, 80, 100, 120]
    for key in ("test_acc", "test_top5", "raw_test_acc", "loss_s", "loss_u", "mask_rate", "pseudo_label_acc", "lr"):
        assert key in rows[0]
    assert rows[-1]["mask_rate"] > 0.3 and rows[-1]["pseudo_label_acc"] > 80
    assert yaml.safe_load((run / "config.yaml").read_text())["num_labels"] == 40
    assert len(json.loads((run / "split.json").read_text())["labeled"]) == 40
    assert list((run / "tensorboard").iterdir())
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["step"] == 120 and state["split"]["labeled"] == json.loads((run / "split.json").read_text())["labeled"]
    assert (run / "checkpoints" / "best.pt").is_file()
    # re-evaluation from the run directory reproduces the logged EMA accuracy
    assert fixmatch.evaluate(run, device="cpu")["test_acc"] == pytest.approx(rows[-1]["test_acc"])


@pytest.mark.slow
def test_same_seed_same_metrics_and_supervised_baseline_runs(tmp_path, capsys):
    a = fixmatch.train(Config(**QUICK, steps=40), out=tmp_path / "a")
    b = fixmatch.train(Config(**QUICK, steps=40), out=tmp_path / "b")
    assert _metrics(tmp_path / "a") == _metrics(tmp_path / "b")
    assert a["test_acc_last"] == b["test_acc_last"]
    s = fixmatch.train(Config(**{**QUICK, "method": "supervised"}, steps=40), out=tmp_path / "s")
    rows = _metrics(tmp_path / "s")
    assert all(r["loss_u"] == 0 and r["mask_rate"] == 0 for r in rows)
    # No pseudo-label was used: their accuracy is undefined (null, "-"), not 0%.
    assert all(r["pseudo_label_acc"] is None for r in rows)
    assert re.search(r"mask 0\.000 pl-acc +- \| lr", capsys.readouterr().out)
    assert s["steps"] == 40


def _cli(*args):
    return [sys.executable, "-m", "fixmatch", "train", *args]


def _flags(steps, **extra):
    flags = []
    for k, v in {**QUICK, "steps": steps, **extra}.items():
        if isinstance(v, bool):  # switches: --progress / --no-progress, --dist-align / --no-dist-align
            flags.append(("--" if v else "--no-") + k.replace("_", "-"))
        else:
            flags += ["--" + k.replace("_", "-"), str(v)]
    return flags


@pytest.mark.parametrize("extra", [{"strong": "randaugment"}, {"strong": "ctaugment"}, {"dist_align": True}],
                         ids=["randaugment", "ctaugment", "dist_align"])
@pytest.mark.slow
def test_interrupted_and_resumed_run_matches_uninterrupted_run(tmp_path, extra):
    # Stopped after its first evaluation (step 20) with 80 or more steps to go; dist_align runs past its window of
    # 128 batch means, so that the history it saves at the end is a full one.
    steps = 140 if extra.get("dist_align") else 100
    fixmatch.train(Config(**{**QUICK, "steps": steps, **extra}), out=tmp_path / "straight")

    run = tmp_path / "resumed"
    proc = subprocess.Popen(_cli(*_flags(steps, **extra), "--out", str(run)), stderr=subprocess.PIPE, text=True,
                            env=ONE_THREAD_ENV)
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").is_file() or not (run / "metrics.jsonl").read_text():
        assert time.time() < deadline and proc.poll() is None, "training did not start"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume" in err
    interrupted_at = load_checkpoint(run / "checkpoints" / "last.pt")["step"]
    assert 0 < interrupted_at < steps

    done = subprocess.run(_cli("--out", str(run), "--resume", "--no-progress"), capture_output=True, text=True,
                          timeout=300, env=ONE_THREAD_ENV)
    assert done.returncode == 0, done.stderr
    assert _metrics(run) == _metrics(tmp_path / "straight")
    a = load_checkpoint(run / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    if extra.get("strong") == "ctaugment":  # the learned bin weights are restored and continue identically
        assert torch.equal(a["ctaugment"]["rates"], b["ctaugment"]["rates"])
        assert not torch.all(a["ctaugment"]["rates"] == 1)
    if extra.get("dist_align"):  # p_model's history is restored and continues identically
        assert torch.equal(a["dist_align"]["history"], b["dist_align"]["history"])
        assert a["dist_align"]["history"].shape == (128, 10)
    else:
        assert a["dist_align"] is None


_Killed = Killed  # test_speed.py imports it from here


@pytest.fixture(scope="module")
def straight_60(tmp_path_factory):
    """The uninterrupted 60-step run that the killed runs below must end as (trained once for both)."""
    run = tmp_path_factory.mktemp("straight_60") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the tests run (one_thread): another thread count may round differently
    try:
        fixmatch.train(Config(**QUICK, steps=60), out=run)
    finally:
        torch.set_num_threads(threads)
    return run


@pytest.mark.slow
def test_run_killed_right_after_an_evaluation_resumes_with_the_same_metrics(tmp_path, monkeypatch, straight_60):
    # The checkpoint written at an evaluation must not carry that evaluation's already-logged loss, mask-rate and
    # pseudo-label sums into the next interval: the row after the resume would average two intervals.
    undo = kill_after_checkpoint(monkeypatch, step=20)
    with pytest.raises(Killed):
        fixmatch.train(Config(**QUICK, steps=60), out=tmp_path / "killed")
    undo()
    assert load_checkpoint(tmp_path / "killed" / "checkpoints" / "last.pt")["step"] == 20
    fixmatch.train(None, out=tmp_path / "killed", resume=True)
    assert _metrics(tmp_path / "killed") == _metrics(straight_60)


@pytest.mark.slow
def test_run_killed_while_appending_an_evaluation_resumes_past_the_torn_line(tmp_path, monkeypatch, straight_60):
    # Power lost half-way through writing the row of step 40: the row is cut short and its checkpoint never
    # written. The resume drops the torn text, redoes step 40's evaluation and ends as an uninterrupted run.
    log_module = sys.modules["fixmatch.runs.log"]
    real_append = log_module.append_line

    def torn_append(path, line):
        if json.loads(line)["step"] == 40:
            with open(path, "a") as f:
                f.write(line[: len(line) // 2])
            raise _Killed
        real_append(path, line)

    monkeypatch.setattr(log_module, "append_line", torn_append)
    with pytest.raises(_Killed):
        fixmatch.train(Config(**QUICK, steps=60), out=tmp_path / "killed")
    monkeypatch.setattr(log_module, "append_line", real_append)
    assert not (tmp_path / "killed" / "metrics.jsonl").read_text().endswith("\n")
    fixmatch.train(None, out=tmp_path / "killed", resume=True)
    assert _metrics(tmp_path / "killed") == _metrics(straight_60)


def test_a_damaged_metrics_line_stops_the_resume_in_one_line_naming_it(tmp_path, capsys):
    from fixmatch.cli import main
    run = tmp_path / "run"
    fixmatch.train(Config(**QUICK, steps=20), out=run)
    rows = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(["{garbage", *rows[1:]]) + "\n")
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "metrics.jsonl line 1 is not a metrics row ('{garbage'); repair or remove that line" in err
    assert len(err.strip().splitlines()) == 1


def test_stop_request_during_the_last_step_lets_the_run_finish(tmp_path, monkeypatch):
    train_module = sys.modules["fixmatch.training.loop"]
    real_evaluate = train_module._metrics_row

    def evaluate_then_interrupt(*args, **kwargs):
        row = real_evaluate(*args, **kwargs)
        if row["step"] == 40:  # Ctrl-C while the final evaluation runs
            os.kill(os.getpid(), signal.SIGINT)
        return row

    monkeypatch.setattr(train_module, "_metrics_row", evaluate_then_interrupt)
    summary = fixmatch.train(Config(**QUICK, steps=40), out=tmp_path / "run")
    assert summary["steps"] == 40
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == summary


def test_resume_refuses_changed_hyperparameters(tmp_path, capsys):
    from fixmatch.cli import main
    run = tmp_path / "run"
    fixmatch.train(Config(**QUICK, steps=20), out=run)
    assert main(["train", "--out", str(run), "--resume", "--lr", "0.5"]) == 2
    assert "cannot change 'lr'" in capsys.readouterr().err


def test_split_file_reuses_the_labels(tmp_path):
    fixmatch.train(Config(**QUICK, steps=20), out=tmp_path / "a")
    fixmatch.train(Config(**{**QUICK, "seed": 5, "split_file": str(tmp_path / "a" / "split.json")}, steps=20),
                   out=tmp_path / "b")
    la = json.loads((tmp_path / "a" / "split.json").read_text())["labeled"]
    lb = json.loads((tmp_path / "b" / "split.json").read_text())["labeled"]
    assert la == lb


def test_bad_num_labels_fails_before_writing(tmp_path):
    with pytest.raises(Exception, match="divisible"):
        fixmatch.train(Config(**{**QUICK, "num_labels": 45}, steps=20), out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_crafted_checkpoint_is_rejected(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))
    path = tmp_path / "evil.pt"
    torch.save({"format": "fixmatch-checkpoint", "x": Evil()}, path)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_resume_needs_a_run_directory():
    with pytest.raises(fixmatch.ConfigError, match="run directory"):
        fixmatch.train(None, resume=True)


@pytest.mark.slow
@pytest.mark.parametrize("strong", ["randaugment-tf", "randaugment-fixed", "randaugment-3op", "ctaugment"])
def test_every_strong_policy_trains(tmp_path, strong):
    summary = fixmatch.train(Config(**{**QUICK, "strong": strong}, steps=60), out=tmp_path / "run")
    assert summary["test_acc_last"] > 30.0  # chance is 10%


def test_weak_padding_reaches_the_weak_view(tmp_path):
    runs = {pad: tmp_path / pad for pad in ("reflect", "zeros")}
    for pad, run in runs.items():
        fixmatch.train(Config(**{**QUICK, "eval_every": 2}, steps=2, weak_padding=pad), out=run)
    assert yaml.safe_load((runs["zeros"] / "config.yaml").read_text())["weak_padding"] == "zeros"
    reflect, zeros = _metrics(runs["reflect"])[-1], _metrics(runs["zeros"])[-1]
    assert reflect["loss_s"] != zeros["loss_s"]  # same draws, other borders: other images


def test_randaugment_ops_and_prob_reach_the_strong_policy(tmp_path, monkeypatch):
    policies_module = sys.modules["fixmatch.augment.randaugment_variants"]  # where build_views finds the policy factory
    built = []
    real = policies_module.make_strong_augment
    monkeypatch.setattr(policies_module, "make_strong_augment", lambda *a, **kw: built.append(real(*a, **kw)) or built[-1])
    fixmatch.train(Config(**{**QUICK, "eval_every": 2}, steps=2, randaugment_ops=3, randaugment_prob=1.0),
                   out=tmp_path / "run")
    assert (built[0].num_ops, built[0].prob) == (3, 1.0)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (saved["randaugment_ops"], saved["randaugment_prob"]) == (3, 1.0)


def test_randaugment_options_are_refused_for_other_policies(tmp_path):
    with pytest.raises(fixmatch.ConfigError, match="--randaugment-prob applies to --strong randaugment only"):
        fixmatch.train(Config(**QUICK, steps=2, strong="ctaugment", randaugment_prob=1.0), out=tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before the run directory is made


def test_config_names_the_same_strong_policies_and_weak_paddings_as_the_augment_package():
    from fixmatch.augment import STRONG_AUGMENTS, WEAK_PADDINGS
    from fixmatch.config import STRONG_AUGMENTS as CONFIG_NAMES
    from fixmatch.config import WEAK_PADDINGS as CONFIG_PADDINGS
    assert CONFIG_NAMES == STRONG_AUGMENTS
    assert CONFIG_PADDINGS == WEAK_PADDINGS
