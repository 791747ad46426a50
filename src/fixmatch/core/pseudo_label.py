"""Pseudo-label policies: the weak view's class probabilities -> (target class, per-sample weight in [0, 1]).

FixMatch and its successors differ only here (and FreeMatch by one extra loss term, ``loss.fairness_loss``):

- ``fixmatch``  (Sohn et al., 2020): weight 1 where the confidence max_c p(c) >= tau, else 0.
- ``flexmatch`` (Zhang et al., 2021, curriculum pseudo-labelling): class-wise thresholds T(c) = tau * M(beta(c)),
  M(x) = x / (2 - x), from each class's learning effect sigma(c) = how many unlabeled samples' latest confident
  (>= tau) prediction is c; beta(c) = sigma(c) / max(max_c sigma, #samples never confident) with threshold warm-up,
  sigma(c) / max_c sigma without. The mask uses the thresholds of the step before (then the batch updates them).
- ``freematch`` (Wang et al., 2023, self-adaptive thresholds): tau_t = EMA of the batch's mean confidence,
  p_t(c) = EMA of the batch's mean probabilities, both from 1/C; class threshold tau_t * p_t(c) / max_c p_t.
  The batch updates the EMAs first, then the mask uses them.
- ``softmatch`` (Chen et al., 2023): weight 1 where the confidence >= mu_t, else the truncated Gaussian
  exp(-(conf - mu_t)^2 / (2 sigma_t^2 / n_sigma^2)); mu_t, sigma_t^2 = EMAs of the batch's mean and unbiased
  variance of the confidence, from 1/C and 1; the probabilities first go through uniform distribution alignment
  (an EMA of the batch mean, from the first batch's), as in the paper. Update first, then the weight.

Definitions, initial values and update order follow the papers and USB (microsoft/Semi-supervised-learning,
semilearn/algorithms/{flexmatch,freematch,softmatch}); where USB's code starts FreeMatch's EMAs at 1 rather than
the paper's 1/C, the paper is followed. Under several processes every statistic is updated from the global batch
(``gather`` concatenates every rank's slice), so all ranks hold the same state, equal to one process's.
Each policy owns its state: ``state_dict`` / ``load_state_dict`` (saved in checkpoints), and ``drop_last``
undoes the last batch's update for a step the non-finite guard skips.
"""
from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from fixmatch.config import ALGORITHMS, Config

Gather = Callable[[Tensor], Tensor]  # every rank's tensor concatenated along dim 0 (None: one process)
DA_EPS = 1e-6  # SoftMatch's uniform alignment: keeps p / p_model finite for a class the model never predicts


