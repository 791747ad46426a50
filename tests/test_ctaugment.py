"""Tests for the ops added for CTAugment (against Pillow) and for CTAugment itself.

Images from sample_images.py: the Grace Hopper photo from matplotlib
(32x32, 48x40 RGB) and four Fashion-MNIST test images (28x28 grey, skipped
when the file is absent). Ops run on ``uint8 / 255`` and are compared with
Pillow on the 0..255 scale; d = ours * 255 - Pillow. Tolerances:

- invert: exact. Without exact=True (continuous ops): equalize blended: d in
  [0, 1] (Pillow's blend truncates); smooth, blur: Pillow rounds the filtered
  image, then truncates the blend: d in [-0.5, 1.5], as for sharpness;
  autocontrast blended: autocontrast and the blend both truncate: d in [0, 2].
- with exact=True, as CTAugment runs them, all of these are exact: d = 0,
  including blend strengths up to 1 (0.97..1.0, where the continuous
  autocontrast blend was up to 2 levels brighter).
- rescale: Pillow rounds its horizontal pass and its output to uint8 and uses
  fixed-point weights: |d| <= 1.5 for the kernels with negative lobes
  (Lanczos, bicubic; 1.17 seen) and <= 1.0 for bilinear and Hamming, mean
  |d| < 0.5, and the rounded result at most 1 level off. Nearest and box are
  exact, including the tied rows and columns of the 48x40 photo, where
  Pillow's accumulated NEAREST coordinate is copied.
- CTAugment ops against the official PIL definitions: exact, pixel for pixel,
  for every op but Rescale, Cutout (random) and TranslateX/Y (a fraction of
  the side on purpose), at the edges, centres and ends of the 17 bins.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps
from sample_images import fashion_mnist, generator, photo, to_array, to_numpy, to_tensor

from fixmatch.augment import CTAChoices, CTAugment, make_strong_augment, ops

PIL_METHODS = (Image.LANCZOS, Image.BICUBIC, Image.BILINEAR, Image.BOX, Image.HAMMING, Image.NEAREST)


# ----------------------------------------------------------------------------- images


@pytest.fixture(scope="module", params=["photo32", "photo48x40", "fmnist28"])
def images(request) -> list[Image.Image]:
    return {"photo32": lambda: [photo((32, 32))], "photo48x40": lambda: [photo((48, 40))],
            "fmnist28": fashion_mnist}[request.param]()  # fmt: skip


def _batch(imgs: list[Image.Image], n: int) -> list[Image.Image]:
    return [imgs[i % len(imgs)] for i in range(n)]


# ----------------------------------------------------------------------------- new ops vs Pillow

LEVELS = [0.0, 0.25, 0.5, 0.77, 0.97, 0.98, 0.99, 1.0]


def _blended(op):
    return lambda im, v: Image.blend(im, op(im), v)


# name -> (our op, Pillow reference, values, bounds on d)
POINT_OPS = {
    "invert": (ops.invert, lambda im, v: ImageOps.invert(im), [0.0] * 4, (0.0, 0.0)),
    "smooth": (ops.smooth, lambda im, v: Image.blend(im, im.filter(ImageFilter.SMOOTH), v), LEVELS, (-0.5, 1.5)),
    "blur": (ops.blur, lambda im, v: Image.blend(im, im.filter(ImageFilter.BLUR), v), LEVELS, (-0.5, 1.5)),
    "autocontrast_blend": (lambda x, v: ops.blend(x, ops.auto_contrast(x), v),
                           _blended(ImageOps.autocontrast), LEVELS, (0.0, 2.0)),
    "equalize_blend": (lambda x, v: ops.blend(x, ops.equalize(x), v), _blended(ImageOps.equalize), LEVELS, (0.0, 1.0)),
    "invert_blend": (lambda x, v: ops.blend(x, ops.invert(x), v), _blended(ImageOps.invert), LEVELS, (0.0, 1.0)),
    # Pillow's arithmetic, as CTAugment runs them: exact.
    "smooth_exact": (lambda x, v: ops.smooth(x, v, exact=True),
                     lambda im, v: Image.blend(im, im.filter(ImageFilter.SMOOTH), v), LEVELS, (0.0, 0.0)),
    "blur_exact": (lambda x, v: ops.blur(x, v, exact=True),
                   lambda im, v: Image.blend(im, im.filter(ImageFilter.BLUR), v), LEVELS, (0.0, 0.0)),
    "autocontrast_blend_exact": (lambda x, v: ops.blend(x, ops.auto_contrast(x, exact=True), v, exact=True),
                                 _blended(ImageOps.autocontrast), LEVELS, (0.0, 0.0)),
    "equalize_blend_exact": (lambda x, v: ops.blend(x, ops.equalize(x), v, exact=True),
                             _blended(ImageOps.equalize), LEVELS, (0.0, 0.0)),
    "invert_blend_exact": (lambda x, v: ops.blend(x, ops.invert(x), v, exact=True),
                           _blended(ImageOps.invert), LEVELS, (0.0, 0.0)),
}  # fmt: skip


@pytest.mark.parametrize("name", list(POINT_OPS))
def test_point_op_matches_pil(name: str, images: list[Image.Image]) -> None:
    op, pil_fn, values, (lo, hi) = POINT_OPS[name]
    batch = _batch(images, len(values))
    ours = to_numpy(op(to_tensor(batch), torch.tensor(values)))
    ref = to_array([pil_fn(im, v) for im, v in zip(batch, values)]).astype(np.float64)
    d = ours - ref
    assert d.min() >= lo - 1e-3 and d.max() <= hi + 1e-3, (d.min(), d.max())
    assert np.abs(d).mean() < 0.6


# Fractions cut from each side; 0.078125 * 32 = 2.5 checks Python's round-half-to-even on the crop box.
RESCALE_CROPS = [0.0, 0.03, 0.078125, 0.1, 0.17, 0.2, 0.25]


@pytest.mark.parametrize("method", range(6), ids=lambda m: ops.RESCALE_METHODS[m])
def test_rescale_matches_pil(method: int, images: list[Image.Image]) -> None:
    crops = [float(np.float32(c)) for c in RESCALE_CROPS]  # Pillow gets the float32 value the op sees
    batch = _batch(images, len(crops))
    ours = to_numpy(ops.rescale(to_tensor(batch), torch.tensor(crops), method))
    ref = []
    for im, c in zip(batch, crops):
        w, h = im.size
        ref.append(im.crop((c * w, c * h, w * (1 - c), h * (1 - c))).resize(im.size, PIL_METHODS[method]))
    d = ours - to_array(ref)
    name = ops.RESCALE_METHODS[method]
    bound = {"nearest": 0.0, "box": 0.0, "lanczos": 1.5, "bicubic": 1.5}.get(name, 1.0)
    assert np.abs(d).max() <= bound + 1e-3, np.abs(d).max()
    assert np.abs(d).mean() < 0.5 and np.abs(np.round(ours) - to_array(ref)).max() <= 1


def test_rescale_per_sample_methods_and_identity() -> None:
    x = to_tensor([photo((32, 32))] * 6)
    crops, methods = torch.full((6,), 0.2), torch.arange(6)
    batched = ops.rescale(x, crops, methods)
    single = torch.cat([ops.rescale(x[i : i + 1], crops[i], int(methods[i])) for i in range(6)])
    assert torch.allclose(batched, single, atol=1e-6)
    # Enlarging, BOX and NEAREST pick the same pixels (here no ties); the other methods differ.
    assert torch.equal(batched[3], batched[5])
    assert len({tuple(batched[i].flatten()[:200].tolist()) for i in range(5)}) == 5
    for m in ops.RESCALE_METHODS:  # no crop: the image comes back unchanged
        assert torch.allclose(ops.rescale(x[:1], 0.0, m), x[:1], atol=1e-6)


def test_cutout_per_sample_sizes() -> None:
    x = torch.zeros(6, 1, 20, 20)
    sizes = torch.tensor([0, 1, 4, 7, 10, 20])
    out = ops.cutout_per_sample(x, sizes, generator(0), fill=1.0)
    areas = out.sum(dim=(1, 2, 3))
    assert areas[0] == 0 and (areas <= sizes**2).all() and areas[1] == 1
    # A constant size gives cutout()'s result from the same generator state.
    assert torch.equal(ops.cutout_per_sample(x, 8, generator(1), 0.3), ops.cutout(x, 8, generator(1), 0.3))


# ----------------------------------------------------------------------------- CTA ops vs the official PIL code

# The official libml/ctaugment.py op definitions, written out for Pillow (geometric fill: Pillow's default, black).
OFFICIAL = {
    "AutoContrast": lambda im, l: Image.blend(im, ImageOps.autocontrast(im), l),
    "Brightness": lambda im, l: ImageEnhance.Brightness(im).enhance(0.1 + 1.9 * l),
    "Color": lambda im, l: ImageEnhance.Color(im).enhance(0.1 + 1.9 * l),
    "Contrast": lambda im, l: ImageEnhance.Contrast(im).enhance(0.1 + 1.9 * l),
    "Equalize": lambda im, l: Image.blend(im, ImageOps.equalize(im), l),
    "Invert": lambda im, l: Image.blend(im, ImageOps.invert(im), l),
    "Posterize": lambda im, l: ImageOps.posterize(im, 1 + int(l * 7.999)),
    "Rotate": lambda im, l: im.rotate(int(np.round((2 * l - 1) * 45))),
    "Sharpness": lambda im, l: ImageEnhance.Sharpness(im).enhance(0.1 + 1.9 * l),
    "ShearX": lambda im, l: im.transform(im.size, Image.AFFINE, (1, (2 * l - 1) * 0.3, 0, 0, 1, 0)),
    "ShearY": lambda im, l: im.transform(im.size, Image.AFFINE, (1, 0, 0, (2 * l - 1) * 0.3, 1, 0)),
    "Smooth": lambda im, l: Image.blend(im, im.filter(ImageFilter.SMOOTH), l),
    "Solarize": lambda im, l: ImageOps.solarize(im, int(l * 255.999)),
    "Blur": lambda im, l: Image.blend(im, im.filter(ImageFilter.BLUR), l),
}
# Values in [0, 1]: the edge, a third and the centre of each of the 17 bins, the ends, and strengths near 1.
CTA_LEVELS = sorted({0.02, 0.11, 0.3, 0.44, 0.62, 0.8, 0.93, 0.97, 0.98, 0.99, 1.0}
                    | {(b + u) / 17 for b in range(17) for u in (0.0, 0.3, 0.5)})


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_cta_op_matches_official(name: str, images: list[Image.Image]) -> None:
    cta = CTAugment(blur=True)
    k = [op.name for op in cta.ops].index(name)
    levels = [float(np.float32(v)) for v in CTA_LEVELS]  # the official code gets the float32 value we see
    batch = _batch(images, len(levels))
    values = torch.tensor([[v, 0.0] for v in levels])
    x = to_tensor(batch)
    ours = to_numpy(cta.ops[k].fn(x, cta.ops[k].params(values), generator(0)))
    ref = to_array([OFFICIAL[name](im, v) for im, v in zip(batch, levels)]).astype(np.float64)
    assert np.abs(ours - ref).max() < 1e-3, [(v, float(np.abs(o - r).max())) for v, o, r in zip(levels, ours, ref)
                                              if np.abs(o - r).max() >= 1e-3]


def test_cta_rescale_and_cutout_match_official(images: list[Image.Image]) -> None:
    cta = CTAugment()
    k = [op.name for op in cta.ops].index("Rescale")
    values = torch.tensor([[0.1, 0.05], [0.5, 0.2], [0.7, 0.4], [0.9, 0.6], [0.3, 0.8], [1.0, 1.0]])
    batch = _batch(images, len(values))
    ours = to_numpy(cta.ops[k].fn(to_tensor(batch), cta.ops[k].params(values), generator(0)))
    ref = []
    for im, (scale, method) in zip(batch, values.tolist()):  # libml/ctaugment.py rescale()
        s, scale = im.size, float(np.float32(scale)) * 0.25
        crop = (scale * s[0], scale * s[1], s[0] * (1 - scale), s[1] * (1 - scale))
        ref.append(im.crop(crop).resize(im.size, PIL_METHODS[int(method * 5.99)]))
    assert np.abs(np.round(ours) - to_array(ref)).max() <= 2

    # Cutout: side 2 * ((1 + int(l * min * 0.499)) // 2) of grey, centred anywhere (clipped at the border).
    k = [op.name for op in cta.ops].index("Cutout")
    x = torch.zeros(200, 1, 32, 32)
    for level, side in [(0.0, 0), (0.5, 8), (1.0, 16)]:
        out = cta.ops[k].fn(x, cta.ops[k].params(torch.tensor([[level, 0.0]]).expand(200, 2)), generator(1))
        areas = (out > 0).sum(dim=(1, 2, 3))
        assert areas.max() == side * side and (out[out > 0] == cta.fill).all()


def test_cta_translate_is_a_fraction_of_the_side() -> None:
    """The paper's TranslateX: l = 1 moves the content 0.3 of the width right (the official code: 0.3 px)."""
    cta = CTAugment(geometric_fill=0.5)
    x = to_tensor([photo((40, 40))])
    k = [op.name for op in cta.ops].index("TranslateX")
    out = cta.ops[k].fn(x, cta.ops[k].params(torch.tensor([[1.0, 0.0]])), generator(0))
    assert torch.allclose(out[..., 12:], x[..., :28], atol=1e-6) and (out[..., :12] == 0.5).all()


