"""RunDir: the run directory's layout, its state, and whether a configuration may resume the run."""
import dataclasses
import os
from pathlib import Path

import pytest
import torch
import yaml

from fixmatch.config import Config, ConfigError, PretrainConfig
from fixmatch.runs.rundir import RunDir, RunDirError, RunState

TINY = dict(dataset="synthetic", model="cnn_small", num_labels=20, batch_size=8, mu=2, steps=8, eval_every=4,
            device="cpu")


def _write_config(run: RunDir, config: Config) -> None:
    run.path.mkdir(parents=True, exist_ok=True)
    run.config_file.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def _write_checkpoint(run: RunDir, config: dict) -> None:
    run.checkpoints.mkdir(parents=True, exist_ok=True)
    torch.save({"format": "fixmatch-checkpoint", "step": 4, "config": config, "w": torch.ones(2)},
               run.last_checkpoint)


def test_the_layout_is_the_documented_one():
    # The file names are part of the command-line contract (README: "The run directory").
    run = RunDir("runs/r")
    base = Path("runs/r")
    assert run.config_file == base / "config.yaml" and run.split_file == base / "split.json"
    assert run.metrics_file == base / "metrics.jsonl" and run.summary_file == base / "summary.json"
    assert run.time_budget_file == base / "time_budget.json" and run.error_file == base / "error.txt"
    assert run.last_checkpoint == base / "checkpoints" / "last.pt"
    assert run.best_checkpoint == base / "checkpoints" / "best.pt"
    assert run.tensorboard == base / "tensorboard" and run.lock_file == base / ".lock"


def test_a_run_dir_is_a_path_like_value():
    run = RunDir("runs/r")
    assert os.fspath(run) == os.fspath(Path("runs/r")) and str(run) == str(Path("runs/r"))
    assert RunDir(run) == run and RunDir(Path("runs/r")) == run and len({run, RunDir("runs/r")}) == 1
    assert RunDir("runs/other") != run


