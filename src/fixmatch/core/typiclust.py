"""TypiClust: which images to label on a small budget (Hacohen, Dekel & Weinshall, ICML 2022, "Active learning on
a budget: opposite strategies suit high and low budgets").

Given image features (N, D), a budget B and the L images already labeled:

1. L2-normalise the features (the paper's code normalises its SimCLR features before everything else).
2. k-means into B + L clusters: scikit-learn's ``KMeans`` up to ``KMEANS_MAX_CLUSTERS`` clusters, as the authors'
   code does, or when the whole set fits in one mini-batch; ``MiniBatchKMeans`` (batches of ``MINIBATCH_SIZE``,
   the authors' value) above that (their cap of 500 clusters is not applied). Clusters are renumbered from the
   largest (0) down.
3. B times: take the largest cluster that holds no labeled or already chosen image (ties: the lower cluster id)
   and pick its most *typical* image not yet taken: typicality(x) = 1 / mean Euclidean distance from x to its
   k = 20 nearest neighbours. As in the authors' code, the neighbours are searched *within the cluster*, among
   its images not yet labeled or chosen, with k = min(20, m // 2) for a cluster of m such images, so that a small
   cluster's density is not measured against the whole cluster. The distance is Euclidean, as the paper defines
   it (the authors' code averages squared distances, faiss's IndexFlatL2 output).

When every cluster without a labeled image has had its pick, picks go on as the authors' code goes on: it sorts the
clusters by labeled images (fewest first), then size (largest first), and cycles through them; so the next pick
comes from the cluster with the fewest images chosen in this call, then the fewest labeled, then the largest.
Small clusters (at most ``MIN_CLUSTER_SIZE`` images) are outliers: the authors' code drops them; here they come
after every larger cluster, so that a budget larger than the usable clusters can still be spent.

The result is fully determined by the features, the labeled set and the seed (k-means' initialisation).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Pick", "typiclust", "typicality", "kmeans_clusters", "l2_normalize", "K_NEIGHBOURS",
           "MIN_CLUSTER_SIZE", "KMEANS_MAX_CLUSTERS", "MINIBATCH_SIZE"]

K_NEIGHBOURS = 20  # neighbours whose mean distance measures density (the paper's K)
MIN_CLUSTER_SIZE = 5  # clusters of at most this many images are outliers, used last (the authors' code drops them)
KMEANS_MAX_CLUSTERS = 50  # full k-means up to this many clusters, mini-batch k-means above (the authors' threshold)
MINIBATCH_SIZE = 5000  # images per MiniBatchKMeans step (the authors' value); a set this small gets full k-means
_KMEANS_INITS = 3  # k-means++ restarts, best inertia kept; fixed so the result does not depend on sklearn's default
_EPS = 1e-12  # identical images have mean distance 0: their typicality is large, not a division by zero


@dataclass(frozen=True)
class Pick:
    """One image to label: its row in the features, its cluster, that cluster's size and the image's typicality."""

    index: int
    cluster: int  # 0 = the largest cluster
    cluster_size: int  # images in the cluster, labeled ones included
    typicality: float  # 1 / mean distance to its nearest neighbours in the cluster (0.0: no neighbour left)


def l2_normalize(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit Euclidean length (float64); an all-zero row stays zero."""
    x = np.asarray(features, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, _EPS)


def kmeans_clusters(features: np.ndarray, n_clusters: int, seed: int) -> np.ndarray:
    """Cluster id of every row, ids renumbered by cluster size (0 = largest; equal sizes keep k-means' order)."""
    from sklearn.cluster import KMeans, MiniBatchKMeans  # imported here: only the advisor pays for scikit-learn

    x = np.ascontiguousarray(features, dtype=np.float32)  # float32 halves k-means' memory traffic
    n = x.shape[0]
    if n_clusters <= KMEANS_MAX_CLUSTERS or n <= MINIBATCH_SIZE:
        km = KMeans(n_clusters=n_clusters, n_init=_KMEANS_INITS, random_state=seed)
    else:
        km = MiniBatchKMeans(n_clusters=n_clusters, batch_size=MINIBATCH_SIZE, n_init=_KMEANS_INITS,
                             random_state=seed)
    raw = km.fit_predict(x)
    sizes = np.bincount(raw, minlength=n_clusters)
    order = np.lexsort((np.arange(n_clusters), -sizes))  # largest first, then k-means' id
    rank = np.empty(n_clusters, dtype=np.int64)
    rank[order] = np.arange(n_clusters)
    return rank[raw]


def typicality(features: np.ndarray, k: int = K_NEIGHBOURS) -> np.ndarray:
    """1 / mean Euclidean distance of each row to its ``k`` nearest other rows (at most ``len(features) - 1``)."""
    from sklearn.neighbors import NearestNeighbors

    x = np.asarray(features, dtype=np.float64)
    k = min(k, x.shape[0] - 1)
    if k < 1:
        return np.zeros(x.shape[0])  # a lone image has no neighbour to measure its density against
    # kneighbors() without a query set leaves each point out of its own neighbours, even among duplicates.
    distances, _ = NearestNeighbors(n_neighbors=k).fit(x).kneighbors()
    return 1.0 / (distances.mean(axis=1) + _EPS)


def typiclust(features: np.ndarray, budget: int, labeled: Sequence[int] = (), *, seed: int = 0,
              k: int = K_NEIGHBOURS) -> list[Pick]:
    """The ``budget`` images to label next, in the order picked (largest clusters first).

    ``features``: (N, D) finite; ``labeled``: rows already labeled (never picked, and their clusters are used
    only after every cluster without one); ``seed``: k-means' initialisation.
    """
    x = np.asarray(features)
    if x.ndim != 2 or x.shape[0] < 1 or not np.isfinite(x).all():
        raise ValueError(f"features must be a finite (N, D) array, got shape {x.shape}")
    n = x.shape[0]
    done = np.asarray(list(labeled), dtype=np.int64)
    if done.size and (done.min() < 0 or done.max() >= n or np.unique(done).size != done.size):
        raise ValueError(f"labeled must list distinct rows of the {n} features")
    if not isinstance(budget, (int, np.integer)) or not 1 <= budget <= n - done.size:
        raise ValueError(f"budget must be 1 to {n - done.size} (the rows not labeled), got {budget!r}")
    x = l2_normalize(x)
    n_clusters = int(budget) + done.size
    clusters = kmeans_clusters(x, n_clusters, seed)
    sizes = np.bincount(clusters, minlength=n_clusters)
    labeled_in = np.bincount(clusters[done], minlength=n_clusters)
    chosen_in = np.zeros(n_clusters, dtype=np.int64)
    free = np.ones(n, dtype=bool)
    free[done] = False
    picks: list[Pick] = []
    for _ in range(budget):
        left = np.bincount(clusters[free], minlength=n_clusters)
        # Smallest key wins: not small, fewest chosen, fewest labeled, largest, lowest id (lexsort: last key first).
        usable = np.flatnonzero(left > 0)
        key = np.lexsort((usable, -sizes[usable], labeled_in[usable], chosen_in[usable],
                          sizes[usable] <= MIN_CLUSTER_SIZE))
        c = int(usable[key[0]])
        members = np.flatnonzero(free & (clusters == c))  # ascending: argmax's ties go to the lower index
        typ = typicality(x[members], min(k, members.size // 2))
        best = int(np.argmax(typ))
        index = int(members[best])
        picks.append(Pick(index=index, cluster=c, cluster_size=int(sizes[c]), typicality=float(typ[best])))
        free[index] = False
        chosen_in[c] += 1
    return picks
