"""Every op of every strong policy, forced on a whole batch: uint8 and float input, range, per-sample magnitudes.

Each case applies one op to all samples, sample i with its own magnitude spread over the op's whole range
(both ends included), through the policy's batched apply(), and checks that uint8 input and the same
images as float in [0, 1] give the same float32 result in [0, 1], that different magnitudes give
different images, and that a seed reproduces the batch.

The geometric ops (Rotate, ShearX/Y, TranslateX/Y) are also compared with Pillow, pixel for pixel, at
every magnitude each policy can draw (levels and signs; CTAugment's 17 bins; seeded draws of the
continuous policy), on 28x28 grey, 32x32 and 96x96 RGB images: real ones and synthetic ones whose
neighbouring pixels all differ, so a single misplaced read shows.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sample_images import fashion_mnist, photo, smooth_images, to_array

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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import pil_reference  # noqa: E402  (the per-image Pillow pipeline that the benchmarks compare against)

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


# ----------------------------------------------------------------------------- geometric ops: Pillow's pixels, exactly

# Every magnitude each policy can draw for its geometric ops, pushed through the policy's own apply() as one
# batch with per-sample magnitudes, against Pillow with the parameter the official code passes (computed here
# in double). Pillow's NEAREST affine transform rounds its sample points in 16.16 fixed point (or sums them in
# double for translations), so points on a pixel edge (e.g. shear 0.12: 0.56 + 12 * 0.12 = 2) go where those
# integers send them; the ops reproduce that, so the pixels must be equal, not close.

GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")


def _pil_geometric(name: str, im: Image.Image, v: float, fill: int) -> Image.Image:
    """Pillow's op with the project's sign conventions; TranslateX/Y take the shift in pixels."""
    fillcolor = fill if im.mode == "L" else (fill,) * 3
    if name == "Rotate":
        return im.rotate(v, resample=Image.NEAREST, fillcolor=fillcolor)
    coeffs = {"ShearX": (1, v, 0, 0, 1, 0), "ShearY": (1, 0, 0, v, 1, 0),
              "TranslateX": (1, 0, -v, 0, 1, 0), "TranslateY": (1, 0, 0, 0, 1, -v)}[name]
    return im.transform(im.size, Image.AFFINE, coeffs, resample=Image.NEAREST, fillcolor=fillcolor)


def _edges(h: int, w: int, channels: int) -> Image.Image:
    """A synthetic image with sharp edges everywhere: every pixel differs from its neighbours, none is black."""
    y, x = np.mgrid[0:h, 0:w]
    grey = (x * 37 + y * 101) % 239 + 8
    if channels == 1:
        return Image.fromarray(grey.astype(np.uint8), mode="L")
    rgb = np.stack([grey, (x * 5 + y * 29) % 211 + 20, ((x // 3 + y // 2) % 2) * 200 + 30], -1)
    return Image.fromarray(rgb.astype(np.uint8))


IMAGE_SETS = {
    "edges28-grey": lambda: [_edges(28, 28, 1)],
    "fmnist28": lambda: fashion_mnist(4),
    "edges32-rgb": lambda: [_edges(32, 32, 3)],
    "photo32": lambda: [photo((32, 32))],
    "photo96": lambda: [photo((96, 96))],  # STL-10's size
    "edges96x80-rgb": lambda: [_edges(80, 96, 3)],
}


def _tf_value(name: str, level: float, sign: float) -> float:
    """The official TF RandAugment's parameter (augmentations.py, PARAMETER_MAX = 10), with its random sign."""
    if name == "Rotate":
        return sign * int(level * 30 / 10)
    if name.startswith("Shear"):
        return sign * level * 0.3 / 10
    return sign * int(level * 10 / 10)  # pixels


def _fraction(name: str) -> Callable[[Image.Image, float], Image.Image]:
    """Pillow's op for a Translate that moves by a fraction of the side (as the paper's ops do), black fill."""
    def op(im: Image.Image, v: float) -> Image.Image:
        if name.startswith("Translate"):
            v = v * (im.width if name == "TranslateX" else im.height)
        return _pil_geometric(name, im, v, 0)
    return op


