from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import silhouette_score

from cssl_ray.method.silhouette import silhouette


def _clusters(
    sizes: list[int], dim: int, seed: int, spread: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs, one per entry of ``sizes``, with labels 0..K-1 shuffled."""
    g = torch.Generator().manual_seed(seed)
    centres = 3.0 * torch.randn(len(sizes), dim, generator=g, dtype=torch.float64)
    labels = torch.cat([torch.full((n,), k) for k, n in enumerate(sizes)])
    z = centres[labels] + spread * torch.randn(len(labels), dim, generator=g, dtype=torch.float64)
    perm = torch.randperm(len(labels), generator=g)
    return z[perm], labels[perm]


def _sk(z: torch.Tensor, labels: torch.Tensor, metric: str) -> float:
    return float(silhouette_score(z.double().numpy(), labels.numpy(), metric=metric))


CASES = [
    [5, 5],  # two even clusters
    [3, 10, 1, 7],  # uneven, with a singleton
    [1, 1, 6],  # two singletons
    [40, 25, 17, 30, 8],  # more clusters
    [2, 199],  # very uneven, larger N
]


@pytest.mark.parametrize("metric", ["manhattan", "euclidean", "cosine"])
@pytest.mark.parametrize("sizes", CASES, ids=lambda s: "-".join(map(str, s)))
def test_standard_matches_sklearn(metric: str, sizes: list[int]) -> None:
    z, labels = _clusters(sizes, dim=7, seed=sum(sizes))
    assert silhouette(z, labels, metric) == pytest.approx(_sk(z, labels, metric), abs=1e-9)


def test_default_metric_is_manhattan_and_overlapping_clusters() -> None:
    z, labels = _clusters([20, 20, 20], dim=16, seed=1, spread=4.0)  # negative scores occur
    out = silhouette(z, labels)
    assert out == pytest.approx(_sk(z, labels, "manhattan"), abs=1e-9)
    assert out != pytest.approx(_sk(z, labels, "euclidean"), abs=1e-6)


def test_float32_input_and_noncontiguous_labels() -> None:
    z, labels = _clusters([6, 9, 4], dim=5, seed=3)
    z32 = z.float()
    weird = torch.tensor([-7, 42, 3])[labels]  # arbitrary label values
    expected = _sk(z32.double(), labels, "manhattan")
    assert silhouette(z32, weird) == pytest.approx(expected, abs=1e-6)


def test_identical_points_in_different_clusters_score_zero_like_sklearn() -> None:
    z = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [5.0, 5.0]])
    labels = torch.tensor([0, 1, 0, 1])
    assert silhouette(z, labels) == pytest.approx(_sk(z, labels, "manhattan"), abs=1e-12)


def test_returns_float_in_range_without_grad() -> None:
    z, labels = _clusters([5, 6], dim=3, seed=4)
    z = z.float().requires_grad_()
    out = silhouette(z, labels)
    assert isinstance(out, float)
    assert -1.0 <= out <= 1.0


# ---------------------------------------------------------------- subsampling


def test_max_samples_at_or_above_n_uses_every_point() -> None:
    z, labels = _clusters([10, 12], dim=4, seed=5)
    full = _sk(z, labels, "manhattan")
    assert silhouette(z, labels, max_samples=22) == pytest.approx(full, abs=1e-9)
    assert silhouette(z, labels, max_samples=1000) == pytest.approx(full, abs=1e-9)


def test_max_samples_is_the_documented_reproducible_subsample() -> None:
    z, labels = _clusters([60, 50, 40], dim=8, seed=6)
    out = silhouette(z, labels, max_samples=50, generator=torch.Generator().manual_seed(0))
    again = silhouette(z, labels, max_samples=50, generator=torch.Generator().manual_seed(0))
    assert out == again
    keep = torch.randperm(150, generator=torch.Generator().manual_seed(0))[:50]
    assert out == pytest.approx(_sk(z[keep], labels[keep], "manhattan"), abs=1e-9)
    other = silhouette(z, labels, max_samples=50, generator=torch.Generator().manual_seed(1))
    assert other != out  # a different subsample, a different estimate
    assert other == pytest.approx(_sk(z, labels, "manhattan"), abs=0.1)  # but an estimate


# ---------------------------------------------------------------- the paper's variant


def test_paper_kind_hand_computed_two_clusters() -> None:
    # A: (0,0),(2,0) -> mu (1,0); B: (0,4),(2,6) -> mu (1,5)
    z = torch.tensor([[0.0, 0.0], [0.0, 4.0], [2.0, 0.0], [2.0, 6.0]])
    labels = torch.tensor([0, 1, 0, 1])
    # manhattan: a = (1 + 1 + 2 + 2) / 4 = 1.5, b = |1-1| + |0-5| = 5
    assert silhouette(z, labels, "manhattan", "paper") == pytest.approx((5 - 1.5) / 5, abs=1e-12)
    # euclidean: a = (1 + 1 + sqrt2 + sqrt2) / 4, b = 5
    a = (2 + 2 * math.sqrt(2)) / 4
    assert silhouette(z, labels, "euclidean", "paper") == pytest.approx((5 - a) / 5, abs=1e-12)


def test_paper_kind_hand_computed_three_clusters_mean_over_pairs() -> None:
    # A: (0,0),(2,0) mu (1,0); B: (0,4),(2,6) mu (1,5); C: (6,0),(6,2) mu (6,1)
    z = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [2.0, 6.0], [6.0, 0.0], [6.0, 2.0]])
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    # a = (1+1 + 2+2 + 1+1) / 6 = 4/3; b = (AB 5 + AC 6 + BC 9) / 3 = 20/3; omega = 0.8
    assert silhouette(z, labels, kind="paper") == pytest.approx(0.8, abs=1e-12)


def test_paper_kind_negative_and_zero() -> None:
    # Centroids coincide (b = 0) while points spread (a > 0): omega = -1.
    z = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, -1.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1, 1])
    assert silhouette(z, labels, kind="paper") == pytest.approx(-1.0, abs=1e-12)
    # All points equal: a = b = 0 -> 0.
    same = torch.ones(4, 3)
    assert silhouette(same, labels, kind="paper") == 0.0


def test_paper_kind_cosine_two_clusters() -> None:
    # Each cluster's points are parallel to its centroid: a = 0; centroids orthogonal: b = 1.
    z = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1, 1])
    assert silhouette(z, labels, "cosine", "paper") == pytest.approx(1.0, abs=1e-12)


# ---------------------------------------------------------------- one class, degenerate cases


@pytest.mark.parametrize("kind", ["standard", "paper"])
def test_one_class_without_aux_is_zero(kind: str) -> None:
    z = torch.randn(10, 4)
    assert silhouette(z, torch.full((10,), 1), kind=kind) == 0.0


@pytest.mark.parametrize("kind", ["standard", "paper"])
@pytest.mark.parametrize("n", [0, 1])
def test_fewer_than_two_points_is_zero(kind: str, n: int) -> None:
    assert silhouette(torch.randn(n, 4), torch.arange(n), kind=kind) == 0.0


@pytest.mark.parametrize("kind", ["standard", "paper"])
def test_every_point_its_own_cluster_is_zero(kind: str) -> None:
    z = torch.randn(5, 3)
    labels = torch.arange(5)
    with pytest.raises(ValueError):  # the oracle refuses it
        silhouette_score(z.numpy(), labels.numpy())
    assert silhouette(z, labels, kind=kind) == 0.0


def test_aux_class_is_the_second_cluster() -> None:
    g = torch.Generator().manual_seed(7)
    z = torch.randn(12, 6, generator=g) + 2.0
    labels = torch.full((12,), 1)  # one foreground class
    aux = torch.randn(9, 6, generator=g)
    expected = _sk(torch.cat([z, aux]), torch.cat([labels, torch.full((9,), 2)]), "manhattan")
    assert silhouette(z, labels, aux=aux) == pytest.approx(expected, abs=1e-6)


def test_aux_label_never_collides_with_labels() -> None:
    g = torch.Generator().manual_seed(8)
    z = torch.randn(10, 3, generator=g)
    labels = torch.tensor([0, 5] * 5)  # aux must not merge into either class
    aux = torch.randn(4, 3, generator=g) + 3.0
    expected = _sk(torch.cat([z, aux]), torch.cat([labels, torch.full((4,), 99)]), "euclidean")
    assert silhouette(z, labels, "euclidean", aux=aux) == pytest.approx(expected, abs=1e-6)


def test_aux_with_paper_kind() -> None:
    z = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    aux = torch.tensor([[0.0, 4.0], [2.0, 6.0]])
    # same geometry as the two-cluster hand case: omega = 0.7
    assert silhouette(z, torch.tensor([1, 1]), kind="paper", aux=aux) == pytest.approx(0.7, abs=1e-12)


def test_empty_aux_changes_nothing() -> None:
    z = torch.randn(6, 2)
    assert silhouette(z, torch.zeros(6, dtype=torch.long), aux=torch.empty(0, 2)) == 0.0


# ---------------------------------------------------------------- errors


def test_unknown_metric_and_kind_name_the_allowed_values() -> None:
    z, labels = torch.randn(4, 2), torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match="manhattan, euclidean, cosine"):
        silhouette(z, labels, metric="chebyshev")
    with pytest.raises(ValueError, match="standard, paper"):
        silhouette(z, labels, kind="fast")


@pytest.mark.parametrize(
    ("z", "labels", "aux", "match"),
    [
        (torch.randn(4), torch.tensor([0, 0, 1, 1]), None, r"\(4,\)"),
        (torch.randn(4, 2), torch.tensor([0, 1, 1]), None, r"\(4, 2\).*\(3,\)"),
        (torch.randn(4, 2), torch.tensor([[0, 0], [1, 1]]), None, r"\(2, 2\)"),
        (torch.randn(4, 2), torch.tensor([0.0, 0.0, 1.0, 1.0]), None, "integer"),
        (torch.randn(4, 2), torch.tensor([0, 0, 1, 1]), torch.randn(3, 5), r"\(3, 5\)"),
    ],
)
def test_bad_shapes_raise(
    z: torch.Tensor, labels: torch.Tensor, aux: torch.Tensor | None, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        silhouette(z, labels, aux=aux)


def test_bad_max_samples_raises() -> None:
    with pytest.raises(ValueError, match="max_samples"):
        silhouette(torch.randn(4, 2), torch.tensor([0, 0, 1, 1]), max_samples=1)


def test_standard_hand_computed_1d() -> None:
    z = np.array([[0.0], [1.0], [10.0], [11.0]])
    labels = np.array([0, 0, 1, 1])
    # point 0: a = 1, b = (10 + 11) / 2 = 10.5 -> 9.5 / 10.5 ; symmetric for the others
    s = [9.5 / 10.5, 8.5 / 9.5, 8.5 / 9.5, 9.5 / 10.5]
    out = silhouette(torch.from_numpy(z), torch.from_numpy(labels))
    assert out == pytest.approx(np.mean(s), abs=1e-12)
