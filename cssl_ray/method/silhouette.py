"""Silhouette omega: how well the patch embeddings cluster by class (Pandey et al., MICCAI 2021).

Legend (the paper's symbols):

    omega    silhouette of the embeddings, in [-1, 1]; 1 = tight, well-separated class clusters.
             It sets the consistency noise variance lambda_ = (omega + 1) / 2 + eps.
    a        mean distance of a point to its own cluster (standard: to the other members;
             paper: to the cluster centroid mu_k)
    b        distance to the other clusters (standard: mean distance to the nearest other cluster;
             paper: mean distance between pairs of distinct centroids)
    mu_k     centroid (mean embedding) of cluster k

Two kinds (``SilhouetteConfig.kind``):

    "standard"  mean over samples of (b - a) / max(a, b): scikit-learn's ``silhouette_score``,
                O(N^2 D) time and O(N^2) memory, so usually evaluated on a subsample.
    "paper"     the paper's cheaper variant, omega = (b - a) / max(a, b) with the centroid-based
                a and b above, O(N K D).

Distances (``metric``): "manhattan" (the paper's choice, default), "euclidean", and "cosine"
(1 - cosine similarity, as scikit-learn; a zero vector has similarity 0 to everything).
"""
from __future__ import annotations

import torch
from torch import Tensor

METRICS = ("manhattan", "euclidean", "cosine")
KINDS = ("standard", "paper")


