"""fixmatch sweep: grid expansion and validation, skip/resume/failure handling, workers' threads."""
import json
import os
import signal
import sys

import pytest
import yaml

import fixmatch
from fixmatch.config import Config, ConfigError
from fixmatch.studies.sweep import load_study, run_name, run_state, run_sweep, worker_env

TINY = dict(dataset="synthetic", model="cnn_small", num_labels=20, batch_size=8, mu=2, lr=0.05, ema=0.9,
            eval_every=4, eval_batch_size=512, device="cpu", channels_last=False)
# Runs trained in this process use one torch thread; the sweep's own workers get the threads it gives them.
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _study(tmp_path, grid, base=None, variants=None, name="study.yaml"):
    data = {"description": "a test study", "base": base if base is not None else {**TINY, "steps": 4},
            "grid": grid}
    if variants is not None:
        data["variants"] = variants
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_grid_is_the_product_first_key_slowest_with_names_from_the_values(tmp_path):
    study = load_study(_study(tmp_path, {"seed": [0, 1], "num_labels": [10, 40], "method": ["fixmatch", "supervised"]}))
    assert len(study.runs) == 8
    assert study.runs[0].name == "seed=0,num_labels=10,method=fixmatch"
    assert study.runs[1].name == "seed=0,num_labels=10,method=supervised"
    assert study.runs[-1].name == "seed=1,num_labels=40,method=supervised"
    last = study.runs[-1].config
    assert (last.seed, last.num_labels, last.method, last.batch_size) == (1, 40, "supervised", 8)
    assert study.description == "a test study"


def test_preset_in_base_and_variants_crossed_with_the_grid(tmp_path):
    variants = {"sgd-cosine": {"optimizer": "sgd", "lr": 0.03},
                "adam-plateau": {"optimizer": "adam", "schedule": "plateau", "lr": 0.001}}
    study = load_study(_study(tmp_path, {"seed": [0, 1]}, base={"preset": "fashion-mnist", "steps": 100},
                              variants=variants))
    assert [r.name for r in study.runs] == ["variant=sgd-cosine,seed=0", "variant=adam-plateau,seed=0",
                                            "variant=sgd-cosine,seed=1", "variant=adam-plateau,seed=1"]
    adam = study.runs[1].config
    assert (adam.model, adam.steps, adam.optimizer, adam.schedule, adam.lr) == ("cnn_small", 100, "adam",
                                                                               "plateau", 0.001)


def test_names_are_filesystem_safe():
    assert run_name({"split_file": "a/b c.json", "weak_flip": None, "nesterov": True}) == \
        "split_file=a_b_c.json,weak_flip=null,nesterov=true"
    assert run_name({}) == "run"


