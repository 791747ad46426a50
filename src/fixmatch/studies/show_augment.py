"""`fixmatch show-augment`: a PNG grid of original, weak and strong views of a few training images.

The views are those train() builds for the same configuration (``build_views``, augment/views.py), drawn and
laid out by augment/visualize.py. It lives here, above ``data`` and ``augment``, because it loads a data set.
"""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

from fixmatch.augment.views import build_views
from fixmatch.augment.visualize import augment_views, grid_figure, have_matplotlib, pick_images, save_grid
from fixmatch.config import Config, ConfigError, check_config, short_repr, validate_overrides
from fixmatch.data.datasets import load_dataset

__all__ = ["show_augment", "draw_views", "MAX_IMAGES"]

MAX_IMAGES = 64  # rows of the grid: a taller PNG is no longer readable


def show_augment(dataset: str, out: str | Path, strong: str = "randaugment", num_images: int = 6, seed: int = 0,
                 data_dir: str | Path = "data", cutout: float = 0.5, weak_padding: str = "reflect",
                 randaugment_ops: int = Config.randaugment_ops,
                 randaugment_prob: float = Config.randaugment_prob) -> Path:
    """Writes the grid of original, weak and strong views of ``num_images`` training images to a PNG file.

    The options are train's keys of the same names (the other keys keep their defaults): the weak view is
    train()'s (flip unless the data set is one without, translation 12.5% padded by ``weak_padding``); the
    strong view is ``strong`` with Cutout of side ``cutout``, and ``randaugment_ops`` / ``randaugment_prob``
    apply to ``--strong randaugment`` only. CTAugment is shown with the uniform magnitudes it starts training
    with. Returns the path written.
    """
    flags = _check_flags(dict(strong=strong, cutout=cutout, weak_padding=weak_padding,
                              randaugment_ops=randaugment_ops, randaugment_prob=randaugment_prob, seed=seed))
    return draw_views(Config(dataset=dataset, data_dir=str(data_dir), **flags), out, num_images)


def draw_views(config: Config, out: str | Path, num_images: int = 6) -> Path:
    """Writes the grid of ``config``'s weak and strong views (``build_views``, as train() builds them) of
    ``num_images`` training images of ``config.dataset``, picked and augmented with ``config.seed``."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--out must name a .png file, got {str(out)!r}")
    if not 1 <= num_images <= MAX_IMAGES:
        raise ConfigError(f"--num-images must be between 1 and {MAX_IMAGES}, got {num_images}")
    weak, strong = build_views(check_config(config))
    if not have_matplotlib():
        raise ConfigError("show-augment draws with matplotlib, which is not installed: pip install 'fixmatch[report]'")
    data = load_dataset(config.dataset, config.data_dir)
    idx = pick_images(data.train_images.shape[0], min(num_images, data.train_images.shape[0]), config.seed)
    views = augment_views(data.train_images[idx], weak, strong, config.seed)
    labels = [data.class_names[int(y)] for y in data.train_labels[idx]]
    ops = f" ({config.randaugment_ops} ops, p {config.randaugment_prob:g})" if config.strong == "randaugment" else ""
    fig = grid_figure(views, labels, title=f"{config.dataset}: --strong {config.strong}{ops}, "
                                           f"cutout {config.cutout:g}, seed {config.seed}")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_grid(fig, out)
    return out


def _check_flags(values: dict[str, Any]) -> dict[str, Any]:
    """Config keys given as show-augment's flags, checked by each key's own rule in config.py.

    A refusal names the flag, as the command's user typed it, and what the key accepts; a number flag is a
    number already (the command line converts it), so for those the accepted range is what the message gives.
    """
    accepted = {f.name: f.metadata["accepted"] for f in fields(Config)}
    checked: dict[str, Any] = {}
    for key, value in values.items():
        try:
            checked.update(validate_overrides({key: value}, "show-augment"))
        except ConfigError:
            want = accepted[key].removeprefix("a number ")
            raise ConfigError(f"--{key.replace('_', '-')} must be {want}, got {short_repr(value)}") from None
    return checked
