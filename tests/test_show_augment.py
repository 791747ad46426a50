"""The augmentation grid: `fixmatch show-augment` and the grids logged to TensorBoard while training."""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from PIL import Image
from run_helpers import metrics_rows

import fixmatch
from fixmatch.augment import STRONG_AUGMENTS, RandAugment, make_strong_augment, visualize, weak_augment
from fixmatch.augment.visualize import AugmentGrids, augment_views, grid_figure, grid_image
from fixmatch.config import Config, ConfigError
from fixmatch.studies import show_augment as show_augment_module
from fixmatch.studies.show_augment import show_augment

QUICK = dict(dataset="synthetic", model="cnn_small", num_labels=40, batch_size=16, mu=3, lr=0.05, ema=0.9,
             eval_every=10, eval_batch_size=512, progress=False, device="cpu")


def _images(n: int = 5) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_views_are_the_training_views_and_captions_name_the_applied_ops() -> None:
    x = _images()
    weak = functools.partial(weak_augment, flip=True, translate=0.125)
    strong = RandAugment(prob=1.0, cutout=0.0)  # every drawn op is applied, so every caption names two ops
    views = augment_views(x, weak, strong, seed=7)
    # The same draws in the order train() makes them: weak view, the strong view's own weak view, the policy.
    g = torch.Generator().manual_seed(7)
    w = weak(x, g)
    base = weak(x, g)
    choices = strong.sample(5, g)
    assert torch.equal(views.weak, w)
    assert torch.equal(views.strong, strong.apply(base, choices, g))
    assert torch.equal(views.original, x.float() / 255)
    names = [op.name for op in strong.ops]
    for i, caption in enumerate(views.captions):
        drawn = [names[int(k)] for k in choices.ops[i]]
        assert caption.split()[0].split("(")[0] == drawn[0] and caption.split()[1].split("(")[0] == drawn[1]
    # The caption's magnitude is the value the op was applied with.
    k, level = int(choices.ops[0, 0]), choices.levels[0, 0]
    if strong.ops[k].fmt is not None:
        assert strong.ops[k].fmt.format(float(strong.value(k, level))) in views.captions[0]
    assert not torch.equal(views.strong, augment_views(x, weak, strong, seed=8).strong)


@pytest.mark.parametrize("name", STRONG_AUGMENTS)
def test_every_policy_draws_a_grid(name: str) -> None:
    views = augment_views(_images(3), weak_augment, make_strong_augment(name, cutout=0.5), seed=0)
    assert views.strong.shape == (3, 3, 16, 16) and 0 <= views.strong.min() and views.strong.max() <= 1
    assert all("Cutout" in c for c in views.captions)
    img = grid_image(grid_figure(views, labels=["a", "b", "c"], title="t"))
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert img.shape[1] == 600 and img.shape[0] > 450  # 7.5 inches at 80 dpi; 2.1 inches per row
    assert img.std() > 10  # something was drawn


def test_show_augment_writes_a_png_reproducibly(tmp_path) -> None:
    a = show_augment("synthetic", tmp_path / "a.png", num_images=3, seed=1)
    b = show_augment("synthetic", tmp_path / "sub" / "b.png", num_images=3, seed=1)
    c = show_augment("synthetic", tmp_path / "c.png", num_images=3, seed=2)
    d = show_augment("synthetic", tmp_path / "d.png", num_images=3, seed=1, weak_padding="zeros")
    pixels = [np.asarray(Image.open(p).convert("RGB")) for p in (a, b, c, d)]
    assert pixels[0].shape[0] > 300 and np.array_equal(pixels[0], pixels[1])
    assert not np.array_equal(pixels[0], pixels[2])
    assert not np.array_equal(pixels[0], pixels[3])  # the same draws with black borders
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "c.png", "d.png", "sub"]  # no temporary file


