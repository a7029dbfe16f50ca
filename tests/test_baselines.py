"""Baselines: Mean Teacher, CPS, SimCLR, self-training, each against a naive oracle."""
from __future__ import annotations

import copy
import dataclasses
import inspect
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cssl_ray.baselines import (
    ProjectionMLP,
    consistency_weight,
    cps_loss,
    deepest_channels,
    ema_update,
    image_embedding,
    mean_teacher_loss,
    noisy,
    nt_xent,
    self_training_loss,
    sigmoid_rampup,
    two_views,
)
from cssl_ray.baselines.simclr import simclr_batches, simclr_pretrain
from cssl_ray.config import Config, ConfigError, ModelConfig
from cssl_ray.data.batches import index_batches
from cssl_ray.method.pseudo_labels import predict_pseudo_labels
from cssl_ray.models import create_model


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    return create_model(ModelConfig(base_channels=4, depth=2, embed_dim=8, proj_hidden=8), in_channels=1, num_classes=3)


def conv_bn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))


def np_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


# ---- Mean Teacher ---------------------------------------------------------------------------------

def test_ema_matches_hand_computed_average_after_k_updates():
    decay, student = 0.9, conv_bn(0)
    teacher = copy.deepcopy(student)
    expected = [p.detach().flatten().tolist() for p in teacher.parameters()]
    for k in range(4):
        with torch.no_grad():
            for p in student.parameters():
                p.copy_(torch.randn_like(p))
        snapshot = [p.detach().flatten().tolist() for p in student.parameters()]
        ema_update(teacher, student, decay, step=1000 + k)  # alpha = min(1 - 1/1001, 0.9) = decay
        expected = [[decay * t + (1 - decay) * s for t, s in zip(tp, sp)] for tp, sp in zip(expected, snapshot)]
    for p, e in zip(teacher.parameters(), expected):
        assert p.flatten().tolist() == pytest.approx(e, abs=1e-6)


def test_ema_warm_up_alpha_follows_the_step():
    student, teacher = conv_bn(0), conv_bn(1)
    t0 = [p.detach().clone() for p in teacher.parameters()]
    ema_update(teacher, student, 0.99, step=0)  # alpha 0: a copy of the student
    for p, s in zip(teacher.parameters(), student.parameters()):
        assert torch.equal(p, s)
    teacher = conv_bn(1)
    ema_update(teacher, student, 0.99, step=1)  # alpha = min(1/2, 0.99) = 0.5
    for p, s, t in zip(teacher.parameters(), student.parameters(), t0):
        assert torch.allclose(p, 0.5 * t + 0.5 * s)


def test_ema_copies_buffers_and_teacher_gets_no_gradient():
    student = conv_bn(0)
    teacher = copy.deepcopy(student)  # parameters still require grad, like a careless caller's
    student(torch.randn(4, 1, 6, 6))  # train mode: running stats move
    ema_update(teacher, student, 0.99, step=50)
    for (name, b), sb in zip(teacher.named_buffers(), student.buffers()):
        assert torch.equal(b, sb), name
    assert int(teacher[1].num_batches_tracked) == 1
    assert all(p.is_leaf and p.grad is None for p in teacher.parameters())  # update recorded no graph
    x = torch.randn(2, 1, 6, 6)
    mean_teacher_loss(student(x), teacher(noisy(x, 0.1, torch.Generator().manual_seed(0)))).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


@pytest.mark.parametrize("decay, step", [(1.0, 0), (-0.1, 0), (float("nan"), 0), (0.5, -1)])
def test_ema_rejects_bad_arguments(decay, step):
    with pytest.raises(ValueError, match="decay|step"):
        ema_update(conv_bn(), conv_bn(), decay, step)


def test_ema_rejects_different_architectures():
    with pytest.raises(ValueError, match="shape|parameters|student"):
        ema_update(nn.Conv2d(1, 2, 3), nn.Conv2d(1, 3, 3), 0.9, 5)


@pytest.mark.parametrize("current, length, expected", [
    (0.0, 10.0, math.exp(-5.0)),
    (5.0, 10.0, math.exp(-5.0 * 0.25)),
    (10.0, 10.0, 1.0),
    (25.0, 10.0, 1.0),
    (-3.0, 10.0, math.exp(-5.0)),
    (7.0, 0.0, 1.0),
])
def test_sigmoid_rampup(current, length, expected):
    assert sigmoid_rampup(current, length) == pytest.approx(expected, rel=1e-12)


