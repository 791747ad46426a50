"""Every op of every strong policy, forced on a whole batch: uint8 and float input, range, per-sample magnitudes.

Each case applies one op to all samples, sample i with its own magnitude spread over the op's whole range
(both ends included), through the policy's batched apply(), and checks that uint8 input and the same
images as float in [0, 1] give the same float32 result in [0, 1], that different magnitudes give
different images, and that a seed reproduces the batch.
"""
from __future__ import annotations

import pytest
import torch
from sample_images import smooth_images

from fixmatch.augment import (
    CTAChoices,
    CTAugment,
    RandAugment,
    RandAugmentChoices,
    VariantChoices,
    randaugment_3op,
    randaugment_fixed,
    randaugment_tf,
)

N = 9  # samples per case: magnitudes 1..9, or 9 values spread over [0, 1]


def _images(channels: int) -> torch.Tensor:
    return smooth_images((N, channels, 20, 20), seed=channels)


def _check(apply, x: torch.Tensor, parametric: bool) -> None:
    out = apply(x, torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, apply(x.float() / 255, torch.Generator().manual_seed(0)))  # uint8 == float input
    assert torch.equal(out, apply(x, torch.Generator().manual_seed(0)))  # a seed reproduces the batch
    if parametric:  # the same image at 9 magnitudes: at least 3 different results
        same = apply(x[:1].expand_as(x).contiguous(), torch.Generator().manual_seed(0))
        assert len({tuple(same[i].flatten().tolist()) for i in range(N)}) >= 3


def _randaugment_cases() -> list[tuple[str, str]]:
    return [(f"randaugment:{op.name}", "randaugment") for op in RandAugment().ops]


POLICIES = {"randaugment-tf": randaugment_tf, "randaugment-fixed": randaugment_fixed,
            "randaugment-3op": randaugment_3op}
CASES = (_randaugment_cases()
         + [(f"{name}:{op.name}", name) for name, make in POLICIES.items() for op in make().ops]
         + [(f"ctaugment:{op.name}", "ctaugment") for op in CTAugment(blur=True).ops])


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("case", [c for c, _ in CASES])
def test_op_on_a_batch(case: str, channels: int) -> None:
    policy_name, op_name = case.split(":")
    x = _images(channels)
    grey_color = op_name == "Color" and channels == 1  # Color is the identity on grey images
    if policy_name == "randaugment":
        ra = RandAugment(cutout=0.0)
        k = [op.name for op in ra.ops].index(op_name)
        ch = RandAugmentChoices(ops=torch.tensor([[k, 0]] * N), levels=torch.arange(1, N + 1).view(N, 1).repeat(1, 2),
                                applied=torch.tensor([[True, False]] * N))
        _check(lambda x, g: ra.apply(x, ch, g), x, ra.ops[k].fmt is not None and not grey_color)
    elif policy_name in POLICIES:
        policy = POLICIES[policy_name](cutout=0.0)
        k = [op.name for op in policy.ops].index(op_name)
        if policy.magnitude is None:
            mags = torch.linspace(0, 0.999, N)
        elif isinstance(policy.magnitude, int):  # fixed-magnitude RandAugment: sweep M itself, 1..15 allowed
            mags = torch.linspace(1, 15, N).round()
        else:
            mags = torch.arange(1, N + 1).float()
        pad = policy.num_ops - 1
        ch = VariantChoices(ops=torch.tensor([[k] + [0] * pad] * N),
                            magnitudes=mags.view(N, 1).repeat(1, policy.num_ops),
                            signs=torch.where(torch.arange(N) % 2 == 0, 1.0, -1.0).view(N, 1).repeat(1, policy.num_ops),
                            applied=torch.tensor([[True] + [False] * pad] * N), cutout=torch.zeros(N))
        _check(lambda x, g: policy.apply(x, ch, g), x, policy.ops[k].value is not None and not grey_color)
    else:
        cta = CTAugment(cutout=0.0, blur=True)
        names = [op.name for op in cta.ops]
        k, ident = names.index(op_name), names.index("Identity")
        nb = cta.nbins[k]  # bins of the op's (up to 2) parameters
        values = torch.zeros(N, 2, 2)
        values[:, 0, :] = torch.linspace(0, 1, N).view(N, 1) * (nb > 0)
        bins = torch.where(nb > 0, (values[:, 0] * nb).floor().clamp(max=nb - 1).long(), -1)
        ch = CTAChoices(ops=torch.tensor([[k, ident]] * N), bins=torch.stack([bins, torch.full_like(bins, -1)], 1),
                        values=values)
        # Cutout's squares are placed at random: not a function of the magnitude alone.
        _check(lambda x, g: cta.apply(x, ch, g), x, bool(cta.ops[k].bins) and op_name != "Cutout" and not grey_color)
