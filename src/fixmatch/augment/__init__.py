"""Batched, device-agnostic image augmentation for FixMatch.

Weak: flip + shift. Strong: RandAugment + Cutout by default; other strong
policies (RandAugment variants, CTAugment) by name via make_strong_augment.
``build_views(config)`` gives a configuration's weak and strong views.
"""

from . import ctaugment, ops, policies, randaugment_variants, views
from .ctaugment import *  # noqa: F403  (each module lists its public names once, in its __all__)
from .ops import *  # noqa: F403
from .policies import *  # noqa: F403
from .randaugment_variants import *  # noqa: F403
from .views import *  # noqa: F403

__all__ = policies.__all__ + ctaugment.__all__ + randaugment_variants.__all__ + views.__all__ + ops.__all__
