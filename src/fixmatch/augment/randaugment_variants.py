"""Strong-augmentation policies by name: ``make_strong_augment(name, cutout, fill)``.

Every policy is a callable ``policy(x, generator)`` on a batch (uint8 or float
in [0, 1], (N, C, H, W)) that returns float32 in [0, 1], with ``sample``,
``apply`` and ``describe`` as in RandAugment. The names:

``randaugment``
    The FixMatch paper's RandAugment (its appendix): policies.RandAugment,
    unchanged. 2 ops, each applied with probability 0.5, integer level 1..9
    of 10 mapped linearly onto the paper's ranges, then Cutout. Against the
    popular PyTorch port (kekmodel/FixMatch-pytorch, RandAugmentMC), which
    draws the same ops, levels and probability: the enhancement factors
    (0.05 + 0.09 l) are the same; Solarize's thresholds are the same set
    (the port's 256 - int(25.6 l) runs through it in the other order of l);
    the signed ops differ. The port gives Rotate, Shear and Translate a
    magnitude of l / 10 of the range's end with a random sign (Rotate
    +-3..27 degrees, never 0); here the level spans the whole range from
    its lower end (Rotate -24..24 in steps of 6, 0 at l = 5, so one draw in
    nine of a geometric op leaves the image as it is). Posterize keeps
    round(4 + 0.4 l) = 4..8 bits where the port keeps 4 + int(0.4 l) = 4..7.

``randaugment-tf``
    The official TensorFlow code's own RandAugment (google-research/fixmatch:
    libml/augment.py AugmentPoolRAMC, "rac"; levels mapped by
    third_party/auto_augment/augmentations.py with PARAMETER_MAX = 10). 2 ops
    drawn with replacement from the same 14 ops, each applied with
    probability 0.5, integer level l in 1..9, then Cutout. Ops marked +- get
    a random sign (p = 0.5):

    ============  ===================================  ================
    op            parameter for level l                l = 1, 5, 9
    ============  ===================================  ================
    Rotate +-     int(3 l) degrees                     3, 15, 27
    ShearX/Y +-   0.03 l                               0.03, 0.15, 0.27
    TranslateX/Y  int(l) pixels (not a fraction)       1, 5, 9
    +-
    Color,        factor 0.1 + 0.18 l                  0.28, 1.0, 1.72
    Contrast,
    Brightness,
    Sharpness
    Solarize      threshold 256 - int(25.6 l) of 256   231, 128, 26
    Posterize     bits 4 - int(0.4 l) (0 bits: black)  4, 2, 1
    ============  ===================================  ================

    The official code pads out-of-image pixels with alpha 0, which becomes
    grey at the end, unless a later op converts to RGB (AutoContrast,
    Equalize, Posterize, Solarize), which turns them black; here they are
    ``fill``.

``randaugment-fixed``
    RandAugment(N, M) of Cubuk et al. (2019) as the official code runs it
    (augment flag ``r{N}_{M}_{cutout}``, AugmentPoolRA): N ops (default 2)
    drawn with replacement, always applied, all with the same level M
    (default 10), mapped as in randaugment-tf (with the random signs). M is
    out of 10, so M = 10 is the end of every range (rotate 30 degrees,
    translate 10 px, factor 1.9, Solarize inverts everything, Posterize to 0
    bits gives black, as in Pillow) and M > 10 extrapolates as the official
    flag allows (M up to 15).

``randaugment-3op``
    The variant of TorchSSL / USB (datasets/augmentation/randaugment.py,
    RandAugment(3, 5)): 3 ops drawn with replacement from the same 14 ops,
    always applied, each with a continuous parameter uniform in its range:
    Rotate [-30, 30] degrees, ShearX/Y and TranslateX/Y [-0.3, 0.3] (of the
    side), Color/Contrast/Brightness/Sharpness [0.05, 0.95], Solarize
    threshold [0, 256), Posterize int(U[4, 8)) = 4..7 bits. Then Cutout with
    a side uniform in [0, cutout] of the image side (TorchSSL: [0, 0.5]).
    TorchSSL fills geometric ops with black (the default here) and Cutout
    with (125, 123, 114), and its Pillow rectangle is one pixel larger.

``ctaugment``
    ctaugment.CTAugment, with Cutout after the policy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

from . import ops
from .ctaugment import CTAugment
from .policies import LayeredPolicy, RandAugment, choices_to

__all__ = [
    "STRONG_AUGMENTS",
    "StrongAugment",
    "make_strong_augment",
    "RandAugmentVariant",
    "VariantChoices",
    "randaugment_tf",
    "randaugment_fixed",
    "randaugment_3op",
]

STRONG_AUGMENTS = ("randaugment", "randaugment-tf", "randaugment-fixed", "randaugment-3op", "ctaugment")


class StrongAugment(Protocol):
    """What the training loop needs from a strong policy."""

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor: ...
    def sample(self, n: int, generator: torch.Generator, device: Any = None) -> Any: ...
    def apply(self, x: Tensor, choices: Any, generator: torch.Generator) -> Tensor: ...
    def describe(self, choices: Any, i: int) -> str: ...


@dataclass
class VariantChoices:
    """Per-sample draws of a RandAugmentVariant; (N, num_ops) tensors except ``cutout`` (N,)."""

    ops: Tensor  # int64 index into RandAugmentVariant.ops
    magnitudes: Tensor  # float: an integer level, or U(0, 1) for continuous variants
    signs: Tensor  # float +-1, used by the ops marked signed
    applied: Tensor  # bool: whether the layer's op is applied
    cutout: Tensor  # float: Cutout side as a fraction of min(H, W)


class _VOp(NamedTuple):
    name: str
    fn: Callable[[Tensor, Tensor], Tensor]
    value: Callable[[Tensor], Tensor] | None  # magnitude -> parameter before the sign; None: no parameter
    signed: bool  # multiply the parameter by the sample's random sign
    fmt: str = "{:.2f}"


@dataclass(eq=False, repr=False)
class RandAugmentVariant(LayeredPolicy[VariantChoices]):
    """RandAugment with a configurable op table, magnitude draw and Cutout (see the module docstring).

    ``magnitude``: an int is a fixed level; a pair (lo, hi) draws an integer
    level uniformly in lo..hi; None draws U(0, 1) (continuous ranges).
    """

    name: str
    ops: list[_VOp]
    num_ops: int
    prob: float
    magnitude: int | tuple[int, int] | None
    cutout: float
    random_cutout: bool
    fill: float

    def value(self, op: int, magnitude: Tensor, sign: Tensor | float = 1.0) -> Tensor:
        """Maps magnitudes (any shape) and signs to the parameter of op number ``op``."""
        spec = self.ops[op]
        if spec.value is None:
            return torch.zeros_like(magnitude, dtype=torch.float32)
        v = spec.value(magnitude.float())
        return v * sign if spec.signed else v

    def _draw(self, shape: tuple[int, int], generator: torch.Generator, device: torch.device) -> VariantChoices:
        """Draws ops, magnitudes, signs, apply flags and Cutout sizes (always all of them, in this order)."""
        n = shape[0]
        kw = dict(generator=generator, device=device)
        op_idx = torch.randint(0, len(self.ops), shape, **kw)
        if self.magnitude is None:
            mags = torch.rand(shape, **kw)
        elif isinstance(self.magnitude, int):
            mags = torch.full(shape, float(self.magnitude), device=device)
        else:
            mags = torch.randint(self.magnitude[0], self.magnitude[1] + 1, shape, **kw).float()
        signs = torch.where(torch.rand(shape, **kw) < 0.5, -1.0, 1.0)
        applied = torch.rand(shape, **kw) < self.prob
        if self.random_cutout:  # a side uniform in [0, cutout], as TorchSSL draws it
            cutout = torch.rand(n, **kw) * self.cutout
        else:
            cutout = torch.full((n,), self.cutout, device=device)
        return VariantChoices(op_idx, mags, signs, applied, cutout)

    def apply(self, x: Tensor, choices: VariantChoices, generator: torch.Generator) -> Tensor:
        """Applies the drawn ops to x, grouped by op, then Cutout. Returns float32 in [0, 1].

        The generator is used only for the positions of the Cutout squares.
        """
        x = ops.to_float(x, copy=True)  # one buffer of our own, updated in place by every layer
        choices = choices_to(choices, x.device)
        parametric = [k for k, spec in enumerate(self.ops) if spec.fn is not ops.identity]
        for layer in range(self.num_ops):
            chosen = torch.where(choices.applied[:, layer], choices.ops[:, layer], -1)
            mags, signs = choices.magnitudes[:, layer], choices.signs[:, layer]
            x = ops.apply_grouped(
                x, chosen, parametric,
                lambda k, xs, idx, mags=mags, signs=signs: self.ops[k].fn(xs, self.value(k, mags[idx], signs[idx])),
                inplace=True)
        if self.cutout > 0:
            sizes = (choices.cutout * min(x.shape[2:])).round()
            x = ops.cutout_per_sample(x, sizes, generator, fill=self.fill)
        return x

    def _caption_value(self, choices: VariantChoices, k: int, i: int, layer: int) -> float | None:
        if self.ops[k].value is None:
            return None
        return float(self.value(k, choices.magnitudes[i, layer], choices.signs[i, layer]))

    def _cutout_caption(self, choices: VariantChoices, i: int) -> str:
        return f"Cutout({float(choices.cutout[i]):.2g})"

    def __repr__(self) -> str:
        return (f"RandAugmentVariant({self.name!r}, num_ops={self.num_ops}, prob={self.prob}, "
                f"magnitude={self.magnitude}, cutout={self.cutout}, fill={self.fill})")


# ----------------------------------------------------------------------------- op tables


def _translate_px(fn: Callable[..., Tensor], axis: int, **geo: float) -> Callable[[Tensor, Tensor], Tensor]:
    """Turns a shift in pixels into the fraction of the side that ops.translate_* takes."""
    return lambda x, v: fn(x, v / x.shape[axis], **geo)


def _posterize_or_black(x: Tensor, bits: Tensor) -> Tensor:
    """Posterize where Pillow keeps 0 (or fewer) bits gives a black image; ops.posterize stops at 1 bit."""
    bits = torch.as_tensor(bits, dtype=x.dtype, device=x.device).expand(x.shape[0])
    return torch.where((bits < 1).view(-1, 1, 1, 1), torch.zeros_like(x), ops.posterize(x, bits))


def _tf_ops(geometric_fill: float) -> list[_VOp]:
    """augmentations.py's mapping: int_parameter(l, m) = int(l m / 10), float_parameter(l, m) = l m / 10."""
    geo = dict(fill=geometric_fill)
    enhance = lambda l: 0.1 + l * 1.8 / 10  # noqa: E731
    shear = lambda l: l * 0.3 / 10  # noqa: E731
    return [
        _VOp("Identity", ops.identity, None, False),
        _VOp("AutoContrast", ops.auto_contrast, None, False),
        _VOp("Equalize", ops.equalize, None, False),
        _VOp("Rotate", partial(ops.rotate, **geo), lambda l: (l * 30 / 10).floor(), True, "{:+.0f}"),
        # Pillow inverts levels >= threshold t; ops.solarize takes t / 256.
        _VOp("Solarize", ops.solarize, lambda l: (256 - (l * 256 / 10).floor()) / 256, False),
        _VOp("Color", ops.color, enhance, False),
        _VOp("Contrast", ops.contrast, enhance, False),
        _VOp("Brightness", ops.brightness, enhance, False),
        _VOp("Sharpness", ops.sharpness, enhance, False),
        _VOp("ShearX", partial(ops.shear_x, **geo), shear, True, "{:+.2f}"),
        _VOp("ShearY", partial(ops.shear_y, **geo), shear, True, "{:+.2f}"),
        _VOp("TranslateX", _translate_px(ops.translate_x, 3, **geo), lambda l: l.floor(), True, "{:+.0f}px"),
        _VOp("TranslateY", _translate_px(ops.translate_y, 2, **geo), lambda l: l.floor(), True, "{:+.0f}px"),
        _VOp("Posterize", _posterize_or_black, lambda l: 4 - (l * 4 / 10).floor(), False, "{:.0f}"),
    ]


