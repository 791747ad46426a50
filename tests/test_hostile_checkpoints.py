"""Damaged and hand-edited checkpoints: each is refused in one line naming the file and the field, before
anything is allocated for it, by fixmatch.load, evaluate, predict, export and train --resume."""
import json
import shutil
import struct
import zipfile

import pytest
import torch
from PIL import Image

import fixmatch
import fixmatch.inference.export
from fixmatch.cli import main
from fixmatch.config import Config, ConfigError
from fixmatch.runs.checkpoint import DIGEST_KEY, CheckpointError, load_checkpoint, save_checkpoint, tensor_digest
from fixmatch.runs.model_spec import MAX_INPUT_SIDE

TINY = dict(dataset="synthetic", model="cnn_small", method="supervised", num_labels=40, batch_size=8, steps=6,
            eval_every=3, lr=0.05, ema=0.9, eval_batch_size=512, progress=False, device="cpu")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run (two evaluations: best.pt and last.pt) trained once for the module."""
    out = tmp_path_factory.mktemp("hostile") / "run"
    fixmatch.train(Config(**TINY), out=out)
    return out


@pytest.fixture(scope="module")
def image(run, tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "img.png"
    Image.new("RGB", (16, 16), (120, 30, 200)).save(path)
    return path


def _edited(run, path, edit):
    """A copy of the run's last.pt with ``edit(state)`` applied, saved as a normal checkpoint (checksum and all)."""
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    edit(state)
    save_checkpoint(state, path)
    return path


def _setter(key, value):
    def edit(state):
        state[key] = value
    return edit


