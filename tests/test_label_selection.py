"""--label-selection: random (the stratified default), file, representative / unrepresentative."""
import json

import pytest
import torch
from run_helpers import one_line_cli

import fixmatch
from fixmatch.config import Config, ConfigError, resolve_config
from fixmatch.data import load_dataset, make_split, save_split
from fixmatch.data.split import SplitError
from fixmatch.models import create_model
from fixmatch.runs.checkpoint import load_checkpoint, save_checkpoint
from fixmatch.runs.model_spec import ModelSpec
from fixmatch.training import label_selection as ls
from fixmatch.training import loop


def _clusters():
    """3 classes x 10 images; within each class image i is i steps away from the class's common image."""
    images, labels = [], []
    for c in range(3):
        base = torch.full((3, 4, 4), 40 + 60 * c, dtype=torch.uint8)
        for i in range(10):
            x = base.clone()
            x[0, 0, 0] += 3 * i  # image 0 sits at the centroid's side, image 9 farthest out
            images.append(x)
            labels.append(c)
    return torch.stack(images), torch.tensor(labels)


def test_random_is_todays_stratified_split():
    labels = torch.arange(100) % 10
    got = ls.select_labels("random", labels, 20, 10, seed=3)
    assert got == make_split(labels, 20, 10, 3)


def test_file_strategy_and_split_file_alone_reuse_the_saved_split(tmp_path):
    labels = torch.arange(100) % 10
    saved = make_split(labels, 30, 10, seed=7)
    path = save_split(saved, tmp_path / "split.json")
    assert ls.select_labels("file", labels, 30, 10, seed=0, split_file=str(path)).labeled == saved.labeled
    assert ls.select_labels("random", labels, 30, 10, seed=0, split_file=str(path)).labeled == saved.labeled
    with pytest.raises(ConfigError, match="needs --split-file"):
        ls.select_labels("file", labels, 30, 10, seed=0)
    with pytest.raises(ConfigError, match="only with label_selection 'file'"):
        ls.select_labels("representative", labels, 30, 10, seed=0, split_file=str(path),
                         images=torch.zeros(100, 1, 2, 2, dtype=torch.uint8))


def test_centroid_selection_nearest_and_farthest():
    feats = torch.tensor([[0.0], [1.0], [10.0], [2.0], [100.0], [101.0], [99.0], [150.0]])
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    # class 0 mean 3.25: nearest 2.0 (idx 3), 1.0 (idx 1); farthest 10 (idx 2), 0 (idx 0)
    # class 1 mean 112.5: nearest 101 (idx 5), 100 (idx 4); farthest 150 (idx 7), 99 (idx 6)
    assert ls.centroid_selection(feats, labels, 2, nearest=True) == [1, 3, 4, 5]
    assert ls.centroid_selection(feats, labels, 2, nearest=False) == [0, 2, 6, 7]
    # ties keep the lower index
    assert ls.centroid_selection(torch.tensor([[1.0], [-1.0], [1.0], [-1.0]]), torch.zeros(4, dtype=torch.long),
                                 1, nearest=True) == [0]


def test_representative_and_unrepresentative_on_pixels():
    images, labels = _clusters()
    rep = ls.select_labels("representative", labels, 6, 3, seed=0, images=images)
    far = ls.select_labels("unrepresentative", labels, 6, 3, seed=5, images=images)
    assert len(rep.labeled) == 6 and rep.unlabeled == list(range(30))
    # pixel distance to the centroid grows with |i - 4.5|: the middle images are nearest, the ends farthest
    assert sorted(i % 10 for i in rep.labeled) == [4, 4, 4, 5, 5, 5]
    assert sorted(i % 10 for i in far.labeled) == [0, 0, 0, 9, 9, 9]
    assert [sum(1 for i in rep.labeled if labels[i] == c) for c in range(3)] == [2, 2, 2]
    # deterministic: the run's seed does not change which images are picked
    assert ls.select_labels("representative", labels, 6, 3, seed=9, images=images).labeled == rep.labeled
    with pytest.raises(SplitError, match="not divisible"):
        ls.select_labels("representative", labels, 5, 3, seed=0, images=images)


def test_pixel_features_are_a_fixed_projection():
    images, _ = _clusters()
    a, b = ls.pixel_features(images), ls.pixel_features(images)
    assert a.shape == (30, ls.PROJECTION_DIM) and torch.equal(a, b)
    assert not torch.equal(a, ls.pixel_features(images, seed=1))


