"""Tests for cssl_ray.method.contrastive against a naive oracle that materialises every hard negative."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cssl_ray.method.contrastive import AuxiliaryGaussian, contrastive_loss, hard_negative_similarity, sample_alpha


def naive_loss(z, labels, tau, alpha=None, *, aux=None, aux_alpha=None):
    """Eq. 1 literally: hard negatives as (R, N, N, D) vectors, python loops over anchors and positives."""
    n = z.shape[0]

    def interpolate(a, others):  # (R, N, K) weights -> (R, N, K, D) unit hard negatives
        a = a if a.dim() == 3 else a[None]
        valid = ~a.isnan()
        a = a.nan_to_num(0.0)[..., None]  # NaN weights would leak NaN into the gradient
        return F.normalize(a * z[None, :, None, :] + (1 - a) * others[None, None, :, :], dim=-1), valid

    if alpha is not None:
        hard, hard_valid = interpolate(alpha, z)
    if aux_alpha is not None:
        aux_hard, aux_hard_valid = interpolate(aux_alpha, aux)
    total, anchors = 0.0, 0
    for i in range(n):
        other = labels != labels[i]  # (N,)
        negatives = [z[other]]
        if alpha is not None:
            negatives.append(hard[:, i][hard_valid[:, i] & other[None]])
        if aux is not None:
            negatives.append(aux)
        if aux_alpha is not None:
            negatives.append(aux_hard[:, i][aux_hard_valid[:, i]])
        neg_sum = torch.exp(torch.cat(negatives) @ z[i] / tau).sum()
        positives = [p for p in range(n) if p != i and labels[p] == labels[i]]
        if not positives:
            continue
        terms = []
        for p in positives:
            e_pos = torch.exp(z[i] @ z[p] / tau)
            terms.append(-torch.log(e_pos / (e_pos + neg_sum)))
        total = total + torch.stack(terms).mean()
        anchors += 1
    return total / anchors if anchors else z.sum() * 0.0


def make_case(n, d, c, mode, dtype=torch.float64, seed=0):
    """Leaf features x (N, D) and aux features y (M, D) before L2 normalisation, and loss inputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype, requires_grad=True)
    labels = (torch.arange(n) % c)[torch.randperm(n, generator=g)]
    m = 5
    y = torch.randn(m, d, generator=g, dtype=dtype, requires_grad=True)
    alpha = aux_alpha = None
    if mode in ("alpha", "alpha_r2", "alpha_nan", "full"):
        r = 1 if mode == "alpha" else 2
        alpha = torch.rand(r, n, n, generator=g, dtype=dtype) * 0.5
        if mode in ("alpha_nan", "full"):
            alpha[torch.rand(r, n, n, generator=g) < 0.4] = float("nan")
            alpha[:, 0] = float("nan")  # anchor 0: an empty hard-negative row
        if mode == "alpha":
            alpha = alpha[0]  # the (N, N) form
    if mode in ("aux_alpha", "full"):
        aux_alpha = torch.rand(2, n, m, generator=g, dtype=dtype) * 0.5
        aux_alpha[torch.rand(2, n, m, generator=g) < 0.3] = float("nan")
    use_aux = mode in ("aux", "aux_alpha", "full")
    return x, y if use_aux else None, labels, alpha, aux_alpha


def loss_and_grads(fn, x, y, labels, tau, alpha, aux_alpha):
    x.grad = None
    if y is not None:
        y.grad = None
    aux = F.normalize(y, dim=1) if y is not None else None
    loss = fn(F.normalize(x, dim=1), labels, tau, alpha, aux=aux, aux_alpha=aux_alpha)
    loss.backward()
    # aux gets no gradient when no anchor has a positive (the loss is then 0 * z.sum())
    aux_grad = None if y is None else torch.zeros_like(y) if y.grad is None else y.grad.clone()
    return loss.detach(), x.grad.clone(), aux_grad


