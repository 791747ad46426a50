"""Classification metrics shared by training's evaluations and ``fixmatch evaluate``: pure functions, tensors in,
numbers out (the plots of them live with ``evaluate``)."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def accuracy_metrics(logits: Tensor, labels: Tensor) -> dict[str, float]:
    """Top-1 and top-5 accuracy in percent (top-5 is top-k with k = min(5, classes))."""
    k = min(5, logits.shape[1])
    topk = logits.topk(k, dim=1).indices
    correct = topk == labels.view(-1, 1)
    return {"top1": 100.0 * correct[:, 0].float().mean().item(), "top5": 100.0 * correct.any(1).float().mean().item()}


def confusion_matrix(predictions: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """int64 (C, C): entry [i, j] counts images of true class i predicted as class j."""
    index = labels.long() * num_classes + predictions.long()
    return torch.bincount(index, minlength=num_classes * num_classes).view(num_classes, num_classes)


def per_class_accuracy(confusion: Tensor) -> list[float | None]:
    """Recall of each class in percent (None for a class without test images)."""
    support = confusion.sum(1)
    return [100.0 * confusion[i, i].item() / n if n else None for i, n in enumerate(support.tolist())]


def macro_f1(confusion: Tensor) -> float:
    """Unweighted mean over classes of F1 = 2 TP / (2 TP + FP + FN), in percent.

    Classes that neither occur nor are predicted have no F1 and are left out of the mean (as
    scikit-learn does when it infers the labels from the data).
    """
    tp = confusion.diag().double()
    denom = 2 * tp + (confusion.sum(0) - confusion.diag()) + (confusion.sum(1) - confusion.diag())
    present = denom > 0
    if not present.any():
        return 0.0
    return 100.0 * (2 * tp[present] / denom[present]).mean().item()


def classification_metrics(logits: Tensor, labels: Tensor, class_names: list[str]) -> dict[str, Any]:
    """Top-1/top-5, per-class accuracy, macro-F1 and the confusion matrix (as nested lists)."""
    cm = confusion_matrix(logits.argmax(1), labels, len(class_names))
    acc = accuracy_metrics(logits, labels)
    return {"test_acc": acc["top1"], "test_top5": acc["top5"], "macro_f1": macro_f1(cm),
            "per_class_acc": dict(zip(class_names, per_class_accuracy(cm))), "confusion": cm.tolist()}
