"""Parameter-free expert routing: k-means over neutral features.

Mod-Adapter routes a concept to one of its expert MLPs by the neutral feature
of its concept word: k-means (k = number of experts) is fitted once over the
neutral features of all concept words of the training set, and a word goes to
the expert of its nearest centroid (L2). The centroids are stored in the
adapter (buffer ``router_centroids``) and in its checkpoint.

Determinism: for a given seed the result does not depend on anything but the
features and the device's arithmetic. Random draws come from a CPU
``torch.Generator`` (so the k-means++ choices are the same on CPU and GPU up to
floating-point ties), cluster sums are computed with a one-hot matmul instead
of ``index_add_`` (whose CUDA kernel accumulates with atomics, in no fixed
order), ties break towards the lowest index, and an empty cluster is re-seeded
with the point farthest from its own centroid (lowest index on ties).
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from .errors import ModAdapterError

# Rows processed at once when computing point-to-centroid distances, so that
# fitting over ~10^5 words of 3072 dims never materialises a huge matrix.
_CHUNK_ROWS = 8192


def _check_features(features: torch.Tensor, name: str = "features") -> None:
    if not isinstance(features, torch.Tensor):
        raise ModAdapterError(f"{name} must be a torch.Tensor, got {type(features).__name__}")
    if features.dim() != 2:
        raise ModAdapterError(f"{name} must be a 2-D tensor (count, dim), got shape {tuple(features.shape)}")
    if not features.is_floating_point():
        raise ModAdapterError(f"{name} must be a floating-point tensor, got {features.dtype}")
    if not torch.isfinite(features).all():
        raise ModAdapterError(f"{name} contain NaN or Inf values; recompute them before routing")


def squared_distances(features: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(M, k) squared L2 distances in float32, computed in row chunks."""
    x = features.float()
    c = centroids.float().to(x.device)
    c_sq = (c * c).sum(dim=1)
    out = torch.empty(x.shape[0], c.shape[0], dtype=torch.float32, device=x.device)
    for start in range(0, x.shape[0], _CHUNK_ROWS):
        xs = x[start : start + _CHUNK_ROWS]
        d = (xs * xs).sum(dim=1, keepdim=True) - 2.0 * (xs @ c.T) + c_sq
        # The expansion can go slightly negative by rounding; distances are >= 0.
        out[start : start + _CHUNK_ROWS] = d.clamp_min_(0.0)
    return out


def assign_experts(features: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid (L2) of every row of ``features``.

    features: (M, D); centroids: (k, D). Returns a LongTensor (M,) on the
    features' device. Ties go to the lowest centroid index.
    """
    _check_features(features)
    _check_features(centroids, "centroids")
    if features.shape[1] != centroids.shape[1]:
        raise ModAdapterError(
            f"features have width {features.shape[1]} but the router centroids have width {centroids.shape[1]}; "
            "the neutral features must come from the same base model as the router"
        )
    if centroids.shape[0] == 1:
        return torch.zeros(features.shape[0], dtype=torch.long, device=features.device)
    return squared_distances(features, centroids).argmin(dim=1)


def _cluster_means(x: torch.Tensor, labels: torch.Tensor, k: int):
    """Per-cluster sums via a one-hot matmul (deterministic on CUDA) and counts."""
    sums = torch.zeros(k, x.shape[1], dtype=torch.float32, device=x.device)
    counts = torch.zeros(k, dtype=torch.float32, device=x.device)
    for start in range(0, x.shape[0], _CHUNK_ROWS):
        onehot = torch.nn.functional.one_hot(labels[start : start + _CHUNK_ROWS], k).float()
        sums += onehot.T @ x[start : start + _CHUNK_ROWS]
        counts += onehot.sum(dim=0)
    return sums, counts


def fit_kmeans(
    features: torch.Tensor,
    k: int,
    *,
    seed: int = 0,
    iterations: int = 100,
    device: Optional[Union[str, torch.device]] = None,
) -> torch.Tensor:
    """Fit k-means (k-means++ initialisation, Lloyd iterations).

    features: (M, D) neutral features, one row per distinct concept word.
    Returns the centroids as a float32 CPU tensor (k, D). Deterministic for a
    seed on a given device. Raises ModAdapterError if M < k, if the features
    hold fewer than k distinct rows, or if they contain NaN/Inf.
    """
    _check_features(features)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ModAdapterError(f"k must be a positive integer, got {k!r}")
    if not isinstance(iterations, int) or iterations < 0:
        raise ModAdapterError(f"iterations must be a non-negative integer, got {iterations!r}")
    num_points = features.shape[0]
    if num_points < k:
        raise ModAdapterError(
            f"k-means needs at least k={k} feature rows (one per concept word) but got {num_points}; "
            f"add more concept words or use fewer experts"
        )
    x = features.detach().to(device=device if device is not None else features.device, dtype=torch.float32)
    generator = torch.Generator(device="cpu").manual_seed(int(seed))

    # k-means++: first centre uniformly, then each next one with probability
    # proportional to the squared distance to the nearest chosen centre.
    first = int(torch.randint(num_points, (1,), generator=generator).item())
    centroids = x[first : first + 1].clone()
    nearest = squared_distances(x, centroids)[:, 0]
    for _ in range(1, k):
        weights = nearest.double().cpu()
        total = float(weights.sum())
        if total <= 0.0:
            distinct = torch.unique(x, dim=0).shape[0]
            raise ModAdapterError(
                f"k-means needs at least k={k} distinct feature rows but the {num_points} rows hold only "
                f"{distinct} distinct values; remove duplicate concept words or use fewer experts"
            )
        draw = float(torch.rand((1,), generator=generator, dtype=torch.float64).item()) * total
        cumulative = torch.cumsum(weights, dim=0)
        index = int(torch.searchsorted(cumulative, torch.tensor([draw], dtype=torch.float64), right=True).item())
        index = min(index, num_points - 1)
        while weights[index] <= 0.0:  # never pick an already-chosen point (rounding at the edges)
            index = (index + 1) % num_points
        centroids = torch.cat([centroids, x[index : index + 1]], dim=0)
        nearest = torch.minimum(nearest, squared_distances(x, centroids[-1:])[:, 0])

    labels = squared_distances(x, centroids).argmin(dim=1)
    for _ in range(iterations):
        sums, counts = _cluster_means(x, labels, k)
        new_centroids = sums / counts.clamp_min(1.0).unsqueeze(1)
        empty = (counts == 0).nonzero().flatten().tolist()
        if empty:
            # Re-seed each empty cluster with the point farthest from its
            # current centroid; mark it taken so two empties differ.
            point_cost = squared_distances(x, centroids).gather(1, labels.unsqueeze(1))[:, 0]
            for cluster in empty:
                far = int(point_cost.argmax().item())
                new_centroids[cluster] = x[far]
                point_cost[far] = -1.0
        centroids = new_centroids
        new_labels = squared_distances(x, centroids).argmin(dim=1)
        if torch.equal(new_labels, labels) and not empty:
            break
        labels = new_labels
    return centroids.cpu().contiguous()