def _flip_a_byte_of_tensor_data(path):
    """Flips one bit in the middle of the largest tensor's bytes (the zip entries are stored uncompressed)."""
    with zipfile.ZipFile(path) as z:
        entry = max(z.infolist(), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[entry.header_offset + 26:entry.header_offset + 30])
    raw[entry.header_offset + 30 + name_len + extra_len + entry.file_size // 2] ^= 0x01
    path.write_bytes(bytes(raw))


def _one_line_error(capsys, code, *needles):
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("fixmatch: error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def _cli_refuses(capsys, ckpt, image, tmp_path, *needles):
    """fixmatch evaluate, predict and export each end in one line containing ``needles``."""
    for argv in (["evaluate", str(ckpt), "--device", "cpu"], ["predict", str(ckpt), str(image), "--device", "cpu"],
                 ["export", str(ckpt), "--format", "torchscript", "--out", str(tmp_path / "m.pt")]):
        _one_line_error(capsys, main(argv), *needles)
    assert not (tmp_path / "m.pt").exists()


# ------------------------------------------------------------------ the model description (item: sane bounds)

@pytest.mark.parametrize("edit, message", [
    (_setter("input_size", [100000, 100000]), f"input size (100000, 100000) is over the limit of {MAX_INPUT_SIDE}"),
    (_setter("in_channels", 100), "100 input channels (1 to 4 are possible)"),
    (_setter("class_names", [f"c{i}" for i in range(200_000)]), "200000 class names, over the limit of 100000"),
    (_setter("class_names", [f"c{i}" for i in range(1000)]),
     "the description lists 1000 class names but 'fc.weight' has 10 outputs"),
    (_setter("class_names", ["a"] * 10), "the class names are not unique"),
    (_setter("mean", [2.0, 0.5, 0.5]), r"mean (2.0, 0.5, 0.5) must lie in [0, 1]"),
    (_setter("mean", [float("inf"), 0.5, 0.5]), "must lie in [0, 1]"),
    (_setter("std", [1e30, 0.2, 0.2]), "must be positive (and at most 1"),
    (_setter("model_name", "nope"), "unknown model 'nope' (known models: "),
    (_setter("model_kwargs", {"image_size": [16, 16], "widths": [4096, 4096, 4096, 4096]}),
     "the description implies"),
    (_setter("model_kwargs", {"image_size": [16, 16], "widths": [10**9]}), "not a finite number up to 4096"),
    (_setter("model_kwargs", {"image_size": [32, 32]}), "image_size [32, 32] of the network differs from the input "
                                                         "size (16, 16)"),
    (_setter("model_kwargs", {"image_size": [16, 16], "bogus": 1}),
     "its model description cannot build 'cnn_small' (SmallCNN.__init__() got an unexpected keyword argument"),
    (lambda s: s.update(in_channels=1, mean=[0.5], std=[0.2]), "'features.0.weight' is (32, 3, 3, 3) in the file "
                                                                "but (32, 1, 3, 3) in the described network"),
    (_setter("input_size", [16, float("inf")]), "malformed model description (cannot convert float infinity"),
], ids=["huge-input", "channels", "too-many-classes", "classes-vs-classifier", "duplicate-classes", "mean-range",
        "mean-inf", "std-huge", "unknown-model", "implied-params", "kwarg-huge", "kwarg-size", "kwarg-unknown",
        "channels-vs-weights", "size-inf"])
def test_description_is_checked_before_anything_is_built(run, tmp_path, edit, message):
    bad = _edited(run, tmp_path / "bad.pt", edit)
    with pytest.raises(CheckpointError) as err:
        fixmatch.load(bad)
    assert message in str(err.value) and "\n" not in str(err.value) and str(bad) in str(err.value)


def test_huge_input_size_is_refused_by_every_command_in_one_line(run, tmp_path, image, capsys):
    bad = _edited(run, tmp_path / "huge.pt", _setter("input_size", [100000, 100000]))
    _cli_refuses(capsys, bad, image, tmp_path, str(bad), "over the limit of 2048 pixels a side")


def test_safetensors_description_is_checked_too(run, tmp_path):
    pytest.importorskip("safetensors", reason="safetensors is not installed (pip install 'fixmatch[export]')")
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    good = tmp_path / "good.safetensors"
    fixmatch.inference.export.export_model(run, "safetensors", good)
    with safe_open(str(good), framework="pt") as f:
        meta = f.metadata()
    description = json.loads(meta["fixmatch"])
    for field, value, message in (("input_size", [100000, 100000], "over the limit of 2048"),
                                  ("class_names", [f"c{i}" for i in range(11)], "lists 11 class names")):
        bad = tmp_path / f"{field}.safetensors"
        save_file(load_file(str(good)), str(bad), metadata={**meta, "fixmatch": json.dumps({**description,
                                                                                              field: value})})
        with pytest.raises(CheckpointError, match=message):
            fixmatch.load(bad)


# ------------------------------------------------------------------ checksum of the tensor data

def test_digest_is_stable_through_save_and_load_and_sees_every_tensor(run, tmp_path):
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state[DIGEST_KEY] == tensor_digest(state)  # the stored digest is not part of what it covers
    changed = {**state, "model": dict(state["model"])}
    changed["model"]["fc.bias"] = state["model"]["fc.bias"].clone()
    changed["model"]["fc.bias"][3] += 1e-6
    assert tensor_digest(changed) != state[DIGEST_KEY]
    swapped = {**state, "model": {**state["model"], "fc.bias": state["ema"]["fc.bias"]}}
    assert tensor_digest(swapped) != state[DIGEST_KEY]
    reordered = dict(reversed(list(state.items())))  # the order a file keeps its entries in does not matter
    assert tensor_digest(reordered) == state[DIGEST_KEY]
    loops = [torch.ones(2)]
    loops.append(loops)  # a container that holds itself (a crafted file can) still ends
    assert tensor_digest({"x": loops}).startswith("blake2b-256:")


def test_a_flipped_bit_in_tensor_data_is_named_in_one_line(run, tmp_path, image, capsys):
    damaged = tmp_path / "last.pt"
    shutil.copy(run / "checkpoints" / "last.pt", damaged)
    _flip_a_byte_of_tensor_data(damaged)
    torch.load(damaged, weights_only=True)  # torch itself notices nothing
    for load in (load_checkpoint, fixmatch.load):
        with pytest.raises(CheckpointError, match="is damaged: its tensor data does not match the checksum") as err:
            load(damaged)
        assert str(damaged) in str(err.value) and "best.pt" in str(err.value) and "\n" not in str(err.value)
    _cli_refuses(capsys, damaged, image, tmp_path, str(damaged), "is damaged", "best.pt")


def test_checkpoints_without_a_digest_still_load_with_one_note(run, tmp_path, capsys):
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    del state[DIGEST_KEY]
    old = tmp_path / "old.pt"
    torch.save(state, old)  # as an earlier version wrote it
    capsys.readouterr()
    first = fixmatch.load(old)
    assert fixmatch.load(old).step == first.step == 6
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{old} has no checksum of its tensors" in err


def test_safetensors_exports_carry_a_digest_that_is_checked(run, tmp_path, capsys):
    pytest.importorskip("safetensors", reason="safetensors is not installed (pip install 'fixmatch[export]')")
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    out = tmp_path / "model.safetensors"
    assert main(["export", str(run), "--format", "safetensors", "--out", str(out)]) == 0
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta[DIGEST_KEY] == tensor_digest(load_file(str(out)))
    fixmatch.load(out)

    raw = bytearray(out.read_bytes())
    raw[len(raw) - 100] ^= 0x01  # the tensor data follows the header
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"damaged.safetensors is damaged: .*export it again") as err:
        fixmatch.load(damaged)
    assert "\n" not in str(err.value)

    older = tmp_path / "older.safetensors"  # exported before the digest was written: loads, with a note
    save_file(load_file(str(out)), str(older), metadata={k: v for k, v in meta.items() if k != DIGEST_KEY})
    capsys.readouterr()
    fixmatch.load(older)
    assert "older.safetensors has no checksum" in capsys.readouterr().err


# ------------------------------------------------------------------ malformed fields

@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("step"), "its field 'step' is missing"),
    (_setter("step", "7"), "its field 'step' is '7', not an integer >= 0"),
    (_setter("step", -3), "its field 'step' is -3, not an integer >= 0"),
    (_setter("ema", [1, 2]), "its ema weights are not a state dict of named tensors (found list)"),
    (_setter("ema", {"fc.weight": "abc"}), "its ema weights are not a state dict of named tensors"),
    (lambda s: s.pop("model") and s.update(ema=None), "its field 'model' is missing"),
    (_setter("config", [1]), "its field 'config' is a list, not a mapping"),
], ids=["step-missing", "step-text", "step-negative", "ema-list", "ema-values", "no-weights", "config-list"])
def test_malformed_fields_are_named_in_one_line(run, tmp_path, edit, message):
    bad = _edited(run, tmp_path / "bad.pt", edit)
    with pytest.raises(CheckpointError) as err:
        fixmatch.load(bad)
    assert message in str(err.value) and str(bad) in str(err.value) and "\n" not in str(err.value)