MODES = ["plain", "alpha", "alpha_r2", "alpha_nan", "aux", "aux_alpha", "full"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n,d,c", [(2, 4, 2), (7, 16, 3), (33, 64, 5), (96, 16, 5), (12, 4, 1)])
def test_matches_naive_oracle_float64(n, d, c, mode):
    x, y, labels, alpha, aux_alpha = make_case(n, d, c, mode)
    got = loss_and_grads(contrastive_loss, x, y, labels, 0.1, alpha, aux_alpha)
    want = loss_and_grads(naive_loss, x, y, labels, 0.1, alpha, aux_alpha)
    assert got[0].dtype == torch.float64
    for g, w in zip(got, want):
        if w is not None:
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_matches_naive_oracle_float32():
    x, y, labels, alpha, aux_alpha = make_case(33, 64, 5, "full")
    want = loss_and_grads(naive_loss, x, y, labels, 0.1, alpha, aux_alpha)
    x32, y32 = (t.detach().float().requires_grad_() for t in (x, y))
    got = loss_and_grads(contrastive_loss, x32, y32, labels, 0.1, alpha.float(), aux_alpha.float())
    assert got[0].dtype == torch.float32
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5)


def test_small_tau_is_stable_in_float32():
    # logits reach 1/tau = 100: exp overflows float32 without the log-sum-exp.
    x, y, labels, alpha, aux_alpha = make_case(33, 16, 3, "full")
    want = loss_and_grads(contrastive_loss, x, y, labels, 0.01, alpha, aux_alpha)
    x32, y32 = (t.detach().float().requires_grad_() for t in (x, y))
    got = loss_and_grads(contrastive_loss, x32, y32, labels, 0.01, alpha.float(), aux_alpha.float())
    for g, w in zip(got, want):
        assert g.isfinite().all()
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4)


def test_two_same_class_no_negatives_is_zero():
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert contrastive_loss(z, torch.tensor([3, 3]), 0.1).item() == 0.0


def test_hand_computed_three_points():
    # z0 = (1,0), z1 = (0,1) class 0; z2 = (-1,0) class 1; tau = 1/2.
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 1])
    loss, stats = contrastive_loss(F.normalize(x, dim=1), labels, 0.5, return_stats=True)
    # anchor 0: positive s=0, negative s=-1; anchor 1: positive s=0, negative s=0; anchor 2: no positive.
    expected = (math.log(1 + math.exp(-2)) + math.log(2)) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-14)
    assert stats == {"anchors": 2, "anchors_without_positive": 1, "negatives_per_anchor": 4 / 3}

    # Hard negatives: anchor 0 from z2 with a = 1/2 is the zero vector (s = 0 after the eps clamp,
    # as F.normalize gives); anchor 1 from z2 with a = 1/4 is (-3, 1)/sqrt(10), so s = 1/sqrt(10).
    alpha = torch.full((3, 3), float("nan"), dtype=torch.float64)
    alpha[0, 2], alpha[1, 2] = 0.5, 0.25
    loss, stats = contrastive_loss(F.normalize(x, dim=1), labels, 0.5, alpha, return_stats=True)
    expected = (math.log(1 + math.exp(-2) + 1) + math.log(1 + 1 + math.exp(2 / math.sqrt(10)))) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-14)
    assert stats["negatives_per_anchor"] == 6 / 3
    loss.backward()
    assert x.grad.isfinite().all()


def test_no_positive_anchor_gives_connected_zero():
    x = torch.randn(5, 8, requires_grad=True)
    aux = F.normalize(torch.randn(3, 8), dim=1)
    loss, stats = contrastive_loss(
        F.normalize(x, dim=1), torch.arange(5), 0.1, sample_alpha(5, 0.0, 0.4), aux=aux, return_stats=True
    )
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert stats["anchors"] == 0 and stats["anchors_without_positive"] == 5
    assert stats["negatives_per_anchor"] == 4 + 4 + 3