def test_cli_show_augment_and_its_errors(tmp_path, capsys) -> None:
    from fixmatch.cli import main

    def run(*args: str) -> tuple[int, str]:
        try:
            code = main(["show-augment", *args])
        except SystemExit as e:  # argparse's own errors
            code = e.code
        return code, capsys.readouterr().err

    out = tmp_path / "grid.png"
    code, err = run("--dataset", "synthetic", "--out", str(out), "--strong", "ctaugment", "--num-images", "2",
                    "--seed", "3")
    assert code == 0, err
    assert Image.open(out).format == "PNG"
    for args, message in [
        (["--dataset", "synthetic", "--out", str(tmp_path / "g.jpg")], "--out must name a .png file"),
        (["--dataset", "synthetic", "--out", str(tmp_path / "g.png"), "--num-images", "0"], "--num-images"),
        (["--dataset", "no-such-set", "--out", str(tmp_path / "g.png")], "unknown dataset"),
        (["--dataset", "synthetic", "--out", str(tmp_path / "g.png"), "--strong", "autoaugment"], "invalid choice"),
        (["--dataset", "synthetic", "--out", str(tmp_path / "g.png"), "--strong", "randaugment-tf",
          "--randaugment-prob", "1"], "--randaugment-prob applies to --strong randaugment only, not randaugment-tf"),
    ]:
        code, err = run(*args)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"]  # nothing written by the failures


def test_show_augment_passes_the_randaugment_options_to_the_policy(tmp_path, monkeypatch) -> None:
    import fixmatch.augment.randaugment_variants as variants

    built = []
    real = variants.make_strong_augment
    monkeypatch.setattr(variants, "make_strong_augment", lambda *a, **kw: built.append(kw) or real(*a, **kw))
    default = show_augment("synthetic", tmp_path / "a.png", num_images=3, seed=1)
    one_op = show_augment("synthetic", tmp_path / "b.png", num_images=3, seed=1, randaugment_ops=1,
                          randaugment_prob=1.0)
    assert (built[0]["num_ops"], built[0]["prob"]) == (2, 0.5)
    assert (built[1]["num_ops"], built[1]["prob"]) == (1, 1.0)
    assert not np.array_equal(np.asarray(Image.open(default)), np.asarray(Image.open(one_op)))


def test_show_augment_rejects_bad_values_before_loading(tmp_path) -> None:
    for kwargs, message in [({"randaugment_ops": 0}, "--randaugment-ops must be a positive integer"),
                            ({"randaugment_prob": 1.5}, r"--randaugment-prob must be in \[0, 1\]"),
                            ({"strong": "ctaugment", "randaugment_ops": 3},
                             "--randaugment-ops applies to --strong randaugment only, not ctaugment")]:
        with pytest.raises(ConfigError, match=message):
            show_augment("synthetic", tmp_path / "g.png", **kwargs)
    assert not (tmp_path / "g.png").exists()
    with pytest.raises(ConfigError, match="--cutout"):
        show_augment("synthetic", tmp_path / "g.png", cutout=1.5)
    with pytest.raises(ConfigError, match="--seed"):
        show_augment("synthetic", tmp_path / "g.png", seed=-1)
    with pytest.raises(ConfigError, match="--weak-padding"):
        show_augment("synthetic", tmp_path / "g.png", weak_padding="edge")


class _Stop(Exception):
    """Ends a training run once its views are built."""


def test_show_augment_draws_the_views_training_uses(tmp_path, monkeypatch) -> None:
    # Options show-augment has no flag for: its views must still be the run's (build_views), not its own constants.
    config = Config(**QUICK, steps=10, weak_flip=False, weak_translate=0.25, weak_padding="zeros", fill=0.2,
                    strong="randaugment-tf", cutout=0.25, seed=4)
    drawn = []
    real_views = show_augment_module.augment_views
    monkeypatch.setattr(show_augment_module, "augment_views",
                        lambda *args: drawn.append((args, real_views(*args))) or drawn[-1][1])
    show_augment_module.draw_views(config, tmp_path / "grid.png", num_images=4)
    (images, _, _, seed), shown = drawn[0]

    trained = []

    def record(self, train_images, weak, strong, *args, **kwargs) -> None:
        trained.append((weak, strong))
        raise _Stop

    monkeypatch.setattr(visualize.AugmentGrids, "__init__", record)  # train() hands it the views it trains with
    with pytest.raises(_Stop):
        fixmatch.train(config, out=tmp_path / "run")
    weak, strong = trained[0]
    views = augment_views(images, weak, strong, seed)
    assert torch.equal(views.weak, shown.weak) and torch.equal(views.strong, shown.strong)
    assert views.captions == shown.captions
    # Without the run's weak options (show-augment's old constants) the pixels differ.
    default_weak = functools.partial(weak_augment, translate=0.125, padding="zeros")
    assert not torch.equal(augment_views(images, default_weak, strong, seed).weak, shown.weak)


