"""Hostile and hand-edited configuration: YAML alias bombs, deep nesting and duplicate keys in every YAML the
project reads, integers in forms other than plain ASCII decimals, a config.yaml edited under a resumable run,
and output into a closed pipe. Each is refused in one line (or, for the pipe, ends quietly), never a traceback."""
import io
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from run_helpers import one_line_cli as _cli

import fixmatch
from fixmatch.cli import main
from fixmatch.config import (
    MAX_YAML_DEPTH,
    MAX_YAML_VALUES,
    Config,
    ConfigError,
    check_config,
    parse_yaml,
    resolve_config,
    validate_overrides,
)
from fixmatch.runs.checkpoint import load_checkpoint
from fixmatch.studies.report import load_runs
from fixmatch.studies.sweep import load_study, run_sweep

QUICK = dict(dataset="synthetic", model="cnn_small", num_labels=40, batch_size=8, mu=2, lr=0.05, ema=0.9,
             eval_batch_size=500, progress=False, device="cpu")

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py




def _bomb(levels, key="steps"):
    """The "billion laughs" under ``key``: a list of lists whose last expands to 9**levels strings, in a file of
    about 50*levels bytes."""
    lines = [f"{key}:", '  - &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"  - &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def _deep(levels):
    return "steps: " + "[" * levels + "]" * levels + "\n"


# --------------------------------------------------------------------------- alias bombs, nesting, duplicates

@pytest.mark.parametrize("levels", [5, 9])  # 59,049 and 387,420,489 values once expanded
def test_alias_bomb_in_a_config_file_is_refused_at_once_in_a_short_line(tmp_path, capsys, levels):
    path = tmp_path / "bomb.yaml"
    path.write_text(_bomb(levels))
    t0 = time.perf_counter()
    code, err = _cli(["train", "--config", str(path)], capsys)
    assert time.perf_counter() - t0 < 5
    assert code == 2 and f"more than {MAX_YAML_VALUES} values once its aliases are expanded" in err
    assert len(err) < 300  # nothing of the expanded value is quoted


def test_aliases_within_the_budget_still_work(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: &rate 0.1\nwd: 0.0005\nlambda_u: *rate\n")
    assert resolve_config(config_file=path).lambda_u == 0.1


def test_alias_to_the_value_that_contains_it_is_refused():
    with pytest.raises(ConfigError, match=r"alias \*a on line 1 refers to a value that contains it"):
        parse_yaml("steps: &a [1, *a]\n", "config file c.yaml")


@pytest.mark.parametrize("text", [_deep(100_000), "".join("  " * i + "a:\n" for i in range(2000)) + "  " * 2000 + "1"])
def test_deep_nesting_is_refused_before_it_is_built(tmp_path, capsys, text):
    path = tmp_path / "deep.yaml"
    path.write_text(text)
    code, err = _cli(["train", "--config", str(path)], capsys)
    assert code == 2 and f"nested more than {MAX_YAML_DEPTH} levels deep" in err  # not a RecursionError


def test_duplicate_key_is_refused_naming_it_and_its_lines(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 40\nlr: 0.1\nsteps: 30\n")
    code, err = _cli(["train", "--config", str(path)], capsys)
    assert code == 2 and "key 'steps' is given twice (lines 1 and 3); keep one of them" in err


def test_merge_keys_may_still_be_overridden():
    data = parse_yaml("base: &b {lr: 0.1, mu: 3}\nrun: {<<: *b, lr: 0.2}\n", "study file s.yaml")
    assert data["run"] == {"lr": 0.2, "mu": 3}


@pytest.mark.parametrize("text", ["a: 2001-13-45\n", "a: !!bool maybe\n", "a: !!float abc\n", "a: !!timestamp x\n"])
def test_values_yaml_cannot_build_are_one_line(text):
    with pytest.raises(ConfigError, match="holds a value that YAML cannot build"):
        parse_yaml(text, "config file c.yaml")


def _study(tmp_path, text):
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, message", [
    (_bomb(5, key="description"), "values once its aliases are expanded"),
    ("grid:\n  seed: " + "[" * 1000 + "]" * 1000 + "\n", "nested more than"),
    ("base: {steps: 8}\ngrid: {seed: [0]}\nbase: {steps: 9}\n", "key 'base' is given twice (lines 1 and 3)"),
    ("grid: {seed: [0], seed: [1]}\n", "key 'seed' is given twice"),
    ("grid: {steps: [1_000]}\n", "invalid value for 'steps' in its settings: '1_000'"),
    ("grid: {seed: [0x10]}\n", "invalid value for 'seed' in its settings: '0x10'"),
    ("1: x\nfoo: y\n", "unknown top-level key"),  # keys of two types: no TypeError from sorting them
    ("grid:\n  seed: [" + ", ".join(map(str, range(200))) + "]\n  num_labels: ["
     + ", ".join(map(str, range(10, 1010, 10))) + "]\n", "make 20000 runs, more than 10000"),
])
def test_hostile_study_files_are_refused_in_one_line(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        load_study(_study(tmp_path, text))
    assert "\n" not in str(e.value) and len(str(e.value)) < 400


def test_study_bomb_stops_the_sweep_before_anything_is_written(tmp_path):
    with pytest.raises(ConfigError, match="values once its aliases are expanded"):
        # (were the bomb let through, the grid's --fold for CIFAR-10 would stop the sweep before any run starts)
        run_sweep(_study(tmp_path, _bomb(5, key="description") + "grid: {fold: [3]}\n"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_sweep_dry_run_refuses_a_study_bomb_in_one_line(tmp_path, capsys):
    code, err = _cli(["sweep", str(_study(tmp_path, _bomb(9, key="description"))), "--out", str(tmp_path / "o"),
                      "--dry-run"], capsys)
    assert code == 2 and "values once its aliases are expanded" in err


def test_unreadable_study_file_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="cannot read study file"):
        load_study(tmp_path)  # a folder


def _fake_run_dir(tmp_path, config_text):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(config_text)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "test_acc": 10.0}) + "\n")
    (run / "summary.json").write_text("{}")
    return run