def test_state_follows_the_files_a_run_leaves(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.state is RunState.NEW and not run.is_run  # no directory yet
    _write_config(run, Config(**TINY))
    assert run.state is RunState.NEW and run.is_run  # killed before its first checkpoint: it starts afresh
    _write_checkpoint(run, Config(**TINY).to_dict())
    assert run.state is RunState.RESUMABLE
    run.summary_file.write_text("{}")
    assert run.state is RunState.FINISHED  # a finished run keeps its checkpoints


def test_a_folder_where_a_file_belongs_does_not_count(tmp_path):
    run = RunDir(tmp_path)
    run.summary_file.mkdir()
    run.last_checkpoint.mkdir(parents=True)
    run.config_file.mkdir()
    assert run.state is RunState.NEW and not run.is_run


def test_states_print_and_compare_as_their_names():
    # `fixmatch sweep --dry-run` prints f"{state:<10} {name}"; scripts compare with the plain names.
    assert f"{RunState.RESUMABLE:<10}|" == "resumable |" and str(RunState.FINISHED) == "finished"
    assert RunState.NEW == "new" and RunState("finished") is RunState.FINISHED


def test_find_lists_the_runs_below_a_folder_that_logged_metrics(tmp_path):
    for name in ("b", "a", "nested/c", "no-metrics"):
        run = RunDir(tmp_path / name)
        _write_config(run, Config(**TINY))
        if name != "no-metrics":
            run.metrics_file.write_text("")
    (tmp_path / "not-a-run").mkdir()
    assert RunDir.find(tmp_path) == [RunDir(tmp_path / n) for n in ("a", "b", "nested/c")]


def _write_pretrain_config(run: RunDir, config: PretrainConfig) -> None:
    run.path.mkdir(parents=True, exist_ok=True)
    run.config_file.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def test_find_leaves_out_pretrain_runs_which_report_no_accuracy(tmp_path):
    train, pre = RunDir(tmp_path / "train"), RunDir(tmp_path / "pre")
    _write_config(train, Config(**TINY))
    _write_pretrain_config(pre, PretrainConfig(dataset="synthetic"))
    for run in (train, pre):
        run.metrics_file.write_text("")
    assert (train.kind, pre.kind) == ("train", "pretrain")
    assert RunDir.find(tmp_path) == [train]


def test_each_kind_of_run_resumes_only_as_itself(tmp_path):
    train, pre = RunDir(tmp_path / "train"), RunDir(tmp_path / "pre")
    _write_config(train, Config(**TINY))
    _write_pretrain_config(pre, PretrainConfig(dataset="synthetic", steps=7))
    with pytest.raises(ConfigError, match=r"pre is a fixmatch pretrain run, not a train run; resume it with "
                                          r"fixmatch pretrain --out .*pre --resume"):
        pre.saved_config()
    with pytest.raises(ConfigError, match="is a fixmatch train run, not a pretrain run"):
        train.resume_config(None, PretrainConfig)
    assert pre.resume_config(None, PretrainConfig) == PretrainConfig(dataset="synthetic", steps=7)
    moved = PretrainConfig(dataset="synthetic", steps=7, device="cpu", progress=False)  # where and how: allowed
    assert pre.resume_config(moved, PretrainConfig) is moved
    with pytest.raises(ConfigError, match=r"cannot change 'temperature' when resuming \(0.5 -> 0.2\)"):
        pre.resume_config(PretrainConfig(dataset="synthetic", steps=7, temperature=0.2), PretrainConfig)


def test_default_is_named_after_the_data_set_method_labels_seed_and_time():
    run = RunDir.default(Config(**TINY, seed=3))
    assert run.path.parent == Path("runs") and run.path.name.startswith("synthetic-fixmatch-20-seed3-")
    folder = RunDir.default(dataclasses.replace(Config(**TINY), dataset="folder:data/my-images"))
    assert folder.path.name.startswith("my-images-fixmatch-20-seed0-")


def test_a_new_run_needs_a_directory_of_its_own(tmp_path):
    RunDir(tmp_path / "absent").check_unused()
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.lock_file.write_text("")  # its own lock, taken just before
    run.check_unused()
    run.metrics_file.write_text("")
    with pytest.raises(ConfigError, match="already exists; pass --resume to continue it or choose another --out"):
        run.check_unused()


def test_the_saved_config_is_read_from_a_regular_file_only(tmp_path):
    run = RunDir(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"cannot resume: .*config.yaml not found; is .* a fixmatch run directory"):
        run.saved_config()
    config = Config(**TINY, lr=0.1)
    _write_config(run, config)
    assert run.saved_config() == config
    elsewhere = tmp_path / "elsewhere.yaml"
    run.config_file.rename(elsewhere)
    run.config_file.symlink_to(elsewhere)
    with pytest.raises(RunDirError, match="is a symbolic link"):
        run.saved_config()


def test_a_resume_may_change_where_and_how_a_run_runs_but_not_what_it_computes(tmp_path):
    run = RunDir(tmp_path / "run")
    saved = Config(**TINY)
    _write_config(run, saved)
    assert run.resume_config(None) == saved  # --resume alone: the saved configuration
    moved = dataclasses.replace(saved, device="cuda", progress=False, data_dir="/elsewhere", compile=True)
    assert run.resume_changes(moved) == [] and run.resume_config(moved) is moved
    changed = dataclasses.replace(saved, seed=5, lr=0.1)
    assert run.resume_changes(changed) == [("lr", 0.03, 0.1), ("seed", 0, 5)]  # in the order of the keys
    with pytest.raises(ConfigError, match=r"cannot change 'lr' when resuming \(0.03 -> 0.1\); start a new run"):
        run.resume_config(changed)


def test_a_config_file_edited_since_the_last_checkpoint_is_refused(tmp_path):
    run = RunDir(tmp_path / "run")
    trained = Config(**TINY)
    _write_config(run, dataclasses.replace(trained, lr=0.5, steps=16, progress=False))
    run.resume_config(None)  # no checkpoint yet: the run restarts from step 0 with the file as it is
    _write_checkpoint(run, trained.to_dict())
    with pytest.raises(ConfigError) as e:
        run.resume_config(None)
    assert str(e.value) == (
        f"cannot resume: {run.config_file} no longer matches the run's last checkpoint (steps: 8 in the checkpoint, "
        f"16 in the file; lr: 0.03 in the checkpoint, 0.5 in the file); put the checkpoint's values back in the "
        f"file, or start a new run with another --out")
    _write_config(run, dataclasses.replace(trained, progress=False))  # a key a resume may change: accepted
    assert run.resume_config(None).progress is False


def test_a_checkpoint_older_than_a_key_was_trained_with_its_default(tmp_path):
    run = RunDir(tmp_path / "run")
    old = Config(**TINY).to_dict()
    del old["wd"]  # written before the key existed
    _write_checkpoint(run, old)
    _write_config(run, Config(**TINY))
    run.resume_config(None)  # the file's wd is the default: what the old run trained with
    _write_config(run, Config(**TINY, wd=0.01))
    with pytest.raises(ConfigError, match=r"wd: 0.0005 in the checkpoint, 0.01 in the file"):
        run.resume_config(None)


def test_an_unreadable_checkpoint_is_left_to_the_restore_to_name(tmp_path):
    run = RunDir(tmp_path / "run")
    _write_config(run, Config(**TINY, lr=0.5))
    run.checkpoints.mkdir()
    run.last_checkpoint.write_bytes(b"not a checkpoint")
    assert run.resume_config(None).lr == 0.5


def test_the_summary_is_read_back_or_named_missing(tmp_path):
    run = RunDir(tmp_path)
    with pytest.raises(RunDirError, match=r"summary.json is missing; resume the run with --resume to write it"):
        run.read_summary()
    run.summary_file.write_text('{"test_acc_last": 81.5}\n')
    assert run.read_summary() == {"test_acc_last": 81.5}


def test_the_lock_is_held_at_its_file_and_gone_afterwards(tmp_path):
    run = RunDir(tmp_path / "run")
    with run.lock() as path:
        assert path == run.path and run.lock_file.read_text() == f"{os.getpid()}\n"
        with pytest.raises(RunDirError, match="in use by another fixmatch process"), RunDir(run.path).lock():
            pass
    assert not run.lock_file.exists() and not run.path.exists()  # nothing written: the folder goes too
