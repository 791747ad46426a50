"""TypiClust (core/typiclust.py), `fixmatch advise` and `--label-selection typiclust`."""
import csv
import json
import math

import numpy as np
import pytest
import torch
from folder_images import make_folder, noise
from run_helpers import one_line_cli

import fixmatch
from fixmatch.cli import main
from fixmatch.config import Config
from fixmatch.core.typiclust import typiclust
from fixmatch.data import load_dataset
from fixmatch.models import create_model
from fixmatch.runs.checkpoint import save_checkpoint
from fixmatch.runs.features import checkpoint_features, pixel_features
from fixmatch.runs.model_spec import checkpoint_fields

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = (30, 20, 12)  # blob A, B, C
STEP = 0.1  # member j of a blob lies (j + 1) * STEP from its centre, along a direction of its own


def _blobs(sizes=SIZES):
    """Blobs far apart (centre b at 10 * e_b), rows shuffled. In each, member j sits (j+1)*STEP from the centre
    along its own axis, orthogonal to every other: the centre is nearer to every member than any other member is
    (hence densest), and member 0 is nearer to every other member than any other member is (hence the densest of
    the rest). Returns (features, row of each blob's centre, row of each blob's member 0)."""
    dim = len(sizes) + sum(sizes)
    rows, blob, role = [], [], []
    axis = len(sizes)
    for b, size in enumerate(sizes):
        centre = np.zeros(dim)
        centre[b] = 10.0
        rows.append(centre)
        blob.append(b)
        role.append(-1)
        for j in range(size - 1):
            x = centre.copy()
            x[axis] = (j + 1) * STEP
            axis += 1
            rows.append(x)
            blob.append(b)
            role.append(j)
    perm = np.random.default_rng(0).permutation(len(rows))
    feats = np.stack(rows)[perm]
    blob, role = np.array(blob)[perm], np.array(role)[perm]
    centres = [int(np.flatnonzero((blob == b) & (role == -1))[0]) for b in range(len(sizes))]
    first = [int(np.flatnonzero((blob == b) & (role == 0))[0]) for b in range(len(sizes))]
    return feats, centres, first


def _centre_typicality(size: int) -> float:
    """1 / mean distance from a centre to its k = min(20, size // 2) nearest members, after L2 normalisation:
    |c/|c| - m/|m||^2 = 2 - 2 * 10 / sqrt(100 + r^2) for a member at r."""
    k = min(20, size // 2)
    d = [math.sqrt(2 - 20 / math.sqrt(100 + ((j + 1) * STEP) ** 2)) for j in range(k)]
    return 1 / (sum(d) / k)


def test_one_image_per_blob_largest_first_the_densest_of_each():
    feats, centres, _ = _blobs()
    picks = typiclust(feats, 3, seed=0)
    assert [p.index for p in picks] == centres  # A (30), then B (20), then C (12)
    assert [p.cluster for p in picks] == [0, 1, 2] and [p.cluster_size for p in picks] == list(SIZES)
    for p, size in zip(picks, SIZES):
        assert p.typicality == pytest.approx(_centre_typicality(size), rel=1e-9)


def test_clusters_holding_a_labeled_image_are_skipped():
    feats, centres, _ = _blobs()
    # B + L = 3 clusters, the blobs. B's centre labeled: A, then C although B is larger.
    assert [p.index for p in typiclust(feats, 2, labeled=[centres[1]], seed=0)] == [centres[0], centres[2]]
    assert [p.index for p in typiclust(feats, 2, labeled=[centres[2]], seed=0)] == centres[:2]
    assert [p.index for p in typiclust(feats, 1, labeled=[centres[0], centres[2]], seed=0)] == [centres[1]]


def test_small_clusters_come_after_touched_ones_and_picks_are_the_densest_free_image():
    # T (4 images) is an outlier cluster: the authors' code drops it. With B's centre labeled, the second pick
    # goes to B again, to its densest free image (member 0), not to T.
    feats, centres, first = _blobs((30, 20, 4))
    picks = typiclust(feats, 2, labeled=[centres[1]], seed=0)
    assert [p.index for p in picks] == [centres[0], first[1]] and picks[1].cluster_size == 20
    # A budget of every free image is spent, each image once, the labeled ones never.
    picks = typiclust(feats, len(feats) - 1, labeled=[centres[1]], seed=0)
    assert sorted(p.index for p in picks) == sorted(set(range(len(feats))) - {centres[1]})


def test_deterministic_for_a_seed_and_refuses_bad_arguments():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(300, 8))
    a = typiclust(feats, 12, labeled=[3, 7], seed=5)
    assert a == typiclust(feats, 12, labeled=[3, 7], seed=5)
    assert not {3, 7} & {p.index for p in a} and len({p.index for p in a}) == 12
    assert [p.index for p in a] != [p.index for p in typiclust(feats, 12, labeled=[3, 7], seed=6)]
    with pytest.raises(ValueError, match="budget must be 1 to 298"):
        typiclust(feats, 299, labeled=[3, 7])
    with pytest.raises(ValueError, match="budget"):
        typiclust(feats, 0)
    with pytest.raises(ValueError, match="distinct rows"):
        typiclust(feats, 2, labeled=[3, 3])