@pytest.mark.parametrize("text, message", [(_bomb(5), "values once its aliases are expanded"),
                                           (_deep(100_000), "nested more than"),
                                           # refused without training even if the duplicate were let through
                                           ("dataset: synthetic\nnum_labels: 45\nsteps: 4\nsteps: 5\n",
                                            "key 'steps' is given twice")])
def test_hostile_run_config_is_refused_on_resume_and_by_report(tmp_path, capsys, text, message):
    run = _fake_run_dir(tmp_path, text)
    code, err = _cli(["train", "--out", str(run), "--resume"], capsys)
    assert code == 2 and message in err and len(err) < 400
    with pytest.raises(ConfigError, match=message) as e:
        load_runs([run])
    assert len(str(e.value)) < 400
    code, err = _cli(["report", str(run), "--out", str(tmp_path / "report")], capsys)
    assert code == 2 and message in err


# --------------------------------------------------------------------------- values quoted in errors are short

@pytest.mark.parametrize("overrides", [{"method": "x" * 100_000}, {"steps": [list(range(1000))] * 1000},
                                       {"seed": 10**5000}, {"k" * 100_000: 1}])
def test_errors_quote_at_most_a_short_piece_of_a_value(overrides):
    with pytest.raises(ConfigError) as e:
        validate_overrides(overrides, "the test")
    assert len(str(e.value).split("; known keys")[0]) < 200


