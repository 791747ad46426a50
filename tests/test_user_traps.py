"""Numbers and messages that used to mislead: evaluation on classes in another order, pseudo-label accuracy
without labels to check it, the summary's median, predict's table and exported files given to predict."""
import json
import re
import shutil

import pytest
import torch
from folder_images import make_folder
from PIL import Image

import fixmatch
import fixmatch.inference.export
from fixmatch.cli import main
from fixmatch.config import Config, ConfigError
from fixmatch.core.metrics import classification_metrics
from fixmatch.data.datasets import _FASHION_CLASSES, load_dataset
from fixmatch.inference.evaluate import class_key, match_classes
from fixmatch.runs.checkpoint import CheckpointError
from fixmatch.runs.log import unmeasured_pseudo_labels

# Good enough (about 70% on the synthetic test set) that a wrong class order changes the accuracy.
TRAINED = dict(dataset="synthetic", model="cnn_small", method="supervised", num_labels=100, batch_size=20, steps=30,
               eval_every=30, lr=0.05, ema=0, eval_batch_size=512, progress=False, device="cpu")
TEST = 200  # synthetic test images in the folder data set


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches gain nothing from more threads on a shared CPU
    try:
        out = tmp_path_factory.mktemp("traps") / "run"
        fixmatch.train(Config(**TRAINED), out=out)
    finally:
        torch.set_num_threads(before)
    return out


@pytest.fixture(scope="module")
def synthetic_folder(tmp_path_factory):
    """Part of the synthetic data set as a folder data set: its classes, folder names, are in alphabetical order."""
    data = load_dataset("synthetic")
    root = tmp_path_factory.mktemp("synthetic-folder")
    few = torch.cat([(data.train_labels == c).nonzero()[:2, 0] for c in range(10)])  # 2 of each class
    for split, images, labels in (("labeled", data.train_images[few], data.train_labels[few]),
                                  ("test", data.test_images[:TEST], data.test_labels[:TEST])):
        for i, (x, y) in enumerate(zip(images, labels.tolist())):
            folder = root / split / data.class_names[y]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x.permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")
    return root


# ------------------------------------------------------------------ evaluate: classes matched by name