def test_one_class_without_aux_is_zero_with_finite_grad():
    x = torch.randn(6, 8, requires_grad=True)
    loss = contrastive_loss(F.normalize(x, dim=1), torch.zeros(6, dtype=torch.long), 0.1, torch.rand(2, 6, 6))
    assert loss.item() == 0.0
    loss.backward()
    assert x.grad.isfinite().all()


@pytest.mark.parametrize("with_aux", [False, True])
def test_single_sample(with_aux):
    x = torch.randn(1, 4, requires_grad=True)
    aux = F.normalize(torch.randn(2, 4), dim=1) if with_aux else None
    loss = contrastive_loss(F.normalize(x, dim=1), torch.tensor([0]), 0.1, aux=aux)
    assert loss.item() == 0.0
    loss.backward()
    assert x.grad.isfinite().all()


def test_empty_batch():
    x = torch.randn(0, 4, requires_grad=True)
    loss, stats = contrastive_loss(F.normalize(x, dim=1), torch.zeros(0, dtype=torch.long), 0.1, return_stats=True)
    assert loss.item() == 0.0 and stats["anchors"] == 0
    loss.backward()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(dtype):
    x, y, labels, alpha, aux_alpha = make_case(33, 16, 3, "full", dtype=torch.float32)
    z, aux = F.normalize(x, dim=1), F.normalize(y, dim=1)
    loss = contrastive_loss(z.to(dtype), labels, 0.1, alpha.to(dtype), aux=aux.to(dtype), aux_alpha=aux_alpha)
    ref = contrastive_loss(z, labels, 0.1, alpha, aux=aux, aux_alpha=aux_alpha)  # float32 inputs
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-2, atol=0)
    loss.backward()
    assert x.grad.isfinite().all()


def test_hard_negative_similarity_matches_materialised():
    g = torch.Generator().manual_seed(1)
    z = F.normalize(torch.randn(6, 5, generator=g, dtype=torch.float64), dim=1)
    a = torch.rand(6, 6, generator=g, dtype=torch.float64) * 0.5
    hard = F.normalize(a[..., None] * z[:, None] + (1 - a[..., None]) * z[None], dim=-1)  # (N, N, D)
    torch.testing.assert_close(hard_negative_similarity(z @ z.T, a), torch.einsum("id,ind->in", z, hard))


def test_antipodal_pair_with_half_weight_has_finite_gradient():
    # s = -1 exactly and a = 1/2: the interpolation is the zero vector; the eps clamp keeps it finite.
    s = torch.tensor(-1.0, requires_grad=True)
    h = hard_negative_similarity(s, torch.tensor(0.5))
    h.backward()
    assert h.item() == 0.0 and s.grad.isfinite()
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0]], requires_grad=True)
    loss = contrastive_loss(F.normalize(x, dim=1), torch.tensor([0, 1, 0]), 0.1, torch.full((3, 3), 0.5))
    loss.backward()
    assert loss.isfinite() and x.grad.isfinite().all()


def test_sample_alpha_shape_range_and_ratio():
    a = sample_alpha(50, 0.1, 0.4, m=30, generator=torch.Generator().manual_seed(0))
    assert a.shape == (1, 50, 30) and a.dtype == torch.float32
    assert a.min() >= 0.1 and a.max() < 0.4 and not a.isnan().any()
    assert abs(a.mean().item() - 0.25) < 0.01
    assert sample_alpha(4, 0.0, 0.5, 2.0).shape == (2, 4, 4)
    for ratio in (0.3, 1.5, 2.0):
        a = sample_alpha(200, 0.0, 0.4, ratio, generator=torch.Generator().manual_seed(1))
        assert a.shape[0] == math.ceil(ratio)
        assert not a[:-1].isnan().any()
        assert abs((~a.isnan()).float().sum().item() / 200**2 - ratio) < 0.02  # hard : batch


