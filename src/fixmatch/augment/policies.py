"""FixMatch's weak and strong augmentation policies, computed on whole batches.

Weak augmentation, from the official FixMatch code for CIFAR, is a random
horizontal flip (p = 0.5) followed by a random integer translation of up to
12.5% of each side. The translation pads with reflection (the official code;
``padding="zeros"`` pads with black instead) and crops back to the original size.

Strong augmentation is the paper's RandAugment variant. For each of
``num_ops`` layers, every sample draws an op uniformly from the pool, an
integer magnitude level ``m`` uniformly in 1..9 (out of 10), and applies the
op with probability ``prob``. Cutout with grey fill is then always applied.
A level maps linearly onto the op's range from the paper's appendix,
``v = lo + (hi - lo) * m / 10``:

============  ==============  ===================  ==========================
op            unit            range [lo, hi]       value for level m
============  ==============  ===================  ==========================
Identity      --              --                   --
AutoContrast  --              --                   --
Equalize      --              --                   --
Rotate        degrees (CCW)   [-30, 30]            (2m/10 - 1) * 30
Solarize      threshold       [0, 1]               m / 10
Color         factor          [0.05, 0.95]         0.05 + 0.9 m / 10
Contrast      factor          [0.05, 0.95]         0.05 + 0.9 m / 10
Brightness    factor          [0.05, 0.95]         0.05 + 0.9 m / 10
Sharpness     factor          [0.05, 0.95]         0.05 + 0.9 m / 10
ShearX        coefficient     [-0.3, 0.3]          (2m/10 - 1) * 0.3
ShearY        coefficient     [-0.3, 0.3]          (2m/10 - 1) * 0.3
TranslateX    fraction of W   [-0.3, 0.3]          (2m/10 - 1) * 0.3
TranslateY    fraction of H   [-0.3, 0.3]          (2m/10 - 1) * 0.3
Posterize     bits            [4, 8]               round(4 + 4 m / 10)
============  ==============  ===================  ==========================

For a symmetric range, m < 5 gives negative values and m > 5 positive ones,
so both directions occur, and m = 5 gives 0 (the image unchanged). The popular
PyTorch port maps these ops differently (a magnitude m / 10 of the range's
end with a random sign): randaugment_variants.py compares the two. Cutout covers a square of side
``round(cutout * min(H, W))``.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

import torch
from torch import Tensor

from . import ops

__all__ = ["weak_augment", "WEAK_PADDINGS", "RandAugment", "RandAugmentChoices", "LayeredPolicy"]


def _reflect(i: Tensor, size: int) -> Tensor:
    """Maps indices in [-size + 1, 2 size - 2] into the image the way reflect padding does (no edge repeat)."""
    i = i.abs()
    return torch.where(i > size - 1, 2 * (size - 1) - i, i)


WEAK_PADDINGS = ("reflect", "zeros")


def weak_augment(
    x: Tensor, generator: torch.Generator, flip: bool = True, translate: float = 0.125, padding: str = "reflect"
) -> Tensor:
    """Applies a random horizontal flip (p = 0.5) and a random integer shift, padded by reflection or zeros.

    Each axis is shifted by at most ``round(translate * side)`` pixels,
    uniformly, independently for each sample: the result equals flipping,
    padding by that many pixels and cropping a random window of the
    original size. ``padding`` "reflect" (the official code) mirrors the image
    into the border; "zeros" fills it with black, which on black-background
    images such as Fashion-MNIST's (garments reach the edges) shifts the object
    without mirroring a sleeve or a sole into view. Both draw the same random
    numbers, so only the border differs. x is uint8 or float in [0, 1] with
    shape (N, C, H, W). The result is float32 in [0, 1].

    The padded image is never built: each output pixel's source pixel
    (flip, shift and reflection folded into one index) is gathered directly,
    in the input's dtype, so uint8 batches move a quarter of the bytes and
    are converted to float once.
    """
    if padding not in WEAK_PADDINGS:
        raise ValueError(f"padding must be one of {', '.join(WEAK_PADDINGS)}, not {padding!r}")
    n, c, h, w = x.shape
    dev = x.device
    flipped = torch.rand(n, generator=generator, device=dev) < 0.5 if flip else torch.zeros(n, dtype=torch.bool,
                                                                                             device=dev)
    ph, pw = round(translate * h), round(translate * w)
    if ph == 0 and pw == 0:
        return ops.to_float(torch.where(flipped.view(-1, 1, 1, 1), x.flip(-1), x))
    # The draws keep their order (flip, then rows, then columns) so a seed gives the same views as ever.
    oy = torch.randint(0, 2 * ph + 1, (n, 1), generator=generator, device=dev)
    ox = torch.randint(0, 2 * pw + 1, (n, 1), generator=generator, device=dev)
    rows = oy - ph + torch.arange(h, device=dev)  # (N, H) source row of each output row, before padding
    cols = ox - pw + torch.arange(w, device=dev)  # (N, W) source column in the flipped image
    inside = None
    if padding == "zeros":  # output pixels whose source lies in the border are set to 0 after the gather
        inside = (((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]).unsqueeze(1)
        rows, cols = rows.clamp(0, h - 1), cols.clamp(0, w - 1)
    else:
        rows, cols = _reflect(rows, h), _reflect(cols, w)
    cols = torch.where(flipped.view(-1, 1), w - 1 - cols, cols)
    src = (rows[:, :, None] * w + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    out = x.reshape(n, c, h * w).gather(2, src).view(n, c, h, w)
    if inside is not None:
        out = out * inside  # bool mask (N, 1, H, W) broadcast over channels; keeps the input's dtype
    return ops.to_float(out)


class _Op(NamedTuple):
    name: str
    fn: Callable[[Tensor, Tensor], Tensor]
    lo: float
    hi: float
    fmt: str | None  # how describe() prints the value; None means the op takes no parameter
    coeffs: Callable[[Tensor, int, int], Tensor] | None = None  # geometric ops: value -> affine coefficients


_GEOMETRIC = -2  # the group of all geometric ops: one affine transform per layer for all of them


@dataclass
class RandAugmentChoices:
    """Per-sample draws of RandAugment. Every tensor has shape (N, num_ops), one column per layer."""

    ops: Tensor  # int64 index into RandAugment.ops
    levels: Tensor  # int64 magnitude level in 1..9
    applied: Tensor  # bool: whether the layer's op is applied (probability prob)


ChoicesT = TypeVar("ChoicesT")


def choices_to(choices: ChoicesT, device: torch.device) -> ChoicesT:
    """A policy's per-sample draws (a dataclass of tensors) on ``device``: drawn on one device, applied on another."""
    return dataclasses.replace(choices, **{f.name: getattr(choices, f.name).to(device)  # type: ignore[arg-type]
                                            for f in dataclasses.fields(choices)})  # type: ignore[arg-type]