def _uniform_ops(geometric_fill: float) -> list[_VOp]:
    """TorchSSL's augment_list(): the parameter is lo + (hi - lo) u with u ~ U(0, 1)."""
    geo = dict(fill=geometric_fill)

    def lin(lo: float, hi: float) -> Callable[[Tensor], Tensor]:
        return lambda u: lo + (hi - lo) * u

    return [
        _VOp("Identity", ops.identity, None, False),
        _VOp("AutoContrast", ops.auto_contrast, None, False),
        _VOp("Equalize", ops.equalize, None, False),
        _VOp("Rotate", partial(ops.rotate, **geo), lin(-30, 30), False, "{:+.1f}"),
        _VOp("Solarize", ops.solarize, lin(0, 1), False),  # threshold 256 u of 256
        _VOp("Color", ops.color, lin(0.05, 0.95), False),
        _VOp("Contrast", ops.contrast, lin(0.05, 0.95), False),
        _VOp("Brightness", ops.brightness, lin(0.05, 0.95), False),
        _VOp("Sharpness", ops.sharpness, lin(0.05, 0.95), False),
        _VOp("ShearX", partial(ops.shear_x, **geo), lin(-0.3, 0.3), False, "{:+.2f}"),
        _VOp("ShearY", partial(ops.shear_y, **geo), lin(-0.3, 0.3), False, "{:+.2f}"),
        _VOp("TranslateX", partial(ops.translate_x, **geo), lin(-0.3, 0.3), False, "{:+.2f}"),
        _VOp("TranslateY", partial(ops.translate_y, **geo), lin(-0.3, 0.3), False, "{:+.2f}"),
        _VOp("Posterize", ops.posterize, lambda u: (4 + 4 * u).floor(), False, "{:.0f}"),  # int(v), v in [4, 8)
    ]


