"""The command line's help and its refusals: no abbreviated flags, train's flags grouped by Config's sections with
their allowed values and defaults, a description and argument help for every sub-command, and the nearest known
name for a misspelt config key wherever keys are read (config files, study files, the Python API)."""
import argparse
from dataclasses import fields

import pytest
import yaml
from run_helpers import one_line_cli as _cli

import fixmatch
from fixmatch.cli import build_parser
from fixmatch.config import Config, ConfigError, config_from_dict, resolve_config
from fixmatch.studies.sweep import load_study

TINY = dict(dataset="synthetic", model="cnn_small", num_labels=20, batch_size=8, mu=2, steps=4, eval_every=4,
            device="cpu")
TRAIN_GROUPS = ["data", "model", "algorithm", "augmentation", "optimisation", "evaluation and logging",
                "speed and processes", "run"]
# Keys with a fixed set of values (a test below checks that this is all of them).
ENUMERATED = {"label_selection", "on_bad_image", "method", "lu_norm", "weak_padding", "strong", "optimizer",
              "schedule", "amp", "on_nonfinite", "algorithm"}




def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _train_parser() -> argparse.ArgumentParser:
    return _subparsers(build_parser())["train"]


# --------------------------------------------------------------------------- no abbreviated flags

@pytest.mark.parametrize("argv, typo", [
    (["train", "--num-label", "40"], "--num-label"),
    (["train", "--num-label=40"], "--num-label=40"),
    (["train", "--num-labels", "40", "--step", "10"], "--step"),
    (["evaluate", "runs/x", "--weight", "raw"], "--weight"),
    (["predict", "run.pt", "a.png", "--top", "3"], "--top"),
    (["export", "run.pt", "--form", "onnx", "--out", "m.onnx"], "--form"),
    (["sweep", "study.yaml", "--out", "d", "--work", "2"], "--work"),
    (["report", "d", "--out", "r", "--ou", "s"], "--ou"),
    (["show-augment", "--dataset", "synthetic", "--out", "g.png", "--num-image", "2"], "--num-image"),
    (["models", "--num-class", "5"], "--num-class"),
    (["--hel"], "--hel"),
])
def test_abbreviated_flags_are_refused(argv, typo, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)  # parsing only: without the refusal these would run
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1
    assert f"unrecognized arguments: {typo}" in err


def test_every_parser_refuses_abbreviations():
    parser = build_parser()
    assert not parser.allow_abbrev
    for name, sub in _subparsers(parser).items():
        assert not sub.allow_abbrev, name


