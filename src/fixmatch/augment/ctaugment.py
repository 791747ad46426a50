"""CTAugment (control-theory augmentation, Berthelot et al. 2019), computed on whole batches.

This follows the official code (google-research/fixmatch, libml/ctaugment.py,
cta/lib/train.py and fixmatch.py) with the flags FixMatch uses: depth 2,
decay 0.99, threshold 0.8.

**Ops and parameters.** Each op has zero, one or two parameters, each a
value in [0, 1] split into magnitude bins. The op maps its values onto its own
range exactly as the official code does:

============  ======  ==========================================================
op            bins    parameter(s), from the values l (and m)
============  ======  ==========================================================
AutoContrast  17      blend(x, autocontrast(x), l)
Brightness    17      enhance factor 0.1 + 1.9 l
Color         17      enhance factor 0.1 + 1.9 l
Contrast      17      enhance factor 0.1 + 1.9 l
Cutout        17      square of side 2 ((1 + int(l * 0.499 * min(H, W))) // 2), fill
Equalize      17      blend(x, equalize(x), l)
Invert        17      blend(x, invert(x), l)
Identity      --      --
Posterize     8       bits = 1 + int(7.999 l)
Rescale       17, 6   crop 0.25 l of each side, resize back with
                      RESCALE_METHODS[int(5.99 m)] (Lanczos, bicubic, bilinear, box, Hamming, nearest)
Rotate        17      round(45 (2 l - 1)) whole degrees
Sharpness     17      enhance factor 0.1 + 1.9 l
ShearX/Y      17      0.3 (2 l - 1)
Smooth        17      blend(x, x.filter(SMOOTH), l)
Solarize      17      threshold int(255.999 l) on the 0..255 scale
TranslateX/Y  17      0.3 (2 l - 1) of the width / height (see below)
============  ======  ==========================================================

This is the paper's op set (its Table 12). The official code also registers
Blur (17 bins, blend with ImageFilter.BLUR) and so samples from 19 ops;
``CTAugment(blur=True)`` adds it.

**Sampling** (``sample``). Each sample draws ``depth`` ops uniformly with
replacement. For every parameter of a drawn op, the bin probabilities are
``p = rate + (1 - decay)`` (0.01, so no bin has zero weight), divided by their
maximum, with bins where ``p < threshold`` set to 0, then normalised; the bin
is drawn from p and the value is uniform within it, ``(bin + U(0, 1)) / bins``.
``sample(probe=True)`` draws every bin uniformly instead: the official code
augments the labeled probe images with uniform magnitudes, not with the rates.

**Update** (``update``), on the probe images: the official code classifies
them with the EMA model in inference mode, then for each sample in order
computes ``proximity = 1 - 0.5 * ||p - onehot(y)||_1`` and, for each of its
ops in order and each parameter, ``rate[bin] <- decay * rate[bin] + (1 -
decay) * proximity``. ``update`` gives the same result without a loop: a
cell updated k times from rate r with proximities q_1..q_k ends at
``decay^k r + (1 - decay) sum_t decay^(k - t) q_t``.

**Pillow's arithmetic.** On uint8 images each op gives the official op's
pixels exactly, except Rescale and the intended differences below (Cutout's
squares are placed at random). The parameters are computed in double from
the values, as the official Python code computes them. The blended ops
(AutoContrast, Equalize, Invert, Smooth, Blur: ``Image.blend(x, op(x), l)``)
and the enhancements (Brightness, Color, Contrast, Sharpness:
``Image.blend(degenerate, x, factor)``) run with ``exact=True`` (ops.py):
Pillow truncates twice, in the op (AutoContrast's lookup table, the SMOOTH /
BLUR filter, ``convert("L")``) and in the blend (float32 factor and sum, then
truncation), and so do they, on the nearest 0..255 levels (the official
code's images are uint8 between ops), giving whole levels. Posterize and
Solarize are exact on levels anyway; the geometric ops read the pixels
Pillow's NEAREST transform reads (16.16 fixed point, ties included).

**Strong view** (``__call__``): the CTA policy, then Cutout of side
``round(cutout * min(H, W))`` with ``fill`` (official: its own Cutout op at
level 1, side 16 of 32, grey 127).

Differences from the official code, on purpose:

- TranslateX/Y move by 0.3 (2 l - 1) of the image side, as the paper states.
  The official op passes the value as the affine offset in *pixels*
  (|offset| <= 0.3 px), which with nearest sampling leaves the image
  unchanged.
- The official update finds the bin again from the value as
  ``int(value * bins * 0.999)``, which credits the bin below for values just
  above a bin's lower edge (under 0.1% of its width per bin index). Here the
  drawn bin is stored and updated.
- Rescale's Lanczos/bicubic/Hamming kernels are Pillow's, not an
  approximation, but without its fixed-point weights and uint8 rounding
  (about one grey level; NEAREST and BOX are exact).
- Geometric ops fill with ``geometric_fill`` (default 0, black: Pillow's
  default fill in the official code); Cutout fills with ``fill``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops

__all__ = ["CTAugment", "CTAChoices"]

_PARAMS = 2  # the most parameters of any op (Rescale)
_BINS = 17  # the most bins of any parameter


class _CTAOp(NamedTuple):
    name: str
    bins: tuple[int, ...]  # bins per parameter; () for an op without parameters
    params: Callable[[Tensor], list[Tensor]]  # values (n, 2) on [0, 1] -> the op's parameters in natural units
    fn: Callable[[Tensor, list[Tensor], torch.Generator], Tensor]  # (x, parameters, generator) -> x
    fmt: Callable[..., str]  # formats the parameters (Python floats) for describe()


@dataclass
class CTAChoices:
    """Per-sample draws of CTAugment for N samples and ``depth`` layers."""

    ops: Tensor  # (N, depth) int64 index into CTAugment.ops
    bins: Tensor  # (N, depth, 2) int64 bin of each parameter; -1 where the op has fewer parameters
    values: Tensor  # (N, depth, 2) float in [0, 1]: (bin + U(0, 1)) / bins; 0 where unused


# The parameters are computed in double from the (float32) values, as the official code computes them in Python.
def _level(v: Tensor) -> list[Tensor]:
    return [v[:, 0]]


def _enhance(v: Tensor) -> list[Tensor]:
    return [0.1 + 1.9 * v[:, 0].double()]


def _symmetric(v: Tensor) -> list[Tensor]:
    return [0.3 * (2 * v[:, 0].double() - 1)]


def _blended(op: Callable[[Tensor], Tensor]) -> Callable[[Tensor, list[Tensor], torch.Generator], Tensor]:
    """The official ``Image.blend(x, op(x), level)``, with Pillow's arithmetic (ops.blend(exact=True))."""
    return lambda x, p, g: ops.blend(x, op(x), p[0], exact=True)