def test_consistency_weight_and_rampup_errors():
    assert consistency_weight(100, 0.1, 200) == pytest.approx(0.1 * math.exp(-5 * 0.25))
    with pytest.raises(ValueError, match="length"):
        sigmoid_rampup(1.0, -1.0)
    with pytest.raises(ValueError, match="weight"):
        consistency_weight(1, -0.1, 10)


def test_mean_teacher_loss_matches_numpy_and_detaches_teacher():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 4, 5, generator=g, requires_grad=True)
    t = torch.randn(2, 3, 4, 5, generator=g, requires_grad=True)
    p_s, p_t = np_softmax(s.detach().double().numpy(), 1), np_softmax(t.detach().double().numpy(), 1)
    expected = sum((a - b) ** 2 for a, b in zip(p_s.ravel(), p_t.ravel())) / p_s.size
    loss = mean_teacher_loss(s, t)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert t.grad is None and s.grad is not None
    with pytest.raises(ValueError, match="shapes"):
        mean_teacher_loss(s, t[:, :2])


def test_noisy_is_clamped_seeded_and_zero_std_is_identity():
    x = torch.randn(4, 1, 16, 16)
    r = noisy(x, 0.1, torch.Generator().manual_seed(3)) - x
    assert r.abs().max().item() <= 0.2 + 1e-6
    assert (r.abs() > 0.19).any()  # the clamp is reached in 1024 draws (P(|N| > 1.9 std) ~ 6%)
    assert torch.equal(noisy(x, 0.1, torch.Generator().manual_seed(3)), noisy(x, 0.1, torch.Generator().manual_seed(3)))
    assert not torch.equal(noisy(x, 0.1, torch.Generator().manual_seed(3)),
                           noisy(x, 0.1, torch.Generator().manual_seed(4)))
    assert torch.equal(noisy(x, 0.0, torch.Generator().manual_seed(3)), x)
    with pytest.raises(ValueError, match="std"):
        noisy(x, -0.1)


# ---- CPS ------------------------------------------------------------------------------------------

def np_ce(logits: np.ndarray, target: np.ndarray, ignore: int | None = None) -> float:
    """Mean -log softmax(logits)[target] over pixels, by loops; logits (B, C, H, W), target (B, H, W)."""
    terms = []
    b, _, h, w = logits.shape
    for i in range(b):
        for y in range(h):
            for x in range(w):
                c = int(target[i, y, x])
                if c == ignore:
                    continue
                v = logits[i, :, y, x]
                terms.append(-(v[c] - v.max() - math.log(np.exp(v - v.max()).sum())))
    return sum(terms) / len(terms)


def cps_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(2, 3, 4, 4, generator=g, requires_grad=True)
    b = torch.randn(2, 3, 4, 4, generator=g, requires_grad=True)
    return a, b


def test_cps_each_network_learns_the_others_argmax():
    a, b = cps_inputs()
    an, bn = a.detach().double().numpy(), b.detach().double().numpy()
    expected = np_ce(an, np.argmax(bn, axis=1)) + np_ce(bn, np.argmax(an, axis=1))
    loss = cps_loss(a, b)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    ya, yb = a.detach().argmax(1), b.detach().argmax(1)
    assert loss.item() == pytest.approx((F.cross_entropy(a, yb) + F.cross_entropy(b, ya)).item(), rel=1e-6)


def test_cps_gradient_of_each_network_comes_only_from_its_student_term():
    a, b = cps_inputs(1)
    cps_loss(a, b).backward()
    a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    F.cross_entropy(a2, b2.detach().argmax(1)).backward()
    assert torch.allclose(a.grad, a2.grad, atol=1e-7)
    a3, b3 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    F.cross_entropy(b3, a3.detach().argmax(1)).backward()
    assert torch.allclose(b.grad, b3.grad, atol=1e-7)


def test_cps_ignore_index_skips_the_other_networks_class():
    a, b = cps_inputs(2)
    an, bn = a.detach().double().numpy(), b.detach().double().numpy()
    yb = np.argmax(bn, axis=1)
    assert (yb == 1).any() and (yb != 1).any()
    expected = np_ce(an, yb, ignore=1) + np_ce(bn, np.argmax(an, axis=1), ignore=1)
    loss = cps_loss(a, b, ignore_index=1)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert (a.grad.abs().sum(1)[torch.from_numpy(yb == 1)] == 0).all()  # skipped pixels: no gradient
    b_all_one = torch.zeros(1, 3, 2, 2)
    b_all_one[:, 1] = 5.0  # every pixel of b is class 1: a's term has no pixel left
    out = cps_loss(torch.zeros(1, 3, 2, 2, requires_grad=True), b_all_one, ignore_index=1)
    assert torch.isfinite(out)
    with pytest.raises(ValueError, match="logits_a"):
        cps_loss(a, b[:1])