def test_evaluate_maps_classes_listed_in_another_order_by_name(run, synthetic_folder, tmp_path, capsys):
    folder = load_dataset(f"folder:{synthetic_folder}", tmp_path)
    synthetic = load_dataset("synthetic")
    assert folder.class_names == sorted(synthetic.class_names) != synthetic.class_names  # another order
    # The evaluation in the model's own class order, on the same images.
    logits = fixmatch.load(run).logits(synthetic.test_images[:TEST])
    expected = classification_metrics(logits, synthetic.test_labels[:TEST], synthetic.class_names)
    assert 40 < expected["test_acc"] < 100

    got = fixmatch.evaluate(run, data_dir=str(tmp_path), device="cpu", dataset=f"folder:{synthetic_folder}")
    assert got["num_test"] == TEST and got["classes_remapped"] is True
    assert got["test_acc"] == pytest.approx(expected["test_acc"])
    assert got["per_class_acc"] == pytest.approx(expected["per_class_acc"])  # under the model's class names
    assert got["confusion"] == expected["confusion"]
    # Compared by position, as before, the same predictions score differently.
    naive = (fixmatch.load(run).logits(folder.test_images).argmax(1) == folder.test_labels).float().mean().item()
    assert 100 * naive != pytest.approx(expected["test_acc"], abs=1.0)
    err = capsys.readouterr().err
    assert "lists the model's classes in another order" in err and err.count("\n") == 1

    assert main(["evaluate", str(run), "--dataset", f"folder:{synthetic_folder}", "--data-dir", str(tmp_path),
                 "--device", "cpu", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["classes_remapped"] is True and "another order" in err
    assert main(["evaluate", str(run), "--device", "cpu", "--json"]) == 0  # its own data set: nothing to map
    out, err = capsys.readouterr()
    assert json.loads(out)["classes_remapped"] is False and "another order" not in err


def test_evaluate_refuses_a_data_set_with_other_class_names(run, synthetic_folder, tmp_path, capsys):
    renamed = tmp_path / "renamed"
    shutil.copytree(synthetic_folder, renamed)
    for split in ("labeled", "test"):
        (renamed / split / "rings").rename(renamed / split / "circles")
    with pytest.raises(ConfigError, match=r"classes the model does not know \('circles'\) and lacks 1 of the "
                                          r"model's 10 classes \('rings'\)") as e:
        fixmatch.evaluate(run, data_dir=str(tmp_path), device="cpu", dataset=f"folder:{renamed}")
    assert "\n" not in str(e.value) and "name its class folders as the model's classes" in str(e.value)
    assert main(["evaluate", str(run), "--dataset", f"folder:{renamed}", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "'circles'" in err and err.count("\n") == 1


def test_class_names_match_ignoring_case_and_separators_only_one_to_one():
    fashion = list(_FASHION_CLASSES)  # 'T-shirt/top', ..., 'Ankle boot'
    folders = sorted(["t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                      "ankle_boot"])
    mapping = match_classes(fashion, folders, "folder:f")
    assert [fashion[i] for i in mapping] == ["Ankle boot", "Bag", "Coat", "Dress", "Pullover", "Sandal", "Shirt",
                                             "Sneaker", "T-shirt/top", "Trouser"]
    assert class_key(" T-shirt / top ") == class_key("t_shirt-top") == "t shirt top"
    assert class_key("Tshirt") != class_key("T-shirt")  # words stay words
    assert match_classes(["Cat", "cat"], ["cat", "Cat"], "d") == [1, 0]  # exact names first
    with pytest.raises(ConfigError, match="only in case or separators"):  # never two names onto one
        match_classes(["a b", "a_b"], ["A B", "a-B"], "d")


# ------------------------------------------------------------------ training: pl-acc and the median

def test_folder_run_shows_no_pseudo_label_accuracy_and_says_why(tmp_path, capsys, one_thread):
    # 6 labeled images (the only known labels) in a pool of 16: a measured accuracy would be theirs alone.
    root = make_folder(tmp_path / "imgs", classes=("cat", "dog"), per_class=3, unlabeled=10)
    config = Config(dataset=f"folder:{root}", data_dir=str(tmp_path / "data"), model="cnn_small", num_labels=4,
                    batch_size=2, mu=4, tau=0.01, steps=4, eval_every=2, progress=False, device="cpu")
    fixmatch.train(config, out=tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["mask_rate"] for r in rows] == [1.0, 1.0]  # every pseudo-label used, some on labeled images
    assert [r["pseudo_label_acc"] for r in rows] == [None, None]
    out = capsys.readouterr().out
    assert ("pseudo-label accuracy is not shown (pl-acc -, pseudo_label_acc null): the unlabeled images have no "
            "labels to check it against (10 of the 16 images of the unlabeled pool)") in out
    assert out.count("pseudo-label accuracy is not shown") == 1 and re.search(r"pl-acc +- \|", out)


def test_pseudo_label_accuracy_needs_labels_for_nearly_all_the_pool():
    assert unmeasured_pseudo_labels(torch.arange(10)) == ""  # built-in data sets: every label known
    assert unmeasured_pseudo_labels(torch.tensor([0] * 9 + [-1])) == ""  # 90% known
    assert "8 of the 10 images" in unmeasured_pseudo_labels(torch.tensor([0, 1] + [-1] * 8))


def test_summary_line_names_the_evaluations_its_median_is_over(tmp_path, capsys, one_thread):
    fixmatch.train(Config(**{**TRAINED, "steps": 6, "eval_every": 2}), out=tmp_path / "run")
    out = capsys.readouterr().out
    assert re.search(r"median of the last 3 evaluations \d+\.\d\d%", out) and "last 20" not in out


# ------------------------------------------------------------------ predict

@pytest.fixture()
def image(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (16, 16), (200, 30, 30)).save(path)
    return path


def test_predict_table_starts_with_a_header(run, image, capsys):
    assert main(["predict", str(run), str(image), "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "path\tclass\tconfidence" and lines[1].startswith(f"{image}\t") and len(lines) == 2
    assert main(["predict", str(run), str(image), "--device", "cpu", "--top-k", "20"]) == 0  # 10 classes shown
    header, row = capsys.readouterr().out.splitlines()
    assert header.split("\t")[-2:] == ["class_10", "confidence_10"] and len(header.split("\t")) == len(row.split("\t"))
    assert main(["predict", str(run), str(image), "--format", "csv"]) == 0  # CSV had its header already
    assert capsys.readouterr().out.splitlines()[0] == "path,rank,class,confidence,error"


@pytest.mark.filterwarnings("ignore:`torch.jit.s:DeprecationWarning")  # writing the TorchScript file to refuse
def test_predict_on_an_exported_file_says_how_to_run_it(run, image, tmp_path, capsys):
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"\x08\x0a\x12\x07pytorch\x1a\x062.13.0")  # the start of an ONNX model (a protobuf)
    scripted = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(scripted))
    program = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(torch.nn.Linear(2, 2), (torch.zeros(1, 2),)), str(program))
    for path, what, how in ((onnx, "an ONNX export", "onnxruntime"), (scripted, "a TorchScript export",
                            "torch.jit.load"), (program, "a torch.export (.pt2) export", "torch.export.load")):
        assert main(["predict", str(path), str(image)]) == 2
        err = capsys.readouterr().err
        assert f"{path} is {what}, which fixmatch does not load: run it with {how}" in err
        assert "run directory or checkpoint it was exported from" in err and err.count("\n") == 1
        with pytest.raises(CheckpointError, match=re.escape(what)):
            fixmatch.load(path)
    renamed = tmp_path / "model.bin"  # content, not name: an ONNX file by any name
    shutil.copy(onnx, renamed)
    with pytest.raises(CheckpointError, match="an ONNX export"):
        fixmatch.load(renamed)


def test_a_safetensors_export_loads_whatever_its_name(run, tmp_path):
    pytest.importorskip("safetensors", reason="safetensors is not installed (pip install 'fixmatch[export]')")
    out = tmp_path / "model.safetensors"
    fixmatch.inference.export.export_model(run, "safetensors", out)
    renamed = tmp_path / "weights.bin"
    shutil.copy(out, renamed)
    x = load_dataset("synthetic").test_images[:4]
    assert torch.equal(fixmatch.load(renamed).logits(x), fixmatch.load(run).logits(x))