# ----------------------------------------------------------------------------- CTAugment: tables and sampling


def test_op_table_and_parameter_mapping() -> None:
    cta = CTAugment()
    names = [op.name for op in cta.ops]
    assert names == ["AutoContrast", "Brightness", "Color", "Contrast", "Cutout", "Equalize", "Invert", "Identity",
                     "Posterize", "Rescale", "Rotate", "Sharpness", "ShearX", "ShearY", "Smooth", "Solarize",
                     "TranslateX", "TranslateY"]  # fmt: skip
    assert [op.name for op in CTAugment(blur=True).ops][1] == "Blur" and len(CTAugment(blur=True).ops) == 19
    assert cta.nbins[names.index("Posterize")].tolist() == [8, 0]
    assert cta.nbins[names.index("Rescale")].tolist() == [17, 6]
    assert cta.nbins[names.index("Identity")].tolist() == [0, 0]
    v = torch.tensor([[0.0, 0.0], [0.5, 0.5], [1.0, 0.99]])

    def params(name: str) -> list[list[float]]:
        return [[round(float(t), 6) for t in p] for p in cta.ops[names.index(name)].params(v)]

    assert params("Rotate") == [[-45.0, 0.0, 45.0]]
    assert params("Posterize") == [[1.0, 4.0, 8.0]]
    assert params("Solarize") == [[0.0, 127.0, 255.0]]
    assert params("Brightness") == params("Sharpness") == [[0.1, 1.05, 2.0]]
    assert params("ShearX") == params("TranslateY") == [[-0.3, 0.0, 0.3]]
    assert params("Rescale") == [[0.0, 0.125, 0.25], [0.0, 2.0, 5.0]]
    assert params("Smooth") == params("Invert") == [[0.0, 0.5, 1.0]]


