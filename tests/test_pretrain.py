"""fixmatch pretrain (SimCLR) and train --init-weights from its run: the loss, the views, the kNN monitor, the run
directory and its exact resume, and what the pretrained weights bring into a FixMatch run."""
from __future__ import annotations

import json
import math
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
from folder_images import make_folder
from run_helpers import Killed, assert_same_state, metrics_rows, one_line_cli

from fixmatch.augment.contrastive import SimCLRView, random_resized_crop
from fixmatch.cli import main
from fixmatch.config import PretrainConfig
from fixmatch.core.contrastive import knn_accuracy, knn_predict, nt_xent
from fixmatch.data.folder_pool import load_folder_pool
from fixmatch.models import create_model
from fixmatch.models.pretrained import InitWeightsError
from fixmatch.runs.model_spec import ModelSpec, load_model_checkpoint
from fixmatch.training import init_weights

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

# A few steps on the 16x16 synthetic set: 2000 training images, a kNN bank of 200, 500 test queries.
PRETRAIN_FLAGS = ["--dataset", "synthetic", "--model", "cnn_small", "--batch-size", "16", "--steps", "6",
                  "--eval-every", "2", "--warmup", "2", "--knn-bank", "200", "--knn-k", "20", "--eval-batch-size",
                  "500", "--device", "cpu", "--no-progress"]


def _pretrain(out: Path, *extra: str) -> int:
    return main(["pretrain", *PRETRAIN_FLAGS, "--out", str(out), *extra])






def _checkpoint(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)


# ------------------------------------------------------------------------------------------------ NT-Xent
def test_nt_xent_of_two_orthogonal_pairs_is_the_hand_computed_value() -> None:
    # Views a, b of image 0 are (1, 0); of image 1, (0, 1). Each view: positive similarity 1, its two negatives 0,
    # so every view's loss is -log(e^(1/t) / (e^(1/t) + 2)) = log(1 + 2 e^(-1/t)).
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    for t in (0.5, 0.1, 1.0):
        assert nt_xent(z, z.clone(), t).item() == pytest.approx(math.log(1 + 2 * math.exp(-1 / t)), rel=1e-5, abs=1e-6)


def _nt_xent_by_the_definition(z1: torch.Tensor, z2: torch.Tensor, t: float) -> float:
    """SimCLR's eq. (1) written out term by term: views 2k and 2k+1 are the pair of image k."""
    views = [v for pair in zip(z1.tolist(), z2.tolist()) for v in pair]

    def sim(u: list[float], v: list[float]) -> float:
        return sum(a * b for a, b in zip(u, v)) / math.sqrt(sum(a * a for a in u) * sum(b * b for b in v))

    total = 0.0
    for i in range(len(views)):
        j = i + 1 if i % 2 == 0 else i - 1
        denominator = sum(math.exp(sim(views[i], views[k]) / t) for k in range(len(views)) if k != i)
        total += -math.log(math.exp(sim(views[i], views[j]) / t) / denominator)
    return total / len(views)


def test_nt_xent_matches_the_papers_definition_and_ignores_the_projections_scale() -> None:
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    expected = _nt_xent_by_the_definition(z1, z2, 0.5)
    assert nt_xent(z1, z2, 0.5).item() == pytest.approx(expected, rel=1e-5)
    assert nt_xent(3 * z1, 0.1 * z2, 0.5).item() == pytest.approx(expected, rel=1e-5)  # cosine similarities
    # Swapping the views changes nothing: every view is an anchor once.
    assert nt_xent(z2, z1, 0.5).item() == pytest.approx(expected, rel=1e-5)


def test_nt_xent_gradient_pulls_the_positive_closer() -> None:
    z1 = torch.tensor([[1.0, 0.2], [0.0, 1.0]], requires_grad=True)
    z2 = torch.tensor([[0.2, 1.0], [1.0, 0.0]])
    loss = nt_xent(z1, z2, 0.5)
    loss.backward()
    with torch.no_grad():
        assert nt_xent(z1 - 0.1 * z1.grad, z2, 0.5) < loss


