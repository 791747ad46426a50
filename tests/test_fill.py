"""The `fill` key: the value of the pixels that Cutout and the strong policy's geometric ops leave empty."""
import pytest
import torch

from fixmatch.augment import make_strong_augment
from fixmatch.augment.policies import RandAugment, RandAugmentChoices
from fixmatch.config import ConfigError, resolve_config


@pytest.mark.parametrize("fill, geometric_fill, expected", [(0.0, None, 0.0), (0.2, 0.7, 0.7)])
def test_geometric_fill_follows_fill_unless_given(fill, geometric_fill, expected):
    policy = RandAugment(num_ops=1, prob=1.0, cutout=0.0, fill=fill, geometric_fill=geometric_fill)
    translate_x = [op.name for op in policy.ops].index("TranslateX")
    n = 4
    choices = RandAugmentChoices(ops=torch.full((n, 1), translate_x), levels=torch.full((n, 1), 9),
                                 applied=torch.ones(n, 1, dtype=torch.bool))
    out = policy.apply(torch.ones(n, 1, 16, 16), choices, torch.Generator().manual_seed(0))
    empty = out != 1.0  # everything the translation uncovered
    assert empty.any()
    assert torch.all(out[empty] == expected)


def test_cutout_uses_fill():
    policy = make_strong_augment("randaugment", cutout=0.5, fill=0.0, geometric_fill=0.0)
    policy.prob = 0.0  # no ops, Cutout only
    out = policy(torch.ones(8, 1, 16, 16), torch.Generator().manual_seed(0))
    erased = (out == 0.0).flatten(1).sum(1)
    assert torch.all(out[out != 1.0] == 0.0)
    # The square (8 x 8 here) is centred anywhere in the image and clipped at its borders.
    assert torch.all((erased > 0) & (erased <= 8 * 8)) and (erased == 8 * 8).any()


def test_fill_config_key():
    assert resolve_config(None, None, {"fill": 0.0}).fill == 0.0
    assert resolve_config(None, None, {}).fill is None
    with pytest.raises(ConfigError, match="fill"):
        resolve_config(None, None, {"fill": 1.5})