class PseudoLabelPolicy(abc.ABC):
    """``policy(probs, idx_ulb)`` -> (pseudo_label, weight): the argmax class and a float weight per sample."""
    name = ""

    def __init__(self, num_classes: int, gather: Gather | None = None) -> None:
        self.num_classes = num_classes
        self.gather = gather
        self._undo: dict[str, Tensor] = {}

    def _global(self, t: Tensor) -> Tensor:
        return self.gather(t) if self.gather is not None else t

    @abc.abstractmethod
    def __call__(self, probs: Tensor, idx_ulb: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The pseudo-labels and weights of a batch; updates the policy's statistics first where it has any."""

    @abc.abstractmethod
    def thresholds(self) -> Tensor:
        """The effective confidence threshold per class (SoftMatch: its mu_t, one value), for the metrics."""

    # The state: named tensors; drop_last restores the values they had before the last call.
    def _tensors(self) -> dict[str, Tensor]:
        return {}

    def _remember(self) -> None:
        self._undo = {k: v.clone() for k, v in self._tensors().items()}

    def drop_last(self) -> None:
        """Undo the last call's update (a skipped step: its possibly NaN statistics stay out)."""
        for k, v in self._undo.items():
            setattr(self, k, v)
        self._undo = {}

    def state_dict(self) -> dict[str, Any]:
        # Copies: the policy updates some of its tensors in place.
        return {"algorithm": self.name, **{k: v.detach().cpu().clone() for k, v in self._tensors().items()}}

    def load_state_dict(self, state: dict[str, Any], device: torch.device | None = None) -> None:
        if state.get("algorithm") != self.name:
            raise ValueError(f"the saved pseudo-label state is {state.get('algorithm')!r}, not {self.name!r}")
        for k, v in self._tensors().items():
            saved = state[k]
            if not isinstance(saved, Tensor) or saved.shape != v.shape:
                raise ValueError(f"pseudo-label state {k!r}: expected a tensor of shape {tuple(v.shape)}")
            setattr(self, k, saved.to(device=device if device is not None else v.device, dtype=v.dtype, copy=True))
        self._undo = {}


class FixMatchPolicy(PseudoLabelPolicy):
    """A fixed threshold tau; no state."""
    name = "fixmatch"

    def __init__(self, num_classes: int, tau: float) -> None:
        super().__init__(num_classes)
        self.tau = tau

    def __call__(self, probs: Tensor, idx_ulb: Tensor | None = None) -> tuple[Tensor, Tensor]:
        confidence, pseudo_label = probs.max(dim=1)
        return pseudo_label, (confidence >= self.tau).float()

    def thresholds(self) -> Tensor:
        return torch.full((self.num_classes,), self.tau)


class FlexMatchPolicy(PseudoLabelPolicy):
    """Curriculum pseudo-labelling; state: ``selected`` (the latest confident class of each pool sample, -1 until
    one) and ``beta`` (the normalised learning effects, recomputed from ``selected`` after every batch)."""
    name = "flexmatch"

    def __init__(self, num_classes: int, tau: float, pool_size: int, warmup: bool = True,
                 gather: Gather | None = None) -> None:
        super().__init__(num_classes, gather)
        self.tau, self.pool_size, self.warmup = tau, pool_size, warmup
        self.selected = torch.full((pool_size,), -1, dtype=torch.long)
        self.beta = torch.zeros(num_classes)  # 0 everywhere: T(c) = 0 until samples become confident

    def _tensors(self) -> dict[str, Tensor]:
        return {"selected": self.selected, "beta": self.beta}

    def _update_beta(self) -> None:
        counts = torch.bincount(self.selected + 1, minlength=self.num_classes + 1)
        never, sigma = counts[0], counts[1:]
        denominator = torch.maximum(sigma.max(), never) if self.warmup else sigma.max()
        beta = sigma.float() / denominator.clamp_min(1).float()
        # As USB: no change while one key (never-confident, or a single class) holds the whole pool.
        self.beta = torch.where(counts.max() < self.pool_size, beta, self.beta)

    def __call__(self, probs: Tensor, idx_ulb: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if idx_ulb is None:
            raise ValueError("flexmatch needs the unlabeled samples' pool indices (Batch.idx_ulb)")
        if self.selected.device != probs.device:  # once: the state follows the batches' device
            self.selected, self.beta = self.selected.to(probs.device), self.beta.to(probs.device)
        confidence, pseudo_label = probs.max(dim=1)
        beta = self.beta[pseudo_label]
        weight = (confidence >= self.tau * beta / (2.0 - beta)).float()
        self._remember()
        confident = self._global(confidence) >= self.tau  # floats: every backend gathers them
        idx, label = self._global(idx_ulb.to(probs.device)), self._global(pseudo_label)
        self.selected[idx[confident]] = label[confident]  # in place: _remember kept the values before
        self._update_beta()
        return pseudo_label, weight

    def thresholds(self) -> Tensor:
        return self.tau * self.beta / (2.0 - self.beta)

    def load_state_dict(self, state: dict[str, Any], device: torch.device | None = None) -> None:
        super().load_state_dict(state, device)
        if bool(((self.selected < -1) | (self.selected >= self.num_classes)).any()):
            raise ValueError(f"pseudo-label state 'selected' holds classes outside -1..{self.num_classes - 1}")


class FreeMatchPolicy(PseudoLabelPolicy):
    """Self-adaptive thresholds; state: ``tau_t``, ``p_t`` and ``hist`` (the EMA of the batch's histogram of
    predicted classes, which only the fairness loss reads)."""
    name = "freematch"

    def __init__(self, num_classes: int, momentum: float = 0.999, gather: Gather | None = None) -> None:
        super().__init__(num_classes, gather)
        self.m = momentum
        self.tau_t = torch.tensor(1.0 / num_classes)
        self.p_t = torch.full((num_classes,), 1.0 / num_classes)
        self.hist = torch.full((num_classes,), 1.0 / num_classes)

    def _tensors(self) -> dict[str, Tensor]:
        return {"tau_t": self.tau_t, "p_t": self.p_t, "hist": self.hist}

    def __call__(self, probs: Tensor, idx_ulb: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._remember()
        batch = self._global(probs)
        batch_conf, batch_label = batch.max(dim=1)
        m = self.m
        self.tau_t = m * self.tau_t.to(probs.device) + (1 - m) * batch_conf.mean()
        self.p_t = m * self.p_t.to(probs.device) + (1 - m) * batch.mean(0)
        counts = torch.bincount(batch_label, minlength=self.num_classes).float()
        self.hist = m * self.hist.to(probs.device) + (1 - m) * counts / counts.sum()
        confidence, pseudo_label = probs.max(dim=1)
        return pseudo_label, (confidence >= self.thresholds()[pseudo_label]).float()

    def thresholds(self) -> Tensor:
        return self.tau_t * self.p_t / self.p_t.max()


class SoftMatchPolicy(PseudoLabelPolicy):
    """Truncated Gaussian weights; state: ``mu_t``, ``var_t`` and (uniform alignment) ``p_model``, NaN until the
    first batch sets it."""
    name = "softmatch"

    def __init__(self, num_classes: int, momentum: float = 0.999, n_sigma: float = 2.0, align: bool = True,
                 gather: Gather | None = None) -> None:
        super().__init__(num_classes, gather)
        self.m, self.n_sigma, self.align = momentum, n_sigma, align
        self.mu_t = torch.tensor(1.0 / num_classes)
        self.var_t = torch.tensor(1.0)
        self.p_model = torch.full((num_classes,), float("nan"))

    def _tensors(self) -> dict[str, Tensor]:
        return {"mu_t": self.mu_t, "var_t": self.var_t, "p_model": self.p_model}

    def aligned(self, probs: Tensor) -> Tensor:
        """Uniform distribution alignment: p * (1/C) / p_model, renormalised (updates p_model first)."""
        batch_mean = self._global(probs).mean(0)
        p_model = self.p_model.to(probs.device)
        self.p_model = torch.where(p_model.isnan(), batch_mean, self.m * p_model + (1 - self.m) * batch_mean)
        aligned = probs * (1.0 / self.num_classes + DA_EPS) / (self.p_model + DA_EPS)
        return aligned / aligned.sum(dim=1, keepdim=True)

    def __call__(self, probs: Tensor, idx_ulb: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._remember()
        if self.align:
            probs = self.aligned(probs)
        batch_conf = self._global(probs).max(dim=1).values
        m = self.m
        self.mu_t = m * self.mu_t.to(probs.device) + (1 - m) * batch_conf.mean()
        if batch_conf.numel() > 1:  # the unbiased variance of one sample is undefined: keep var_t
            self.var_t = m * self.var_t.to(probs.device) + (1 - m) * batch_conf.var(unbiased=True)
        confidence, pseudo_label = probs.max(dim=1)
        below = (confidence - self.mu_t).clamp(max=0.0)
        return pseudo_label, torch.exp(-below.square() / (2 * self.var_t / self.n_sigma ** 2))

    def thresholds(self) -> Tensor:
        return self.mu_t.reshape(1)


def make_policy(config: Config, num_classes: int, pool_size: int, gather: Gather | None = None) -> PseudoLabelPolicy:
    """The policy ``config.algorithm`` names, with its keys."""
    if config.algorithm == "flexmatch":
        return FlexMatchPolicy(num_classes, config.tau, pool_size, config.flexmatch_warmup, gather)
    if config.algorithm == "freematch":
        return FreeMatchPolicy(num_classes, config.threshold_momentum, gather)
    if config.algorithm == "softmatch":
        return SoftMatchPolicy(num_classes, config.threshold_momentum, config.softmatch_n_sigma, gather=gather)
    assert config.algorithm == "fixmatch", ALGORITHMS
    return FixMatchPolicy(num_classes, config.tau)