def test_threshold_masks_low_rate_bins() -> None:
    cta = CTAugment()
    rot, resc = [op.name for op in cta.ops].index("Rotate"), [op.name for op in cta.ops].index("Rescale")
    cta.rates[rot, 0, :8] = 0.5  # p = 0.51 / 1.01 < 0.8: never sampled
    cta.rates[rot, 0, 8] = 0.8  # p = 0.81 / 1.01 = 0.802 >= 0.8: kept
    cta.rates[resc, 1, 0] = 0.0  # p = 0.01: never sampled
    p = cta.probabilities()
    assert (p[rot, 0, :8] == 0).all() and (p[rot, 0, 8:] > 0).all()
    assert torch.allclose(p[rot, 0, 9:], torch.full((8,), 1 / (8 + 0.81 / 1.01)))
    assert (p[:, :, :].sum(-1)[cta.nbins > 0] - 1).abs().max() < 1e-6

    ch = cta.sample(20000, generator(0))
    rot_bins = ch.bins[..., 0][ch.ops == rot]
    assert rot_bins.min() == 8 and rot_bins.unique().numel() == 9
    assert (ch.bins[..., 1][ch.ops == resc] != 0).all()
    # Probe draws ignore the rates: every bin occurs.
    probe = cta.sample(20000, generator(0), probe=True)
    assert probe.bins[..., 0][probe.ops == rot].unique().numel() == 17