def test_checkpoint_features_are_the_ema_models_pooled_features(tmp_path):
    images, labels = _clusters()
    images = images.repeat_interleave(4, 2).repeat_interleave(4, 3)  # 16x16: the network pools 4 times
    torch.manual_seed(0)
    ema = create_model("cnn_small", 3, 3)
    ckpt = tmp_path / "c.pt"
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.2, 0.2)
    # A checkpoint as training writes it: it describes its model, with the statistics its inputs were standardised by.
    description = ModelSpec("cnn_small", ("a", "b", "c"), 3, (16, 16), mean, std).to_dict()
    save_checkpoint({"format": "fixmatch-checkpoint", "step": 0, "config": {"model": "cnn_small"}, "model": {},
                     "ema": ema.state_dict(), **description}, ckpt)
    feats = ls.checkpoint_features(ckpt, images)
    ema.eval()
    x = (images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = ema.forward_features(x).flatten(1).double()
    assert torch.allclose(feats, expected, atol=1e-6)
    split = ls.select_labels("unrepresentative", labels, 3, 3, seed=0, images=images, checkpoint=str(ckpt))
    assert split.labeled == ls.centroid_selection(expected, labels, 1, nearest=False)
    with pytest.raises(SplitError, match="does not fit these images"):
        ls.checkpoint_features(ckpt, images[:, :1])


def _nan_in_ema(state):
    state["ema"]["fc.weight"][0, 0] = float("nan")


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update(mean=[2.0, 0.5, 0.5]), "malformed model description: mean (2.0, 0.5, 0.5) must lie in [0, 1]"),
    (_nan_in_ema, "its ema weights hold non-finite values (NaN or inf) in 'fc.weight'"),
], ids=["mean-range", "nan-weights"])
def test_selection_checkpoint_is_checked_as_fixmatch_load_checks_it(tmp_path, capsys, edit, message):
    """A --selection-checkpoint whose model description or weights are damaged is refused in one line before
    training starts (it used to pick labels from garbage features and train on)."""
    source = tmp_path / "source"
    fixmatch.train(Config(dataset="synthetic", model="cnn_small", num_labels=20, batch_size=8, mu=2, steps=1,
                          eval_every=1, eval_batch_size=512, progress=False, device="cpu"), out=source)
    state = load_checkpoint(source / "checkpoints" / "last.pt")
    edit(state)
    bad = tmp_path / "bad.pt"
    save_checkpoint(state, bad)  # a fresh checksum: only the description or the weights are wrong
    run = tmp_path / "run"
    code, err = one_line_cli(["train", "--dataset", "synthetic", "--model", "cnn_small", "--num-labels", "20",
                              "--steps", "1", "--device", "cpu", "--no-progress", "--label-selection",
                              "representative", "--selection-checkpoint", str(bad), "--out", str(run)], capsys)
    assert code == 2 and err.startswith("fixmatch: error: ") and str(bad) in err and message in err, err
    assert not (run / "checkpoints").exists()


def test_training_with_representative_labels(tmp_path, monkeypatch):
    quick = dict(dataset="synthetic", model="cnn_small", num_labels=20, batch_size=8, mu=2, eval_every=2,
                 eval_batch_size=512, progress=False, device="cpu", steps=2)
    run = tmp_path / "rep"
    devices = []

    def spy(*args, **kwargs):
        devices.append(kwargs.get("device"))
        return ls.select_labels(*args, **kwargs)

    monkeypatch.setattr(loop, "select_labels", spy)
    fixmatch.train(Config(**quick, label_selection="representative"), out=run)
    assert devices == [torch.device("cpu")]  # the run's device: features are computed where the run trains
    labeled = json.loads((run / "split.json").read_text())["labeled"]
    data = load_dataset("synthetic")
    assert labeled == ls.centroid_selection(ls.pixel_features(data.train_images), data.train_labels, 2, nearest=True)
    assert labeled != make_split(data.train_labels, 20, 10, 0).labeled
    with pytest.raises(ConfigError, match="label_selection"):
        resolve_config(overrides={"label_selection": "best"})


@pytest.mark.parametrize("strategy", ["representative", "typiclust"])
def test_a_checkpoints_network_embeds_on_the_runs_device(monkeypatch, strategy):
    """train passes its device: a GPU run does not embed 50,000 images with a WRN on the CPU."""
    images, labels = _clusters()
    seen = []

    def features(checkpoint, imgs, batch_size=256, device="cpu", flag=""):
        seen.append(str(device))
        return imgs.flatten(1).double()

    monkeypatch.setattr("fixmatch.runs.features.checkpoint_features", features)
    monkeypatch.setattr(ls, "checkpoint_features", features)
    split = ls.select_labels(strategy, labels, 3, 3, seed=0, images=images, checkpoint="run", device="meta")
    assert seen == ["meta"] and len(split.labeled) == 3
