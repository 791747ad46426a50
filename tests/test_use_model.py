"""Using a trained model: self-describing checkpoints, fixmatch.load / predict, evaluate, predict and export."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import fixmatch
import fixmatch.inference.export
from fixmatch.cli import main
from fixmatch.config import Config, ConfigError
from fixmatch.core.preprocess import channel_stats, predict_logits
from fixmatch.data.datasets import load_dataset
from fixmatch.runs.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fixmatch.runs.model_spec import SPEC_KEYS, ModelSpec, spec_from_checkpoint

TINY = dict(dataset="synthetic", model="cnn_small", method="supervised", num_labels=40, batch_size=8, steps=6,
            eval_every=6, lr=0.05, ema=0.9, eval_batch_size=512, progress=False, device="cpu")


@pytest.fixture(scope="session")
def run(tmp_path_factory):
    """A run directory with a tiny model trained for a few steps on the synthetic data set."""
    out = tmp_path_factory.mktemp("use-model") / "run"
    fixmatch.train(Config(**TINY), out=out)
    return out


@pytest.fixture(scope="session")
def data():
    return load_dataset("synthetic")


@pytest.fixture(scope="session")
def model(run):
    return fixmatch.load(run, device="cpu")


def _reference_logits(weights_state, data, images):
    """Logits computed the way training evaluates: the backbone fed normalize(images / 255)."""
    from fixmatch.models import create_model
    net = create_model("cnn_small", 10, 3, image_size=list(data.image_size))
    net.load_state_dict(weights_state)
    mean, std = channel_stats(data.mean, data.std, torch.device("cpu"))
    return predict_logits(net, images, mean, std, batch_size=256)


# ------------------------------------------------------------------ checkpoints describe their model

def test_checkpoint_describes_its_model(run, data):
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["model_name"] == "cnn_small"
    assert isinstance(state["model_kwargs"], dict)
    assert state["in_channels"] == 3 and state["input_size"] == [16, 16]
    assert state["mean"] == pytest.approx(list(data.mean)) and state["std"] == pytest.approx(list(data.std))
    assert state["class_names"] == data.class_names
    spec = spec_from_checkpoint(state, "ckpt")
    assert ModelSpec.from_dict(json.loads(spec.to_json()), "json") == spec
    # the description alone rebuilds a network the saved weights fit
    spec.build().load_state_dict(state["ema"])


def test_old_checkpoint_is_described_from_its_config(run, tmp_path, model, data):
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    for key in SPEC_KEYS[:-1]:  # class_names was always saved
        del state[key]
    old = tmp_path / "old.pt"
    save_checkpoint(state, old)
    loaded = fixmatch.load(old)
    assert loaded.spec == model.spec
    x = data.test_images[:8]
    assert np.array_equal(loaded.predict(x).probabilities, model.predict(x).probabilities)

    state["config"]["dataset"] = "cifar10"  # a data set that is not on disk: a clear one-line error
    save_checkpoint(state, old)
    with pytest.raises(CheckpointError, match="predates self-describing checkpoints") as e:
        fixmatch.load(old, data_dir=tmp_path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("field, value, message", [
    ("std", [0.2, 0.2], r"malformed model description: 3 input channels with mean .* and std \(0.2, 0.2\)"),
    ("input_size", [16], r"input size \(16,\) is not \(height, width\)"),
    ("input_size", [16, 0], r"input size \(16, 0\) is not \(height, width\)"),
    ("std", [0.2, 0.0, 0.2], r"std \(0.2, 0.0, 0.2\) must be positive"),
    ("std", [0.2, float("nan"), 0.2], r"std .* must be positive"),
    ("class_names", [], "no class names"),
    ("in_channels", "three", r"malformed model description \(invalid literal"),
    ("mean", None, r"malformed model description \("),
    ("model_kwargs", None, "lacks the model description field.s. model_kwargs"),
], ids=["std-per-channel", "size-1d", "size-zero", "std-zero", "std-nan", "no-classes", "channels-text",
        "mean-none", "field-missing"])
def test_malformed_description_is_refused(run, tmp_path, field, value, message):
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    if value is None and field == "model_kwargs":
        del state[field]
    else:
        state[field] = value
    bad = tmp_path / "bad.pt"
    save_checkpoint(state, bad)
    with pytest.raises(CheckpointError, match=message) as err:
        fixmatch.load(bad)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------ Python API

def test_predict_matches_training_preprocessing_and_every_input_kind(run, model, data):
    x = data.test_images[:32]
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    reference = torch.softmax(_reference_logits(state["ema"], data, x), 1).numpy()
    p = model.predict(x)
    assert p.probabilities.shape == (32, 10)
    np.testing.assert_allclose(p.probabilities, reference, atol=1e-5)
    assert p.labels == [data.class_names[i] for i in reference.argmax(1)]
    assert p.confidences == pytest.approx(reference.max(1).tolist(), abs=1e-5)
    top = p.top(3)
    assert top[0][0] == (p.labels[0], pytest.approx(p.confidences[0]))
    assert [c for c, _ in top[0]] == [data.class_names[i] for i in np.argsort(-reference[0])[:3]]

    nhwc = x.permute(0, 2, 3, 1).numpy()
    same = [x.float() / 255, nhwc, nhwc.astype(np.float32) / 255, [Image.fromarray(a) for a in nhwc],
            list(x)]  # a list of (C, H, W) tensors
    for images in same:
        np.testing.assert_allclose(model.predict(images).probabilities, p.probabilities, atol=1e-5)
    one = model.predict(Image.fromarray(nhwc[0]))
    assert len(one) == 1 and one.labels == p.labels[:1]


def test_predict_converts_channels_and_resizes(model, data):
    grey = np.full((20, 30), 128, np.uint8)
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    # grey -> RGB repeats the channel, so both give the same prediction; any size is resized
    np.testing.assert_allclose(model.predict(grey).probabilities, model.predict(rgb).probabilities, atol=1e-6)
    # a PIL image is resized as folder data sets are: shorter side, then the centre
    big = Image.fromarray(data.test_images[0].permute(1, 2, 0).numpy()).resize((32, 32), Image.BICUBIC)
    framed = Image.new("RGB", (64, 32), (255, 0, 0))
    framed.paste(big, (16, 0))
    centre = model.predict(big).probabilities
    # (the bicubic filter at the crop's edge sees a few red pixels, hence the tolerance)
    np.testing.assert_allclose(model.predict(framed).probabilities, centre, atol=0.01)
    squashed = model.predict(np.asarray(framed.resize((16, 16), Image.BICUBIC))).probabilities
    assert np.abs(squashed - centre).max() > 0.05


def test_predict_rejects_bad_inputs(model):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.predict(np.full((16, 16, 3), 2.0, np.float32))
    with pytest.raises(ValueError, match="2 channels"):
        model.predict(np.zeros((16, 16, 2), np.uint8))
    with pytest.raises(ValueError, match="cannot predict on a str"):
        model.predict("image.png")
    with pytest.raises(ConfigError, match="weights"):
        fixmatch.load("x", weights="best")


def test_raw_weights_are_the_model_weights(run, data):
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    raw = fixmatch.load(run, weights="raw")
    x = data.test_images[:16]
    expected = torch.softmax(_reference_logits(state["model"], data, x), 1).numpy()
    np.testing.assert_allclose(raw.predict(x).probabilities, expected, atol=1e-5)
    assert not np.allclose(raw.predict(x).probabilities, fixmatch.load(run).predict(x).probabilities)


# ------------------------------------------------------------------------------ evaluate

def test_evaluate_reports_all_metrics_and_matches_training(run, tmp_path, capsys):
    png = tmp_path / "cm.png"
    assert main(["evaluate", str(run), "--device", "cpu", "--json", "--confusion", str(png)]) == 0
    m = json.loads(capsys.readouterr().out)
    logged = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert m["test_acc"] == pytest.approx(logged["test_acc"])
    assert m["test_top5"] == pytest.approx(logged["test_top5"])
    cm = torch.tensor(m["confusion"])
    assert cm.sum() == m["num_test"] == 500
    assert 100 * cm.diag().sum().item() / 500 == pytest.approx(m["test_acc"])
    assert list(m["per_class_acc"]) == load_dataset("synthetic").class_names
    assert 0 <= m["macro_f1"] <= 100
    assert png.read_bytes()[:4] == b"\x89PNG"

    assert main(["evaluate", str(run), "--device", "cpu", "--weights", "raw"]) == 0
    text = capsys.readouterr().out
    assert f"top-1 {logged['raw_test_acc']:.2f}%" in text and "macro-F1" in text and "h-stripes" in text


def test_evaluate_on_an_unknown_dataset_is_one_line(run, capsys):
    assert main(["evaluate", str(run), "--dataset", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown dataset 'nope'" in err and err.count("\n") == 1


# ------------------------------------------------------------------------------ fixmatch predict

@pytest.fixture()
def images(tmp_path, data):
    folder = tmp_path / "images"
    (folder / "nested" / "deeper").mkdir(parents=True)
    paths = []
    for i in range(3):
        p = folder / "nested" / ("deeper" if i else "") / f"img{i}.png"
        Image.fromarray(data.test_images[i].permute(1, 2, 0).numpy()).save(p)
        paths.append(p)
    (folder / "broken.png").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("ignored: not an image extension")
    return folder, paths


def test_predict_command_walks_folders_and_reports_unreadable_files(run, model, images, data, capsys):
    folder, paths = images
    assert main(["predict", str(run), str(folder), "--format", "json", "--top-k", "2", "--device", "cpu",
                 "--batch-size", "2"]) == 0
    out, err = capsys.readouterr()
    rows = {r["path"]: r for r in json.loads(out)}
    assert set(rows) == {str(p) for p in paths} | {str(folder / "broken.png")}
    assert "error" in rows[str(folder / "broken.png")] and "broken.png" in err
    expected = model.predict(data.test_images[:3])
    for i, p in enumerate(paths):
        preds = rows[str(p)]["predictions"]
        assert len(preds) == 2
        assert preds[0]["class"] == expected.labels[i]
        assert preds[0]["confidence"] == pytest.approx(expected.confidences[i], abs=1e-5)


def test_predict_command_formats_and_exit_codes(run, images, capsys):
    folder, paths = images
    assert main(["predict", str(run), str(paths[0]), "--format", "csv"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "path,rank,class,confidence,error" and lines[1].startswith(f"{paths[0]},1,")
    assert main(["predict", str(run), str(paths[0])]) == 0
    assert capsys.readouterr().out.startswith(f"path\tclass\tconfidence\n{paths[0]}\t")  # the table's header
    # nothing readable: non-zero exit, the error in the output and on stderr
    assert main(["predict", str(run), str(folder / "broken.png")]) == 1
    out, err = capsys.readouterr()
    assert "ERROR" in out and "cannot read" in err
    assert main(["predict", str(run), str(folder / "missing.png")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------ export

def _probe(spec_size=(16, 16)):
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (3, 3, *spec_size), dtype=torch.uint8, generator=gen),
            torch.randint(0, 256, (2, 3, 23, 40), dtype=torch.uint8, generator=gen)]  # resized in the graph


# The test loads the file back with torch.jit.load, which this PyTorch deprecates in favour of torch.export
# (`--format pt2`); the TorchScript format stays for runtimes that read only TorchScript.
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_torchscript_export_matches_pytorch(run, model, tmp_path, capsys):
    out = tmp_path / "model.pt"
    assert main(["export", str(run), "--format", "torchscript", "--out", str(out)]) == 0
    assert "exported ema weights" in capsys.readouterr().out
    files = {"fixmatch.json": ""}
    scripted = torch.jit.load(str(out), _extra_files=files)
    assert ModelSpec.from_dict(json.loads(files["fixmatch.json"]), "extra file") == model.spec
    with torch.no_grad():
        for x in _probe():
            expected = model.module(x)
            torch.testing.assert_close(scripted(x), expected, atol=1e-4, rtol=0)
            torch.testing.assert_close(scripted(x.float() / 255), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("input_dtype", ["uint8", "float32"])
def test_pt2_export_matches_pytorch(run, model, tmp_path, capsys, input_dtype):
    out = tmp_path / "model.pt2"
    assert main(["export", str(run), "--format", "pt2", "--out", str(out), "--input-dtype", input_dtype]) == 0
    assert "exported ema weights as pt2" in capsys.readouterr().out
    files = {"fixmatch.json": ""}
    program = torch.export.load(str(out), extra_files=files)
    assert ModelSpec.from_dict(json.loads(files["fixmatch.json"]), "extra file") == model.spec
    exported = program.module()
    with torch.no_grad():
        for x in _probe():  # other batch sizes and image sizes than the export's example
            x_in = x if input_dtype == "uint8" else x.float() / 255
            torch.testing.assert_close(exported(x_in), model.module(x), atol=1e-4, rtol=0)


def test_export_command_offers_every_format_and_input_dtype():
    # The parser writes both lists out (building it must not import torch): they must stay the export module's.
    from fixmatch.cli import build_parser
    export_parser = build_parser()._subparsers._group_actions[0].choices["export"]
    choices = {a.dest: a.choices for a in export_parser._actions}
    assert tuple(choices["format"]) == fixmatch.inference.export.EXPORT_FORMATS
    assert tuple(choices["input_dtype"]) == tuple(fixmatch.inference.export.INPUT_DTYPES)


@pytest.mark.slow
def test_onnx_export_matches_pytorch(run, model, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'fixmatch[export]')")
    onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install 'fixmatch[export]')")
    pytest.importorskip("onnxscript", reason="onnxscript is not installed (pip install 'fixmatch[export]')")
    out = tmp_path / "model.onnx"
    fixmatch.inference.export.export_model(run, "onnx", out)
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert ModelSpec.from_dict(json.loads(meta["fixmatch"]), "onnx") == model.spec
    session = ort.InferenceSession(str(out))
    with torch.no_grad():
        for x in _probe():
            got = session.run(["logits"], {"images": x.numpy()})[0]
            np.testing.assert_allclose(got, model.module(x).numpy(), atol=1e-4, rtol=0)


def test_safetensors_export_round_trips(run, model, tmp_path, data):
    pytest.importorskip("safetensors", reason="safetensors is not installed (pip install 'fixmatch[export]')")
    from safetensors.torch import load_file
    out = tmp_path / "model.safetensors"
    assert main(["export", str(run), "--format", "safetensors", "--out", str(out), "--weights", "raw"]) == 0
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    weights = load_file(str(out))
    assert weights.keys() == state["model"].keys()
    assert all(torch.equal(weights[k], state["model"][k]) for k in weights)  # raw weights, as asked
    reloaded = fixmatch.load(out)
    assert reloaded.spec == model.spec
    x = data.test_images[:8]
    np.testing.assert_allclose(reloaded.predict(x).probabilities, fixmatch.load(run, weights="raw").predict(x)
                               .probabilities, atol=1e-6)


def test_safetensors_files_that_are_not_fixmatch_exports_are_named(run, tmp_path):
    pytest.importorskip("safetensors", reason="safetensors is not installed (pip install 'fixmatch[export]')")
    from safetensors.torch import load_file, save_file
    good = tmp_path / "good.safetensors"
    assert main(["export", str(run), "--format", "safetensors", "--out", str(good)]) == 0
    weights = load_file(str(good))
    from safetensors import safe_open
    with safe_open(str(good), framework="pt") as f:
        description = f.metadata()["fixmatch"]
    cases = {
        "corrupt": (b"\x08\x00\x00\x00\x00\x00\x00\x00{not json", "cannot read"),
        "foreign": ({}, "has no fixmatch model description; export it with fixmatch export"),
        "bad-json": ({"fixmatch": "{not json"}, "its model description is not valid JSON"),
        "wrong-weights": ({"fixmatch": description}, "the weights do not fit model 'cnn_small'"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif name == "wrong-weights":
            save_file({k: v for k, v in weights.items() if not k.endswith("bias")}, str(path), metadata=content)
        else:
            save_file(weights, str(path), metadata=content)
        with pytest.raises(CheckpointError, match=message) as err:
            fixmatch.load(path)
        assert "\n" not in str(err.value), name
    with pytest.raises(CheckpointError, match="no such file"):
        fixmatch.load(tmp_path / "absent.safetensors")


@pytest.mark.parametrize("images, message", [
    ([], r"predict\(\) got no images"),
    (torch.zeros(1, 1, 3, 16, 16), r"a tensor of images must be \(H, W\), \(C, H, W\) or \(N, C, H, W\)"),
    (np.zeros((1, 1, 16, 16, 3), np.uint8), r"an array of images must be \(H, W\), \(H, W, C\) or \(N, H, W, C\)"),
    (torch.zeros(3, 16, 16, dtype=torch.int32), r"must be uint8 in \[0, 255\] or float in \[0, 1\], not torch.int32"),
], ids=["empty", "tensor-5d", "array-5d", "int32"])
def test_predict_names_the_shape_or_type_it_cannot_take(model, images, message):
    with pytest.raises(ValueError, match=message):
        model.predict(images)


def test_predict_takes_a_single_grey_tensor_and_float_images(model, data):
    x = data.test_images[0]  # (3, H, W) uint8
    grey = x.float().mean(0).round().to(torch.uint8)  # (H, W)
    one = model.predict(grey).probabilities
    assert one.shape == (1, 10) and np.isfinite(one).all()
    np.testing.assert_allclose(model.predict(x.float() / 255).probabilities, model.predict(x).probabilities,
                               atol=1e-5)


def test_export_errors_are_one_line_and_leave_nothing_half_written(run, tmp_path, capsys, monkeypatch):
    assert main(["export", str(run), "--format", "torchscript", "--out", str(tmp_path / "no" / "m.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "none.pt"), "--format", "torchscript", "--out", str(tmp_path / "m.pt")]) == 2
    assert "no such run directory or checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", str(run), "--format", "tflite", "--out", str(tmp_path / "m")])
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="unknown export format"):
        fixmatch.inference.export.export_model(run, "tflite", tmp_path / "m")

    # a writer that fails half-way leaves the previous file intact and no temporary file behind
    import fixmatch.inference.export as export
    existing = tmp_path / "m.pt"
    existing.write_bytes(b"previous export")

    def half_write(model, path):
        path.write_bytes(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(export, "_torchscript", half_write)
    assert main(["export", str(run), "--format", "torchscript", "--out", str(existing)]) != 0
    assert existing.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]