def test_sample_structure_and_values() -> None:
    cta = CTAugment()
    ch = cta.sample(4000, generator(1))
    assert ch.ops.shape == (4000, 2) and ch.bins.shape == ch.values.shape == (4000, 2, 2)
    assert ch.values.min() >= 0 and ch.values.max() <= 1
    nb = cta.nbins[ch.ops]  # (N, depth, 2)
    assert torch.equal(ch.bins < 0, nb == 0) and (ch.values[nb == 0] == 0).all()
    used = nb > 0
    assert (ch.bins[used] < nb[used]).all()
    # The value lies in its bin: bin <= value * bins <= bin + 1.
    scaled = ch.values[used] * nb[used]
    assert (scaled >= ch.bins[used] - 1e-5).all() and (scaled <= ch.bins[used] + 1 + 1e-5).all()
    freq = torch.bincount(ch.ops.flatten(), minlength=18).float() / ch.ops.numel()
    assert (freq - 1 / 18).abs().max() < 0.015
    # Different samples get different ops and magnitudes.
    assert len({tuple(ch.ops[i].tolist()) for i in range(64)}) > 40
    assert ch.values[:64][used[:64]].unique().numel() == used[:64].sum()


def test_seed_reproduces_a_batch() -> None:
    cta = CTAugment()
    x = (to_tensor([photo((32, 32))] * 16) * 255).round().to(torch.uint8)
    x_float = x.float() / 255
    x_copy = x_float.clone()
    out = cta(x, generator(2))
    assert out.shape == x.shape and out.dtype == torch.float32 and out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, cta(x, generator(2))) and torch.equal(out, cta(x_float, generator(2)))
    assert torch.equal(x_float, x_copy)
    assert not torch.equal(out, cta(x, generator(3)))
    assert len({tuple(out[i].flatten()[::7].tolist()) for i in range(16)}) == 16  # every sample differs