@pytest.mark.parametrize("grid,base,message", [
    ({"tau": [0.9, 1.5]}, None, "run tau=1.5: invalid value for 'tau'"),
    ({"model": ["cnn_small", "no_such_net"]}, None, "unknown model 'no_such_net'"),
    ({"dataset": ["nope"]}, None, "unknown dataset 'nope'"),
    ({"learning_rate": [0.1]}, None, "unknown config key 'learning_rate' in its settings;"),  # not "command line"
    ({"seed": 3}, None, "grid key 'seed' needs a non-empty list"),
    ({"seed": []}, None, "grid key 'seed' needs a non-empty list"),
    ({"seed": [0]}, {"preset": "nope"}, "unknown preset 'nope'"),
    ({"split_file": ["a/b", "a_b"]}, None, "share the directory"),
    # Keys that another key makes meaningless are found here too, not when that run starts.
    ({"strong": ["randaugment", "ctaugment"]}, {**TINY, "steps": 4, "randaugment_prob": 1.0},
     "run strong=ctaugment: --randaugment-prob applies to --strong randaugment only, not ctaugment"),
    ({"fold": [None, 3]}, None, "run fold=3: --fold selects one of STL-10's official labeled folds"),
])
def test_every_configuration_is_validated_first(tmp_path, grid, base, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        run_sweep(_study(tmp_path, grid, base=base), tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing started, nothing written


def test_bad_study_files_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("grid: [1, 2]\n")
    with pytest.raises(ConfigError, match="'grid' must be a mapping"):
        load_study(bad)
    bad.write_text("grids: {seed: [0]}\n")
    with pytest.raises(ConfigError, match="unknown top-level key 'grids'"):
        load_study(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_study(tmp_path / "missing.yaml")
    clash = _study(tmp_path, {"lr": [0.1]}, variants={"a": {"lr": 0.2}})
    with pytest.raises(ConfigError, match="'lr' is set by variant 'a' and by the grid"):
        load_study(clash)


def test_workers_share_the_cores():
    assert worker_env(2, cores=8)["OMP_NUM_THREADS"] == "4"
    assert worker_env(3, cores=8)["OMP_NUM_THREADS"] == "2"
    assert worker_env(16, cores=8)["OMP_NUM_THREADS"] == "1"


@pytest.mark.slow
def test_sweep_runs_skips_records_failures_and_resumes(tmp_path):
    # num_labels 25 is not divisible by 10 classes: that run fails when its split is drawn; the others go on.
    study = _study(tmp_path, {"num_labels": [20, 25], "seed": [0]})
    out = tmp_path / "out"
    lines = []
    result = run_sweep(study, out, workers=2, echo=lines.append)
    good, bad = ["num_labels=20,seed=0"], ["num_labels=25,seed=0"]
    assert sorted(result.done) == good and sorted(result.failed) == bad
    for name in good:
        summary = json.loads((out / name / "summary.json").read_text())
        assert summary["steps"] == 4 and run_state(out / name) == "finished"
    for name in bad:
        error = (out / name / "error.txt").read_text()
        assert "divisible" in error and "exit code 2" in error
        assert "divisible" in result.failed[name]
    assert any(line.startswith("FAILED num_labels=25,seed=0") for line in lines)
    assert (out / "study.yaml").is_file() and (out / "logs" / f"{good[0]}.log").is_file()
    assert json.loads((out / "sweep.json").read_text())["command"] == f"fixmatch sweep {study} --out {out}"

    # Again: finished runs are skipped (untouched), failed ones are tried again.
    mtime = (out / good[0] / "summary.json").stat().st_mtime_ns
    again = run_sweep(study, out, workers=1, echo=lambda s: None)
    assert sorted(again.skipped) == good and sorted(again.failed) == bad and again.done == []
    assert (out / good[0] / "summary.json").stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_interrupted_run_is_resumed_and_changed_study_is_refused(tmp_path, monkeypatch):
    study = _study(tmp_path, {"seed": [0]}, base={**TINY, "steps": 8})
    out = tmp_path / "out"
    # An interrupted run: stopped by SIGINT after its first evaluation (checkpoint at step 4, no summary).
    train_module = sys.modules["fixmatch.training.loop"]
    real = train_module.RunLogger.evaluation

    def interrupt(self, row):
        real(self, row)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(train_module.RunLogger, "evaluation", interrupt)
    with pytest.raises(train_module.TrainingInterrupted):
        fixmatch.train(Config(**{**TINY, "progress": False}, steps=8), out=out / "seed=0")
    monkeypatch.setattr(train_module.RunLogger, "evaluation", real)
    assert run_state(out / "seed=0") == "resumable"

    result = run_sweep(study, out, echo=lambda s: None)
    assert result.done == ["seed=0"]
    rows = [json.loads(line) for line in (out / "seed=0" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [4, 8]
    assert "--resume" in (out / "logs" / "seed=0.log").read_text()

    changed = _study(tmp_path, {"seed": [0]}, base={**TINY, "steps": 8, "tau": 0.8}, name="changed.yaml")
    with pytest.raises(ConfigError, match="was run with tau=0.95 but the study now gives 0.8"):
        run_sweep(changed, out)


@pytest.mark.slow
def test_ctrl_c_stops_the_sweep_with_its_runs_resumable_and_the_same_command_finishes_them(tmp_path):
    import subprocess
    import time
    # Long enough (in steps) that Ctrl-C comes while the run trains, after its first checkpoint (step 20): the
    # 80 steps after it take far longer than the 0.1 s poll below.
    study = _study(tmp_path, {"seed": [0, 1]}, base={**TINY, "steps": 100, "eval_every": 20})
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "fixmatch", "sweep", str(study), "--out", str(out), "--workers", "1"]
    # Its own process group, as a terminal gives one: Ctrl-C reaches the sweep and its training process. SIGINT
    # back to its default first: a test runner started in the background of a shell inherits it ignored, and a
    # Python process that starts with SIGINT ignored keeps ignoring it (as `nohup fixmatch sweep ... &` should).
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    first = out / "seed=0" / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 120
    while not first.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert first.is_file(), proc.communicate()[0] if proc.poll() is not None else "no checkpoint in 120 s"
    os.killpg(proc.pid, signal.SIGINT)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, output
    assert "sweep interrupted; run the same command again to resume" in output
    assert "stopped seed=0 (resumable)" in output and "seed=1" not in output.split("start seed=0")[-1]
    assert run_state(out / "seed=0") == "resumable" and not (out / "seed=1").exists()

    result = run_sweep(study, out, echo=lambda s: None)
    assert sorted(result.done) == ["seed=0", "seed=1"] and not result.failed
    rows = [json.loads(line) for line in (out / "seed=0" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 100 and len({r["step"] for r in rows}) == len(rows)  # resumed, nothing twice


def test_cli_dry_run_lists_runs_and_states(tmp_path, capsys):
    from fixmatch.cli import main
    study = _study(tmp_path, {"seed": [0, 1]})
    assert main(["sweep", str(study), "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "new        seed=0" in out and "2 runs; every configuration resolves" in out
    bad = _study(tmp_path, {"tau": [2.0]}, name="bad.yaml")
    assert main(["sweep", str(bad), "--out", str(tmp_path / "out")]) == 2
    assert "invalid value for 'tau'" in capsys.readouterr().err