def test_show_augment_refuses_bad_options_by_the_configs_rules(tmp_path) -> None:
    # Each flag is checked by its config key's own rule (booleans are no numbers), before the data set is read.
    for kwargs, message in [({"cutout": True}, r"--cutout must be in \[0, 1\], got True"),
                            ({"randaugment_prob": True}, r"--randaugment-prob must be in \[0, 1\], got True"),
                            ({"seed": True}, r"--seed must be an integer in \[0, 2\^31\), got True"),
                            ({"weak_padding": "edge"}, "--weak-padding must be reflect or zeros, got 'edge'")]:
        with pytest.raises(ConfigError, match=message):
            show_augment("no-such-set", tmp_path / "g.png", **kwargs)
    # A rule between keys refuses with the config's own one-line message, the one train gives.
    with pytest.raises(ConfigError) as trained:
        fixmatch.train(Config(**QUICK, strong="ctaugment", randaugment_prob=1.0), out=tmp_path / "run")
    with pytest.raises(ConfigError) as shown:
        show_augment("no-such-set", tmp_path / "g.png", strong="ctaugment", randaugment_prob=1.0)
    assert str(shown.value) == str(trained.value) and len(str(shown.value).splitlines()) == 1
    # A Config given to draw_views is checked as train() checks it.
    with pytest.raises(ConfigError) as trained:
        fixmatch.train(Config(**QUICK, weak_translate=0.5), out=tmp_path / "run")
    with pytest.raises(ConfigError) as shown:
        show_augment_module.draw_views(Config(**QUICK, weak_translate=0.5), tmp_path / "g.png")
    assert str(shown.value) == str(trained.value) and "weak_translate" in str(shown.value)
    assert not (tmp_path / "g.png").exists() and not (tmp_path / "run").exists()


def test_grid_schedule() -> None:
    grids = AugmentGrids(_images(), weak_augment, RandAugment(), 0, eval_every=100, device=torch.device("cpu"))
    assert [s for s in range(100, 2001, 100) if grids.due(s)] == [100, 500, 1000, 1500, 2000]
    assert grids.due(1050) is False and grids.due(1401) is True  # a final evaluation off the grid: ceil(step / 100)
    assert grids.images.shape[0] == 5  # fewer images than GRID_IMAGES: all of them




def _image_steps(run) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    if "augment/views" not in acc.Tags()["images"]:
        return []
    events = acc.Images("augment/views")
    assert all(e.width > 100 and e.height > e.width for e in events)
    return [e.step for e in events]


@pytest.mark.parametrize("strong", ["ctaugment"])  # the policy with state: grids must leave it alone
def test_training_logs_grids_without_changing_the_run(tmp_path, monkeypatch, strong) -> None:
    config = Config(**{**QUICK, "batch_size": 8, "mu": 2}, steps=30, strong=strong)
    monkeypatch.setattr(visualize, "GRID_EVERY", 2)  # evaluations 1 and 2 of 3 (the default, 5, is tested above)
    fixmatch.train(config, out=tmp_path / "with")
    assert _image_steps(tmp_path / "with") == [10, 20]
    monkeypatch.setattr(visualize, "GRID_EVERY", 0)  # grids off
    fixmatch.train(config, out=tmp_path / "without")
    assert _image_steps(tmp_path / "without") == []
    assert metrics_rows(tmp_path / "with") == metrics_rows(tmp_path / "without")
