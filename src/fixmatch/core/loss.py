"""The FixMatch objective (Sohn et al., 2020, Eq. 1-4), as one pure function."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class LossStats:
    """Detached per-step statistics (tensors, so that logging does not force a device sync)."""
    loss_s: Tensor
    loss_u: Tensor
    mask_rate: Tensor      # fraction of the mu*B unlabeled samples with a weight > 0 (FixMatch: confidence >= tau)
    pseudo_label: Tensor   # argmax of the weak-view prediction, one per unlabeled sample
    mask: Tensor           # bool, one per unlabeled sample: its weight > 0
    weight: Tensor         # float in [0, 1], one per unlabeled sample: its weight in Lu


def fixmatch_loss(logits_lb: Tensor, y_lb: Tensor, logits_ulb_w: Tensor | None, logits_ulb_s: Tensor | None,
                  tau: float = 0.95, lambda_u: float = 1.0, T: float = 1.0, lu_norm: str = "all",
                  align: Callable[[Tensor], Tensor] | None = None,
                  rank_mean: Callable[[Tensor], Tensor] | None = None,
                  policy: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None) -> tuple[Tensor, LossStats]:
    """Ls + lambda_u * Lu.

    Ls: cross-entropy of the (weakly augmented) labeled batch.
    Lu: cross-entropy of the strong view towards a target from the weak view, counted only where the weak
        view's max softmax >= tau (always the unsharpened softmax, so tau means the same for every T).
        Target: T == 1 or T == 0 (the paper and the official code): the hard pseudo-label argmax of the weak
        view; any other T > 0: the soft label softmax(weak logits / T) (T < 1 sharpens), as in the soft
        variant of the PyTorch SSL libraries.
        lu_norm "all": averaged over ALL mu*B unlabeled samples (masked-out ones count 0), as in the paper and
        the official code; "masked": averaged over the masked samples only (0 when none is).
    align: maps the weak view's class probabilities before the threshold and the target (distribution
        alignment, dist_align.py; None = the paper); soft targets are then the aligned probabilities
        sharpened by T, p**(1/T) renormalised.
    rank_mean: with several processes, the mean of a tensor over ranks (None: one process). lu_norm "masked"
        then divides each rank's sum by the mean masked count, so that the gradient DistributedDataParallel
        averages is that of the global batch's loss (sum over all ranks / global masked count).
    policy: a pseudo-label policy (pseudo_label.py): the (aligned) probabilities -> (pseudo-label, weight in
        [0, 1] per sample); each sample's Lu term is multiplied by its weight, and lu_norm "masked" divides by the
        weights' sum. None: FixMatch's weight 1 where the confidence >= tau, else 0.
    The weak view gives no gradient: the target is fixed.
    With logits_ulb_w None (the supervised baseline), Lu = 0.
    """
    if lu_norm not in ("all", "masked"):
        raise ValueError(f"lu_norm must be 'all' or 'masked', not {lu_norm!r}")
    loss_s = F.cross_entropy(logits_lb, y_lb)
    if logits_ulb_w is None or logits_ulb_s is None:
        zero = loss_s.new_zeros(())
        empty = torch.empty(0, dtype=torch.long, device=logits_lb.device)
        return loss_s, LossStats(loss_s.detach(), zero, zero, empty, empty.bool(), empty.float())
    with torch.no_grad():
        weak = logits_ulb_w.detach().float()
        probs = torch.softmax(weak, dim=1)
        if align is not None:
            probs = align(probs)
        if policy is None:
            confidence, pseudo_label = probs.max(dim=1)
            weight = (confidence >= tau).float()
        else:
            pseudo_label, weight = policy(probs)
        mask = weight > 0
        if T in (0, 1):
            target = pseudo_label
        else:
            soft = torch.softmax(weak / T, dim=1) if align is None else _sharpen(probs, T)
            target = soft.to(logits_ulb_s.dtype)
    per_sample = F.cross_entropy(logits_ulb_s, target, reduction="none") * weight
    if lu_norm == "all":
        loss_u = per_sample.mean()
    else:
        count = weight.sum()
        if rank_mean is not None:
            count = rank_mean(count)
        # Without masked samples anywhere the sum is 0: any positive denominator gives the defined Lu = 0.
        loss_u = per_sample.sum() / count.clamp(min=1e-6)
    loss = loss_s + lambda_u * loss_u
    return loss, LossStats(loss_s.detach(), loss_u.detach(), mask.float().mean(), pseudo_label, mask, weight)


def fairness_loss(logits_ulb_s: Tensor, mask: Tensor, p_t: Tensor, hist: Tensor) -> Tensor:
    """FreeMatch's self-adaptive fairness loss (Wang et al., 2023, Eq. 10), as USB computes it.

    -H(SumNorm(p_t / hist), SumNorm(p_s / hist_s)): p_t, hist are the policy's EMAs of the mean probabilities and
    of the predicted-class histogram; p_s, hist_s the same over the strong view of the masked samples (hist_s has
    no gradient). Classes absent from a histogram get a factor of 0 instead of 1/0. 0 without masked samples.
    """
    logits = logits_ulb_s[mask]
    if logits.shape[0] == 0:
        return logits_ulb_s.new_zeros((), dtype=torch.float32)
    probs = torch.softmax(logits.float(), dim=1)
    hist_s = torch.bincount(probs.argmax(1), minlength=probs.shape[1]).float()
    hist_s = hist_s / hist_s.sum()

    def inverse(h: Tensor) -> Tensor:
        return torch.where(h > 0, 1.0 / h, torch.zeros_like(h))

    target = p_t * inverse(hist)
    target = target / target.sum()
    mean_s = probs.mean(0) * inverse(hist_s)
    mean_s = mean_s / mean_s.sum()
    return (target * torch.log(mean_s + 1e-12)).sum()


def _sharpen(probs: Tensor, T: float) -> Tensor:
    """probs**(1/T), renormalised: softmax(logits / T) for probabilities that are not a softmax of known logits."""
    sharpened = probs.pow(1.0 / T)
    return sharpened / sharpened.sum(dim=1, keepdim=True)