def test_a_misspelt_train_flag_starts_nothing_and_names_the_flag(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--num-label", "40", "--out", str(run), "--no-progress"]
    argv += [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    code, err = _cli(argv, capsys)
    assert code == 2
    assert "unrecognized arguments: --num-label; did you mean --num-labels? (see fixmatch train --help)" in err
    assert not run.exists()


# --------------------------------------------------------------------------- train --help

def test_train_help_groups_every_config_key_once_in_its_section():
    groups = {g.title: g for g in _train_parser()._action_groups}
    assert list(groups)[2:] == TRAIN_GROUPS  # after argparse's "positional arguments" and "options"
    for f in fields(Config):
        holders = [title for title, g in groups.items() if any(a.dest == f.name for a in g._group_actions)]
        assert holders == [f.metadata["group"]], f.name
    assert {a.dest for a in groups["run"]._group_actions} >= {"out", "resume"}


def test_train_help_lists_the_groups_in_order_and_every_flag_once():
    text = _train_parser().format_help()
    positions = [text.index(f"\n{title}:\n") for title in TRAIN_GROUPS]
    assert positions == sorted(positions)
    flags = [line.split()[0] for line in text.splitlines() if line.startswith("  --")]
    for f in fields(Config):
        flag = f.name.replace("_", "-")
        assert flags.count(f"--[no-]{flag}" if str(f.type).startswith("bool") else f"--{flag}") == 1, f.name


def test_every_enumerated_key_shows_its_choices_and_checks_the_same_ones():
    actions = {a.dest: a for a in _train_parser()._actions}
    enumerated = {f.name for f in fields(Config) if f.metadata["choices"]}
    assert enumerated == ENUMERATED
    for f in fields(Config):
        choices = f.metadata["choices"]
        if not choices:
            continue
        assert actions[f.name].metavar == "{" + ",".join(choices) + "}"
        for value in choices:
            resolve_config(overrides={f.name: value})
        with pytest.raises(ConfigError) as e:
            resolve_config(overrides={f.name: "no-such-value"})
        assert all(value in str(e.value) for value in choices), str(e.value)


def test_every_key_shows_its_default():
    actions = {a.dest: a for a in _train_parser()._actions}
    for f in fields(Config):
        default = "null" if f.default is None else str(f.default).lower() if isinstance(f.default, bool) \
            else str(f.default)
        assert actions[f.name].help.endswith(f"(default: {default})"), f.name


def test_train_usage_is_short():
    assert len(_train_parser().format_usage().splitlines()) == 1


# --------------------------------------------------------------------------- every sub-command is described

def test_every_subcommand_has_a_description_and_every_argument_help():
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert commands.help
    for name, sub in _subparsers(parser).items():
        assert sub.description, f"fixmatch {name} has no description"
        for action in sub._actions:
            assert action.help, f"fixmatch {name}: {action.dest} has no help"
        positionals = [a for a in sub._actions if not a.option_strings]
        assert all(a.help for a in positionals)


# --------------------------------------------------------------------------- did you mean

def test_a_misspelt_key_in_a_config_file_names_the_closest_key(tmp_path, capsys):
    f = tmp_path / "my.yaml"
    f.write_text("methd: supervised\n")
    with pytest.raises(ConfigError, match=f"unknown config key 'methd' in config file {f}; did you mean 'method'\\?$"):
        resolve_config(config_file=f)
    code, err = _cli(["train", "--config", str(f)], capsys)
    assert code == 2 and "did you mean 'method'?" in err


@pytest.mark.parametrize("key, close", [("num-labels", "num_labels"), ("Tau", "tau"), ("seeds", "seed"),
                                        ("weak_no_gard", "weak_no_grad"), ("t", "T")])
def test_dashes_case_and_small_typos_find_the_key(key, close):
    with pytest.raises(ConfigError, match=f"did you mean '{close}'"):
        resolve_config(overrides={key: 1})


def test_with_no_close_key_the_error_says_where_to_list_them(tmp_path):
    f = tmp_path / "my.yaml"
    f.write_text("learning_rate: 0.1\n")
    with pytest.raises(ConfigError) as e:
        resolve_config(config_file=f)
    message = str(e.value)
    assert message.endswith("see fixmatch train --help for the known keys")
    assert "did you mean" not in message and "eval_batch_size" not in message  # no list of fifty keys


def test_a_misspelt_key_in_a_study_file_names_the_closest_key(tmp_path):
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({"base": TINY, "grid": {"methd": ["fixmatch", "supervised"]}}))
    with pytest.raises(ConfigError, match="unknown config key 'methd' in its settings; did you mean 'method'"):
        load_study(study)
    study.write_text(yaml.safe_dump({"base": {**TINY, "presets": "fashion-mnist"}, "grid": {"seed": [0]}}))
    with pytest.raises(ConfigError, match="'presets' in its settings; did you mean 'preset'"):
        load_study(study)
    study.write_text(yaml.safe_dump({"base": TINY, "grids": {"seed": [0]}}))
    with pytest.raises(ConfigError, match="unknown top-level key 'grids'; did you mean 'grid'"):
        load_study(study)


def test_the_python_api_names_the_closest_key():
    with pytest.raises(TypeError, match="unexpected keyword argument 'methd'; did you mean 'method'"):
        fixmatch.Config(methd="supervised")
    with pytest.raises(ConfigError, match="unknown config key 'num-labels' in run.yaml; did you mean 'num_labels'"):
        config_from_dict({"num-labels": 40}, "run.yaml")
    with pytest.raises(ConfigError, match="unknown config key 'tua' in the overrides; did you mean 'tau'"):
        fixmatch.resolve_config(overrides={"tua": 0.9})
    assert fixmatch.Config(method="supervised").method == "supervised"  # real keys still work
