"""Contrastive loss with interpolated hard negatives (Pandey et al., MICCAI 2021, Eq. 1).

Legend (the paper's symbols):
    z       (N, D) L2-normalised patch embeddings of one batch; labels (N,) their classes c_i
    tau     temperature, > 0; default 0.1 (config ``contrastive.tau``)
    alpha   per-pair weight a of a hard negative normalize(a z_i + (1-a) z_n), a ~ U(alpha_min,
            alpha_max) with 0 <= alpha_min < alpha_max <= 0.5 (paper: (0, 0.4)), so the anchor
            weighs less than the negative; shaped (R, N, N): R hard negatives per batch negative,
            NaN = "no hard negative for this pair" (how hard:batch ratios below 1 are expressed)
    aux     (M, D) auxiliary negatives for one-foreground-class data: normalised samples of a
            fixed Gaussian N(mu, sigma^2 I) (``AuxiliaryGaussian``); negatives of every anchor,
            never anchors or positives
    s       z_i . z_k, the cosine similarity of two unit vectors

Hard negatives are never materialised: for unit z,
``z_i . normalize(a z_i + (1-a) z_n) = (a + (1-a) s) / sqrt(a^2 + (1-a)^2 + 2a(1-a) s)``
with ``s = z_i . z_n``, an elementwise function of the (N, N) similarity matrix, so the loss costs
O(N^2 (D + R)) time and O(R N^2) memory instead of O(R N^2 D) (benchmarks/contrastive_loss.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

_NORM_EPS_SQ = 1e-24  # (1e-12)^2: F.normalize's eps, on the squared norm


def hard_negative_similarity(s: Tensor, a: Tensor) -> Tensor:
    """``z_i . normalize(a z_i + (1-a) z_n)`` for unit z, elementwise from ``s = z_i . z_n``.

    ``(a + (1-a) s) / sqrt(a^2 + (1-a)^2 + 2a(1-a) s)``; the sqrt argument (the squared norm of
    the interpolation) is clamped at 1e-24 like F.normalize's eps, so ``s = -1, a = 0.5`` (the
    interpolation is the zero vector) gives 0 with a finite gradient. ``s`` and ``a`` broadcast.
    """
    # a + b = 1 gives a^2 + b^2 + 2ab s = 1 - 2ab(1 - s) and a + b s = 1 - b(1 - s): fewer passes.
    c = (1.0 - a) * (1.0 - s)  # (1-a)(1-s)
    norm_sq = (1.0 - 2.0 * a * c).clamp_min(_NORM_EPS_SQ)
    return (1.0 - c) * norm_sq.rsqrt()


def _as_weights(w: Tensor, n: int, m: int, name: str) -> Tensor:
    """(n, m) or (R, n, m) -> (R, n, m), or a ValueError naming the shapes."""
    if w.dim() not in (2, 3) or tuple(w.shape[-2:]) != (n, m):
        raise ValueError(f"{name} must have shape ({n}, {m}) or (R, {n}, {m}), got {tuple(w.shape)}")
    return w.unsqueeze(0) if w.dim() == 2 else w


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """a @ b.T, (N, D) x (M, D) -> (N, M), in a's dtype even inside a caller's autocast (train.amp):
    bf16 would round the similarities by up to 2^-8, 0.04 in logits at tau 0.1."""
    with torch.autocast(a.device.type, enabled=False):
        return a @ b.T


def contrastive_loss(
    z: Tensor,
    labels: Tensor,
    tau: float,
    alpha: Tensor | None = None,
    *,
    aux: Tensor | None = None,
    aux_alpha: Tensor | None = None,
    return_stats: bool = False,
) -> Tensor | tuple[Tensor, dict[str, float]]:
    """L_CL of Eq. 1 (one positive per denominator, unlike SupCon).

    Args:
        z: (N, D) unit embeddings, any float dtype (computed in float32, float64 if given).
        labels: (N,) integer classes.
        tau: temperature > 0.
        alpha: None (no hard negatives), (N, N) or (R, N, N) weights; entry [r, i, n] defines hard
            negative r of anchor i from batch negative n, used only where labels[i] != labels[n]
            and not NaN.
        aux: (M, D) unit auxiliary negatives (negatives of every anchor).
        aux_alpha: (N, M) or (R, N, M) weights of hard negatives normalize(a z_i + (1-a) aux_m),
            NaN = none; needs ``aux``.
        return_stats: also return {"anchors", "anchors_without_positive", "negatives_per_anchor"}
            (the last is the mean over all N anchors of batch + hard + aux negatives).

    For anchor i with positives P(i) (same label, j != i) and negatives Q(i):
    ``l_ip = -log(e^{s_ip/tau} / (e^{s_ip/tau} + sum_{k in Q(i)} e^{s_ik/tau}))
          = softplus(logsumexp_{k in Q(i)} s_ik/tau - s_ip/tau)``
    and L = mean over anchors with a positive of mean_p l_ip.

    Degenerate cases: anchors without a positive are excluded (and counted); an anchor without
    negatives contributes log(1) = 0 per positive (so one class and no aux gives 0); if no anchor
    has a positive (N = 0 or 1, all labels distinct) the loss is ``0 * z.sum()``, a zero still
    connected to the graph. Never NaN, in value or gradient.
    """
    if z.dim() != 2:
        raise ValueError(f"z must be (N, D), got shape {tuple(z.shape)}")
    n, d = z.shape
    if labels.shape != (n,):
        raise ValueError(f"labels must be ({n},) to match z {tuple(z.shape)}, got {tuple(labels.shape)}")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if aux is not None and (aux.dim() != 2 or aux.shape[1] != d):
        raise ValueError(f"aux must be (M, {d}) to match z {tuple(z.shape)}, got {tuple(aux.shape)}")
    if aux_alpha is not None and aux is None:
        raise ValueError(f"aux_alpha {tuple(aux_alpha.shape)} given without aux")
    if alpha is not None:
        alpha = _as_weights(alpha, n, n, "alpha")
    if aux_alpha is not None:
        aux_alpha = _as_weights(aux_alpha, n, aux.shape[0], "aux_alpha")

    dtype = torch.promote_types(z.dtype, torch.float32)
    z = z.to(dtype)
    if n == 0:  # an empty batch (e.g. an empty shard): nothing to contrast
        stats = {"anchors": 0, "anchors_without_positive": 0, "negatives_per_anchor": 0.0}
        return (z.sum() * 0.0, stats) if return_stats else z.sum() * 0.0
    s = _dot(z, z)  # (N, N) similarities
    logits = s / tau  # (N, N)
    same = labels[:, None] == labels[None, :]  # (N, N)
    pos = same.clone().fill_diagonal_(False)  # (N, N) P(i)

    # Negatives in blocks of masked logits (-inf = not a negative), anchors on the dim of size N:
    # (logits, dims to reduce, count of negatives per anchor).
    blocks = [(logits.masked_fill(same, -math.inf), 1, n - same.count_nonzero(1))]
    if alpha is not None:
        valid = ~(same | alpha.isnan())  # (R, N, N)
        a = torch.where(valid, alpha.to(dtype), 0.0)  # NaN weights would poison the gradient
        hard = hard_negative_similarity(s, a).div(tau).masked_fill(~valid, -math.inf)  # (R, N, N)
        blocks.append((hard, (0, 2), valid.count_nonzero((0, 2))))
    if aux is not None and aux.shape[0] > 0:
        s_aux = _dot(z, aux.to(dtype))  # (N, M)
        blocks.append((s_aux / tau, 1, torch.full((n,), aux.shape[0], device=z.device)))
        if aux_alpha is not None:
            valid = ~aux_alpha.isnan()  # (R, N, M)
            a = torch.where(valid, aux_alpha.to(dtype), 0.0)
            hard = hard_negative_similarity(s_aux, a).div(tau).masked_fill(~valid, -math.inf)  # (R, N, M)
            blocks.append((hard, (0, 2), valid.count_nonzero((0, 2))))
    n_neg = sum(count for _, _, count in blocks)  # (N,) |Q(i)|
    has_neg = n_neg > 0

    # Stable log-sum-exp over Q(i): logits reach +-1/tau, so exp over/underflows float32 for
    # tau < ~0.012 unless shifted by the row max. The shift is detached (the value does not depend
    # on it) and 0 for anchors without negatives (max -inf), whose sum of exps is then 0: they get
    # LSE = -inf through where(), so neither log(0) nor -inf - -inf reaches the gradient.
    shift = torch.stack([x.amax(dims) for x, dims, _ in blocks]).amax(0).detach()  # (N,)
    shift = torch.where(has_neg, shift, 0.0)
    sum_exp = sum((x - shift[:, None]).exp().sum(dims) for x, dims, _ in blocks)  # (N,)
    lse = torch.where(has_neg, torch.where(has_neg, sum_exp, 1.0).log() + shift, -math.inf)  # (N,)

    terms = F.softplus(lse[:, None] - logits)  # (N, N) l_ip = -log(e^{s_ip/tau} / (e^{s_ip/tau} + e^LSE_i))
    n_pos = pos.count_nonzero(1)  # (N,)
    per_anchor = terms.masked_fill(~pos, 0.0).sum(1) / n_pos.clamp_min(1)  # (N,)
    has_pos = n_pos > 0
    anchors = int(has_pos.sum())
    loss = per_anchor[has_pos].mean() if anchors else z.sum() * 0.0
    if not return_stats:
        return loss
    return loss, {
        "anchors": anchors,
        "anchors_without_positive": n - anchors,
        "negatives_per_anchor": n_neg.sum().item() / n,
    }


def sample_alpha(
    n: int,
    alpha_min: float,
    alpha_max: float,
    hard_ratio: float = 1.0,
    *,
    m: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Per-pair hard-negative weights a ~ U(alpha_min, alpha_max), shaped (R, n, m or n).

    R = ceil(hard_ratio); for a fractional ratio the last slice keeps each pair with probability
    hard_ratio - floor(hard_ratio) and is NaN elsewhere, so the expected number of hard negatives
    per batch negative is hard_ratio.
    """
    if not 0.0 <= alpha_min <= 0.5:
        raise ValueError(f"alpha_min must be in [0, 0.5) and < alpha_max, got {alpha_min}")
    if not alpha_min < alpha_max <= 0.5:
        raise ValueError(f"alpha_max must be in (alpha_min={alpha_min}, 0.5], got {alpha_max}")
    if not hard_ratio > 0:
        raise ValueError(f"hard_ratio must be > 0, got {hard_ratio}")
    m = n if m is None else m
    draw_on = generator.device if generator is not None else device  # a generator draws on its own device
    a = torch.rand(math.ceil(hard_ratio), n, m, generator=generator, device=draw_on)  # (R, n, m)
    a = a * (alpha_max - alpha_min) + alpha_min
    frac = hard_ratio - math.floor(hard_ratio)
    if frac > 0:
        drop = torch.rand(n, m, generator=generator, device=draw_on) >= frac
        a[-1].masked_fill_(drop, float("nan"))
    return a.to(device) if device is not None else a


