import pytest

from fixmatch.cli import main
from fixmatch.config import PRESETS, Config, ConfigError, resolve_config


def test_defaults_are_the_paper_setting():
    c = Config()
    assert (c.batch_size, c.mu, c.tau, c.lambda_u) == (64, 7, 0.95, 1.0)
    assert (c.lr, c.momentum, c.nesterov, c.wd, c.ema) == (0.03, 0.9, True, 5e-4, 0.999)
    assert (c.steps, c.eval_every, c.model) == (2**20, 1024, "wrn28_2")


@pytest.mark.parametrize("preset", ["cifar10", "cifar100", "svhn", "stl10"])
def test_paper_presets_are_the_papers_settings(preset):
    from fixmatch.config import check_config
    from fixmatch.studies.report import paper_accuracy
    c = check_config(resolve_config(preset=preset))
    assert c.dataset == preset
    # the paper's network for the data set and a label count of its Table 2: reports set the run beside it
    assert paper_accuracy(c.to_dict()) is not None
    assert (c.batch_size, c.mu, c.tau, c.lambda_u, c.T, c.lu_norm) == (64, 7, 0.95, 1.0, 1.0, "all")
    assert (c.lr, c.momentum, c.nesterov, c.schedule, c.warmup) == (0.03, 0.9, True, "cosine", 0)
    assert (c.steps, c.eval_every, c.ema) == (2**20, 1024, 0.999)
    assert c.wd == (1e-3 if preset == "cifar100" else 5e-4)
    assert (c.strong, c.cutout, c.weak_translate, c.weak_padding) == ("randaugment", 0.5, 0.125, "reflect")
    assert not (c.weak_no_grad or c.dist_align or c.svhn_extra) and c.fold is None


def test_precedence_defaults_preset_file_command_line(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lr: 0.1\nmu: 3\n")
    c = resolve_config("fashion-mnist", f, {"mu": 5})
    assert c.model == PRESETS["fashion-mnist"]["model"]  # from the preset
    assert c.lr == 0.1                                    # file beats preset
    assert c.mu == 5                                      # command line beats file
    assert c.tau == 0.95                                  # default


@pytest.mark.parametrize("overrides, key", [
    ({"tau": 1.5}, "tau"), ({"mu": 0}, "mu"), ({"mu": 2.5}, "mu"), ({"lr": -1.0}, "lr"),
    ({"method": "mixmatch"}, "method"), ({"nesterov": "yes"}, "nesterov"), ({"steps": True}, "steps"),
    ({"lr": float("nan")}, "lr"), ({"num_labels": "40"}, "num_labels"), ({"device": "tpu"}, "device"),
])
def test_bad_values_are_rejected_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=f"'{key}' in the overrides:"):  # the API's words, not the command line's
        resolve_config(overrides=overrides)


def test_unknown_keys_in_file_are_rejected(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="unknown config key 'learning_rate'"):
        resolve_config(config_file=f)


def test_int_accepted_for_float_keys(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lambda_u: 2\n")
    assert resolve_config(config_file=f).lambda_u == 2.0


@pytest.mark.parametrize("argv, fragment", [
    (["train", "--tau", "2"], "'tau' in the command line:"),
    (["train", "--mu", "seven"], "--mu expects an integer"),
    (["train", "--preset", "imagenet"], "invalid choice"),
    (["train", "--no-such-flag"], "unrecognized arguments"),
    (["train", "--config", "/nonexistent/c.yaml"], "config file not found"),
    (["train", "--resume"], "--resume needs --out"),
    (["evaluate", "/nonexistent/run"], "no such run directory or checkpoint"),
])
def test_cli_errors_are_one_line_and_exit_nonzero(argv, fragment, capsys):
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    assert fragment in err
    assert len(err.strip().splitlines()) == 1


def test_existing_run_dir_is_refused_without_resume(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("precious")
    assert main(["train", "--dataset", "synthetic", "--out", str(run)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (run / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in run.iterdir()) == ["keep.txt"]


def test_resume_of_a_folder_that_is_no_run_is_refused_and_left_alone(tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "keep.txt").write_text("precious")
    assert main(["train", "--out", str(folder), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "config.yaml not found" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in folder.iterdir()) == ["keep.txt"]


def test_api_train_without_a_config_is_refused():
    import fixmatch
    with pytest.raises(ConfigError, match="needs a Config unless it resumes"):
        fixmatch.train(None)


def test_split_file_with_another_label_count_is_refused_before_the_run_starts(tmp_path, capsys):
    base = ["train", "--dataset", "synthetic", "--model", "cnn_small", "--steps", "2", "--eval-every", "2",
            "--batch-size", "8", "--mu", "1", "--no-progress"]
    assert main(base + ["--num-labels", "40", "--out", str(tmp_path / "a")]) == 0
    capsys.readouterr()
    argv = base + ["--num-labels", "20", "--split-file", str(tmp_path / "a" / "split.json"), "--out", str(tmp_path / "b")]
    assert main(argv) == 2
    assert "the split has 40 labeled images but num_labels is 20" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_presets_command_lists_values(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "cifar10:" in out and "fashion-mnist:" in out and "cnn_small" in out
    assert "cifar100:\n" in out and "  wd: 0.001  (default 0.0005)" in out and "stl10:\n" in out
