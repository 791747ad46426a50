"""Batched, device-agnostic image augmentation for FixMatch.

Weak: flip + shift. Strong: RandAugment + Cutout by default; other strong
policies (RandAugment variants, CTAugment) by name via make_strong_augment.
"""

from . import ops
from .ctaugment import CTAChoices, CTAugment
from .ops import *  # noqa: F403  (the ops' public names, listed once in ops.__all__)
from .policies import WEAK_PADDINGS, RandAugment, RandAugmentChoices, weak_augment
from .randaugment_variants import (
    STRONG_AUGMENTS,
    RandAugmentVariant,
    StrongAugment,
    VariantChoices,
    make_strong_augment,
    randaugment_3op,
    randaugment_fixed,
    randaugment_tf,
)

__all__ = [
    "RandAugment",
    "RandAugmentChoices",
    "weak_augment",
    "WEAK_PADDINGS",
    "CTAugment",
    "CTAChoices",
    "STRONG_AUGMENTS",
    "StrongAugment",
    "make_strong_augment",
    "RandAugmentVariant",
    "VariantChoices",
    "randaugment_tf",
    "randaugment_fixed",
    "randaugment_3op",
] + ops.__all__