def test_command_line_errors_are_capped(tmp_path, capsys):
    code, err = _cli(["train", "--dataset", "x" * 50_000, "--fold", "3", "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and len(err) < 300


# --------------------------------------------------------------------------- integers: plain ASCII decimals only

def _never_starts(tmp_path):
    """Flags that stop a run that got past the flag's own check before it reads any data (--fold is STL-10's)."""
    return ["--fold", "3", "--out", str(tmp_path / "run")]


@pytest.mark.parametrize("text", ["٤٠", "1_000", "100000000000000000000000000", "0x10", " 40", "4" * 5000, "४०"])
def test_integer_flags_take_plain_ascii_decimals_within_64_bits(tmp_path, capsys, text):
    code, err = _cli(["train", f"--steps={text}", *_never_starts(tmp_path)], capsys)
    assert code == 2 and "--steps expects an integer (ASCII digits, 64-bit)" in err and len(err) < 400


@pytest.mark.parametrize("argv", [["sweep", "s.yaml", "--out", "o", "--workers", "٢"],
                                  ["predict", "c.pt", "x.png", "--top-k", "100000000000000000000000000"],
                                  ["show-augment", "--dataset", "x", "--out", "o.png", "--num-images", "1_0"],
                                  ["show-augment", "--dataset", "x", "--out", "o.png", "--cutout", "٠.٥"]])
def test_the_other_number_flags_take_plain_ascii_too(capsys, argv):
    code, err = _cli(argv, capsys)
    assert code == 2 and f"{argv[-2]} expects a" in err and "(ASCII digits" in err


@pytest.mark.parametrize("text", ["١.٥", "1_0.5", " 0.1"])
def test_number_flags_take_ascii_only(tmp_path, capsys, text):
    code, err = _cli(["train", f"--lr={text}", *_never_starts(tmp_path)], capsys)
    assert code == 2 and "--lr expects a number (ASCII digits)" in err


@pytest.mark.parametrize("text", ["1_000", "0x10", "1:30", "!!int '٤٠'", "0b101", "100000000000000000000000000",
                                  "9" * 5000])
def test_integer_keys_in_yaml_take_plain_decimals_only(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(f"steps: {text}\n")
    with pytest.raises(ConfigError, match="invalid value for 'steps'") as e:
        resolve_config(config_file=path)
    assert len(str(e.value)) < 300


def test_plain_decimals_keep_working(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 40\nseed: 010\nwarmup: +3\nlr: 1\n")  # 010 is ten, not YAML 1.1's octal eight
    c = resolve_config(config_file=path)
    assert (c.steps, c.seed, c.warmup, c.lr) == (40, 10, 3, 1.0)
    assert resolve_config(overrides={"steps": 2**63 - 1}).steps == 2**63 - 1


def test_api_refuses_integers_beyond_64_bits():
    with pytest.raises(ConfigError, match=r"'eval_every' in the config: 1000000000000000000000000; expected a "
                                          r"positive integer \(at most 2\^63 - 1 in magnitude\)"):
        check_config(Config(eval_every=10**24))


# --------------------------------------------------------------------------- config.yaml edited under a run

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("trained") / "run"
    fixmatch.train(Config(**QUICK, steps=4, eval_every=4), out=run)
    return run


@pytest.fixture
def trained_run(finished_run, tmp_path):
    """A copy of a finished 4-step run with its checkpoint, for each test to change."""
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


def _edit(run, **changes):
    path = run / "config.yaml"
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), **changes}, sort_keys=False))


def test_hand_edited_config_yaml_is_refused_on_resume(trained_run, capsys):
    run = trained_run
    before = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    metrics = (run / "metrics.jsonl").read_text()
    _edit(run, lr=5.0, steps=3)
    capsys.readouterr()
    code, err = _cli(["train", "--out", str(run), "--resume"], capsys)
    assert code == 2
    assert "config.yaml no longer matches the run's last checkpoint" in err
    assert "steps: 4 in the checkpoint, 3 in the file" in err and "lr: 0.05 in the checkpoint, 5.0 in the file" in err
    assert "put the checkpoint's values back in the file, or start a new run" in err
    with pytest.raises(ConfigError, match="no longer matches"):  # the API's resume too
        fixmatch.train(None, out=run, resume=True)
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()} == before
    assert (run / "metrics.jsonl").read_text() == metrics
    assert load_checkpoint(run / "checkpoints" / "last.pt")["config"]["lr"] == 0.05


def test_keys_that_may_change_on_resume_may_change_in_config_yaml_too(trained_run, tmp_path, capsys):
    run = trained_run
    _edit(run, on_nonfinite="skip", data_dir=str(tmp_path / "elsewhere"))
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume"]) == 0


def test_edited_config_yaml_without_a_checkpoint_has_nothing_to_compare(trained_run):
    run = trained_run
    for p in (run / "checkpoints").iterdir():  # as a run killed before its first checkpoint leaves it
        p.unlink()
    _edit(run, steps=2, eval_every=2)
    assert fixmatch.train(None, out=run, resume=True)["steps"] == 2  # restarted from step 0 with the file


# --------------------------------------------------------------------------- output into a closed pipe

class _ClosedPipe(io.StringIO):
    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")


def test_output_into_a_closed_pipe_ends_quietly(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    assert main(["presets"]) == 141
    assert capsys.readouterr().err == ""


@pytest.mark.slow  # a fresh interpreter that imports torch
def test_closed_pipe_in_a_real_process_leaves_no_traceback():
    proc = subprocess.Popen([sys.executable, "-m", "fixmatch", "presets"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first line is written, as with `| head -0`
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 141
    assert err == b""