def _cutout_side(x: Tensor, frac: Tensor) -> Tensor:
    # Official: size = 1 + int(level * min * 0.499); the square spans [c - size // 2, c + size // 2).
    size = 1 + (frac * min(x.shape[2:])).floor().long()
    return 2 * (size // 2)


class CTAugment:
    """CTAugment with its learned bin rates (see the module docstring).

    ``CTAugment()(x, generator)`` gives the strong view of a batch. Train-time
    use, as in the official code::

        probe, choices = cta.probe(x_lb_weak, generator)         # uniform magnitudes, no Cutout
        cta.update(choices, ema_model(probe).softmax(1), y_lb)   # after each step, without gradients

    The rates live on the CPU; sampling moves the small probability table to
    the generator's device and draws everything with the given generator.
    """

    def __init__(
        self,
        depth: int = 2,
        threshold: float = 0.8,
        decay: float = 0.99,
        cutout: float = 0.5,
        fill: float = 0.5,
        geometric_fill: float = 0.0,
        blur: bool = False,
    ) -> None:
        self.depth = depth
        self.threshold = threshold
        self.decay = decay
        self.cutout = cutout
        self.fill = fill
        self.geometric_fill = geometric_fill
        geo = dict(fill=geometric_fill)
        none = lambda *a: ""  # noqa: E731
        level = "{:.2f}".format
        self.ops: list[_CTAOp] = [
            _CTAOp("AutoContrast", (17,), _level, _blended(partial(ops.auto_contrast, exact=True)), level),
            _CTAOp("Blur", (17,), _level, lambda x, p, g: ops.blur(x, p[0], exact=True), level),
            _CTAOp("Brightness", (17,), _enhance, lambda x, p, g: ops.brightness(x, p[0], exact=True), level),
            _CTAOp("Color", (17,), _enhance, lambda x, p, g: ops.color(x, p[0], exact=True), level),
            _CTAOp("Contrast", (17,), _enhance, lambda x, p, g: ops.contrast(x, p[0], exact=True), level),
            _CTAOp("Cutout", (17,), lambda v: [0.499 * v[:, 0]],
                   lambda x, p, g: ops.cutout_per_sample(x, _cutout_side(x, p[0]), g, fill), level),
            _CTAOp("Equalize", (17,), _level, _blended(ops.equalize), level),
            _CTAOp("Invert", (17,), _level, _blended(ops.invert), level),
            _CTAOp("Identity", (), lambda v: [], lambda x, p, g: x, none),
            _CTAOp("Posterize", (8,), lambda v: [1 + (7.999 * v[:, 0].double()).floor()],
                   lambda x, p, g: ops.posterize(x, p[0]), "{:.0f}".format),
            _CTAOp("Rescale", (17, 6), lambda v: [0.25 * v[:, 0].double(), (5.99 * v[:, 1].double()).floor()],
                   lambda x, p, g: ops.rescale(x, p[0], p[1]),
                   lambda c, m: f"{c:.3f}, {ops.RESCALE_METHODS[int(m)]}"),
            _CTAOp("Rotate", (17,), lambda v: [(45 * (2 * v[:, 0].double() - 1)).round()],
                   lambda x, p, g: ops.rotate(x, p[0], **geo), "{:+.0f}".format),
            _CTAOp("Sharpness", (17,), _enhance, lambda x, p, g: ops.sharpness(x, p[0], exact=True), level),
            _CTAOp("ShearX", (17,), _symmetric, lambda x, p, g: ops.shear_x(x, p[0], **geo), "{:+.2f}".format),
            _CTAOp("ShearY", (17,), _symmetric, lambda x, p, g: ops.shear_y(x, p[0], **geo), "{:+.2f}".format),
            _CTAOp("Smooth", (17,), _level, lambda x, p, g: ops.smooth(x, p[0], exact=True), level),
            # Threshold t on the 0..255 scale; ops.solarize takes t / 256.
            _CTAOp("Solarize", (17,), lambda v: [(255.999 * v[:, 0].double()).floor()],
                   lambda x, p, g: ops.solarize(x, p[0] / 256), "{:.0f}".format),
            _CTAOp("TranslateX", (17,), _symmetric,
                   lambda x, p, g: ops.translate_x(x, p[0], **geo), "{:+.2f}".format),
            _CTAOp("TranslateY", (17,), _symmetric,
                   lambda x, p, g: ops.translate_y(x, p[0], **geo), "{:+.2f}".format),
        ]  # fmt: skip
        if not blur:
            self.ops = [op for op in self.ops if op.name != "Blur"]
        # nbins[k, j]: bins of parameter j of op k (0: no such parameter); valid marks the bins that exist.
        self.nbins = torch.tensor([list(op.bins) + [0] * (_PARAMS - len(op.bins)) for op in self.ops])
        self.valid = torch.arange(_BINS) < self.nbins[..., None]  # (K, 2, 17)
        self.rates = torch.ones(len(self.ops), _PARAMS, _BINS)  # one rate per bin, initialised to 1

    # ------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Tensor]:
        """Gives the learned state as tensors only (fits a weights_only checkpoint)."""
        return {"rates": self.rates.clone(), "nbins": self.nbins.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if not torch.equal(state["nbins"].cpu(), self.nbins):
            raise ValueError("CTAugment state has a different op set or binning")
        rates = state["rates"]
        if not isinstance(rates, Tensor) or rates.shape != self.rates.shape:  # would fail at the next draw, not here
            found = tuple(rates.shape) if isinstance(rates, Tensor) else type(rates).__name__
            raise ValueError(f"CTAugment rates of shape {found}, expected {tuple(self.rates.shape)}")
        self.rates = rates.detach().to("cpu", torch.float32).clone()

    def probabilities(self) -> Tensor:
        """Gives the sampling probability of every bin (K, 2, 17), zero for missing bins and parameters."""
        p = torch.where(self.valid, self.rates + (1 - self.decay), 0)  # + 0.01 so no bin has zero weight
        p = p / p.amax(-1, keepdim=True).clamp_min(1e-12)
        p = torch.where(p < self.threshold, 0, p)
        return p / p.sum(-1, keepdim=True).clamp_min(1e-12)

    # ------------------------------------------------------------------------- sampling and applying

    def sample(
        self, n: int, generator: torch.Generator, device: torch.device | str | None = None, probe: bool = False
    ) -> CTAChoices:
        """Draws ops, bins and values for n samples (probe=True: bins uniformly, ignoring the rates)."""
        device = torch.device(device) if device is not None else generator.device
        ops_idx = torch.randint(0, len(self.ops), (n, self.depth), generator=generator, device=device)
        u = torch.rand(n, self.depth, _PARAMS, 1, generator=generator, device=device)  # picks the bin
        r = torch.rand(n, self.depth, _PARAMS, generator=generator, device=device)  # position within the bin
        p = (self.valid.float() if probe else self.probabilities()).to(device)[ops_idx]  # (n, depth, 2, 17)
        # Inverse-CDF draw: bin b where cdf[b - 1] <= u * total < cdf[b]. Zero-probability bins are empty
        # intervals; the clamp to the last nonzero bin only guards against float rounding at the top end.
        cdf = p.cumsum(-1)
        bins = (cdf <= u * cdf[..., -1:]).sum(-1)
        last = torch.where(p > 0, torch.arange(_BINS, device=device), 0).amax(-1)
        bins = torch.minimum(bins, last)
        nbins = self.nbins.to(device)[ops_idx]
        used = nbins > 0
        values = torch.where(used, (bins + r) / nbins.clamp_min(1), 0).clamp_(0, 1)
        return CTAChoices(ops=ops_idx, bins=torch.where(used, bins, -1), values=values)

    def apply(self, x: Tensor, choices: CTAChoices, generator: torch.Generator, cutout: bool = True) -> Tensor:
        """Applies the drawn ops to x (uint8 or float in [0, 1]), then Cutout unless cutout=False.

        Samples are grouped by op, as in RandAugment.apply. The generator is
        used only for the positions of the Cutout squares. Returns float32 in
        [0, 1]; the input is not modified.
        """
        x = ops.to_float(x, copy=True)  # one buffer of our own, updated in place by every layer
        op_idx, values = choices.ops.to(x.device), choices.values.to(x.device, x.dtype)
        parametric = [k for k, spec in enumerate(self.ops) if spec.bins]  # all but Identity
        for layer in range(choices.ops.shape[1]):
            v = values[:, layer]
            x = ops.apply_grouped(x, op_idx[:, layer], parametric,
                                  lambda k, xs, idx, v=v: self.ops[k].fn(xs, self.ops[k].params(v[idx]), generator),
                                  inplace=True)
        if cutout and self.cutout > 0:
            x = ops.cutout(x, round(self.cutout * min(x.shape[2:])), generator, fill=self.fill)
        return x

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Gives the strong view of a batch: sample() with the rates, apply(), Cutout."""
        return self.apply(x, self.sample(x.shape[0], generator, x.device), generator)

    def probe(self, x: Tensor, generator: torch.Generator) -> tuple[Tensor, CTAChoices]:
        """Augments labeled images with uniformly drawn magnitudes and no Cutout, for update()."""
        choices = self.sample(x.shape[0], generator, x.device, probe=True)
        return self.apply(x, choices, generator, cutout=False), choices

    # ------------------------------------------------------------------------- learning the rates

    @torch.no_grad()
    def update(self, choices: CTAChoices, probs: Tensor, labels: Tensor,
               gather: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """Moves the rates of the bins each probe sample used towards its proximity; returns the proximities (N,).

        probs (N, C) are the model's class probabilities for the probe
        images, labels (N,) their labels. The result equals the official
        sequential loop over samples, layers and parameters (see the module
        docstring); only the float summation order differs.

        gather: with several processes, concatenates a tensor of every rank
        in rank order; all ranks then update from the probes of the whole
        global batch and keep identical rates (None: one process).
        """
        if gather is not None:
            choices = CTAChoices(gather(choices.ops), gather(choices.bins), gather(choices.values))
            probs, labels = gather(probs), gather(labels)
        probs = probs.detach().to("cpu", torch.float64)
        onehot = F.one_hot(labels.detach().cpu().long(), probs.shape[1]).to(torch.float64)
        proximity = 1 - 0.5 * (probs - onehot).abs().sum(1)  # (N,), in [0, 1]
        k, p, b = self.rates.shape
        bins = choices.bins.cpu()
        cell = (choices.ops.cpu()[..., None] * p + torch.arange(p)) * b + bins  # flat rate index (N, depth, 2)
        used = bins >= 0
        cell = cell[used]  # row-major: the official order (sample, layer, parameter)
        q = proximity.view(-1, 1, 1).expand_as(bins)[used]
        # later[t]: how many later occurrences update the same cell, i.e. how often occurrence t's term decays.
        later = torch.triu(cell[:, None] == cell[None, :], diagonal=1).sum(1)
        count = torch.bincount(cell, minlength=k * p * b)
        decay = torch.tensor(self.decay, dtype=torch.float64)
        rates = self.rates.view(-1).double() * decay**count
        rates.index_add_(0, cell, (1 - decay) * decay**later * q)
        self.rates = rates.view(k, p, b).float()
        return proximity.float()

    # ------------------------------------------------------------------------- captions

    def describe(self, choices: CTAChoices, i: int) -> str:
        """Gives a caption for sample i, e.g. ``"Rotate(+18) Rescale(0.062, bicubic) Cutout(0.5)"``."""
        parts = []
        for layer in range(choices.ops.shape[1]):
            spec = self.ops[int(choices.ops[i, layer])]
            params = [float(t) for t in spec.params(choices.values[i : i + 1, layer].float().cpu())]
            parts.append(f"{spec.name}({spec.fmt(*params)})" if params else spec.name)
        if self.cutout > 0:
            parts.append(f"Cutout({self.cutout:g})")
        return " ".join(parts)

    def __repr__(self) -> str:
        names = ", ".join(op.name for op in self.ops)
        return (f"CTAugment(depth={self.depth}, threshold={self.threshold}, decay={self.decay}, "
                f"cutout={self.cutout}, fill={self.fill}, geometric_fill={self.geometric_fill}, ops=[{names}])")