def test_nonfinite_weights_are_refused_by_every_command(run, tmp_path, image, capsys):
    def poison(state):
        state["ema"]["fc.weight"][0, 0] = float("nan")
    bad = _edited(run, tmp_path / "nan.pt", poison)
    with pytest.raises(CheckpointError, match=r"its ema weights hold non-finite values \(NaN or inf\) in 'fc.weight'"):
        fixmatch.load(bad)
    _cli_refuses(capsys, bad, image, tmp_path, str(bad), "non-finite values", "'fc.weight'")
    assert fixmatch.load(bad, weights="raw").step == 6  # the raw weights are finite


# ------------------------------------------------------------------ train --resume

def _resume_refuses(run, tmp_path, capsys, edit=None, damage=False):
    """Resumes a copy of the run whose last.pt was edited; the run directory must be left as it was."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    last = copy / "checkpoints" / "last.pt"
    if edit is not None:
        _edited(run, last, edit)
    if damage:
        _flip_a_byte_of_tensor_data(last)
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    code = main(["train", "--out", str(copy), "--resume"])
    err = _one_line_error(capsys, code, str(last))
    assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file() and p.name != ".lock"} == before
    return err


def test_resume_from_a_damaged_last_checkpoint_names_it_and_the_fix(run, tmp_path, capsys):
    err = _resume_refuses(run, tmp_path, capsys, damage=True)
    assert "is damaged" in err and f"copy {tmp_path / 'run' / 'checkpoints' / 'best.pt'} over" in err


@pytest.mark.parametrize("edit, message", [
    (lambda s: s["model"].update({"fc.weight": torch.zeros(11, 128)}),
     "its field 'model' cannot be restored (size mismatch for fc.weight"),
    (_setter("ema", "weights"), "its field 'ema' cannot be restored"),
    (lambda s: s.pop("optimizer"), "its field 'optimizer' is missing"),
    (lambda s: s["optimizer"]["state"][0].update(momentum_buffer=torch.zeros(7)),
     "its field 'optimizer' cannot be restored (its momentum_buffer of shape (7,) is for a parameter of shape"),
    (lambda s: s["rng"].update(torch=torch.zeros(5, dtype=torch.uint8)),
     "its field 'rng' cannot be restored (expected a tensor of shape (5056,), found (5,))"),
    (_setter("rng", None), "its field 'rng' cannot be restored"),
    (_setter("sums", torch.zeros(3, dtype=torch.float64)), "its field 'sums' cannot be restored (expected a tensor "
                                                            "of shape (6,), found (3,))"),
    (_setter("sums", torch.ones(1, dtype=torch.float64)), "found (1,)"),  # copy_ would have broadcast it
    (_setter("step", 2.5), "its field 'step' is 2.5, not an integer"),
    (_setter("best_acc", "high"), "its field 'best_acc' is 'high', not a number"),
    (_setter("schedule", [3]), "its field 'schedule' cannot be restored"),
], ids=["weight-shape", "ema-text", "no-optimizer", "momentum-shape", "rng-size", "rng-none", "sums-size",
        "sums-broadcast", "step-float", "best-acc", "schedule"])
def test_resume_names_the_field_that_cannot_be_restored(run, tmp_path, capsys, edit, message):
    err = _resume_refuses(run, tmp_path, capsys, edit)
    assert message in err and "best.pt over" in err


@pytest.mark.slow  # trains the last steps again
def test_the_suggested_fix_resumes_the_run(run, tmp_path, capsys):
    _resume_refuses(run, tmp_path, capsys, damage=True)
    ckpts = tmp_path / "run" / "checkpoints"
    shutil.copy(ckpts / "best.pt", ckpts / "last.pt")  # what the message says to do
    fixmatch.train(None, out=tmp_path / "run", resume=True)
    assert load_checkpoint(ckpts / "last.pt")["step"] == 6


# ------------------------------------------------------------------ --device

@pytest.mark.parametrize("device", ["bogus", "meta", "cuda:x"])
def test_bad_device_is_one_line_for_predict_and_evaluate(run, image, capsys, device):
    for argv in (["predict", str(run), str(image)], ["evaluate", str(run)]):
        _one_line_error(capsys, main([*argv, "--device", device]), f"unknown device {device!r}; use auto, cpu, "
                                                                    "cuda or cuda:N")
    with pytest.raises(ConfigError, match="unknown device"):
        fixmatch.load(run, device=device)
