"""Numerics of contrastive pretraining (``fixmatch pretrain``): the NT-Xent loss and the kNN monitor.

NT-Xent (SimCLR, Chen et al. 2020, eq. 1): a batch of N images gives 2N views; the projections are
L2-normalised, so that their dot products are cosine similarities s. For each view i with positive p(i) (the
other view of the same image):

    l(i) = -log( exp(s[i, p(i)] / t) / sum_{k != i} exp(s[i, k] / t) )

and the loss is the mean of l over all 2N views: each view is once the anchor, the 2N - 2 views of the other
images are its negatives. That is a cross-entropy over each row of the similarity matrix with the diagonal left
out and the positive as the target.

The kNN monitor is the weighted k-nearest-neighbour classifier of Wu et al. (2018, "Unsupervised feature
learning via non-parametric instance discrimination"), which the SSL literature uses to follow a representation
during training without a linear probe: cosine similarities to a memory bank of training features, the k most
similar vote for their label with weight exp(s / t_knn), the class with the largest summed weight wins.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# kNN monitor defaults: Wu et al. 2018's 200 nearest neighbours; their votes weigh exp(cosine / 0.1), the
# temperature of the common CIFAR monitors of MoCo-style code (Wu et al. used 0.07).
KNN_K = 200
KNN_TEMPERATURE = 0.1


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """SimCLR's NT-Xent loss of two views' projections (N, D) each, row i of z1 and of z2 from the same image.

    Computed in float32 whatever the inputs' dtype (exp(s / t) of a low-precision s would round the loss).
    """
    if z1.shape != z2.shape or z1.ndim != 2 or z1.shape[0] < 2:
        raise ValueError(f"nt_xent needs two (N, D) batches with N >= 2, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    logits = z @ z.T / temperature
    # A view is no negative of itself: its own similarity (1 / t) leaves the softmax's denominator.
    logits.fill_diagonal_(float("-inf"))
    positive = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)  # view i's other view
    return F.cross_entropy(logits, positive)


@torch.no_grad()
def knn_predict(bank: Tensor, bank_labels: Tensor, queries: Tensor, num_classes: int, k: int = KNN_K,
                temperature: float = KNN_TEMPERATURE, chunk: int = 1024) -> Tensor:
    """The class each query gets from a weighted vote of its k most cosine-similar bank features.

    ``bank`` (M, D) with int64 labels (M,) in [0, num_classes), ``queries`` (Q, D); returns int64 (Q,). Each of
    the min(k, M) nearest bank entries adds exp(similarity / temperature) to its class; ties between classes go to
    the lower class index (argmax). Queries are compared ``chunk`` at a time, so memory stays at chunk x M.
    """
    bank = F.normalize(bank.float(), dim=1)
    k = min(k, bank.shape[0])
    preds = []
    for start in range(0, queries.shape[0], chunk):
        q = F.normalize(queries[start:start + chunk].float(), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)
        votes = torch.zeros(q.shape[0], num_classes, dtype=torch.float64, device=q.device)
        votes.scatter_add_(1, bank_labels[idx], (sim.double() / temperature).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


def knn_accuracy(bank: Tensor, bank_labels: Tensor, queries: Tensor, query_labels: Tensor, num_classes: int,
                 k: int = KNN_K, temperature: float = KNN_TEMPERATURE) -> float:
    """Top-1 accuracy (%) of ``knn_predict`` on labeled queries."""
    if query_labels.numel() == 0:
        raise ValueError("knn_accuracy needs at least one labeled query")
    pred = knn_predict(bank, bank_labels, queries, num_classes, k, temperature)
    return 100.0 * (pred == query_labels.to(pred.device)).double().mean().item()