# ------------------------------------------------------------------------------------------------ views
def _images(channels: int, n: int = 8, side: int = 16) -> torch.Tensor:
    return torch.randint(0, 256, (n, channels, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("channels", [1, 3])
def test_two_views_differ_and_keep_shape_and_range(channels: int) -> None:
    x = _images(channels)
    g = torch.Generator().manual_seed(0)
    view = SimCLRView(randaugment_ops=1)
    a, b = view(x, g), view(x, g)
    for v in (a, b):
        assert v.shape == x.shape and v.dtype == torch.float32 and v.min() >= 0 and v.max() <= 1
    assert not torch.equal(a, b)
    assert (a - b).abs().flatten(1).amax(1).min() > 0  # every image's two views differ
    # The generator alone decides: the same seed gives the same pair.
    g.manual_seed(0)
    assert torch.equal(view(x, g), a) and torch.equal(view(x, g), b)


def test_the_full_crop_unflipped_is_the_image() -> None:
    x = _images(3)
    out = random_resized_crop(x, torch.Generator().manual_seed(0), scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False)
    torch.testing.assert_close(out, x.float() / 255, atol=1e-5, rtol=0)


def test_colour_ops_touch_colour_images_only() -> None:
    plain, coloured = SimCLRView(jitter=0.0, grey_prob=0.0), SimCLRView(jitter=0.5, grey_prob=0.5)
    grey, rgb = _images(1), _images(3)
    draws = [view(img, torch.Generator().manual_seed(3)) for img in (grey, rgb) for view in (plain, coloured)]
    assert torch.equal(draws[0], draws[1])  # grey images: the same views with or without colour distortion
    assert not torch.equal(draws[2], draws[3])  # colour images: distorted


def test_a_strong_jitter_never_inverts_an_image() -> None:
    # Factors are clamped at 0 as torchvision's ColorJitter does: with s = 5 the range 1 -+ 4 would otherwise give
    # about 3 images in 8 a negative contrast factor, which turns a left-to-right ramp into a right-to-left one.
    ramp = torch.linspace(40, 215, 16).round().to(torch.uint8).expand(64, 3, 16, 16).contiguous()
    view = SimCLRView(crop_scale=(1.0, 1.0), flip=False, jitter=5.0, jitter_prob=1.0, grey_prob=0.0)
    profile = view(ramp, torch.Generator().manual_seed(0)).mean(dim=(1, 2))  # (64, 16): left to right
    assert (profile.diff(dim=1) >= -1e-4).all()


# ------------------------------------------------------------------------------------------------ kNN monitor
def test_knn_accuracy_is_100_on_features_that_separate_the_classes() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(4) * 10
    labels = torch.arange(40) % 4
    bank = centres[labels] + torch.randn(40, 4, generator=g)
    queries_y = torch.arange(20) % 4
    queries = centres[queries_y] + torch.randn(20, 4, generator=g)
    assert knn_accuracy(bank, labels, queries, queries_y, 4, k=10) == 100.0
    assert knn_accuracy(bank, labels, queries, (queries_y + 1) % 4, 4, k=10) == 0.0


def test_knn_votes_are_weighted_by_exp_of_the_cosine_over_t() -> None:
    # Query (1, 0). One class-1 neighbour at cosine 0.9 outweighs two class-0 neighbours at cosine 0.1 with
    # weights exp(s / 0.1): e^9 > 2 e^1, where an unweighted majority would say class 0.
    s = math.sqrt(1 - 0.1**2)
    bank = torch.tensor([[0.9, math.sqrt(1 - 0.81)], [0.1, s], [0.1, -s]]) * torch.tensor([[2.0], [5.0], [0.5]])
    labels = torch.tensor([1, 0, 0])
    query = torch.tensor([[1.0, 0.0]])
    assert knn_predict(bank, labels, query, 2, k=3, temperature=0.1).tolist() == [1]
    # With a temperature so high that the weights are nearly equal, the two class-0 votes win.
    assert knn_predict(bank, labels, query, 2, k=3, temperature=100.0).tolist() == [0]
    # k=2: only the two nearest vote (class 1 at 0.9 and one class-0 at 0.1).
    assert knn_predict(bank, labels, query, 2, k=2, temperature=100.0).tolist() == [1]


# ------------------------------------------------------------------------------------------------ the run
def test_a_pretrain_run_writes_its_files_and_loads_as_a_model(tmp_path, capsys) -> None:
    run = tmp_path / "pre"
    assert _pretrain(run) == 0
    out = capsys.readouterr().out
    assert "kNN acc" in out and f"fixmatch train --init-weights {run}" in out
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints/last.pt"):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").iterdir())
    assert not (run / ".lock").exists()  # released
    rows = metrics_rows(run)
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert all(0 <= r["knn_acc"] <= 100 and math.isfinite(r["loss"]) for r in rows)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["knn_acc_last"] == rows[-1]["knn_acc"] and summary["method"] == "simclr"
    config = PretrainConfig()
    assert "proj_dim" in (run / "config.yaml").read_text() and config.temperature == 0.5

    loaded = load_model_checkpoint(run)
    ckpt = _checkpoint(run)
    assert loaded.step == 6 and loaded.spec.name == "cnn_small" and loaded.spec.input_size == (16, 16)
    assert ckpt["ema"] is None and ckpt["pretrain"] == "simclr"
    assert set(ckpt["projection_head"]) and not any(k.startswith("projection") for k in ckpt["model"])
    assert_same_state(loaded.backbone.state_dict(), ckpt["model"], "backbone")
    # The weights moved from their initialisation (seed 0), and forward_features is the embedding.
    torch.manual_seed(0)
    fresh = create_model("cnn_small", 10, 3, image_size=[16, 16]).state_dict()
    assert not torch.equal(fresh["features.0.weight"], ckpt["model"]["features.0.weight"])
    assert torch.equal(fresh["fc.weight"], ckpt["model"]["fc.weight"])  # the classifier head is never trained
    assert loaded.backbone.forward_features(torch.zeros(2, 3, 16, 16)).shape == (2, 128)


