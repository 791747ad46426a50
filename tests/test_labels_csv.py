"""`train --labels-csv FILE`: exactly the images a person labeled (index,label for built-in data sets, path,label for
folders), recorded in split.json; every bad file refused in one line before anything is written."""
from __future__ import annotations

import json
import re

import pytest
import torch
import yaml
from folder_images import make_folder, noise
from run_helpers import one_line_cli

from fixmatch.cli import main
from fixmatch.data.datasets import DatasetError, load_dataset
from fixmatch.data.labels_file import read_path_labels, resolve_csv_path

CLASSES = load_dataset("synthetic").class_names  # h-stripes, v-stripes, ... (10 classes)
TRAIN = ["train", "--dataset", "synthetic", "--model", "cnn_small", "--batch-size", "4", "--mu", "2", "--steps", "2",
         "--eval-every", "2", "--eval-batch-size", "500", "--device", "cpu", "--no-progress"]
# One image of each class (the synthetic set's own labels), by name or by number; 7 and 70 swapped on purpose.
_TRUE = load_dataset("synthetic").train_labels
ROWS = [(int((_TRUE == c).nonzero()[k, 0]), c) for c in range(10) for k in (0, 1)]


def _write(path, text):
    path.write_text(text)
    return path


def _good_csv(path):
    lines = ["index,label"] + [f"{i},{CLASSES[c] if n % 2 else c}" for n, (i, c) in enumerate(ROWS)]
    return _write(path, "\n".join(lines) + "\n")


def test_training_labels_exactly_the_files_images_and_records_them(tmp_path, capsys, one_thread):
    labels = _good_csv(tmp_path / "labels.csv")
    run = tmp_path / "run"
    # --num-labels 40 (another number) gives way to the file's 20 rows, and the line says so.
    assert main([*TRAIN, "--labels-csv", str(labels), "--num-labels", "40", "--out", str(run)]) == 0
    assert "labels.csv labels 20 images: num_labels is 20" in capsys.readouterr().err
    split = json.loads((run / "split.json").read_text())
    assert split["labeled"] == sorted(i for i, _ in ROWS) and split["num_labels"] == 20
    assert yaml.safe_load((run / "config.yaml").read_text())["num_labels"] == 20
    # Evaluation reads the test set only: the labels file may be gone by then.
    labels.unlink()
    assert main(["evaluate", str(run), "--device", "cpu", "--json"]) == 0


def test_the_files_labels_replace_the_data_sets_own(tmp_path, capsys):
    i, j = ROWS[0][0], ROWS[2][0]  # a class-0 and a class-1 image, labeled the other way round
    rows = [(i, 1), (j, 0)] + ROWS[4:]
    labels = _write(tmp_path / "l.csv", "index,label\n" + "".join(f"{a},{b}\n" for a, b in rows))
    data = load_dataset("synthetic", labels_csv=str(labels))
    assert data.train_labels[i] == 1 and data.train_labels[j] == 0
    assert data.labeled_indices == sorted(a for a, _ in rows)
    unlisted = torch.ones(len(_TRUE), dtype=torch.bool)
    unlisted[[a for a, _ in rows]] = False
    assert torch.equal(data.train_labels[unlisted], _TRUE[unlisted])
    assert "2 of the 18 labels in" in capsys.readouterr().err


def _refusals():
    first = ROWS[0][0]
    good = "".join(f"{i},{c}\n" for i, c in ROWS)
    return [
        ("index,label\n" + good + "abc,0\n", r"line 22: index 'abc' is not a whole number; give the image's "
                                             r"position in the training set \(0 to 1999\)"),
        ("index,label\n" + good + "2000,0\n", r"line 22: index 2000 is outside the training set \(0 to 1999\); fix"),
        ("index,label\n" + good + "-1,0\n", r"line 22: index -1 is outside the training set"),
        ("index,label\n" + good + "5,cat\n", r"line 22: unknown class 'cat'; use a class name \(h-stripes, "),
        ("index,label\n" + good + "5,10\n", r"unknown class '10'; .* or number \(0 to 9\)"),
        ("index,label\n" + good + f"{first},h-stripes\n", rf"line 22: index {first} is listed again \(first on line "
                                                          r"2\); keep one row per image"),
        ("index,label\n", r"lists no images; add rows 'index,label'"),
        ("", r"lists no images"),
        ("index,label\n" + "".join(f"{i},{c}\n" for i, c in ROWS if c not in (4, 8)),
         r"labels no image of class\(es\) checker, plus; label at least one image of every class"),
        (good, r"line 1: expected the header 'index,label', got '\d+,0'; add that header"),
        ("path,label\na.png,cat\n", r"has path,label rows, which are for folder data sets; this data set needs "
                                    r"index,label rows"),
        ("index,label\n5\n", r"line 2: expected 'index,label', got '5'"),
    ]


