"""One typed configuration for a run, resolved as defaults < preset < config file < command line.

The defaults are the paper's CIFAR-10 setting (Sohn et al., 2020, and the official code). Keys are
flat and named as the command-line flags (``num_labels`` <-> ``--num-labels``) so that a YAML file,
a sweep grid and the command line all speak the same language. Unknown keys and bad values raise
``ConfigError`` with one line naming the key and what is accepted, before any work starts. Every YAML file the
project reads goes through ``parse_yaml``: no alias bombs, deep nesting or duplicate keys, and integers are plain
decimals (an integer key takes 64 bits at most).

Every rule about the values lives here, next to the keys, in three kinds:
- a key's type comes from its type hint (``bool``, ``int``, ``float``, ``str``, each optionally ``| None``):
  ``key_types`` reads the hints, so a new ``bool`` key needs no check of its own;
- a key's range or set of values is its ``check`` (``_key``, ``_one_of``);
- rules between keys (``check_combinations``) and between keys and where the run runs, the device and the
  number of processes (``check_runtime``).
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import reprlib
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

# The names of fixmatch.augment.STRONG_AUGMENTS, kept here so that reading a config does not import torch
# (a test checks that the two agree).
STRONG_AUGMENTS = ("randaugment", "randaugment-tf", "randaugment-fixed", "randaugment-3op", "ctaugment")
WEAK_PADDINGS = ("reflect", "zeros")  # fixmatch.augment.WEAK_PADDINGS, likewise
LABEL_SELECTIONS = ("random", "file", "representative", "unrepresentative", "typiclust")  # training/label_selection.py
ALGORITHMS = ("fixmatch", "flexmatch", "freematch", "softmatch")  # core/pseudo_label.py's policies


class ConfigError(ValueError):
    """A configuration key is unknown or its value is invalid (message: one line, with the fix)."""


# The help group of the keys that follow: Config's body calls _section before each group of keys, so that a key's
# group is where it is written (``fixmatch train --help`` lists the keys by group, in this order).
_SECTION = ""


def _section(title: str) -> None:
    global _SECTION
    _SECTION = title


def _key(help: str, check: Callable[[Any], bool] | None = None, accepted: str = "", *,
         choices: tuple[str, ...] = (), metavar: str = "", **kw: Any) -> Any:
    """A config key: ``check`` says which values of the key's type are allowed (None: any), ``accepted`` says it
    in words for errors; a key without ``accepted`` gets its type's words (``_spell_out_types``)."""
    return field(metadata={"help": help, "check": check, "accepted": accepted, "group": _SECTION,
                           "choices": choices, "metavar": metavar}, **kw)


def _one_of(help: str, choices: tuple[str, ...], default: str) -> Any:
    """A key with a fixed set of values: its check, its error message and --help all read ``choices``."""
    return _key(help, lambda v: v in choices, _or_list(choices), choices=choices, default=default)


def _or_list(words: tuple[str, ...]) -> str:
    return " or ".join(words) if len(words) < 3 else f"{', '.join(words[:-1])} or {words[-1]}"


# The checks below see values of the key's type only: the type hint is checked first (validate_overrides).
def _positive_int(v: int) -> bool:
    return v > 0


def _nonneg_int(v: int) -> bool:
    return v >= 0


def _nonneg_float(v: float) -> bool:
    return math.isfinite(v) and v >= 0


def _unit_interval(v: float) -> bool:
    return _nonneg_float(v) and v <= 1


def _positive_float(v: float) -> bool:
    return _nonneg_float(v) and v > 0


_DURATION = re.compile(r"(?:([0-9]{1,6})h)?(?:([0-9]{1,8})m)?(?:([0-9]{1,10})s)?")
DURATION_FORMS = "a duration such as 90s, 15m, 2h or 1h30m"


def parse_budget(text: Any) -> float:
    """Seconds in a ``time_budget``: whole hours, minutes and seconds, in that order ("90s", "15m", "2h", "1h30m")."""
    match = _DURATION.fullmatch(text) if isinstance(text, str) and text else None
    if match is None:
        raise ConfigError(f"invalid time budget {short_repr(text)}; expected {DURATION_FORMS}")
    hours, minutes, seconds = (int(g or 0) for g in match.groups())
    total = 3600 * hours + 60 * minutes + seconds
    if total == 0:
        raise ConfigError(f"time budget {short_repr(text)} is zero; give {DURATION_FORMS}")
    return float(total)


def is_budget(value: Any) -> bool:
    """The check of the ``time_budget`` key (null is checked by the key itself)."""
    try:
        parse_budget(value)
    except ConfigError:
        return False
    return True


def _time_budget(v: str | None) -> bool:
    return v is None or is_budget(v)


