"""k-means router: determinism, cluster recovery, nearest-centroid assignment, errors."""

import pytest
import torch

from mod_adapter.modules import router
from mod_adapter.modules.errors import ModAdapterError
from mod_adapter.modules.router import assign_experts, fit_kmeans


def _clusters(num_clusters=4, per_cluster=50, dim=8, spread=0.05, seed=0):
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_clusters, dim, generator=generator) * 10.0
    points = centers.repeat_interleave(per_cluster, dim=0) + spread * torch.randn(num_clusters * per_cluster, dim, generator=generator)
    labels = torch.arange(num_clusters).repeat_interleave(per_cluster)
    # Shuffle so that cluster membership is not encoded in the row order.
    order = torch.randperm(points.shape[0], generator=generator)
    return points[order], labels[order]


def test_same_seed_gives_identical_centroids():
    points = torch.randn(300, 16, generator=torch.Generator().manual_seed(1))
    first = fit_kmeans(points, 5, seed=3)
    second = fit_kmeans(points, 5, seed=3)
    assert first.dtype == torch.float32 and first.shape == (5, 16)
    assert torch.equal(first, second)


def test_recovers_well_separated_clusters():
    points, labels = _clusters()
    centroids = fit_kmeans(points, 4, seed=0)
    assigned = assign_experts(points, centroids)
    # Each true cluster maps to exactly one centroid and vice versa.
    mapping = {}
    for true_label in range(4):
        found = assigned[labels == true_label].unique()
        assert found.numel() == 1, f"cluster {true_label} split over centroids {found.tolist()}"
        mapping[true_label] = int(found)
    assert sorted(mapping.values()) == [0, 1, 2, 3]
    for true_label, centroid_index in mapping.items():
        true_mean = points[labels == true_label].mean(dim=0)
        assert torch.allclose(centroids[centroid_index], true_mean, atol=1e-4)


def test_k_equal_to_distinct_points_puts_one_centroid_on_each_point():
    points = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]])
    centroids = fit_kmeans(points, 3, seed=7)
    assert sorted(map(tuple, centroids.tolist())) == sorted(map(tuple, points.tolist()))


def test_chunked_distances_give_the_same_result(monkeypatch):
    points, _ = _clusters(per_cluster=30)
    reference = fit_kmeans(points, 4, seed=2)
    monkeypatch.setattr(router, "_CHUNK_ROWS", 7)
    assert torch.allclose(fit_kmeans(points, 4, seed=2), reference, atol=1e-5)
    assert torch.equal(assign_experts(points, reference), torch.cdist(points, reference).argmin(dim=1))


def test_fewer_rows_than_k_is_an_error():
    with pytest.raises(ModAdapterError, match=r"at least k=5 feature rows .* got 3"):
        fit_kmeans(torch.randn(3, 4), 5)


def test_fewer_distinct_rows_than_k_is_an_error():
    points = torch.tensor([[1.0, 2.0]] * 4 + [[3.0, 4.0]] * 4)
    with pytest.raises(ModAdapterError, match=r"only 2 distinct"):
        fit_kmeans(points, 3)


def test_nan_features_are_an_error():
    points = torch.randn(10, 4)
    points[3, 1] = float("nan")
    with pytest.raises(ModAdapterError, match="NaN or Inf"):
        fit_kmeans(points, 2)
    with pytest.raises(ModAdapterError, match="NaN or Inf"):
        assign_experts(points, torch.randn(2, 4))


def test_assign_experts_is_nearest_centroid():
    generator = torch.Generator().manual_seed(4)
    points = torch.randn(200, 12, generator=generator)
    centroids = torch.randn(6, 12, generator=generator)
    expected = torch.cdist(points.double(), centroids.double()).argmin(dim=1)
    result = assign_experts(points, centroids)
    assert result.dtype == torch.long
    assert torch.equal(result, expected)
    assert torch.equal(assign_experts(points, centroids[:1]), torch.zeros(200, dtype=torch.long))


def test_assign_experts_width_mismatch_is_an_error():
    with pytest.raises(ModAdapterError, match=r"width 12 but the router centroids have width 8"):
        assign_experts(torch.randn(3, 12), torch.randn(2, 8))
