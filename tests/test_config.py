import dataclasses

import pytest

from fixmatch.cli import main
from fixmatch.config import (
    PRESETS,
    Config,
    ConfigError,
    KeyType,
    check_config,
    check_runtime,
    key_types,
    resolve_config,
    short_repr,
    validate_overrides,
)


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


# --------------------------------------------------------------------------- types from the type hints

@dataclasses.dataclass
class _MoreKeys(Config):
    """Config with four more keys that have a type hint and no check of their own."""
    extra_flag: bool = False
    extra_count: int = 1
    extra_rate: float = 0.5
    extra_note: str | None = None


@pytest.mark.parametrize("key, value, accepted", [
    ("extra_flag", "yes", "true or false"), ("extra_flag", 1, "true or false"),
    ("extra_count", True, "a value of type int"), ("extra_count", 2.0, "a value of type int"),
    ("extra_count", 2**64, "a value of type int (at most 2^63 - 1 in magnitude)"),
    ("extra_rate", "0.5", "a value of type float"), ("extra_rate", None, "a value of type float"),
    ("extra_note", 5, "a value of type str | None"),
])
def test_a_new_keys_type_is_checked_from_its_hint_alone(key, value, accepted):
    with pytest.raises(ConfigError) as e:
        check_config(_MoreKeys(**{key: value}))
    assert str(e.value) == f"invalid value for '{key}' in the config: {short_repr(value)}; expected {accepted}"


def test_a_new_keys_values_of_its_type_pass_and_its_ints_become_floats():
    config = _MoreKeys(extra_flag=True, extra_count=-3, extra_rate=2.5, extra_note=None)
    assert check_config(config) is config
    out = validate_overrides({"extra_rate": 2, "extra_note": "x"}, "the test", _MoreKeys)
    assert out == {"extra_rate": 2.0, "extra_note": "x"} and isinstance(out["extra_rate"], float)


def test_any_dataclass_is_checked_by_its_hints():
    @dataclasses.dataclass
    class Knobs:
        on: bool = True
        maybe: bool | None = None
        size: int | None = None

    assert validate_overrides({"on": False, "maybe": None, "size": None}, "the test", Knobs) == \
        {"on": False, "maybe": None, "size": None}
    with pytest.raises(ConfigError, match=r"^invalid value for 'maybe' in the test: 'no'; expected true, false or null$"):
        validate_overrides({"maybe": "no"}, "the test", Knobs)
    with pytest.raises(ConfigError, match=r"^invalid value for 'size' in the test: 1.5; expected a value of type int \| None$"):
        validate_overrides({"size": 1.5}, "the test", Knobs)
    with pytest.raises(ConfigError, match=r"^unknown config key 'sise' in the test; did you mean 'size'\?$"):
        validate_overrides({"sise": 3}, "the test", Knobs)


def test_configs_types_are_its_hints_and_its_bool_keys_have_no_check_of_their_own():
    kinds = key_types(Config)
    assert kinds["weak_flip"] == KeyType(bool, nullable=True) and kinds["fold"] == KeyType(int, nullable=True)
    assert kinds["lr"] == KeyType(float) and kinds["dataset"] == KeyType(str) and kinds["fill"] == KeyType(float, True)
    flags = {f.name: f for f in dataclasses.fields(Config) if kinds[f.name].base is bool}
    assert set(flags) == {"svhn_extra", "dist_align", "weak_flip", "nesterov", "progress", "channels_last", "compile",
                          "weak_no_grad", "sync_bn", "flexmatch_warmup"}
    assert all(f.metadata["check"] is None for f in flags.values())
    assert flags["compile"].metadata["accepted"] == "true or false"  # the words --help and errors use
    with pytest.raises(TypeError, match="one type, or one type \\| None"):
        KeyType.of(int | str)


def test_an_int_is_a_number_for_a_nullable_float_key_too():
    # fill is `float | None`: 1 means 1.0, as it does for cutout (`float`) and on the command line (--fill 1)
    assert resolve_config(overrides={"fill": 1}).fill == 1.0
    assert resolve_config(overrides={"fill": None}).fill is None


# --------------------------------------------------------------------------- rules between keys, and the runtime

@pytest.mark.parametrize("overrides, message", [
    (dict(label_selection="file"), "label_selection 'file' needs --split-file FILE (a split.json from an earlier run)"),
    (dict(label_selection="representative", split_file="a/split.json"),
     "--split-file is used only with label_selection 'file', not 'representative'; drop one"),
    (dict(fold=3), "--fold selects one of STL-10's official labeled folds; it does not apply to cifar10: leave it unset"),
    (dict(svhn_extra=True), "--svhn-extra adds SVHN's extra images; it does not apply to cifar10"),
    (dict(strong="ctaugment", randaugment_ops=3),
     "--randaugment-ops applies to --strong randaugment only, not ctaugment; leave it at its default (2) or use "
     "--strong randaugment"),
])
def test_rules_between_keys_are_refused_with_the_config_before_any_data_is_read(tmp_path, overrides, message):
    # data_dir is empty: a rule that waited for the data set would fail on the missing files instead
    with pytest.raises(ConfigError) as e:
        check_config(Config(**overrides, data_dir=str(tmp_path)))
    assert str(e.value) == message


@pytest.mark.parametrize("overrides", [dict(split_file="a/split.json"), dict(label_selection="file", split_file="s.json"),
                                       dict(dataset="stl10", fold=3, num_labels=1000), dict(dataset="svhn", svhn_extra=True)])
def test_keys_that_go_together_pass(overrides):
    check_config(Config(**overrides))


@pytest.mark.parametrize("overrides, device_type, world_size, compiler, message", [
    (dict(batch_size=30), "cpu", 4, "g++",
     "--batch-size 30 is the global batch and must be divisible by the 4 processes; choose a multiple of 4"),
    (dict(amp="fp16"), "cpu", 1, "g++",
     "--amp fp16 needs CUDA (float16 with loss scaling); on the CPU use --amp bf16 or none"),
    (dict(amp="fp16"), "mps", 1, None,
     "--amp fp16 needs CUDA (float16 with loss scaling); on the CPU use --amp bf16 or none"),
    (dict(compile=True), "cpu", 1, None,
     "--compile on the CPU needs a C++ compiler (g++, c++ or clang++, or $CXX) and none was found on PATH; install "
     "one or leave --compile off"),
    (dict(sync_bn=True), "cpu", 2, "g++",
     "--sync-bn needs CUDA: PyTorch's SyncBatchNorm runs on GPUs only; leave --sync-bn off on the CPU (each process "
     "then normalises with its own batch statistics)"),
])
def test_check_runtime_refuses_what_this_device_or_process_count_cannot_run(overrides, device_type, world_size,
                                                                            compiler, message):
    with pytest.raises(ConfigError) as e:
        check_runtime(Config(**overrides), device_type, world_size, compiler)
    assert str(e.value) == message


def test_check_runtime_accepts_what_the_device_can_run():
    check_runtime(Config(batch_size=32, amp="fp16", compile=True, sync_bn=True), "cuda", 4, None)  # no C++ on CUDA
    check_runtime(Config(compile=True, amp="bf16"), "cpu", 1, "g++")
    check_runtime(Config(batch_size=30), "cpu", 1, None)