def _cases(policy_name: str, name: str) -> tuple[object, Callable, list[float], Callable]:
    """Gives the policy, a function (k, n) -> choices that draws op k at every magnitude, Pillow's values and op."""
    if policy_name == "randaugment":
        policy = RandAugment(cutout=0.0, fill=pil_reference.FILL / 255)
        fn, lo, hi = next((fn, lo, hi) for op_name, fn, lo, hi in pil_reference.OPS if op_name == name)
        levels = list(range(1, 10))
        values = [lo + (hi - lo) * m / 10 for m in levels]  # pil_reference.randaugment()'s mapping

        def choices(k: int, n: int) -> RandAugmentChoices:
            return RandAugmentChoices(ops=torch.tensor([[k, 0]] * n), levels=torch.tensor([[m, 1] for m in levels]),
                                      applied=torch.tensor([[True, False]] * n))
        return policy, choices, values, fn
    if policy_name == "ctaugment":
        policy = CTAugment(cutout=0.0, geometric_fill=0.0)
        # The lower edge and three inner points of each of the 17 bins, the top end, and for Rotate every whole degree.
        ls = [(b + u) / 17 for b in range(17) for u in (0.0, 0.3, 0.5, 0.8)] + [1.0]
        if name == "Rotate":
            ls += [(a / 45 + 1) / 2 for a in range(-45, 46)]
        ls = [float(np.float32(v)) for v in ls]  # CTAugment's values are float32
        values = [int(np.round((2 * v - 1) * 45)) if name == "Rotate" else (2 * v - 1) * 0.3 for v in ls]

        def choices(k: int, n: int) -> CTAChoices:
            ident = [op.name for op in policy.ops].index("Identity")
            vals = torch.zeros(n, 2, 2)
            vals[:, 0, 0] = torch.tensor(ls)
            bins = torch.full((n, 2, 2), -1)
            bins[:, 0, 0] = (vals[:, 0, 0] * 17).floor().clamp(max=16).long()
            return CTAChoices(ops=torch.tensor([[k, ident]] * n), bins=bins, values=vals)
        return policy, choices, values, _fraction(name)
    policy = POLICIES[policy_name](cutout=0.0, geometric_fill=0.0)
    if policy_name == "randaugment-3op":  # continuous: seeded draws and both ends, as the policy computes them
        mags = [0.0, 0.999999] + torch.rand(40, generator=torch.Generator().manual_seed(5)).tolist()
        signs = [1.0] * len(mags)
    else:  # randaugment-tf: levels 1..9; randaugment-fixed: M = 1..15 (10 by default); both signs
        top = 9 if policy_name == "randaugment-tf" else 15
        mags = [float(m) for m in range(1, top + 1) for _ in (0, 1)]
        signs = [1.0, -1.0] * top

    def choices(k: int, n: int) -> VariantChoices:
        pad = policy.num_ops - 1
        return VariantChoices(ops=torch.tensor([[k] + [0] * pad] * n),
                              magnitudes=torch.tensor(mags).view(n, 1).repeat(1, policy.num_ops),
                              signs=torch.tensor(signs).view(n, 1).repeat(1, policy.num_ops),
                              applied=torch.tensor([[True] + [False] * pad] * n), cutout=torch.zeros(n))
    if policy_name == "randaugment-3op":
        k = [op.name for op in policy.ops].index(name)
        values = [float(v) for v in policy.value(k, torch.tensor(mags))]  # fractions of the side for Translate
        return policy, choices, values, _fraction(name)
    values = [_tf_value(name, m, s) for m, s in zip(mags, signs)]
    return policy, choices, values, lambda im, v: _pil_geometric(name, im, v, 0)


@pytest.mark.parametrize("image_set", list(IMAGE_SETS))
@pytest.mark.parametrize("policy_name", ["randaugment", "randaugment-tf", "randaugment-fixed", "ctaugment",
                                         "randaugment-3op"])
def test_geometric_ops_give_pillows_pixels_at_every_magnitude(policy_name: str, image_set: str) -> None:
    imgs = IMAGE_SETS[image_set]()
    for name in GEOMETRIC:
        policy, choices, values, reference = _cases(policy_name, name)
        k = [op.name for op in policy.ops].index(name)
        batch = [imgs[i % len(imgs)] for i in range(len(values))]
        x = torch.from_numpy(to_array(batch)).permute(0, 3, 1, 2).contiguous()  # uint8, as the loaders give it
        out = policy.apply(x, choices(k, len(values)), torch.Generator().manual_seed(0)) * 255
        assert torch.allclose(out, out.round(), atol=1e-3)  # pixels are moved, never mixed
        ours = out.round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for i, (im, v) in enumerate(zip(batch, values)):
            ref = to_array([reference(im, v)])[0]
            differ = (ours[i] != ref).any(-1)
            assert not differ.any(), f"{name}({v!r}): {int(differ.sum())} pixels differ, first at {np.argwhere(differ)[0]}"