class LayerChoices(Protocol):
    """What every layered policy's draws hold: (N, num_ops) tensors of op indices and apply flags."""

    ops: Tensor
    applied: Tensor


LayerChoicesT = TypeVar("LayerChoicesT", bound=LayerChoices)


class LayeredPolicy(ABC, Generic[LayerChoicesT]):
    """What RandAugment and its variants (randaugment_variants.py) share: ``num_ops`` layers, each applying
    one drawn op to every sample (or none), then Cutout; ``policy(x, generator)`` is sample() then apply().

    A subclass draws the choices (``_draw``), applies them (``apply``) and says what its captions show
    (``_caption_value``, ``_cutout_caption``).
    """

    num_ops: int
    cutout: float
    ops: list[Any]  # the op table: each entry has a name and a fmt for its value

    def sample(self, n: int, generator: torch.Generator, device: torch.device | str | None = None) -> LayerChoicesT:
        """Draws every sample's choices for each layer; ``device`` defaults to the generator's (as CTAugment's)."""
        device = torch.device(device) if device is not None else generator.device
        return self._draw((n, self.num_ops), generator, device)

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Augments a batch: sample() followed by apply()."""
        return self.apply(x, self.sample(x.shape[0], generator, x.device), generator)

    def describe(self, choices: LayerChoicesT, i: int) -> str:
        """Gives a caption for sample i listing the ops that were applied.

        For example: ``"Rotate(+18.0) Posterize(6) Cutout(0.5)"``.
        """
        parts = []
        for layer in range(self.num_ops):
            if bool(choices.applied[i, layer]):
                k = int(choices.ops[i, layer])
                v = self._caption_value(choices, k, i, layer)
                parts.append(self.ops[k].name if v is None else f"{self.ops[k].name}({self.ops[k].fmt.format(v)})")
        if self.cutout > 0:
            parts.append(self._cutout_caption(choices, i))
        return " ".join(parts) if parts else "Identity"

    @abstractmethod
    def _draw(self, shape: tuple[int, int], generator: torch.Generator, device: torch.device) -> LayerChoicesT:
        """The choices of ``shape`` = (samples, layers), drawn with ``generator`` on ``device``."""

    @abstractmethod
    def apply(self, x: Tensor, choices: LayerChoicesT, generator: torch.Generator) -> Tensor:
        """Applies the drawn ops to x (uint8 or float in [0, 1]), then Cutout. Returns float32 in [0, 1]."""

    @abstractmethod
    def _caption_value(self, choices: LayerChoicesT, k: int, i: int, layer: int) -> float | None:
        """The value op ``k`` was applied with to sample i in ``layer``; None for an op without one."""

    @abstractmethod
    def _cutout_caption(self, choices: LayerChoicesT, i: int) -> str:
        """Cutout's part of sample i's caption."""


class RandAugment(LayeredPolicy[RandAugmentChoices]):
    """The RandAugment variant used by FixMatch as its strong augmentation (see the module docstring).

    ``RandAugment()(x, generator)`` augments a whole batch. The batch is
    grouped by op: for each layer and each op, the samples that drew that op
    are transformed together, each with its own magnitude.
    """

    def __init__(self, num_ops: int = 2, prob: float = 0.5, cutout: float = 0.5, fill: float = 0.5,
                 geometric_fill: float | None = None) -> None:
        self.num_ops = num_ops
        self.prob = prob
        self.cutout = cutout
        self.fill = fill  # Cutout's fill; also the geometric ops' unless geometric_fill is given
        self.geometric_fill = fill if geometric_fill is None else geometric_fill
        geo = dict(fill=self.geometric_fill)
        self.ops: list[_Op] = [
            _Op("Identity", ops.identity, 0, 0, None),
            _Op("AutoContrast", ops.auto_contrast, 0, 0, None),
            _Op("Equalize", ops.equalize, 0, 0, None),
            _Op("Rotate", partial(ops.rotate, **geo), -30, 30, "{:+.1f}", ops.rotate_coeffs),
            _Op("Solarize", ops.solarize, 0, 1, "{:.2f}"),
            _Op("Color", ops.color, 0.05, 0.95, "{:.2f}"),
            _Op("Contrast", ops.contrast, 0.05, 0.95, "{:.2f}"),
            _Op("Brightness", ops.brightness, 0.05, 0.95, "{:.2f}"),
            _Op("Sharpness", ops.sharpness, 0.05, 0.95, "{:.2f}"),
            _Op("ShearX", partial(ops.shear_x, **geo), -0.3, 0.3, "{:+.2f}", ops.shear_x_coeffs),
            _Op("ShearY", partial(ops.shear_y, **geo), -0.3, 0.3, "{:+.2f}", ops.shear_y_coeffs),
            _Op("TranslateX", partial(ops.translate_x, **geo), -0.3, 0.3, "{:+.2f}", ops.translate_x_coeffs),
            _Op("TranslateY", partial(ops.translate_y, **geo), -0.3, 0.3, "{:+.2f}", ops.translate_y_coeffs),
            _Op("Posterize", ops.posterize, 4, 8, "{:.0f}"),
        ]
        self._parametric = [k for k, spec in enumerate(self.ops) if spec.fn is not ops.identity]
        self._geometric = [k for k in self._parametric if self.ops[k].coeffs is not None]
        self._groups = [k for k in self._parametric if k not in self._geometric] + [_GEOMETRIC]

    def value(self, op: int, level: Tensor) -> Tensor:
        """Maps magnitude levels (any shape) to the parameter of op number ``op``."""
        spec = self.ops[op]
        v = spec.lo + (spec.hi - spec.lo) * level.float() / 10
        return v.round() if spec.name == "Posterize" else v

    def _draw(self, shape: tuple[int, int], generator: torch.Generator, device: torch.device) -> RandAugmentChoices:
        """Draws the op, the magnitude level and the apply flag for each sample and each layer."""
        return RandAugmentChoices(
            ops=torch.randint(0, len(self.ops), shape, generator=generator, device=device),
            levels=torch.randint(1, 10, shape, generator=generator, device=device),
            applied=torch.rand(shape, generator=generator, device=device) < self.prob,
        )

    def apply(self, x: Tensor, choices: RandAugmentChoices, generator: torch.Generator) -> Tensor:
        """Applies the drawn ops to x (uint8 or float in [0, 1]), then cutout. Returns float32 in [0, 1].

        The generator is used only for the positions of the cutout squares.
        """
        x = ops.to_float(x, copy=True)  # one buffer of our own, updated in place by every layer
        choices = choices_to(choices, x.device)
        geometric = torch.tensor(self._geometric, device=x.device)
        for layer in range(self.num_ops):
            chosen = torch.where(choices.applied[:, layer], choices.ops[:, layer], -1)
            levels = choices.levels[:, layer]
            groups = torch.where(torch.isin(chosen, geometric), _GEOMETRIC, chosen)

            def transform(k: int, xs: Tensor, idx: Tensor, chosen: Tensor = chosen, levels: Tensor = levels) -> Tensor:
                if k == _GEOMETRIC:
                    return ops.affine(xs, self._affine_coeffs(chosen[idx], levels[idx], *xs.shape[2:]),
                                      self.geometric_fill)
                return self.ops[k].fn(xs, self.value(k, levels[idx]))

            x = ops.apply_grouped(x, groups, self._groups, transform, inplace=True)
        size = round(self.cutout * min(x.shape[2:]))
        return ops.cutout(x, size, generator, fill=self.fill)

    def _affine_coeffs(self, op: Tensor, level: Tensor, h: int, w: int) -> Tensor:
        """Gives the affine coefficients (N, 6) of samples that each drew one of the geometric ops."""
        coeffs = torch.empty(op.shape[0], 6, dtype=torch.float64, device=op.device)  # double, as Pillow's
        for k in self._geometric:
            sel = op == k
            if bool(sel.any()):
                coeffs[sel] = self.ops[k].coeffs(self.value(k, level[sel]), h, w)
        return coeffs

    def _caption_value(self, choices: RandAugmentChoices, k: int, i: int, layer: int) -> float | None:
        return None if self.ops[k].fmt is None else float(self.value(k, choices.levels[i, layer]))

    def _cutout_caption(self, choices: RandAugmentChoices, i: int) -> str:
        return f"Cutout({self.cutout:g})"

    def __repr__(self) -> str:
        return f"RandAugment(num_ops={self.num_ops}, prob={self.prob}, cutout={self.cutout}, fill={self.fill})"