@pytest.mark.parametrize("text, message", _refusals())
def test_each_bad_file_is_refused_in_one_line_and_writes_no_run(tmp_path, capsys, text, message):
    labels = _write(tmp_path / "labels.csv", text)
    run = tmp_path / "run"
    code, err = one_line_cli([*TRAIN, "--labels-csv", str(labels), "--out", str(run)], capsys)
    assert code == 2 and err.startswith("fixmatch: error:")
    assert re.search(message, err), err
    assert not run.exists()


def test_a_missing_file_and_other_label_choices_are_refused(tmp_path, capsys):
    run = tmp_path / "run"
    code, err = one_line_cli([*TRAIN, "--labels-csv", str(tmp_path / "nope.csv"), "--out", str(run)], capsys)
    assert code == 2 and "nope.csv not found; check --labels-csv" in err
    labels = _good_csv(tmp_path / "labels.csv")
    for extra, named in ((["--split-file", str(labels)], "--split-file"),
                         (["--label-selection", "representative"], "--label-selection representative")):
        code, err = one_line_cli([*TRAIN, "--labels-csv", str(labels), *extra, "--out", str(run)], capsys)
        assert code == 2 and f"--labels-csv names the labeled images itself; drop {named}" in err
    assert not run.exists()


# ---------------------------------------------------------------------------------------------- folder data sets

def _folder(tmp_path):
    """Unlabeled images only, plus a test/ folder: a person labels some of unlabeled/ with the labeling page."""
    root = make_folder(tmp_path / "imgs", per_class=0, unlabeled=12, test_per_class=1)
    for i in range(4):  # flat files too, named from the folder as the labeling page writes them
        noise(root / "unlabeled" / f"flat{i}.png", 100 + i)
    return root


def test_folder_labels_saved_elsewhere_label_images_of_unlabeled(tmp_path, capsys, one_thread):
    root = _folder(tmp_path)
    downloads = tmp_path / "Downloads"
    downloads.mkdir()
    rows = ["path,label", "unlabeled/flat0.png,cat", "unlabeled/flat1.png,dog", "unlabeled/flat2.png,cat",
            "unlabeled/batch0/deeper/u0.png,dog"]
    labels = _write(downloads / "labels.csv", "\n".join(rows) + "\n")  # paths relative to the folder, not the CSV
    data = load_dataset(f"folder:{root}", tmp_path / "data", labels_csv=str(labels))
    assert data.class_names == ["cat", "dog"] and data.train_labels.tolist() == [0, 1, 0, 1]
    assert data.labeled_indices == [0, 1, 2, 3]
    assert data.num_unlabeled_extra == 16 - 4  # the labeled four are in the pool once, as labeled images
    run = tmp_path / "run"
    assert main([*TRAIN[:2], f"folder:{root}", *TRAIN[3:], "--data-dir", str(tmp_path / "data"),
                 "--labels-csv", str(labels), "--out", str(run)]) == 0
    assert json.loads((run / "split.json").read_text())["labeled"] == [0, 1, 2, 3]


@pytest.mark.parametrize("rows, message", [
    (["unlabeled/flat0.png,cat", "unlabeled/none.png,dog"], r"lists 1 missing file\(s\): .*none.png \(line 2\); "
                                                            r"paths are relative to the CSV's folder or to "),
    (["unlabeled/flat0.png,cat", "unlabeled/flat0.png,dog"], r"lists .*flat0.png twice; keep one row per image"),
    (["path,label"], r"lists no images; add rows 'path,label'"),
    (["index,label", "3,cat"], r"has index,label rows, which are for built-in data sets"),
    (["unlabeled/flat0.png,cat"], r"test class folder .*dog has no labeled counterpart"),
])
def test_folder_refusals(tmp_path, rows, message):
    root = _folder(tmp_path)
    labels = _write(tmp_path / "labels.csv", "\n".join(rows) + "\n")
    with pytest.raises(DatasetError, match=message):
        load_dataset(f"folder:{root}", tmp_path / "data", labels_csv=str(labels))