@dataclass(frozen=True)
class KeyType:
    """What a key's type hint allows: values of ``base`` (bool, int, float, str), and null where ``nullable``."""
    base: type
    nullable: bool = False

    @classmethod
    def of(cls, hint: Any) -> KeyType:
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        args = typing.get_args(hint) if union else (hint,)
        bases = [a for a in args if a is not type(None)]
        if len(bases) != 1 or not isinstance(bases[0], type):
            raise TypeError(f"a config key holds one type, or one type | None, not {hint}")
        return cls(bases[0], len(bases) < len(args))

    @property
    def name(self) -> str:  # as the hint is written: "str | None"
        return self.base.__name__ + (" | None" if self.nullable else "")

    @property
    def words(self) -> str:
        """What the type accepts, in an error message's words."""
        if self.base is bool:
            return "true, false or null" if self.nullable else "true or false"
        return f"a value of type {self.name}"

    def holds(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        if self.base is int:  # no key needs more than 64 bits: a longer number is a typo, not a setting
            return _is_int(value) and _fits_64_bits(value)
        return isinstance(value, self.base)  # bool is no float or str, and True is no int (above)


@functools.cache
def key_types(schema: type) -> dict[str, KeyType]:
    """Each key of the dataclass ``schema`` (Config, or a subclass adding keys) -> its KeyType, read from the
    resolved type hints (``from __future__ import annotations`` makes them strings until resolved)."""
    hints = typing.get_type_hints(schema)
    return {f.name: KeyType.of(hints[f.name]) for f in fields(schema)}


def _spell_out_types(schema: type) -> type:
    """Keys without ``accepted`` words (bool and str keys) get their type's, so that every key's metadata says
    what it accepts (error messages, --help)."""
    for f in fields(schema):
        if not f.metadata.get("accepted"):
            f.metadata = types.MappingProxyType({**f.metadata, "accepted": key_types(schema)[f.name].words})
    return schema


class _Keys:
    """What every configuration class shares: unknown keys name the nearest known one, and a plain dict of values."""
    _HELP_HINT: str | None = None  # where the keys are listed, for the unknown-key message (None: suggest's own)

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        # The generated __init__ would only say "unexpected keyword argument": name the nearest key as well.
        known = [f.name for f in fields(cls)]
        for name in kwargs:
            if name not in known:
                hint = (cls._HELP_HINT,) if cls._HELP_HINT else ()
                raise TypeError(f"{cls.__name__}() got an unexpected keyword argument {short_repr(name)}; "
                                f"{suggest(name, known, *hint)}")
        return super().__new__(cls)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@_spell_out_types
@dataclass
class Config(_Keys):
    _section("data")
    dataset: str = _key("data set name (cifar10, cifar100, svhn, stl10, mnist, fashion-mnist, synthetic) or "
                        "folder:PATH for your own images", metavar="NAME", default="cifar10")
    data_dir: str = _key("folder searched for (and receiving downloads of) the data set files", metavar="DIR",
                         default="data")
    num_labels: int = _key("labeled training images, split equally over the classes", _positive_int,
                           "a positive integer divisible by the number of classes", default=250)
    split_file: str | None = _key("a saved split.json to reuse instead of drawing a new one", metavar="FILE",
                                  default=None)
    fold: int | None = _key("stl10: label the 1000 images of official fold 0-9 (fold_indices.txt; set --num-labels "
                            "1000); null = draw num_labels per class with the seed, as the official FixMatch code "
                            "does (5000 = every train image)", lambda v: v is None or v in range(10),
                            "an integer 0-9 or null", default=None)
    svhn_extra: bool = _key("svhn: add the 531,131 extra images to the unlabeled pool (the paper uses train only)",
                            default=False)
    label_selection: str = _one_of("which images get labels: random (stratified), file (--split-file), "
                                   "representative / unrepresentative (nearest to / farthest from the class "
                                   "centroid), typiclust (the images fixmatch advise proposes, k-means seeded "
                                   "with --seed); study tools that read the true labels", LABEL_SELECTIONS,
                                   default="random")
    selection_checkpoint: str | None = _key("checkpoint or run directory (a train run's EMA model, or a fixmatch "
                                            "pretrain run) whose features place the images for (un)representative "
                                            "and typiclust selection; null = a fixed random projection of the "
                                            "pixels", metavar="FILE", default=None)
    image_size: int | None = _key("folder data sets: side of the square images; null = the median shorter side, "
                                  "at most 96", lambda v: v is None or _positive_int(v), "a positive integer or null",
                                  default=None)
    on_bad_image: str = _one_of("folder data sets: error (stop and list unreadable images) or skip (leave them "
                                "out)", ("error", "skip"), default="error")
    labels_csv: str | None = _key("the labeled images, as the labeling page saves them: rows index,label (built-in "
                                  "data sets; header required) or path,label (folder data sets, instead of "
                                  "labeled/<class>/); training labels exactly these, num_labels = their number",
                                  metavar="FILE", default=None)
    _section("model")
    model: str = _key("backbone from the model registry (fixmatch models)", metavar="NAME", default="wrn28_2")
    init_weights: str | None = _key("start from these weights: a fixmatch pretrain (or train) run directory or "
                                    "checkpoint, whose model, input channels and size must be this run's, or a local "
                                    "state dict (.safetensors or weights-only torch file); the classifier head is "
                                    "re-initialised", metavar="PATH", default=None)
    _section("algorithm")
    method: str = _one_of("fixmatch, or supervised: the same pipeline with the unlabeled loss off",
                          ("fixmatch", "supervised"), default="fixmatch")
    batch_size: int = _key("B: labeled images per step (the paper's 64)", _positive_int, "a positive integer",
                           default=64)
    mu: int = _key("unlabeled images per step = mu * B (the paper's 7)", _positive_int, "a positive integer",
                   default=7)
    tau: float = _key("confidence threshold for pseudo-labels (the paper's 0.95)",
                      _unit_interval, "a number in [0, 1]", default=0.95)
    lambda_u: float = _key("weight of the unlabeled loss (the paper's 1)", _nonneg_float, "a number >= 0",
                           default=1.0)
    T: float = _key("pseudo-label temperature: 1 (or 0) = hard argmax labels, as the paper and official code; "
                    "any other T > 0 = soft targets softmax(weak logits / T)", _nonneg_float, "a number >= 0",
                    default=1.0)
    lu_norm: str = _one_of("Lu's denominator: all = the mu*B unlabeled samples (the paper), masked = the samples "
                           "over tau only", ("all", "masked"), default="all")
    dist_align: bool = _key("distribution alignment (ReMixMatch): scale the weak view's probabilities by "
                            "p_labeled / p_model before the threshold; not in the paper's FixMatch",
                            default=False)
    algorithm: str = _one_of("how the weak view's prediction becomes a pseudo-label and its weight: fixmatch (a "
                             "fixed tau, the paper), flexmatch (class-wise curriculum thresholds), freematch "
                             "(self-adaptive thresholds + fairness loss) or softmatch (truncated Gaussian weights)",
                             ALGORITHMS, default="fixmatch")
    flexmatch_warmup: bool = _key("--algorithm flexmatch: threshold warm-up, the never-confident samples count in "
                                  "beta's denominator (the paper's and USB's default)", default=True)
    threshold_momentum: float = _key("--algorithm freematch/softmatch: momentum of the EMAs of the confidence "
                                     "statistics (the papers' 0.999)", lambda v: _unit_interval(v) and v < 1,
                                     "a number in [0, 1)", default=0.999)
    freematch_fairness_weight: float = _key("--algorithm freematch: weight of the self-adaptive fairness loss (USB's "
                                            "CIFAR-10 0.001)", _nonneg_float, "a number >= 0", default=0.001)
    softmatch_n_sigma: float = _key("--algorithm softmatch: the Gaussian's width divisor n_sigma (the paper's 2)",
                                    _positive_float, "a number > 0", default=2.0)
    _section("augmentation")
    weak_flip: bool | None = _key("random horizontal flip in the weak view; null = the data set's default",
                                  default=None)
    weak_translate: float = _key("max random translation of the weak view, as a fraction of the side (4 px at 32)",
                                 lambda v: _unit_interval(v) and v < 0.5, "a number in [0, 0.5)", default=0.125)
    weak_padding: str = _one_of("border of the weak view's translation: reflect (the official code) or zeros "
                                "(black, for objects on a black background that reach the edges)", WEAK_PADDINGS,
                                default="reflect")
    strong: str = _one_of("strong augmentation policy (augment/randaugment_variants.py says where each comes from)",
                          STRONG_AUGMENTS, default="randaugment")
    randaugment_ops: int = _key("--strong randaugment: ops drawn per image, with replacement (the paper's 2)",
                                _positive_int, "a positive integer", default=2)
    randaugment_prob: float = _key("--strong randaugment: probability that each drawn op is applied (the paper's "
                                   "0.5; 1 = always)", _unit_interval, "a number in [0, 1]", default=0.5)
    cutout: float = _key("Cutout square side as a fraction of the image side after RandAugment; 0 = off",
                         _unit_interval, "a number in [0, 1]", default=0.5)
    fill: float | None = _key("value in [0, 1] of the pixels that Cutout and the strong policy's geometric ops leave "
                              "empty; null = the policy's own (0.5 grey for the paper's RandAugment)",
                              lambda v: v is None or _unit_interval(v), "a number in [0, 1] or null", default=None)
    _section("optimisation")
    steps: int = _key("K: total optimiser steps, also the K of the cosine schedule (the paper's 2^20)",
                      _positive_int, "a positive integer", default=2**20)
    time_budget: str | None = _key("how long the run may take (90s, 15m, 2h, 1h30m): a short timed calibration at "
                                   "the start chooses steps (at most --steps) and eval_every, written into "
                                   "config.yaml (training/budget.py); null = train --steps steps", _time_budget,
                                   "a duration such as 90s, 15m, 2h or 1h30m, or null", metavar="DURATION",
                                   default=None)
    lr: float = _key("SGD step size at step 0; decays as lr * cos(7*pi*k / (16*K))", _positive_float,
                     "a number > 0", default=0.03)
    momentum: float = _key("SGD momentum (Nesterov)", lambda v: _unit_interval(v) and v < 1, "a number in [0, 1)",
                           default=0.9)
    nesterov: bool = _key("use Nesterov momentum, as the paper does", default=True)
    wd: float = _key("L2 weight decay on convolution and linear weights only (the paper's 5e-4)",
                     _nonneg_float, "a number >= 0", default=5e-4)
    optimizer: str = _one_of("sgd (the paper: momentum, Nesterov), adam (L2 decay) or adamw (decoupled decay); "
                             "decay on kernels only in all three", ("sgd", "adam", "adamw"), default="sgd")
    schedule: str = _one_of("learning-rate schedule: cosine (lr * cos(7*pi*k/16K)), plateau (times plateau_factor "
                            "after plateau_patience evaluations without a better test_acc) or constant",
                            ("cosine", "plateau", "constant"), default="cosine")
    warmup: int = _key("steps of linear warm-up from lr/warmup to lr before the schedule; 0 = none (the paper)",
                       _nonneg_int, "an integer >= 0", default=0)
    plateau_factor: float = _key("plateau schedule: the lr is multiplied by this when accuracy stalls",
                                 lambda v: _unit_interval(v) and 0 < v < 1, "a number in (0, 1)", default=0.5)
    plateau_patience: int = _key("plateau schedule: evaluations without improvement before the lr drops",
                                 _nonneg_int, "an integer >= 0", default=3)
    ema: float = _key("decay of the exponential moving average of the weights used for evaluation; "
                      "0 = no EMA (evaluate the raw weights)",
                      lambda v: _unit_interval(v) and v < 1, "a number in [0, 1)", default=0.999)
    _section("evaluation and logging")
    eval_every: int = _key("steps between evaluations and checkpoints (1024 = the paper's 64k-image epoch)",
                           _positive_int, "a positive integer", default=1024)
    eval_batch_size: int = _key("images per forward pass at evaluation", _positive_int, "a positive integer",
                                default=1024)
    progress: bool = _key("show a progress bar", default=True)
    _section("speed and processes")  # training/speed.py, step.py, distributed.py
    device: str = _key("auto (cuda when available), cpu, cuda or cuda:N", lambda v: v in ("auto", "cpu", "cuda")
                       or re.fullmatch(r"cuda:\d+", v) is not None,
                       "auto, cpu, cuda or cuda:N", metavar="{auto,cpu,cuda,cuda:N}", default="auto")
    channels_last: bool = _key("channels-last memory format (faster convolutions on most CPUs and GPUs)",
                               default=True)
    amp: str = _one_of("mixed precision of the forward pass: none (fp32), bf16 (CUDA; CPUs with bf16 units) or fp16 "
                       "(CUDA, with loss scaling)", ("none", "bf16", "fp16"), default="none")
    compile: bool = _key("torch.compile the model (needs a C++ compiler on the CPU); the first steps are slow",
                         default=False)
    weak_no_grad: bool = _key("run the weak unlabeled view in its own no-grad forward: about a third less compute; "
                              "BatchNorm then normalises it with its own batch statistics (training/step.py)",
                              default=False)
    sync_bn: bool = _key("several processes (torchrun) on CUDA: BatchNorm statistics over all processes' batches",
                         default=False)
    _section("run")  # with train's --out and --resume
    seed: int = _key("seed of the split, the initial weights, the data order and the augmentations",
                     lambda v: 0 <= v < 2**31,
                     "an integer in [0, 2^31)", default=0)
    on_nonfinite: str = _one_of("a NaN/inf loss or gradient: stop (naming the step and the last good checkpoint) "
                                "or skip the step and count it in nonfinite_steps (nonfinite.py)", ("stop", "skip"),
                                default="stop")



# Keys that may differ when a run is resumed: they change where and how it runs, not what it computes.
RESUME_MUTABLE_KEYS = frozenset({"data_dir", "device", "progress", "on_nonfinite", "compile"})


@_spell_out_types
@dataclass
class PretrainConfig(_Keys):
    """``fixmatch pretrain``: SimCLR contrastive pretraining of a registry backbone (training/pretrain.py). Keys that
    Config also has mean the same there; the defaults are SimCLR's CIFAR recipe scaled down for a CPU."""
    _HELP_HINT = "see fixmatch pretrain --help for the known keys"  # no annotation: a class attribute, not a key
    _section("data")
    dataset: str = _key("data set name (as for train) or folder:PATH; its labels are never used for training",
                        metavar="NAME", default="cifar10")
    data_dir: str = _key("folder searched for (and receiving downloads of) the data set files", metavar="DIR",
                         default="data")
    image_size: int | None = _key("folder data sets: side of the square images; null = the median shorter side, "
                                  "at most 96 (train must use the same size to start from these weights)",
                                  lambda v: v is None or _positive_int(v), "a positive integer or null", default=None)
    on_bad_image: str = _one_of("folder data sets: error (stop and list unreadable images) or skip (leave them "
                                "out)", ("error", "skip"), default="error")
    _section("model")
    # The CPU presets' network (fashion-mnist, cpu-small): two views of every image per step cost 6 forward passes'
    # worth of compute, which a Wide ResNet makes hours on a CPU.
    model: str = _key("backbone from the model registry (train --init-weights needs the same)", metavar="NAME",
                      default="cnn_small")
    proj_dim: int = _key("output width of the projection head (SimCLR's 128); the head is dropped afterwards",
                         _positive_int, "a positive integer", default=128)
    proj_hidden: int | None = _key("hidden width of the projection head Linear-BN-ReLU-Linear; null = the backbone's "
                                   "feature width (SimCLR's)", lambda v: v is None or _positive_int(v),
                                   "a positive integer or null", default=None)
    _section("contrastive loss and optimisation")
    # SimCLR's CIFAR-10 setting (appendix B.9): with few negatives per batch a low temperature makes the loss chase
    # the hardest ones and gets unstable; t = 0.5 was its best for small batches.
    temperature: float = _key("NT-Xent temperature t (SimCLR's CIFAR-10 0.5)", _positive_float, "a number > 0",
                              default=0.5)
    steps: int = _key("optimiser steps; the cosine schedule reaches 0 at the last", _positive_int,
                      "a positive integer", default=1000)
    batch_size: int = _key("images per step, each seen as two views (2B views, 2B - 2 negatives per view)",
                           lambda v: v >= 2, "an integer >= 2", default=128)
    lr: float = _key("SGD step size after the warm-up; decays as lr * (1 + cos(pi*k/K)) / 2 to 0 at step K",
                     _positive_float, "a number > 0", default=0.3)
    momentum: float = _key("SGD momentum (SimCLR's LARS 0.9; plain SGD here)",
                           lambda v: _unit_interval(v) and v < 1, "a number in [0, 1)", default=0.9)
    wd: float = _key("L2 weight decay on convolution and linear weights only", _nonneg_float, "a number >= 0",
                     default=1e-4)
    warmup: int = _key("steps of linear warm-up from lr/warmup to lr (SimCLR warms up over its first 10 epochs)",
                       _nonneg_int, "an integer >= 0", default=50)
    _section("views")  # augment/contrastive.py
    crop_scale: float = _key("smallest area fraction of the random resized crop (SimCLR's 0.08)",
                             lambda v: _unit_interval(v) and v > 0, "a number in (0, 1]", default=0.08)
    flip: bool | None = _key("random horizontal flip; null = the data set's default (none for digits)", default=None)
    jitter: float = _key("colour-jitter strength s of colour images (SimCLR's CIFAR 0.5; 0 = off); grey images get "
                         "none", _nonneg_float, "a number >= 0", default=0.5)
    grey_prob: float = _key("probability that a colour image's view is made grey (SimCLR's 0.2)", _unit_interval,
                            "a number in [0, 1]", default=0.2)
    # Measured on Fashion-MNIST: kNN accuracy 73.1% with 2 layers, 63.7% without (the untrained network: 72.0%),
    # `fixmatch pretrain --dataset fashion-mnist --steps 150 --lr 0.3 --warmup 15 --crop-scale 0.3
    # --randaugment-ops 2` (or 0); grey images have no colour distortion to make the views differ.
    randaugment_ops: int | None = _key("RandAugment layers added after the crop (the train --strong ops, no Cutout); "
                                       "0 = SimCLR's views only; null = 2 on grey images, 0 on colour images (which "
                                       "get SimCLR's colour distortion instead)",
                                       lambda v: v is None or _nonneg_int(v), "an integer >= 0 or null", default=None)
    _section("evaluation and logging")
    eval_every: int = _key("steps between kNN evaluations and checkpoints", _positive_int, "a positive integer",
                           default=250)
    eval_batch_size: int = _key("images per forward pass when computing features", _positive_int,
                                "a positive integer", default=1024)
    knn_k: int = _key("neighbours in the kNN monitor (weighted vote, Wu et al. 2018's k = 200)", _positive_int,
                      "a positive integer", default=200)
    knn_bank: int | None = _key("training images in the kNN monitor's memory bank, a fixed random subset drawn with "
                                "the seed (features of all 50-60k images would take longer than the steps "
                                "between evaluations on a CPU); null = all", lambda v: v is None or _positive_int(v),
                                "a positive integer or null", default=10000)
    progress: bool = _key("show a progress bar", default=True)
    _section("speed")
    device: str = _key("auto (cuda when available), cpu, cuda or cuda:N", lambda v: v in ("auto", "cpu", "cuda")
                       or re.fullmatch(r"cuda:\d+", v) is not None,
                       "auto, cpu, cuda or cuda:N", metavar="{auto,cpu,cuda,cuda:N}", default="auto")
    channels_last: bool = _key("channels-last memory format (faster convolutions on most CPUs and GPUs)",
                               default=True)
    _section("run")
    seed: int = _key("seed of the initial weights, the data order, the views and the kNN bank",
                     lambda v: 0 <= v < 2**31, "an integer in [0, 2^31)", default=0)



# What a resumed pretraining may change: where and how it runs, not what it computes.
PRETRAIN_RESUME_MUTABLE_KEYS = frozenset({"data_dir", "device", "progress"})

# The paper's training hyper-parameters (the official code's defaults), shared by the presets of its data sets:
# B=64, mu=7, 2^20 steps, evaluation every 1024 steps (the paper's 64k-image "epoch").
_PAPER_TRAINING: dict[str, Any] = dict(steps=2**20, eval_every=1024, batch_size=64, mu=7, tau=0.95, lambda_u=1.0,
                                       lr=0.03, wd=5e-4, ema=0.999)

PRESETS: dict[str, dict[str, Any]] = {
    # The paper's data sets, each with the network and weight decay the paper used for it; num_labels is the
    # middle of the paper's three label counts (STL-10 has one). The weak view's flip (none for SVHN) and shift
    # (4 px at 32x32, 12 px at 96x96) follow from the data set (augment/views.py NO_FLIP_DATASETS, weak_translate).
    "cifar10": dict(dataset="cifar10", model="wrn28_2", num_labels=250, **_PAPER_TRAINING),
    # WRN-28-8 (the official code's 128 filters) and twice the weight decay.
    "cifar100": dict(dataset="cifar100", model="wrn28_8", num_labels=2500, **{**_PAPER_TRAINING, "wd": 1e-3}),
    # SVHN's 73,257 training images only (the paper's protocol; --svhn-extra adds the extra set).
    "svhn": dict(dataset="svhn", model="wrn28_2", num_labels=250, **_PAPER_TRAINING),
    # 1000 labels drawn with the seed from the 5000 training images, as the official code's splits are (--fold
    # labels an official fold instead); the 100,000 unlabeled images join the pool. WRN-37-2: the official
    # code's four scales at 96x96.
    "stl10": dict(dataset="stl10", model="wrn37_2", num_labels=1000, **_PAPER_TRAINING),
    # A real FixMatch run that finishes in under 10 minutes on a 2-core CPU (benchmarks/RESULTS.md): a small CNN and the
    # paper's mu, tau and lambda_u; B=32 (per image, the fastest batch on such a CPU; the paper's 64 over half the steps
    # was no better); a short schedule with a faster EMA (0.999 averages over ~1000 steps, a third of this run);
    # evaluation batches of 256 (faster on a CPU than 1024). No Cutout: on 28x28 garments a 14-pixel grey square hides
    # what tells shirt, pullover and coat apart (2.7 points on average over 3 seeds; no other strong policy beat plain
    # RandAugment: docs/results/fashion-mnist-augmentation). The weak view in its own no-grad forward (step.py) is
    # 1.6-2.3x faster on a CPU, so 3500 steps fit, and was more accurate on every seed
    # (studies/fashion-mnist-weak-no-grad.yaml, benchmarks/RESULTS.md).
    "fashion-mnist": dict(dataset="fashion-mnist", model="cnn_small", num_labels=40, steps=3500, eval_every=250,
                          batch_size=32, mu=7, tau=0.95, lambda_u=1.0, lr=0.03, wd=5e-4, ema=0.99, cutout=0.0,
                          eval_batch_size=256, weak_no_grad=True),
    # Your own images on a CPU, with --dataset folder:PATH: the fashion-mnist preset's CPU settings (the small CNN,
    # B=32, the weak view in its own no-grad forward, EMA 0.99, evaluation batches of 256) on images made 32x32,
    # and 15 minutes of training chosen by a timed calibration (budget.py) rather than a step count. The paper's
    # Cutout stays: the fashion-mnist preset drops it for garments, not for photos.
    "cpu-small": dict(model="cnn_small", image_size=32, time_budget="15m", eval_every=250, batch_size=32, mu=7,
                      tau=0.95, lambda_u=1.0, lr=0.03, wd=5e-4, ema=0.99, eval_batch_size=256, weak_no_grad=True),
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def _field_map(schema: type = Config) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in fields(schema)}


def _coerce(value: Any, kind: KeyType) -> Any:
    """Accept ints for float keys (``lr: 1`` in YAML); the type check refuses everything else of another type."""
    if kind.base is float and _is_int(value):
        try:
            return float(value)
        except OverflowError:  # beyond any float: refused as the int it is
            return value
    return value


def validate_overrides(overrides: dict[str, Any], source: str, schema: type = Config) -> dict[str, Any]:
    """Check that every key exists and every value has its key's type (from ``schema``'s type hints) and passes
    its key's check; return coerced values."""
    known, kinds = _field_map(schema), key_types(schema)
    out: dict[str, Any] = {}
    for name, value in overrides.items():
        if name not in known:
            raise unknown_key_error(name, source, schema=schema)
        f, kind = known[name], kinds[name]
        value = _coerce(value, kind)
        check = f.metadata.get("check")
        if not kind.holds(value) or (check is not None and not check(value)):
            want = f.metadata.get("accepted") or kind.words
            if _is_int(value) and not _fits_64_bits(value):
                want += " (at most 2^63 - 1 in magnitude)"
            raise ConfigError(f"invalid value for '{name}' in {source}: {short_repr(value)}; expected {want}")
        out[name] = value
    return out


LIST_KEYS_HINT = "see fixmatch train --help for the known keys"


def closest_name(name: Any, known: Iterable[str]) -> str | None:
    """The known name nearest to a misspelt ``name`` (difflib's ratio >= 0.6), or None.

    Case, dashes and underscores do not count: 'num-labels', '--Num_Labels' and 'num_labels' are one name.
    """
    if not isinstance(name, str) or len(name) > 100:  # a long or non-text key is nobody's typo of a short name
        return None
    by_norm = {_norm_name(k): k for k in known}
    match = difflib.get_close_matches(_norm_name(name), by_norm, n=1)
    return by_norm[match[0]] if match else None


def _norm_name(name: str) -> str:
    return name.strip().lstrip("-").replace("-", "_").lower()


def suggest(name: Any, known: Iterable[str], listing: str = LIST_KEYS_HINT) -> str:
    """"did you mean 'x'?" for the closest known name; else ``listing``, which says where to find them all."""
    close = closest_name(name, known)
    return f"did you mean '{close}'?" if close is not None else listing


def unknown_key_error(name: Any, source: str, also: Iterable[str] = (), schema: type = Config) -> ConfigError:
    """The error for a key that is no config key (nor one of ``also``, other names valid where it was found)."""
    return ConfigError(f"unknown config key {short_repr(name)} in {source}; "
                       f"{suggest(name, [*_field_map(schema), *also])}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fits_64_bits(value: int) -> bool:
    return -(2**63) <= value < 2**63


# --------------------------------------------------------------------------------------------- YAML files
# Config files, study files and RUN_DIR/config.yaml are flat or a few levels deep and hold at most a few thousand
# values. Anything beyond these limits is refused while the file is composed, before any value is built: an alias
# bomb ("billion laughs") would otherwise expand to billions of values wherever it is walked or printed.
MAX_YAML_DEPTH = 20
MAX_YAML_VALUES = 10_000
_PLAIN_INT = re.compile(r"[-+]?[0-9]+")  # ASCII digits only: no 1_000, 0x10, 017 (octal) or 1:30 (base 60)
_MAX_INT_DIGITS = 100  # longer digit strings stay text (Python refuses to convert > 4300 digits anyway)


class _YAMLRefused(yaml.YAMLError):
    """A YAML file that is well-formed but beyond what a configuration needs (message: one line, with the fix)."""


class _GuardedLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses nesting deeper than MAX_YAML_DEPTH, documents whose aliases expand beyond
    MAX_YAML_VALUES values, aliases to the collection that contains them, and a key given twice in one mapping.

    ``_expanded`` counts the values of the document as if every alias were written out: a node adds 1, an alias
    adds the expanded size of the node it names (its own count when it was composed), so a bomb is refused after
    MAX_YAML_VALUES steps whatever it would expand to.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._expanded = 0
        self._sizes: dict[int, int] = {}  # id(node) -> expanded size, for the nodes an alias may name

    def _count(self, n: int, mark: yaml.Mark) -> None:
        self._expanded += n
        if self._expanded > MAX_YAML_VALUES:
            raise _YAMLRefused(f"more than {MAX_YAML_VALUES} values once its aliases are expanded (line "
                               f"{mark.line + 1}); write the values out or use fewer aliases")

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            node = self.anchors.get(event.anchor)
            if node is not None:  # an undefined alias is yaml's own error
                if id(node) not in self._sizes:
                    raise _YAMLRefused(f"alias *{_clip(event.anchor)} on line {event.start_mark.line + 1} refers to "
                                       f"a value that contains it; remove the alias")
                self._count(self._sizes[id(node)], event.start_mark)
            return super().compose_node(parent, index)
        mark = self.peek_event().start_mark
        if self._depth >= MAX_YAML_DEPTH:
            raise _YAMLRefused(f"nested more than {MAX_YAML_DEPTH} levels deep (line {mark.line + 1}); a "
                               f"configuration needs a few levels at most")
        before = self._expanded
        self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        self._count(1, mark)
        self._sizes[id(node)] = self._expanded - before
        return node

    def compose_mapping_node(self, anchor: str | None) -> yaml.MappingNode:
        node = super().compose_mapping_node(anchor)
        seen: dict[tuple[str, str], int] = {}
        for key, _ in node.value:
            if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                continue  # merged keys (<<) are meant to be overridden; complex keys are refused later
            line, k = key.start_mark.line + 1, (key.tag, key.value)
            if k in seen:  # yaml would keep the last value silently
                raise _YAMLRefused(f"key {short_repr(key.value)} is given twice (lines {seen[k]} and {line}); "
                                   f"keep one of them")
            seen[k] = line
        return node

    def construct_plain_int(self, node: yaml.ScalarNode) -> int | str:
        """Plain decimal integers only: anything else (1_000, 0x10, Unicode digits, !!int '1:30') stays text,
        which the key's check then refuses by name."""
        text = self.construct_scalar(node)
        return int(text) if _PLAIN_INT.fullmatch(text) and len(text) <= _MAX_INT_DIGITS else text


_INT_TAG = "tag:yaml.org,2002:int"
# YAML 1.1 reads 1_000, 0x10, 017 (= 15) and 1:30 (= 90) as integers: here only plain decimals are integers.
_GuardedLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _INT_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_GuardedLoader.add_implicit_resolver(_INT_TAG, re.compile(r"^[-+]?[0-9]+$"), list("-+0123456789"))
_GuardedLoader.add_constructor(_INT_TAG, _GuardedLoader.construct_plain_int)


def parse_yaml(text: str, source: str) -> Any:
    """yaml.safe_load within the limits above; ConfigError in one line naming ``source`` ("config file x.yaml")."""
    try:
        return yaml.load(text, Loader=_GuardedLoader)  # a SafeLoader: plain data only
    except _YAMLRefused as e:
        raise ConfigError(f"{source}: {e}") from None
    except yaml.MarkedYAMLError as e:
        where = f", line {e.problem_mark.line + 1}" if e.problem_mark is not None else ""
        reason = _clip(str(e.problem or e.context or "malformed"), 120)
        raise ConfigError(f"{source} is not valid YAML ({reason}{where}); fix its syntax") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source} is not valid YAML ({_clip(str(e).splitlines()[0], 120)}); fix its syntax") \
            from None
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as e:  # a date 2001-13-45, !!bool x
        reason = _clip(" ".join(str(e).split()) or type(e).__name__, 120)
        raise ConfigError(f"{source} holds a value that YAML cannot build ({reason}); fix that value") from None
    except RecursionError:  # not reached within MAX_YAML_DEPTH; kept so that no nesting ends in a traceback
        raise ConfigError(f"{source}: nested too deeply; a configuration needs a few levels at most") from None


def read_yaml(path: Path, what: str, option: str) -> Any:
    """Read and parse a YAML file; ``what`` names it in errors ("study file"), ``option`` is where it was given."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}; check the path given to {option}") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:  # a folder, an unreadable or a binary file
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
        raise ConfigError(f"cannot read {what} {path} ({reason}); give {option} a YAML text file") from None
    return parse_yaml(text, f"{what} {path}")


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxlong, _SHORT.maxother = 3, 60, 60, 60


def short_repr(value: Any, limit: int = 60) -> str:
    """repr(value) cut to about ``limit`` characters: an error quotes what it refuses, never all of it."""
    if _is_int(value) and value.bit_length() > 256:  # repr() of a huge int is slow, or refused past 4300 digits
        return f"<a {value.bit_length()}-bit integer>"
    return _clip(_SHORT.repr(value), limit)


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML override file (flat mapping of config keys) and validate it."""
    path = Path(path)
    data = read_yaml(path, "config file", "--config")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of config keys, not {type(data).__name__}")
    return validate_overrides(data, f"config file {path}")


def resolve_config(preset: str | None = None, config_file: str | Path | None = None,
                   overrides: dict[str, Any] | None = None, base: Config | None = None,
                   overrides_source: str = "the overrides") -> Config:
    """defaults (or ``base``, a resumed run's saved config) < preset < config file < overrides.

    ``overrides_source`` names where the overrides came from in error messages ("the command line").
    """
    values: dict[str, Any] = base.to_dict() if base is not None else {}
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset '{preset}'; known presets: {', '.join(preset_names())}")
        values.update(PRESETS[preset])
    if config_file is not None:
        values.update(load_config(config_file))
    if overrides:
        values.update(validate_overrides(overrides, overrides_source))
    return Config(**values)


def check_config(config: Config) -> Config:
    """Validate a Config built in Python (the API path), with the same messages as the command line."""
    if not isinstance(config, Config):
        raise ConfigError(f"train() expects a fixmatch.Config, got {type(config).__name__}")
    validate_overrides(config.to_dict(), "the config", type(config))
    check_combinations(config)
    return config


# ------------------------------------------------------------------------------------- rules between keys
def check_combinations(config: Config) -> None:
    """Keys that only one data set, one label selection or one strong policy reads: refused for the others
    rather than ignored.

    Each key's own check cannot see the others, so this runs on the resolved config: by ``train`` and by
    ``fixmatch sweep`` when it validates a study, before any run starts. Rules that need the data (a fold's
    size, the pool's size) are train's, once the data set is loaded.
    """
    if config.fold is not None and config.dataset != "stl10":
        raise ConfigError(f"--fold selects one of STL-10's official labeled folds; it does not apply to "
                          f"{_clip(config.dataset)}: leave it unset")
    if config.svhn_extra and config.dataset != "svhn":
        raise ConfigError(f"--svhn-extra adds SVHN's extra images; it does not apply to {_clip(config.dataset)}")
    if config.labels_csv:  # the file names the labeled images; nothing else may choose them
        other = ("--fold" if config.fold is not None else "--split-file" if config.split_file
                 else f"--label-selection {config.label_selection}" if config.label_selection != "random" else None)
        if other:
            raise ConfigError(f"--labels-csv names the labeled images itself; drop {other}")
    if config.fold is None:  # a fold chooses the labeled images itself
        check_label_selection(config.label_selection, config.split_file)
    strong_policy_options(config.strong, config.randaugment_ops, config.randaugment_prob)
    check_algorithm_keys(config)


# Each algorithm's own keys: refused (at a value other than the default) for the algorithms that do not read them
# (FreeMatch's and SoftMatch's thresholds adapt by themselves: no tau).
ALGORITHM_KEYS = {"tau": ("fixmatch", "flexmatch"), "flexmatch_warmup": ("flexmatch",),
                  "threshold_momentum": ("freematch", "softmatch"),
                  "freematch_fairness_weight": ("freematch",), "softmatch_n_sigma": ("softmatch",)}


def check_algorithm_keys(config: Config) -> None:
    """--algorithm needs pseudo-labels (method fixmatch); each algorithm's own keys stay at their defaults for the
    others, which would ignore them."""
    if config.algorithm != "fixmatch" and config.method != "fixmatch":
        raise ConfigError(f"--algorithm {config.algorithm} needs --method fixmatch (the {config.method} method has "
                          f"no pseudo-labels); drop --algorithm")
    for key, users in ALGORITHM_KEYS.items():
        default = getattr(Config, key)
        if config.algorithm not in users and getattr(config, key) != default:
            raise ConfigError(f"--{key.replace('_', '-')} applies to --algorithm {'/'.join(users)} only, not "
                              f"{config.algorithm}; leave it at its default ({default}) or change --algorithm")


def check_label_selection(label_selection: str, split_file: str | None) -> None:
    """--split-file goes with label_selection file, or with random, which it then replaces (select_labels)."""
    if label_selection == "file" and not split_file:
        raise ConfigError("label_selection 'file' needs --split-file FILE (a split.json from an earlier run)")
    if split_file and label_selection not in ("random", "file"):
        raise ConfigError(f"--split-file is used only with label_selection 'file', not {label_selection!r}; "
                          f"drop one")


def strong_policy_options(strong: str, randaugment_ops: int, randaugment_prob: float) -> dict[str, Any]:
    """make_strong_augment's keyword arguments for the RandAugment options (used by train and show-augment).

    ConfigError where a policy other than randaugment gets a value other than the default: it would ignore it.
    """
    if strong == "randaugment":
        return {"num_ops": randaugment_ops, "prob": randaugment_prob}
    for key, value in (("randaugment_ops", randaugment_ops), ("randaugment_prob", randaugment_prob)):
        default = getattr(Config, key)
        if value != default:
            raise ConfigError(f"--{key.replace('_', '-')} applies to --strong randaugment only, not {strong}; "
                              f"leave it at its default ({default}) or use --strong randaugment")
    return {}


# ------------------------------------------------------------------------------ rules about where a run runs
def check_runtime(config: Config, device_type: str, world_size: int, cpu_compiler: str | None) -> None:
    """Options that this device ("cpu", "cuda"), this number of processes or this machine cannot run, refused
    before anything is written. ``cpu_compiler``: the C++ compiler torch.compile would use on the CPU
    (speed.find_cpu_compiler), None where there is none."""
    check_batch_sizes(config.batch_size, world_size)
    check_amp(config.amp, device_type)
    check_compile(config.compile, device_type, cpu_compiler)
    check_sync_bn(config.sync_bn, device_type)


def check_batch_sizes(batch_size: int, world_size: int) -> None:
    if batch_size % world_size:
        raise ConfigError(f"--batch-size {batch_size} is the global batch and must be divisible by the "
                          f"{world_size} processes; choose a multiple of {world_size}")


def check_amp(amp: str, device_type: str) -> None:
    if amp == "fp16" and device_type != "cuda":
        raise ConfigError("--amp fp16 needs CUDA (float16 with loss scaling); on the CPU use --amp bf16 or none")


def check_compile(compile: bool, device_type: str, cpu_compiler: str | None) -> None:
    """torch.compile generates C++ on the CPU: refuse in one line, before training, if no compiler is there."""
    if compile and device_type == "cpu" and cpu_compiler is None:
        raise ConfigError("--compile on the CPU needs a C++ compiler (g++, c++ or clang++, or $CXX) and none was "
                          "found on PATH; install one or leave --compile off")


def check_sync_bn(sync_bn: bool, device_type: str) -> None:
    if sync_bn and device_type != "cuda":
        raise ConfigError("--sync-bn needs CUDA: PyTorch's SyncBatchNorm runs on GPUs only; leave --sync-bn off "
                          "on the CPU (each process then normalises with its own batch statistics)")


def config_from_dict(data: dict[str, Any], source: str) -> Config:
    return Config(**validate_overrides(data, source))


def describe_keys() -> list[tuple[str, Any, str]]:
    """(key, default, help) for every key: used by ``fixmatch presets`` and the docs."""
    return [(f.name, f.default, f.metadata["help"]) for f in fields(Config)]