def test_batched_apply_equals_per_sample() -> None:
    cta = CTAugment(cutout=0.0)
    x = to_tensor([photo((32, 32))] * 48)
    ch = cta.sample(48, generator(4))
    out = cta.apply(x, ch, generator(5))
    cutout_op = [op.name for op in cta.ops].index("Cutout")
    checked = 0
    for i in range(48):
        if (ch.ops[i] == cutout_op).any():  # random square positions depend on the grouping
            continue
        y = x[i : i + 1]
        for layer in range(2):
            spec = cta.ops[int(ch.ops[i, layer])]
            if spec.bins:
                y = spec.fn(y, spec.params(ch.values[i : i + 1, layer]), generator(0))
        assert torch.allclose(out[i : i + 1], y, atol=1e-5), cta.describe(ch, i)
        checked += 1
    assert checked > 30


def test_strong_view_ends_with_cutout() -> None:
    cta = CTAugment(depth=0, cutout=0.5, fill=0.5)  # no policy ops: only the final Cutout
    out = cta(torch.zeros(64, 3, 24, 40), generator(6))
    mask = out[:, 0] != 0
    assert torch.equal(out, mask[:, None].expand_as(out).float() * 0.5)
    assert mask.sum(dim=(1, 2)).max() == 12 * 12
    probe, ch = cta.probe(torch.zeros(8, 3, 24, 40), generator(6))
    assert (probe == 0).all()  # probes get no Cutout


def test_describe() -> None:
    cta = CTAugment()
    names = [op.name for op in cta.ops]
    ch = CTAChoices(
        ops=torch.tensor([[names.index("Rotate"), names.index("Rescale")], [names.index("Identity"),
                                                                            names.index("Posterize")]]),
        bins=torch.tensor([[[12, -1], [4, 2]], [[-1, -1], [5, -1]]]),
        values=torch.tensor([[[0.7, 0.0], [0.25, 0.4]], [[0.0, 0.0], [0.7, 0.0]]]),
    )
    assert cta.describe(ch, 0) == "Rotate(+18) Rescale(0.062, bilinear) Cutout(0.5)"
    assert CTAugment(cutout=0).describe(ch, 1) == "Identity Posterize(6)"


# ----------------------------------------------------------------------------- CTAugment: learning the rates


def _sequential_update(rates: torch.Tensor, ch: CTAChoices, probs, labels, decay: float) -> torch.Tensor:
    """The official loop (cta/lib/train.py + update_rates), on the drawn bins."""
    rates = rates.double().clone()
    for i in range(len(labels)):
        error = probs[i].double().clone()
        error[labels[i]] -= 1
        proximity = 1 - 0.5 * error.abs().sum()
        for layer in range(ch.ops.shape[1]):
            for j in range(2):
                b = int(ch.bins[i, layer, j])
                if b >= 0:
                    k = int(ch.ops[i, layer])
                    rates[k, j, b] = rates[k, j, b] * decay + proximity * (1 - decay)
    return rates.float()


