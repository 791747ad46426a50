"""The FixMatch objective (Sohn et al., 2020, Eq. 1-4), as one pure function."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class LossStats:
    """Detached per-step statistics (tensors, so that logging does not force a device sync)."""
    loss_s: Tensor
    loss_u: Tensor
    mask_rate: Tensor      # fraction of the mu*B unlabeled samples whose confidence >= tau
    pseudo_label: Tensor   # argmax of the weak-view prediction, one per unlabeled sample
    mask: Tensor           # bool, one per unlabeled sample


def fixmatch_loss(logits_lb: Tensor, y_lb: Tensor, logits_ulb_w: Tensor | None, logits_ulb_s: Tensor | None,
                  tau: float = 0.95, lambda_u: float = 1.0) -> tuple[Tensor, LossStats]:
    """Ls + lambda_u * Lu.

    Ls: cross-entropy of the (weakly augmented) labeled batch.
    Lu: cross-entropy of the strong view towards the hard pseudo-label argmax(softmax(weak view)),
        counted only where max softmax >= tau, and averaged over ALL mu*B unlabeled samples
        (masked-out samples contribute 0 to the numerator), as in the paper and the official code.
    The weak view gives no gradient: the pseudo-label is a fixed target.
    With logits_ulb_w None (the supervised baseline), Lu = 0.
    """
    loss_s = F.cross_entropy(logits_lb, y_lb)
    if logits_ulb_w is None or logits_ulb_s is None:
        zero = loss_s.new_zeros(())
        empty = torch.empty(0, dtype=torch.long, device=logits_lb.device)
        return loss_s, LossStats(loss_s.detach(), zero, zero, empty, empty.bool())
    with torch.no_grad():
        probs = torch.softmax(logits_ulb_w.detach().float(), dim=1)
        confidence, pseudo_label = probs.max(dim=1)
        mask = confidence >= tau
    loss_u = (F.cross_entropy(logits_ulb_s, pseudo_label, reduction="none") * mask).mean()
    loss = loss_s + lambda_u * loss_u
    return loss, LossStats(loss_s.detach(), loss_u.detach(), mask.float().mean(), pseudo_label, mask)