# ----------------------------------------------------------------------------- constructors


def randaugment_tf(cutout: float = 0.5, fill: float = 0.5, geometric_fill: float | None = None) -> RandAugmentVariant:
    """The official TF code's RandAugment: 2 ops, p = 0.5, level 1..9 of 10 (module docstring)."""
    table = _tf_ops(fill if geometric_fill is None else geometric_fill)
    return RandAugmentVariant("randaugment-tf", table, 2, 0.5, (1, 9), cutout, False, fill)


def randaugment_fixed(
    n: int = 2, m: int = 10, cutout: float = 0.5, fill: float = 0.5, geometric_fill: float | None = None
) -> RandAugmentVariant:
    """RandAugment(N, M): n ops always applied, all at level m of 10, TF mapping (module docstring)."""
    table = _tf_ops(fill if geometric_fill is None else geometric_fill)
    return RandAugmentVariant("randaugment-fixed", table, n, 1.0, int(m), cutout, False, fill)


def randaugment_3op(cutout: float = 0.5, fill: float = 0.5, geometric_fill: float = 0.0) -> RandAugmentVariant:
    """TorchSSL's RandAugment(3, 5): 3 ops always applied, continuous ranges, Cutout side U[0, cutout]."""
    return RandAugmentVariant("randaugment-3op", _uniform_ops(geometric_fill), 3, 1.0, None, cutout, True, fill)


def make_strong_augment(name: str, cutout: float = 0.5, fill: float = 0.5, **kwargs: Any) -> StrongAugment:
    """Builds the strong policy called ``name`` (one of STRONG_AUGMENTS); kwargs go to its constructor.

    For example ``make_strong_augment("randaugment-fixed", 0.5, m=9)`` or
    ``make_strong_augment("ctaugment", 0.5, blur=True)``.
    """
    builders: dict[str, Callable[..., Any]] = {
        "randaugment": RandAugment,
        "randaugment-tf": randaugment_tf,
        "randaugment-fixed": randaugment_fixed,
        "randaugment-3op": randaugment_3op,
        "ctaugment": CTAugment,
    }
    if name not in builders:
        raise ValueError(f"unknown strong augmentation {name!r}; choose from {', '.join(STRONG_AUGMENTS)}")
    return builders[name](cutout=cutout, fill=fill, **kwargs)