# ---- SimCLR ---------------------------------------------------------------------------------------

def np_nt_xent(z1: np.ndarray, z2: np.ndarray, t: float) -> float:
    z = np.concatenate([z1, z2]).astype(np.float64)
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    n2, n = len(z), len(z1)
    total = 0.0
    for i in range(n2):
        p = (i + n) % n2
        denom = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(n2) if k != i)
        total += -math.log(math.exp(float(z[i] @ z[p]) / t) / denom)
    return total / n2


@pytest.mark.parametrize("n, d, t", [(1, 3, 0.5), (2, 4, 0.1), (5, 8, 1.0), (7, 3, 0.07)])
def test_nt_xent_matches_naive_double_loop(n, d, t):
    g = torch.Generator().manual_seed(n * 10 + d)
    z1, z2 = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)
    expected = np_nt_xent(z1.numpy(), z2.numpy(), t)
    assert nt_xent(z1, z2, t).item() == pytest.approx(expected, rel=1e-10, abs=1e-12)
    assert nt_xent(z1.float(), z2.float(), t).item() == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert nt_xent(3.0 * z1, 0.25 * z2, t).item() == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_nt_xent_gradient_is_finite_and_errors_are_clear():
    z1, z2 = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6, requires_grad=True)
    nt_xent(z1, z2, 0.2).backward()
    assert torch.isfinite(z1.grad).all() and torch.isfinite(z2.grad).all()
    bad_pairs = [(torch.randn(4, 6), torch.randn(3, 6)), (torch.randn(4), torch.randn(4)),
                 (torch.randn(0, 6), torch.randn(0, 6))]
    for bad in bad_pairs:
        with pytest.raises(ValueError, match="z1 and z2"):
            nt_xent(*bad, 0.5)
    for t in (0.0, -0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            nt_xent(z1, z2, t)


@pytest.mark.parametrize("size", [(16, 16), (8, 12)])
def test_two_views_shapes_determinism_and_difference(size):
    images = torch.randn(3, 2, *size)
    before = images.clone()
    v1, v2 = two_views(images, torch.Generator().manual_seed(0))
    w1, w2 = two_views(images, torch.Generator().manual_seed(0))
    assert v1.shape == v2.shape == images.shape and v1.dtype == images.dtype
    assert torch.equal(v1, w1) and torch.equal(v2, w2)
    assert not torch.allclose(v1, v2)
    assert torch.equal(images, before)
    with pytest.raises(ValueError, match="two_views"):
        two_views(images[0])


def test_two_views_jitter_ranges_on_a_constant_image():
    # flips, rotations and crops leave a constant image constant: v = contrast + shift + noise
    v1, v2 = two_views(torch.ones(64, 1, 16, 16), torch.Generator().manual_seed(1))
    for v in (v1, v2):
        means, stds = v.mean(dim=(1, 2, 3)), v.std(dim=(1, 2, 3))
        assert means.min() > 0.7 - 0.02 and means.max() < 1.3 + 0.02
        assert means.max() - means.min() > 0.2  # the jitter is drawn per sample
        assert stds.mean().item() == pytest.approx(0.05, rel=0.1)


def test_deepest_channels_from_the_model_and_by_dummy_forward():
    model = tiny_model()
    x = torch.randn(2, 1, 16, 16)
    assert deepest_channels(model, 1, 16) == model.encode(x)[-1].shape[1] == model.feature_channels[-1]

    class EncodeOnly(nn.Module):  # no feature_channels: the dummy forward path
        def __init__(self):
            super().__init__()
            self.body = conv_bn()

        def encode(self, x):
            return [x, self.body(x)]

    net = EncodeOnly().train()
    stats = net.body[1].running_mean.clone()
    assert deepest_channels(net, 1, (8, 10)) == 2
    assert net.training and net.body[1].training and torch.equal(net.body[1].running_mean, stats)


def test_image_embedding_pools_the_deepest_map_and_trains_the_encoder():
    model = tiny_model()
    model.eval()
    x = torch.randn(4, 1, 16, 16)
    z = image_embedding(model, x)
    assert z.shape == (4, 8)
    assert torch.allclose(z, model.project(model.encode(x)[-1]))
    head = ProjectionMLP(deepest_channels(model, 1, 16), 16, 5)
    z = image_embedding(model, x, head)
    assert z.shape == (4, 5)
    assert torch.allclose(z, head(model.encode(x)[-1].mean(dim=(2, 3))))
    model.train()
    v1, v2 = two_views(x, torch.Generator().manual_seed(0))
    nt_xent(image_embedding(model, v1, head), image_embedding(model, v2, head), 0.5).backward()
    first = next(model.parameters())
    assert first.grad is not None and torch.isfinite(first.grad).all() and first.grad.abs().sum() > 0


def _simclr_cfg(images: str, batch_size: int = 4, epochs: int = 2):
    c = Config()
    return dataclasses.replace(c, baselines=dataclasses.replace(
        c.baselines, simclr_images=images, simclr_batch_size=batch_size, simclr_epochs=epochs))


def test_simclr_batches_all_is_one_pass_and_labelled_matches_its_step_count():
    for n_l, n_u, bs in ((3, 24, 16), (3, 10, 4), (5, 0, 2), (2, 7, 3)):
        every = list(simclr_batches(n_l, n_u, _simclr_cfg("all", bs), torch.Generator().manual_seed(1)))
        oracle = list(index_batches(n_l + n_u, bs, generator=torch.Generator().manual_seed(1)))
        assert [b.tolist() for b in every] == [b.tolist() for b in oracle]  # the baseline is unchanged
        assert set(torch.cat(every).tolist()) == set(range(n_l + n_u))  # each image at least once
        dl = list(simclr_batches(n_l, n_u, _simclr_cfg("labelled", bs), torch.Generator().manual_seed(1)))
        assert len(dl) == len(every) == math.ceil((n_l + n_u) / min(bs, n_l + n_u))  # the same optimiser steps
        assert all(b.numel() == min(bs, n_l) for b in dl)
        assert set(torch.cat(dl).tolist()) == set(range(n_l))  # D_L alone, every image of it
    with pytest.raises(ConfigError, match="baselines.simclr_images.*at least 2 labelled"):
        simclr_batches(1, 9, _simclr_cfg("labelled"), torch.Generator())


def test_simclr_on_d_l_only_never_reads_the_unlabelled_images():
    """NaN unlabelled images: the D_L control's loss and weights stay finite, the baseline's do not."""
    labelled = torch.randn(3, 1, 16, 16)
    poisoned = torch.full((5, 1, 16, 16), float("nan"))
    dl = tiny_model()
    out = simclr_pretrain(dl, labelled, poisoned, _simclr_cfg("labelled"), torch.Generator().manual_seed(0))
    assert math.isfinite(out["simclr_loss_first"]) and math.isfinite(out["simclr_loss_last"])
    assert all(torch.isfinite(p).all() for p in dl.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(dl.parameters(), tiny_model().parameters()))  # it trained
    every = tiny_model()
    out = simclr_pretrain(every, labelled, poisoned, _simclr_cfg("all"), torch.Generator().manual_seed(0))
    assert math.isnan(out["simclr_loss_first"])


# ---- self-training --------------------------------------------------------------------------------

def test_self_training_loss_hand_case():
    logits = torch.tensor([[[[2.0, 0.0, -1.0]], [[0.0, 3.0, 1.0]]]], requires_grad=True)  # (1, 2, 1, 3)
    pseudo = torch.tensor([[[0, 255, 1]]])  # (1, 1, 3): the middle pixel is not covered
    expected = (-math.log(math.exp(2) / (math.exp(2) + 1)) - math.log(math.exp(1) / (math.exp(-1) + math.exp(1)))) / 2
    loss = self_training_loss(logits, pseudo, 255)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert loss.item() == pytest.approx(F.cross_entropy(logits, pseudo, ignore_index=255).item(), rel=1e-6)
    loss.backward()
    assert logits.grad[0, :, 0, 1].abs().sum() == 0


def test_self_training_loss_all_ignored_is_a_connected_zero():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    loss = self_training_loss(logits, torch.full((2, 4, 4), 255), 255)
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_self_training_loss_needs_no_ground_truth_and_consumes_predicted_pseudo_labels():
    assert list(inspect.signature(self_training_loss).parameters) == ["logits", "pseudo", "ignore_index"]
    model = tiny_model()
    x = torch.randn(2, 1, 16, 16)
    pseudo = predict_pseudo_labels(model, x, threshold=1 / 3)  # <= 1/C: Lee's plain argmax, every pixel
    model.eval()
    logits = model(x)
    assert torch.equal(pseudo, logits.argmax(1))
    assert self_training_loss(logits, pseudo).item() == pytest.approx(F.cross_entropy(logits, pseudo).item(), rel=1e-6)
    with pytest.raises(ValueError, match="pseudo"):
        self_training_loss(logits, pseudo[:, :8])
    with pytest.raises(ValueError, match="integer"):
        self_training_loss(logits, pseudo.float())