class AuxiliaryGaussian:
    """Fixed N(mu, sigma^2 I) in embedding space for one-foreground-class data; mu is a random
    unit vector drawn once from ``seed``. Its normalised samples are the auxiliary class: the
    negatives of every anchor (and the second cluster of the silhouette)."""

    def __init__(self, dim: int, sigma: float = 1.0, seed: int = 0) -> None:
        if dim < 1 or not sigma > 0:
            raise ValueError(f"AuxiliaryGaussian needs dim >= 1 and sigma > 0, got dim={dim}, sigma={sigma}")
        self.dim, self.sigma, self.seed = dim, float(sigma), seed
        self.mu = F.normalize(torch.randn(dim, generator=torch.Generator().manual_seed(seed)), dim=0)  # (D,)

    @torch.no_grad()
    def sample(
        self,
        m: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """(m, dim) L2-normalised samples, drawn on the generator's device and moved to ``device``."""
        draw_on = generator.device if generator is not None else device
        noise = torch.randn(m, self.dim, generator=generator, device=draw_on)  # (m, D)
        x = F.normalize(self.mu.to(noise.device) + self.sigma * noise, dim=1)
        return x.to(device=device if device is not None else noise.device, dtype=dtype)

    def state_dict(self) -> dict:
        return {"dim": self.dim, "sigma": self.sigma, "seed": self.seed, "mu": self.mu.clone()}

    def load_state_dict(self, d: dict) -> None:
        self.dim, self.sigma, self.seed = int(d["dim"]), float(d["sigma"]), int(d["seed"])
        self.mu = d["mu"].detach().clone().float().cpu()
