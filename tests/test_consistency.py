"""Consistency regularisation: lambda follows omega into the noise; teacher; L_CR."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cssl_ray.config import ModelConfig
from cssl_ray.method.consistency import Teacher, consistency_loss, consistency_step, noise_variance, perturb
from cssl_ray.models import create_model


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    cfg = ModelConfig(base_channels=4, depth=2, embed_dim=8, proj_hidden=8)
    return create_model(cfg, in_channels=1, num_classes=3)


@pytest.mark.parametrize("omega", [-1.0, -0.3, 0.0, 0.5, 1.0])
def test_noise_variance_follows_omega(omega):
    eps = 0.01
    lam = noise_variance(omega, eps)
    assert lam == pytest.approx((omega + 1) / 2 + eps)
    h = torch.zeros(64, 32, 16, 16)
    gen = torch.Generator().manual_seed(0)
    r = perturb([torch.zeros(2, 3), h], lam, "bottleneck", gen)[-1] - h  # (64, 32, 16, 16)
    # 524288 draws: the sample variance is within ~0.5% of lambda
    assert r.var().item() == pytest.approx(lam, rel=0.02)
    assert r.mean().abs().item() < 0.01


def test_noise_reaches_the_decoder_through_the_objective():
    """The anchor's bug: lambda frozen. Here the bottleneck noise seen by the decoder scales with omega."""
    model = tiny_model()
    teacher = Teacher(model)
    x = torch.randn(4, 1, 16, 16)
    seen = []
    orig = model.decode

    def spy(feats):
        seen.append(feats[-1].detach().clone())
        return orig(feats)

    model.decode = spy
    variances = []
    for omega in (-1.0, 1.0):
        seen.clear()
        gen = torch.Generator().manual_seed(1)
        model.eval()  # deterministic encoder (BatchNorm running stats)
        clean = model.encode(x)[-1].detach()
        consistency_step(model, teacher, x, noise_variance(omega, 0.0), threshold=0.01, generator=gen)
        variances.append((seen[-1] - clean).var().item())
    assert variances[0] < 1e-10  # omega = -1, eps = 0: no noise at all
    assert variances[1] == pytest.approx(1.0, rel=0.25)  # omega = 1: variance 1


def test_perturb_all_levels_and_inputs_untouched():
    feats = [torch.zeros(2, 4, 8, 8), torch.zeros(2, 8, 4, 4), torch.zeros(2, 16, 2, 2)]
    out = perturb(feats, 0.5, "bottleneck", torch.Generator().manual_seed(0))
    assert torch.equal(out[0], feats[0]) and torch.equal(out[1], feats[1])
    assert not torch.equal(out[2], feats[2])
    out = perturb(feats, 0.5, "all_levels", torch.Generator().manual_seed(0))
    assert all(not torch.equal(o, f) for o, f in zip(out, feats))
    assert all(f.abs().sum() == 0 for f in feats)
    with pytest.raises(ValueError, match="perturb mode"):
        perturb(feats, 0.5, "skips")
    with pytest.raises(ValueError):
        noise_variance(1.5, 0.0)


def test_consistency_loss_is_cross_entropy_on_confident_teacher_pixels():
    torch.manual_seed(0)
    t = torch.randn(2, 3, 4, 4) * 3
    s = torch.randn(2, 3, 4, 4, requires_grad=True)
    thr = 0.8
    loss = consistency_loss(t, s, thr)
    prob, target = t.softmax(1).max(1)
    keep = prob >= thr
    # naive oracle: per-pixel -log softmax(student)[teacher class], averaged over kept pixels
    logp = F.log_softmax(s, 1)
    expected = -torch.stack([logp[b, target[b, i, j], i, j] for b, i, j in keep.nonzero().tolist()]).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert torch.isfinite(s.grad).all()


def test_consistency_loss_no_confident_pixel_is_zero_not_nan():
    s = torch.randn(1, 3, 4, 4, requires_grad=True)
    loss = consistency_loss(torch.zeros(1, 3, 4, 4), s, 0.9)  # uniform teacher: confidence 1/3
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))
    with pytest.raises(ValueError, match="logits"):
        consistency_loss(torch.zeros(1, 3, 4, 4), torch.zeros(1, 2, 4, 4), 0.5)


def test_teacher_is_frozen_previous_copy():
    model = tiny_model()
    teacher = Teacher(model, "previous")
    assert all(not p.requires_grad for p in teacher.model.parameters())
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert all(torch.equal(before[k], v) for k, v in teacher.model.state_dict().items())
    teacher.update(model)  # "previous" ignores per-step updates
    assert all(torch.equal(before[k], v) for k, v in teacher.model.state_dict().items())
    teacher.snapshot(model)
    for k, v in model.state_dict().items():
        assert torch.equal(teacher.model.state_dict()[k], v)


def test_teacher_ema():
    model = tiny_model()
    teacher = Teacher(model, "ema", ema_decay=0.9)
    name, p0 = next((k, v.clone()) for k, v in teacher.model.state_dict().items() if v.dtype.is_floating_point)
    with torch.no_grad():
        model.state_dict()[name].add_(1.0)
    teacher.update(model)
    assert torch.allclose(teacher.model.state_dict()[name], p0 + 0.1, atol=1e-6)


def test_cr_gradients_reach_student_encoder_and_decoder_not_teacher():
    model = tiny_model()
    teacher = Teacher(model)
    x = torch.randn(2, 1, 16, 16)
    loss = consistency_step(model, teacher, x, 0.5, threshold=0.01, generator=torch.Generator().manual_seed(0))
    loss.backward()
    enc = [p for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert len(enc) > 0
    assert all(p.grad is None for p in teacher.model.parameters())
    assert math.isfinite(loss.item())


def test_relative_noise_scales_with_each_channel_variance():
    """noise: relative -> r ~ N(0, lambda_ Var_c(h)): per channel, the empirical noise variance over
    (B, H, W) is lambda_ times that channel's own variance (two channels 100x apart in scale)."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(32, 2, 16, 16, generator=g) * torch.tensor([0.1, 10.0])[None, :, None, None]
    lam = 0.5
    r = perturb([h], lam, "bottleneck", torch.Generator().manual_seed(1), scale="relative")[0] - h
    channel_var = h.var(dim=(0, 2, 3), unbiased=False)
    assert torch.allclose(r.var(dim=(0, 2, 3)), lam * channel_var, rtol=0.05)
    with pytest.raises(ValueError, match="noise scale"):
        perturb([h], lam, "bottleneck", scale="loud")


def test_relative_noise_carries_no_gradient_through_the_variance():
    h = torch.randn(4, 3, 4, 4, requires_grad=True)
    out = perturb([h], 0.3, "bottleneck", torch.Generator().manual_seed(0), scale="relative")[0]
    out.sum().backward()
    assert torch.equal(h.grad, torch.ones_like(h))  # d(h + std * noise)/dh = 1: std is detached