def test_sample_alpha_is_reproducible():
    draw = lambda seed: sample_alpha(10, 0.0, 0.4, 1.5, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(draw(3).nan_to_num(-1), draw(3).nan_to_num(-1))
    assert not torch.equal(draw(3).nan_to_num(-1), draw(4).nan_to_num(-1))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(alpha_min=-0.1, alpha_max=0.4), r"alpha_min must be in \[0, 0.5\)"),
        (dict(alpha_min=0.3, alpha_max=0.3), r"alpha_max must be in \(alpha_min=0.3, 0.5\]"),
        (dict(alpha_min=0.0, alpha_max=0.6), r"alpha_max must be in \(alpha_min=0.0, 0.5\]"),
        (dict(alpha_min=0.0, alpha_max=0.4, hard_ratio=0.0), "hard_ratio must be > 0"),
    ],
)
def test_sample_alpha_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample_alpha(4, **kwargs)


def test_auxiliary_gaussian():
    a, b, other = AuxiliaryGaussian(16, seed=7), AuxiliaryGaussian(16, seed=7), AuxiliaryGaussian(16, seed=8)
    assert torch.equal(a.mu, b.mu) and not torch.equal(a.mu, other.mu)
    assert a.mu.norm().item() == pytest.approx(1.0)
    sa = a.sample(20, generator=torch.Generator().manual_seed(0))
    sb = b.sample(20, generator=torch.Generator().manual_seed(0))
    so = other.sample(20, generator=torch.Generator().manual_seed(0))
    assert sa.shape == (20, 16) and torch.equal(sa, sb) and not torch.equal(sa, so)
    torch.testing.assert_close(sa.norm(dim=1), torch.ones(20))
    assert a.sample(3, dtype=torch.float64).dtype == torch.float64
    tight = AuxiliaryGaussian(16, sigma=1e-3, seed=7).sample(5)  # concentrates at mu
    assert (tight @ a.mu).min() > 0.99

    restored = AuxiliaryGaussian(4, sigma=2.0, seed=0)
    restored.load_state_dict(a.state_dict())
    assert torch.equal(restored.mu, a.mu) and (restored.dim, restored.sigma, restored.seed) == (16, 1.0, 7)
    assert torch.equal(restored.sample(20, generator=torch.Generator().manual_seed(0)), sa)
    with pytest.raises(ValueError, match="sigma"):
        AuxiliaryGaussian(16, sigma=0.0)


def test_bad_shapes_raise():
    z, labels = F.normalize(torch.randn(4, 3), dim=1), torch.tensor([0, 0, 1, 1])
    aux = F.normalize(torch.randn(2, 3), dim=1)
    cases = [
        (dict(z=z[0], labels=labels), r"\(3,\)"),
        (dict(z=z, labels=labels[:3]), r"\(3,\)"),
        (dict(z=z, labels=labels[None]), r"\(1, 4\)"),
        (dict(z=z, labels=labels, alpha=torch.rand(4, 5)), r"\(4, 5\)"),
        (dict(z=z, labels=labels, alpha=torch.rand(1, 1, 4, 4)), r"\(1, 1, 4, 4\)"),
        (dict(z=z, labels=labels, aux=torch.randn(2, 4)), r"\(2, 4\)"),
        (dict(z=z, labels=labels, aux=torch.randn(3)), r"\(3,\)"),
        (dict(z=z, labels=labels, aux=aux, aux_alpha=torch.rand(4, 3)), r"\(4, 3\)"),
        (dict(z=z, labels=labels, aux_alpha=torch.rand(4, 2)), "without aux"),
        (dict(z=z, labels=labels, tau=0.0), "tau"),
        (dict(z=z, labels=labels, tau=-1.0), "tau"),
    ]
    for kwargs, match in cases:
        kwargs.setdefault("tau", 0.1)
        with pytest.raises(ValueError, match=match):
            contrastive_loss(**kwargs)