def test_update_hand_computed() -> None:
    cta = CTAugment()
    names = [op.name for op in cta.ops]
    rot, post, resc = names.index("Rotate"), names.index("Posterize"), names.index("Rescale")
    ch = CTAChoices(
        ops=torch.tensor([[rot, post], [rot, resc]]),
        bins=torch.tensor([[[3, -1], [5, -1]], [[3, -1], [0, 5]]]),
        values=torch.zeros(2, 2, 2),  # update() uses the bins only
    )
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.5, 0.0]])
    labels = torch.tensor([0, 1])
    # proximity = 1 - 0.5 * ||p - onehot||_1: 1 - 0.5 * (0.3 + 0.2 + 0.1) = 0.7 and 1 - 0.5 * (0.5 + 0.5) = 0.5.
    prox = cta.update(ch, probs, labels)
    assert torch.allclose(prox, torch.tensor([0.7, 0.5]))
    expected = torch.ones_like(cta.rates)
    expected[rot, 0, 3] = 0.99 * (0.99 + 0.01 * 0.7) + 0.01 * 0.5  # used twice: sample 0, then sample 1
    expected[post, 0, 5] = 0.99 + 0.01 * 0.7
    expected[resc, 0, 0] = expected[resc, 1, 5] = 0.99 + 0.01 * 0.5
    assert torch.allclose(cta.rates, expected, atol=1e-7)
    assert abs(float(cta.rates[rot, 0, 3]) - 0.99203) < 1e-6


def test_update_matches_sequential_loop() -> None:
    cta = CTAugment()
    cta.rates = torch.rand(cta.rates.shape, generator=generator(7))
    ch = cta.sample(64, generator(8), probe=True)
    # Force repeats of the same cells, within a sample and across samples.
    ch.ops[:20] = 9
    ch.bins[:20] = torch.tensor([3, 1])
    ch.ops[5, 1], ch.bins[5, 1] = 9, torch.tensor([3, 2])
    probs = torch.softmax(torch.randn(64, 10, generator=generator(9)) * 3, 1)
    labels = torch.randint(0, 10, (64,), generator=generator(10))
    expected = _sequential_update(cta.rates, ch, probs, labels, 0.99)
    cta.update(ch, probs, labels)
    assert torch.allclose(cta.rates, expected, atol=1e-6)


def test_perfect_predictions_raise_or_keep_rates() -> None:
    cta = CTAugment()
    ch = cta.sample(32, generator(11), probe=True)
    labels = torch.randint(0, 5, (32,), generator=generator(12))
    perfect = torch.nn.functional.one_hot(labels, 5).float()
    assert torch.equal(cta.update(ch, perfect, labels), torch.ones(32))
    assert torch.equal(cta.rates, torch.ones_like(cta.rates))  # 0.99 * 1 + 0.01 * 1 = 1
    cta.rates.fill_(0.5)
    cta.update(ch, perfect, labels)
    touched = cta.rates != 0.5
    assert touched.sum() > 20 and (cta.rates[touched] > 0.5).all()
    worst = torch.nn.functional.one_hot((labels + 1) % 5, 5).float()  # all mass on a wrong class: proximity 0
    cta.rates.fill_(0.5)
    assert torch.equal(cta.update(ch, worst, labels), torch.zeros(32))
    assert (cta.rates[touched] < 0.5).all() and (cta.rates[~touched] == 0.5).all()


def test_state_dict_round_trip() -> None:
    cta = CTAugment()
    cta.rates = torch.rand(cta.rates.shape, generator=generator(14))  # as after long training: the threshold bites
    ch = cta.sample(64, generator(15), probe=True)
    cta.update(ch, torch.softmax(torch.randn(64, 10, generator=generator(16)), 1), torch.zeros(64, dtype=torch.long))
    buffer = io.BytesIO()
    torch.save(cta.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    restored = CTAugment()
    restored.load_state_dict(state)
    assert torch.equal(restored.rates, cta.rates)
    a, b, fresh = cta.sample(256, generator(13)), restored.sample(256, generator(13)), CTAugment().sample(256, generator(13))
    assert torch.equal(a.ops, b.ops) and torch.equal(a.bins, b.bins) and torch.equal(a.values, b.values)
    assert not torch.equal(a.bins, fresh.bins)  # the learned rates do change the sampling
    with pytest.raises(ValueError):
        CTAugment(blur=True).load_state_dict(state)


def test_factory_builds_ctaugment() -> None:
    cta = make_strong_augment("ctaugment", cutout=0.25, fill=0.4)
    assert isinstance(cta, CTAugment) and cta.cutout == 0.25 and cta.fill == 0.4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda() -> None:
    cta = CTAugment(blur=True)
    x = (torch.rand(64, 3, 32, 32) * 255).to(torch.uint8).cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    out = cta(x, g)
    assert out.is_cuda and out.shape == x.shape and 0 <= out.min() and out.max() <= 1
    probe, ch = cta.probe(x, g)
    cta.update(ch, torch.softmax(torch.randn(64, 10, device="cuda"), 1), torch.zeros(64, dtype=torch.long).cuda())
    assert cta.rates.device.type == "cpu" and (cta.rates < 1).any()
