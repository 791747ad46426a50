"""Property-based tests: random values of random types for every config key, in Python, YAML files and on the
command line. Each is either accepted (and passes its key's check) or refused with one line that names the key
and what it accepts; never a traceback."""
import contextlib
import importlib
import io
import math
from dataclasses import fields
from unittest import mock

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fixmatch.cli import main
from fixmatch.config import Config, ConfigError, resolve_config, validate_overrides

FIELDS = {f.name: f for f in fields(Config)}
TRAIN_MODULE = importlib.import_module("fixmatch.training.loop")  # the attribute fixmatch.training.loop is the function
FUZZ = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
    st.sampled_from(["auto", "cpu", "cuda:0", "cuda:x", "stop", "skip", "sgd", "cosine", "fixmatch", "random",
                     "ctaugment", "error", "all", "0", "1e-3", "-1", "nan", "inf", "true", "null"]),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


def _accepted(f) -> str:
    return f.metadata["accepted"] or "a value of type"


def _check_refusal(message: str, key: str) -> None:
    assert "\n" not in message.strip(), message
    assert f"'{key}'" in message, message
    assert _accepted(FIELDS[key]) in message, message


@pytest.mark.parametrize("key", sorted(FIELDS))
@FUZZ
@given(value=ANY_VALUE)
def test_every_key_accepts_or_refuses_in_one_line(key, value):
    f = FIELDS[key]
    try:
        out = validate_overrides({key: value}, "the test")[key]
    except ConfigError as e:
        _check_refusal(str(e), key)
        return
    check = f.metadata["check"]
    assert check is None or check(out)
    if isinstance(out, float):
        assert math.isfinite(out)  # no float key takes nan or inf
    Config(**{key: out})  # and it builds a Config


@pytest.mark.parametrize("key", sorted(FIELDS))
@FUZZ
@given(value=ANY_VALUE)
def test_every_key_in_a_yaml_file_accepts_or_refuses_in_one_line(tmp_path, key, value):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({key: value}))
    try:
        resolve_config(config_file=path)
    except ConfigError as e:
        _check_refusal(str(e), key)


@FUZZ
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=50).map(lambda b: b.decode("latin1"))))
def test_any_yaml_file_content_is_accepted_or_refused_in_one_line(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        resolve_config(config_file=path)
    except ConfigError as e:
        assert "\n" not in str(e).strip()


class _Started(Exception):
    """Raised by the stand-in for train(): the command line was accepted."""


def _run_cli(argv):
    err = io.StringIO()

    def fake_train(config, out=None, resume=False):
        raise _Started(config)
    with mock.patch.object(TRAIN_MODULE, "train", fake_train), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
        except _Started as started:
            return 0, started.args[0], err.getvalue()
    return code, None, err.getvalue()


def _cli_value(key):
    text = st.one_of(st.text(max_size=20), ANY_VALUE.map(str))
    if str(FIELDS[key].type).startswith("bool"):
        return st.one_of(st.just(None), text)  # None: the bare --flag / --no-flag
    return text


@pytest.mark.parametrize("key", sorted(FIELDS))
@FUZZ
@given(data=st.data())
def test_every_flag_accepts_or_refuses_in_one_line(key, data):
    flag = "--" + key.replace("_", "-")
    text = data.draw(_cli_value(key))
    if text is None:
        argv = ["train", data.draw(st.sampled_from([flag, "--no-" + flag[2:]]))]
    else:
        argv = ["train", f"{flag}={text}"]
    code, config, err = _run_cli(argv)
    if code == 0:
        value = getattr(config, key)
        check = FIELDS[key].metadata["check"]
        assert check is None or check(value)
        return
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert flag in err or f"'{key}'" in err, err
    if "invalid value" in err or "expects" in err:  # a value of the wrong kind or out of range
        assert _accepted(FIELDS[key]) in err, err


@FUZZ
@given(option=st.sampled_from(["--preset", "--config", "--out"]), text=st.text(max_size=30),
       resume=st.booleans())
def test_run_options_accept_or_refuse_in_one_line(tmp_path, option, text, resume):
    argv = ["train", f"{option}={text}"] + (["--resume"] if resume else [])
    code, _, err = _run_cli(argv)
    if code != 0:
        assert code == 2 and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("argv", [["train", "--out=\x00", "--resume"], ["train", "--config=a\x00b"],
                                  ["evaluate", "run\x00"], ["report", "s", "--out", "r\x00"]])
def test_a_nul_character_in_an_argument_is_one_line(argv):
    code, _, err = _run_cli(argv)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "NUL character" in err, err


@pytest.mark.parametrize("path_kind", ["folder", "binary"])
def test_unreadable_config_files_are_one_line(tmp_path, path_kind):
    path = tmp_path
    if path_kind == "binary":
        path = tmp_path / "c.yaml"
        path.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(ConfigError, match="config file"):
        resolve_config(config_file=path)