def test_killed_and_stopped_then_resumed_runs_equal_the_uninterrupted_run(tmp_path, monkeypatch, capsys) -> None:
    assert _pretrain(tmp_path / "whole") == 0
    whole = _checkpoint(tmp_path / "whole")

    # Killed (SIGKILL stands in: nothing after the raise runs) right after the checkpoint of step 2.
    module = sys.modules["fixmatch.training.pretrain"]
    real_save = module.save_checkpoint

    def save_then_die(state, path):
        real_save(state, path)
        if state["step"] == 2:
            raise Killed

    monkeypatch.setattr(module, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        _pretrain(tmp_path / "killed")
    monkeypatch.setattr(module, "save_checkpoint", real_save)
    assert main(["pretrain", "--out", str(tmp_path / "killed"), "--resume", "--no-progress"]) == 0

    # Stopped by SIGTERM during step 3 (between evaluations): a checkpoint at step 3, exit code 130.
    real_step = module.pretrain_step

    def step_then_signal(state, *args):
        loss = real_step(state, *args)
        if state.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    monkeypatch.setattr(module, "pretrain_step", step_then_signal)
    assert _pretrain(tmp_path / "stopped") == 130
    assert "Resume with: fixmatch pretrain --out" in capsys.readouterr().err
    assert _checkpoint(tmp_path / "stopped")["step"] == 3
    monkeypatch.setattr(module, "pretrain_step", real_step)
    assert main(["pretrain", "--out", str(tmp_path / "stopped"), "--resume", "--no-progress"]) == 0

    for name in ("killed", "stopped"):
        resumed = _checkpoint(tmp_path / name)
        assert metrics_rows(tmp_path / name) == metrics_rows(tmp_path / "whole"), name
        for key in ("model", "projection_head", "optimizer", "loss_sums", "step"):
            assert_same_state(resumed[key], whole[key], f"{name}[{key!r}]")


def test_pretrain_command_errors_are_one_line(tmp_path, capsys) -> None:
    code, err = one_line_cli(["pretrain", *PRETRAIN_FLAGS, "--temperature", "0", "--out", str(tmp_path / "a")],
                             capsys)
    assert code == 2 and "temperature" in err and not (tmp_path / "a").exists()
    code, err = one_line_cli(["pretrain", "--out", str(tmp_path / "none"), "--resume"], capsys)
    assert code == 2 and "not found" in err
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("")
    code, err = one_line_cli(["pretrain", *PRETRAIN_FLAGS, "--out", str(tmp_path / "used")], capsys)
    assert code == 2 and "already exists" in err


def test_resume_refuses_a_changed_setting_and_a_train_run(tmp_path, capsys) -> None:
    assert _pretrain(tmp_path / "pre", "--steps", "2") == 0
    capsys.readouterr()
    code, err = one_line_cli(["pretrain", "--out", str(tmp_path / "pre"), "--resume", "--lr", "0.1"], capsys)
    assert code == 2 and "cannot change 'lr' when resuming" in err
    # Where the data lives may change (synthetic reads none); the settings in config.yaml may not be edited.
    assert main(["pretrain", "--out", str(tmp_path / "pre"), "--resume", "--data-dir", str(tmp_path)]) == 0
    config = tmp_path / "pre" / "config.yaml"
    config.write_text(config.read_text().replace("temperature: 0.5", "temperature: 0.2"))
    code, err = one_line_cli(["pretrain", "--out", str(tmp_path / "pre"), "--resume"], capsys)
    assert code == 2 and "no longer matches the run's last checkpoint (temperature: 0.5 in the checkpoint" in err
    train_run = tmp_path / "train"
    assert main(["train", "--dataset", "synthetic", "--model", "cnn_small", "--num-labels", "40", "--batch-size",
                 "8", "--mu", "1", "--steps", "1", "--eval-every", "1", "--device", "cpu", "--no-progress",
                 "--out", str(train_run)]) == 0
    capsys.readouterr()
    code, err = one_line_cli(["pretrain", "--out", str(train_run), "--resume"], capsys)
    assert code == 2 and "is a fixmatch train run, not a pretrain run" in err


# ------------------------------------------------------------------------------------------------ --init-weights
TRAIN_FLAGS = ["train", "--dataset", "synthetic", "--model", "cnn_small", "--num-labels", "40", "--batch-size", "8",
               "--mu", "1", "--steps", "1", "--eval-every", "1", "--eval-batch-size", "500", "--lr", "1e-9",
               "--wd", "0", "--device", "cpu", "--no-progress", "--seed", "1"]


def test_init_weights_from_a_pretrain_run_copies_the_backbone_not_the_head(tmp_path, capsys) -> None:
    assert _pretrain(tmp_path / "pre", "--steps", "2") == 0
    pretrained = _checkpoint(tmp_path / "pre")["model"]
    for source in (tmp_path / "pre", tmp_path / "pre" / "checkpoints" / "last.pt"):  # a run directory or its file
        run = tmp_path / f"train-{source.name}"
        assert main([*TRAIN_FLAGS, "--init-weights", str(source), "--out", str(run)]) == 0
        assert "init weights from" in capsys.readouterr().out
        ckpt = _checkpoint(run)
        assert f"init_weights: {source}" in (run / "config.yaml").read_text()  # recorded
        torch.manual_seed(1)  # the train run's seed: its fresh classifier head
        fresh_head = create_model("cnn_small", 10, 3, image_size=[16, 16]).fc.weight
        for weights in (ckpt["model"], ckpt["ema"]):  # the EMA starts from the initialised weights too
            for key, tensor in pretrained.items():
                if key.startswith("fc.") or "running_" in key or "num_batches" in key:
                    continue  # the head; BatchNorm's statistics, which the step's forward pass moves
                if tensor.is_floating_point():  # lr 1e-9 and one step: the weights have not moved
                    torch.testing.assert_close(weights[key], tensor, atol=1e-6, rtol=0)
            torch.testing.assert_close(weights["fc.weight"], fresh_head, atol=1e-6, rtol=0)
            assert not torch.allclose(weights["fc.weight"], pretrained["fc.weight"], atol=1e-3)


def test_init_weights_refuses_another_network_and_paths_that_are_no_run(tmp_path, capsys) -> None:
    assert _pretrain(tmp_path / "pre", "--steps", "2") == 0
    capsys.readouterr()
    code, err = one_line_cli([*TRAIN_FLAGS, "--model", "resnet18", "--init-weights", str(tmp_path / "pre"),
                              "--out", str(tmp_path / "r18")], capsys)
    assert code == 2 and err.strip().endswith("holds cnn_small for 3x16x16 images but this run builds resnet18 for 3x16x16 "
                                      "images; train with --model cnn_small (the checkpoint's), or pretrain again "
                                      "with --model resnet18")
    assert not (tmp_path / "r18").exists()
    (tmp_path / "empty").mkdir()
    code, err = one_line_cli([*TRAIN_FLAGS, "--init-weights", str(tmp_path / "empty"), "--out", str(tmp_path / "e")],
                             capsys)
    assert code == 2 and "is a folder but not a fixmatch run directory" in err
    code, err = one_line_cli([*TRAIN_FLAGS, "--init-weights", str(tmp_path / "missing"), "--out", str(tmp_path / "m")],
                             capsys)
    assert code == 2 and "not found" in err
    # A run started from one pretrained backbone cannot be resumed with another.
    assert main([*TRAIN_FLAGS, "--out", str(tmp_path / "plain")]) == 0
    capsys.readouterr()
    code, err = one_line_cli(["train", "--out", str(tmp_path / "plain"), "--resume", "--init-weights",
                              str(tmp_path / "pre")], capsys)
    assert code == 2 and "cannot change 'init_weights' when resuming" in err


# ------------------------------------------------------------------------------------- a folder of your images
def _folder_flags(root: Path, tmp_path: Path) -> list[str]:
    return ["pretrain", "--dataset", f"folder:{root}", "--data-dir", str(tmp_path / "data"), "--model", "cnn_small",
            "--batch-size", "8", "--steps", "2", "--eval-every", "2", "--warmup", "1", "--knn-k", "3", "--device",
            "cpu", "--no-progress"]


def test_pretrain_on_a_folder_of_unlabeled_images_alone_then_train_from_it(tmp_path, capsys) -> None:
    # The workflow's first command: only unlabeled/ (test/ too, but no labeled/ to compare its images with).
    root = make_folder(tmp_path / "imgs", per_class=0, unlabeled=12, test_per_class=1)
    assert main([*_folder_flags(root, tmp_path), "--out", str(tmp_path / "pre")]) == 0
    out = capsys.readouterr().out
    assert f"no kNN monitor: it needs labeled/<class>/ images as reference and test/<class>/ images to query in " \
           f"{root}; pretraining itself uses no labels" in out
    assert "(12 images, labels unused)" in out
    assert [r["knn_acc"] for r in metrics_rows(tmp_path / "pre")] == [None]
    assert json.loads((tmp_path / "pre" / "summary.json").read_text())["knn_acc_last"] is None
    network = load_model_checkpoint(tmp_path / "pre")
    assert network.spec.input_size == (20, 20) and network.spec.in_channels == 3
    # advise embeds the same pool at the same size; train on the labels a person gave starts from the backbone.
    assert load_folder_pool(root, tmp_path / "data", 20).images.shape == (12, 3, 20, 20)
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\nunlabeled/batch0/deeper/u0.png,cat\nunlabeled/batch1/deeper/u1.png,dog\n")
    assert main(["train", "--dataset", f"folder:{root}", "--data-dir", str(tmp_path / "data"), "--labels-csv",
                 str(labels), "--model", "cnn_small", "--batch-size", "2", "--mu", "1", "--steps", "1",
                 "--eval-every", "1", "--device", "cpu", "--no-progress", "--init-weights", str(tmp_path / "pre"),
                 "--out", str(tmp_path / "train")]) == 0
    assert "init weights from" in capsys.readouterr().out
    # The cpu-small preset decodes the folder at 32x32: the line names the size to train (or pretrain) at.
    code, err = one_line_cli(["train", "--preset", "cpu-small", "--dataset", f"folder:{root}", "--data-dir",
                              str(tmp_path / "data"), "--labels-csv", str(labels), "--init-weights",
                              str(tmp_path / "pre"), "--num-labels", "2", "--batch-size", "2", "--mu", "1", "--out", str(tmp_path / "small")],
                             capsys)
    assert code == 2 and err.strip().endswith("holds cnn_small for 3x20x20 images but this run builds cnn_small for 3x32x32 "
                                      "images; train with --image-size 20 (the checkpoint's), or pretrain again "
                                      "with --image-size 32")
    assert not (tmp_path / "small").exists()


@pytest.mark.parametrize("test_per_class", [2, 0])
def test_pretrain_on_a_folder_with_labeled_images_logs_the_knn_accuracy_where_test_has_some(
        tmp_path, capsys, test_per_class) -> None:
    root = make_folder(tmp_path / "imgs", per_class=4, unlabeled=6, test_per_class=test_per_class)
    assert main([*_folder_flags(root, tmp_path), "--out", str(tmp_path / "pre")]) == 0
    captured = capsys.readouterr()
    assert "(14 images, labels unused)" in captured.out  # labeled/ and unlabeled/; test/ is never trained on
    assert "held out" not in captured.err  # pretraining holds no labeled image out: it uses no labels
    (row,) = metrics_rows(tmp_path / "pre")
    if test_per_class:
        assert "no kNN monitor" not in captured.out
        assert row["knn_acc"] is not None and 0 <= row["knn_acc"] <= 100
    else:
        assert "no kNN monitor: it needs labeled/<class>/ images as reference and test/<class>/" in captured.out
        assert row["knn_acc"] is None
    assert load_model_checkpoint(tmp_path / "pre").spec.class_names == ("cat", "dog")


def _spec(channels: int = 3, size: int = 32, name: str = "cnn_small") -> ModelSpec:
    return ModelSpec(name=name, class_names=("a", "b"), in_channels=channels, input_size=(size, size),
                     mean=(0.5,) * channels, std=(0.25,) * channels, kwargs={"image_size": [size, size]})


@pytest.mark.parametrize("source, dataset, fix", [
    (_spec(size=20), "folder:imgs", "train with --image-size 20 (the checkpoint's), or pretrain again with "
                                    "--image-size 32"),
    (_spec(size=96), "cifar10", "pretrain again on this data set"),  # a built-in data set has one size
    (_spec(channels=1), "cifar10", "its network takes 1-channel images and these have 3: pretrain again on this "
                                   "data set"),
    (_spec(name="resnet18"), "folder:imgs", "train with --model resnet18 (the checkpoint's), or pretrain again "
                                            "with --model cnn_small"),
])
def test_another_network_names_the_fix_that_can_make_them_agree(source, dataset, fix) -> None:
    with pytest.raises(InitWeightsError) as e:
        init_weights._check_same_network(source, _spec(), Path("pre"), dataset)
    assert str(e.value).endswith(f"; {fix}") and "\n" not in str(e.value)
    init_weights._check_same_network(_spec(), _spec(), Path("pre"), dataset)  # the same network passes