@torch.no_grad()
def silhouette(
    z: Tensor,
    labels: Tensor,
    metric: str = "manhattan",
    kind: str = "standard",
    *,
    aux: Tensor | None = None,
    max_samples: int | None = None,
    generator: torch.Generator | None = None,
) -> float:
    """Silhouette omega of embeddings ``z`` clustered by ``labels``.

    Args:
        z: (N, D) embeddings, any float dtype and device; computed in float64.
        labels: (N,) integer cluster (class) labels; any values, they need not be contiguous.
        metric: "manhattan" (default, the paper), "euclidean" or "cosine".
        kind: "standard" (equals ``sklearn.metrics.silhouette_score``) or "paper" (centroids).
        aux: optional (M, D) auxiliary-class samples for the one-foreground-class case (draws of
            the fixed Gaussian in embedding space). They are appended to ``z`` as one extra
            cluster whose label differs from every label in ``labels``; their own silhouettes
            count in the mean like any other sample's.
        max_samples: standard kind only. If the number of points n (N + M with ``aux``) exceeds
            it, the score is computed on the points ``torch.randperm(n, generator=generator)
            [:max_samples]`` of ``cat(z, aux)``, so it is then a (reproducible, given the
            generator's state) random *estimate* of the full score. The paper kind is cheap and
            always uses every point.
        generator: random generator for the subsample (CPU or the device it lives on).

    Returns:
        omega as a python float in [-1, 1].

    Degenerate cases (the silhouette is undefined; scikit-learn raises). omega = 0.0 is
    returned instead, a neutral value that makes lambda_ = 0.5 + eps:
        - fewer than 2 distinct clusters after appending ``aux`` (one class and no ``aux``,
          fewer than 2 points, an empty batch, or a subsample that caught one cluster only);
        - as many clusters as points (every point is its own cluster).
    The same rule applies to both kinds, so omega's domain does not depend on ``kind``.
    Within a valid clustering, a point in a singleton cluster scores 0 (scikit-learn's
    convention) and a point with a = b = 0 scores 0; the paper kind gives 0 when a = b = 0.

    Raises:
        ValueError: unknown ``metric`` or ``kind``; ``z`` not (N, D); ``labels`` not (N,) or not
            integer; ``aux`` not (M, D); ``max_samples`` < 2.
    """
    if metric not in METRICS:
        raise ValueError(f"silhouette: unknown metric {metric!r}; allowed: {', '.join(METRICS)}")
    if kind not in KINDS:
        raise ValueError(f"silhouette: unknown kind {kind!r}; allowed: {', '.join(KINDS)}")
    if z.dim() != 2:
        raise ValueError(f"silhouette: z must be (N, D), got shape {tuple(z.shape)}")
    if labels.dim() != 1 or labels.shape[0] != z.shape[0]:
        raise ValueError(
            f"silhouette: labels must be (N,) with N = z.shape[0]; "
            f"got z {tuple(z.shape)}, labels {tuple(labels.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"silhouette: labels must be an integer tensor, got dtype {labels.dtype}")
    if aux is not None and (aux.dim() != 2 or aux.shape[1] != z.shape[1]):
        raise ValueError(
            f"silhouette: aux must be (M, D) with D = z.shape[1]; "
            f"got z {tuple(z.shape)}, aux {tuple(aux.shape)}"
        )
    if max_samples is not None and max_samples < 2:
        raise ValueError(f"silhouette: max_samples must be >= 2 or None, got {max_samples}")

    x = z.detach().to(torch.float64)  # (N, D)
    _, y = torch.unique(labels.to(z.device), return_inverse=True)  # (N,) contiguous 0..K-1
    if aux is not None and aux.shape[0] > 0:
        aux_label = int(y.max()) + 1 if y.numel() > 0 else 0
        x = torch.cat([x, aux.detach().to(device=x.device, dtype=torch.float64)])  # (N + M, D)
        y = torch.cat([y, torch.full((aux.shape[0],), aux_label, dtype=y.dtype, device=y.device)])

    if kind == "standard" and max_samples is not None and x.shape[0] > max_samples:
        gen_device = generator.device if generator is not None else torch.device("cpu")
        keep = torch.randperm(x.shape[0], generator=generator, device=gen_device)[:max_samples]
        keep = keep.to(x.device)
        x = x[keep]
        _, y = torch.unique(y[keep], return_inverse=True)  # a subsample may drop clusters

    n = x.shape[0]
    num_clusters = int(y.max()) + 1 if n > 0 else 0
    if num_clusters < 2 or num_clusters >= n:
        return 0.0

    onehot = torch.nn.functional.one_hot(y, num_clusters).to(torch.float64)  # (n, K)
    counts = onehot.sum(0)  # (K,)
    if kind == "standard":
        return _standard(x, y, onehot, counts, metric)
    return _paper(x, y, onehot, counts, metric)


def _pairwise(x1: Tensor, x2: Tensor, metric: str) -> Tensor:
    """(n1, D), (n2, D) -> (n1, n2) distances; exact zeros between identical rows."""
    if metric == "manhattan":
        return torch.cdist(x1, x2, p=1.0)
    if metric == "euclidean":
        # The matmul shortcut loses precision (and exact zeros) for near-identical points.
        return torch.cdist(x1, x2, p=2.0, compute_mode="donot_use_mm_for_euclid_dist")
    # Cosine: a zero vector stays zero after normalisation, so its similarity is 0 (sklearn).
    u1 = x1 / x1.norm(dim=1, keepdim=True).clamp_min(torch.finfo(x1.dtype).tiny)
    u2 = x2 / x2.norm(dim=1, keepdim=True).clamp_min(torch.finfo(x2.dtype).tiny)
    return (1.0 - u1 @ u2.T).clamp_(0.0, 2.0)


def _standard(x: Tensor, y: Tensor, onehot: Tensor, counts: Tensor, metric: str) -> float:
    dist = _pairwise(x, x, metric)  # (n, n)
    if metric == "cosine":
        dist.fill_diagonal_(0.0)  # rounding leaves ~1e-16 on the diagonal
    sums = dist @ onehot  # (n, K) summed distance of each point to each cluster
    own_count = counts[y]  # (n,)
    a = sums.gather(1, y[:, None]).squeeze(1) / (own_count - 1).clamp_min(1.0)  # (n,)
    mean_to = sums / counts  # (n, K)
    b = mean_to.masked_fill(onehot.bool(), float("inf")).amin(1)  # (n,) nearest other cluster
    denom = torch.maximum(a, b)
    s = torch.where(denom > 0, (b - a) / denom.clamp_min(torch.finfo(x.dtype).tiny), 0.0)
    s = torch.where(own_count > 1, s, 0.0)  # singleton clusters score 0 (sklearn)
    return float(s.mean())


def _paper(x: Tensor, y: Tensor, onehot: Tensor, counts: Tensor, metric: str) -> float:
    mu = (onehot.T @ x) / counts[:, None]  # (K, D) centroids
    a = _pairwise_rows(x, mu[y], metric).mean()  # points to their own centroid
    mu_dist = _pairwise(mu, mu, metric)  # (K, K)
    k = mu.shape[0]
    off_diag = ~torch.eye(k, dtype=torch.bool, device=x.device)
    b = mu_dist[off_diag].mean()  # over ordered pairs = over unordered pairs (symmetric)
    denom = torch.maximum(a, b)
    if denom <= 0:
        return 0.0
    return float((b - a) / denom)


def _pairwise_rows(x1: Tensor, x2: Tensor, metric: str) -> Tensor:
    """(n, D), (n, D) -> (n,) distance between matching rows."""
    if metric == "manhattan":
        return (x1 - x2).abs().sum(1)
    if metric == "euclidean":
        return (x1 - x2).norm(dim=1)
    tiny = torch.finfo(x1.dtype).tiny
    u1 = x1 / x1.norm(dim=1, keepdim=True).clamp_min(tiny)
    u2 = x2 / x2.norm(dim=1, keepdim=True).clamp_min(tiny)
    return (1.0 - (u1 * u2).sum(1)).clamp_(0.0, 2.0)