def _unlabeled_only(tmp_path, n):
    """A folder of ``n`` unlabeled images and no test/: the hold-out takes the test set from the file's images."""
    root = tmp_path / "imgs"
    for i in range(n):
        noise(root / "unlabeled" / f"u{i:02d}.png", 200 + i)
    return root


def test_folder_without_test_holds_out_a_tenth_of_the_files_images_and_says_so(tmp_path, capsys, one_thread):
    root = _unlabeled_only(tmp_path, 24)
    rows = ["path,label"] + [f"unlabeled/u{i:02d}.png,{'cat' if i < 11 else 'dog'}" for i in range(22)]
    labels = _write(tmp_path / "labels.csv", "\n".join(rows) + "\n")
    run = tmp_path / "run"
    assert main([*TRAIN[:2], f"folder:{root}", *TRAIN[3:], "--data-dir", str(tmp_path / "data"),
                 "--labels-csv", str(labels), "--out", str(run)]) == 0
    (note,) = [line for line in capsys.readouterr().err.splitlines() if "held out" in line]
    assert (f"no {root / 'test'}: 2 of the 22 labeled images of {labels} (10% of each class with at least 10, the "
            f"same on every run) are held out as the test set to measure accuracy; training labels the other 20; "
            f"add {root / 'test'}/<class>/ images to train on all 22") in note
    assert len(json.loads((run / "split.json").read_text())["labeled"]) == 20
    data = load_dataset(f"folder:{root}", tmp_path / "data", labels_csv=str(labels))
    assert data.test_labels.tolist() == [0, 1] and data.num_unlabeled_extra == 24 - 22


def test_folder_without_test_and_too_few_labels_to_hold_out_is_refused_in_one_line(tmp_path, capsys):
    root = _unlabeled_only(tmp_path, 24)  # the README's 20 labels over 3 classes: no class reaches 10
    rows = ["path,label"] + [f"unlabeled/u{i:02d}.png,{('cat', 'dog', 'bird')[i % 3]}" for i in range(20)]
    labels = _write(tmp_path / "labels.csv", "\n".join(rows) + "\n")
    run = tmp_path / "run"
    code, err = one_line_cli([*TRAIN[:2], f"folder:{root}", *TRAIN[3:], "--data-dir", str(tmp_path / "data"),
                              "--labels-csv", str(labels), "--out", str(run)], capsys)
    assert code == 2 and (f"no test set: {root / 'test'} is absent and no class of the 20 labeled images of {labels} "
                          f"has the 10 images needed to hold 10% of them out to measure accuracy; add "
                          f"{root / 'test'}/<class>/ images, or label at least 10 images of a class") in err
    assert not run.exists()


def test_a_relative_path_is_looked_up_next_to_the_csv_first_then_in_the_folder(tmp_path):
    root = _unlabeled_only(tmp_path, 2)
    downloads = tmp_path / "Downloads"
    noise(downloads / "unlabeled" / "u00.png", 7)  # a file of the same name beside the CSV wins
    csv_path = downloads / "labels.csv"
    assert resolve_csv_path(csv_path, root, "unlabeled/u00.png") == downloads / "unlabeled" / "u00.png"
    assert resolve_csv_path(csv_path, root, "unlabeled/u01.png") == root / "unlabeled" / "u01.png"
    with pytest.raises(DatasetError, match=re.escape(f"{csv_path} line 3: no image unlabeled/u09.png (paths are "
                                                     f"relative to the CSV's folder or to {root}); fix or remove")):
        resolve_csv_path(csv_path, root, "unlabeled/u09.png", line=3)
    _write(csv_path, "unlabeled/u00.png,cat\nunlabeled/u01.png,dog\n")
    assert read_path_labels(csv_path, root) == [(downloads / "unlabeled" / "u00.png", "cat"),
                                                (root / "unlabeled" / "u01.png", "dog")]
