"""The weak and strong views of a configuration: ``build_views(config)``, for train() and for show-augment.

The weak view is a flip (unless the data set is one without, or ``weak_flip`` says otherwise) and a translation
of up to ``weak_translate`` of the side, padded by ``weak_padding``. The strong view is the ``strong`` policy by
name, with ``cutout``, ``fill`` and the RandAugment options. Both are callables ``view(x, generator)`` on a
batch; a resumed run, a TensorBoard grid and ``fixmatch show-augment`` all get the views of the same config.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from fixmatch.config import Config, strong_policy_options

from . import randaugment_variants
from .policies import weak_augment
from .randaugment_variants import StrongAugment

__all__ = ["NO_FLIP_DATASETS", "WeakAugment", "build_views"]

# Data sets whose weak view has no horizontal flip (digits and text are not mirror-symmetric).
NO_FLIP_DATASETS = frozenset({"svhn", "mnist"})

WeakAugment = Callable[[Tensor, torch.Generator], Tensor]


def build_views(config: Config) -> tuple[WeakAugment, StrongAugment]:
    """The weak view and the strong policy of ``config``.

    Raises ConfigError (one line, from config.py) where a RandAugment option is given to another policy.
    """
    flip = config.weak_flip if config.weak_flip is not None else config.dataset not in NO_FLIP_DATASETS
    weak = functools.partial(weak_augment, flip=flip, translate=config.weak_translate, padding=config.weak_padding)
    fills = {} if config.fill is None else {"fill": config.fill, "geometric_fill": config.fill}
    ra_options = strong_policy_options(config.strong, config.randaugment_ops, config.randaugment_prob)
    # Looked up on the module when called, so that a test can wrap the policy factory.
    strong = randaugment_variants.make_strong_augment(config.strong, cutout=config.cutout, **fills, **ra_options)
    return weak, strong