def _csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _page_data(out):
    """The data the labeling page in OUT embeds (its ids, classes and the labels given earlier)."""
    page = (out / "index.html").read_text()
    start = page.index('<script type="application/json" id="data">') + len('<script type="application/json" id="data">')
    return json.loads(page[start:page.index("</script>", start)])


def test_advise_end_to_end_on_the_synthetic_set(tmp_path, capsys):
    out = tmp_path / "advice"
    assert main(["advise", "--dataset", "synthetic", "--budget", "8", "--out", str(out), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "no --features: embedding the images with a fixed random projection" in captured.err
    rows = _csv_rows(out / "to_label.csv")
    assert list(rows[0]) == ["index", "cluster", "cluster_size", "typicality"] and len(rows) == 8
    data = load_dataset("synthetic")
    expected = typiclust(pixel_features(data.train_images).numpy(), 8, seed=0)
    assert [int(r["index"]) for r in rows] == [p.index for p in expected]
    assert [int(r["cluster_size"]) for r in rows] == [p.cluster_size for p in expected]
    page = (out / "index.html").read_text()
    assert "h-stripes" in page and page.count('class="item"') == 8
    # Labels given so far: those images are not proposed again; 8 more are.
    labels = tmp_path / "labels.csv"
    given = [int(r["index"]) for r in rows[:5]]
    labels.write_text("index,label\n" + "".join(f"{i},{int(data.train_labels[i])}\n" for i in given))
    assert main(["advise", "--dataset", "synthetic", "--budget", "8", "--out", str(out), "--device", "cpu",
                 "--labels-csv", str(labels), "--seed", "1"]) == 0
    again = [int(r["index"]) for r in _csv_rows(out / "to_label.csv")]
    assert len(again) == 8 and not set(again) & set(given)
    assert again == [p.index for p in typiclust(pixel_features(data.train_images).numpy(), 8, given, seed=1)]
    assert "besides the 5 already labeled" in capsys.readouterr().out
    # The page saves those 5 labels (class names, the file's order) before the new answers: its download is the
    # whole labeled set that train --labels-csv needs, not only the 8 new images.
    page = _page_data(out)
    assert page["ids"] == [str(i) for i in again]
    assert page["given"] == [[str(i), data.class_names[int(data.train_labels[i])]] for i in given]


@pytest.mark.parametrize("args, message", [
    (["--budget", "0"], "--budget must be a positive number of images, got 0"),
    (["--budget", "2001"], "--budget 2001 is more than the 2000 training images not labeled yet"),
    (["--budget", "3", "--features", "no/such/run"], "no such run directory or checkpoint: no/such/run"),
    (["--budget", "3", "--classes", "a,b"], "--classes names the classes of a folder data set"),
    (["--budget", "3", "--out", "FILE"], "is a file, not a folder"),
    (["--budget", "3", "--out", "BUSY"], "holds other files (notes.txt); choose a new or empty folder"),
])
def test_advise_refuses_bad_input_in_one_line(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "FILE").write_text("x")
    (tmp_path / "BUSY").mkdir()
    (tmp_path / "BUSY" / "notes.txt").write_text("mine")
    argv = ["advise", "--dataset", "synthetic", "--device", "cpu", *args]
    if "--out" not in args:
        argv += ["--out", "advice"]
    code, err = one_line_cli(argv, capsys)
    assert code == 2 and message in err, err
    assert not (tmp_path / "advice").exists() and (tmp_path / "BUSY" / "notes.txt").read_text() == "mine"


def _pretrain_like_run(tmp_path, data):
    """A run directory as `fixmatch pretrain` writes it (checkpoints/last.pt, the network under "model", no EMA)."""
    torch.manual_seed(0)
    model = create_model("cnn_small", data.num_classes, data.in_channels, image_size=list(data.image_size))
    run = tmp_path / "pretrain"
    save_checkpoint({"format": "fixmatch-checkpoint", "step": 5, "config": {"model": "cnn_small"},
                     "model": model.state_dict(), "ema": None,
                     **checkpoint_fields("cnn_small", {"image_size": list(data.image_size)}, data)},
                    run / "checkpoints" / "last.pt")
    return run


def test_advise_with_features_of_a_pretrain_run(tmp_path, capsys):
    data = load_dataset("synthetic")
    run = _pretrain_like_run(tmp_path, data)
    out = tmp_path / "advice"
    assert main(["advise", "--dataset", "synthetic", "--budget", "6", "--out", str(out), "--device", "cpu",
                 "--features", str(run), "--seed", "2"]) == 0
    assert "no --features" not in capsys.readouterr().err
    feats = checkpoint_features(run, data.train_images)
    expected = [p.index for p in typiclust(feats.numpy(), 6, seed=2)]
    assert [int(r["index"]) for r in _csv_rows(out / "to_label.csv")] == expected
    assert expected != [p.index for p in typiclust(pixel_features(data.train_images).numpy(), 6, seed=2)]


def test_advise_on_a_folder_of_unlabeled_images(tmp_path, capsys):
    root = tmp_path / "photos"
    for i in range(12):
        noise(root / "unlabeled" / f"{i:02d}.png", seed=i, size=(12, 12))
    out = tmp_path / "advice"
    code, err = one_line_cli(["advise", "--dataset", f"folder:{root}", "--budget", "3", "--out", str(out),
                              "--data-dir", str(tmp_path / "cache")], capsys)
    assert code == 2 and "has no class names yet" in err and "--classes a,b,c" in err
    assert main(["advise", "--dataset", f"folder:{root}", "--budget", "3", "--out", str(out), "--data-dir",
                 str(tmp_path / "cache"), "--classes", "cat,dog", "--device", "cpu"]) == 0
    rows = _csv_rows(out / "to_label.csv")
    assert list(rows[0])[0] == "path" and len(rows) == 3
    assert all(r["path"].startswith("unlabeled/") and (root / r["path"]).is_file() for r in rows)
    page = (out / "index.html").read_text()
    assert "cat" in page and "dog" in page
    # Labels given so far (paths relative to the folder, as the page saves them) are not proposed again.
    (tmp_path / "labels.csv").write_text("path,label\n" + "".join(f"{r['path']},cat\n" for r in rows))
    assert main(["advise", "--dataset", f"folder:{root}", "--budget", "3", "--out", str(out), "--data-dir",
                 str(tmp_path / "cache"), "--labels-csv", str(tmp_path / "labels.csv"), "--device", "cpu"]) == 0
    again = {r["path"] for r in _csv_rows(out / "to_label.csv")}
    assert len(again) == 3 and not again & {r["path"] for r in rows}


def test_to_label_csv_is_written_last(tmp_path, monkeypatch):
    """Scripts wait for to_label.csv: it must not appear unless the page was written too."""
    import fixmatch.inference.advise as advise_module

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(advise_module, "write_labeling_page", fail)
    with pytest.raises(OSError, match="disk full"):
        advise_module.advise("synthetic", 2, tmp_path / "advice", device="cpu")
    assert not (tmp_path / "advice" / "to_label.csv").exists()


def test_folder_labeled_set_is_what_train_uses(tmp_path, capsys):
    """With --labels-csv the labeled images are its rows alone (train ignores labeled/ then); without it, the
    labeled/<class>/ folders, or the folder's own labels.csv; both at once are refused, as train refuses them."""
    root = make_folder(tmp_path / "pets", per_class=3, unlabeled=8, size=(12, 12))
    in_folders = sorted(f"labeled/{c}/{i}.png" for c in ("cat", "dog") for i in range(3))
    cache = ["--data-dir", str(tmp_path / "cache"), "--device", "cpu"]
    out = tmp_path / "advice"
    assert main(["advise", "--dataset", f"folder:{root}", "--budget", "8", "--out", str(out), *cache]) == 0
    assert "besides the 6 already labeled" in capsys.readouterr().out
    proposed = [r["path"] for r in _csv_rows(out / "to_label.csv")]
    assert len(proposed) == 8 and all(p.startswith("unlabeled/") for p in proposed)
    assert sorted(i for i, _ in _page_data(out)["given"]) == in_folders

    # Two unlabeled images labeled in a CSV (names not sorted, a class labeled/ lacks): labeled/ plays no part.
    csv_file = tmp_path / "first.csv"
    csv_file.write_text(f"path,label\n{proposed[0]},zebra\n{proposed[1]},cat\n")
    assert main(["advise", "--dataset", f"folder:{root}", "--budget", "6", "--out", str(out),
                 "--labels-csv", str(csv_file), *cache]) == 0
    captured = capsys.readouterr()
    assert "besides the 2 already labeled" in captured.out and "6 images under" in captured.err
    again = [r["path"] for r in _csv_rows(out / "to_label.csv")]
    assert sorted(again) == sorted(proposed[2:])  # neither the CSV's images nor labeled/'s are proposed
    page = _page_data(out)
    assert page["given"] == [[proposed[0], "zebra"], [proposed[1], "cat"]] and page["classes"] == ["cat", "zebra"]
    code, err = one_line_cli(["advise", "--dataset", f"folder:{root}", "--budget", "2", "--out", str(out),
                              "--labels-csv", str(csv_file), "--classes", "cat,dog", *cache], capsys)
    assert code == 2 and f"{proposed[0]} in {csv_file} labels class 'zebra', which --classes (cat,dog) lacks" in err

    (root / "labels.csv").write_text(f"path,label\n{proposed[0]},cat\n")
    code, err = one_line_cli(["advise", "--dataset", f"folder:{root}", "--budget", "2", "--out", str(out), *cache],
                             capsys)
    assert code == 2 and "has both labeled/ and labels.csv; remove one" in err


def test_advise_with_a_real_pretrain_run_agrees_with_train_typiclust(tmp_path, capsys):
    """The advisor and the study tool pick the same images from the same pretrain run and seed."""
    run = tmp_path / "pretrain"
    assert main(["pretrain", "--dataset", "synthetic", "--model", "cnn_small", "--batch-size", "16", "--steps", "2",
                 "--eval-every", "2", "--warmup", "1", "--knn-bank", "100", "--knn-k", "10", "--eval-batch-size",
                 "500", "--device", "cpu", "--no-progress", "--out", str(run)]) == 0
    out = tmp_path / "advice"
    assert main(["advise", "--dataset", "synthetic", "--budget", "12", "--out", str(out), "--device", "cpu",
                 "--features", str(run), "--seed", "4"]) == 0
    advised = [int(r["index"]) for r in _csv_rows(out / "to_label.csv")]
    data = load_dataset("synthetic")
    pixels = [p.index for p in typiclust(pixel_features(data.train_images).numpy(), 12, seed=4)]
    assert len(set(advised)) == 12 and sorted(advised) != sorted(pixels)  # the run's features, not the pixels
    train_run = tmp_path / "train"
    assert main(["train", "--dataset", "synthetic", "--model", "cnn_small", "--num-labels", "12", "--batch-size",
                 "8", "--mu", "2", "--steps", "1", "--eval-every", "1", "--eval-batch-size", "500", "--device",
                 "cpu", "--no-progress", "--label-selection", "typiclust", "--selection-checkpoint", str(run),
                 "--seed", "4", "--out", str(train_run)]) == 0
    assert json.loads((train_run / "split.json").read_text())["labeled"] == sorted(advised)


def test_train_with_typiclust_labels_records_them_in_the_split(tmp_path, capsys):
    run = tmp_path / "run"
    fixmatch.train(Config(dataset="synthetic", model="cnn_small", num_labels=12, batch_size=8, mu=2, steps=2,
                          eval_every=2, eval_batch_size=512, progress=False, device="cpu",
                          label_selection="typiclust", seed=3), out=run)
    labeled = json.loads((run / "split.json").read_text())["labeled"]
    data = load_dataset("synthetic")
    assert labeled == sorted(p.index for p in typiclust(pixel_features(data.train_images).numpy(), 12, seed=3))
    covered = len(set(data.train_labels[labeled].tolist()))
    err = capsys.readouterr().err
    assert "typiclust chose 12 images in a fixed random projection" in err and f"covering {covered} of 10" in err
