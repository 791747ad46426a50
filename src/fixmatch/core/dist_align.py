"""Distribution alignment of the pseudo-label probabilities (an option; off in the paper's FixMatch).

From ReMixMatch (Berthelot et al., 2020), also offered with FixMatch by later SSL libraries: the weak view's
class probabilities are multiplied by p_target / p_model and renormalised before the threshold and the
argmax. p_model is the model's average prediction on unlabeled data (the mean of the last ``window`` batch
means), p_target the class distribution of the labeled split. A model that under-predicts some classes (a
few labeled images per class that happen to be atypical) thereby gets more pseudo-labels for those classes
and fewer for the ones it favours.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

DEFAULT_WINDOW = 128  # batches averaged into p_model, as in ReMixMatch
MIN_P_MODEL = 1e-6


class DistributionAlignment:
    """``align(probs)`` records ``probs``' batch mean in p_model, then returns the aligned probabilities.

    ``p_target`` None means uniform (a class-balanced labeled split): the factor is then the same for every
    class and cancels in the renormalisation, so it is left out. ``reduce`` averages the batch mean over
    processes (each rank sees a slice of the global batch), so that every rank aligns with the same p_model.
    """

    def __init__(self, p_target: Tensor | None = None, window: int = DEFAULT_WINDOW,
                 reduce: Callable[[Tensor], Tensor] | None = None) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.p_target = p_target
        self.window = window
        self.reduce = reduce
        self.history: deque[Tensor] = deque(maxlen=window)
        self._evicted: Tensor | None = None  # what the last call pushed out of the window (for drop_last)

    @staticmethod
    def target_from_labels(labels: Tensor, num_classes: int) -> Tensor | None:
        """The labeled split's class distribution, or None when it is uniform."""
        counts = torch.bincount(labels, minlength=num_classes)
        if bool((counts == counts[0]).all()):
            return None
        return counts.double().div(counts.sum()).float()

    def p_model(self) -> Tensor:
        # Recomputed from the stored batch means (at most window x classes values) rather than kept as a
        # running sum, whose rounding would drift from the plain mean over a long run.
        return torch.stack(list(self.history)).mean(0)

    def __call__(self, probs: Tensor) -> Tensor:
        batch_mean = probs.mean(0)
        if self.reduce is not None:
            batch_mean = self.reduce(batch_mean)
        self._evicted = self.history[0] if len(self.history) == self.window else None
        self.history.append(batch_mean)
        # A class whose probability underflows to 0 on every recent sample would divide by 0: floor p_model.
        aligned = probs / self.p_model().clamp_min(MIN_P_MODEL)
        if self.p_target is not None:
            if self.p_target.device != aligned.device:  # once: not a host-to-device copy every step
                self.p_target = self.p_target.to(aligned.device)
            aligned = aligned * self.p_target
        return aligned / aligned.sum(1, keepdim=True)

    def drop_last(self) -> None:
        """Undoes the last call's record, restoring the batch mean it pushed out of the window.

        For a step that the non-finite guard skips (nonfinite.py): its batch mean, possibly NaN, must not
        enter p_model, as its gradients do not enter the weights.
        """
        self.history.pop()
        if self._evicted is not None:
            self.history.appendleft(self._evicted)
            self._evicted = None

    def state_dict(self) -> dict[str, Any]:
        history = torch.stack(list(self.history)).cpu() if self.history else torch.empty(0)
        return {"window": self.window, "history": history}

    def load_state_dict(self, state: dict[str, Any], device: torch.device | None = None) -> None:
        self.window = int(state["window"])
        self.history = deque((row.to(device) for row in state["history"]), maxlen=self.window)
