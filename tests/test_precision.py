"""train.amp / train.channels_last in the real training step (cssl_ray.models.precision)."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

import cssl_ray.run.loop as loop
from cssl_ray.config import ConfigError, from_dict
from cssl_ray.data.synthetic import make_synthetic
from cssl_ray.method.consistency import Teacher
from cssl_ray.method.pseudo_labels import predict_pseudo_labels
from cssl_ray.method.streams import RandomStreams
from cssl_ray.models import create_model
from cssl_ray.models.precision import FP32, Precision, backward_step
from cssl_ray.run import labelling
from cssl_ray.run import plan as step_plan
from cssl_ray.run.schedule import RunState

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def small_cfg(**train):
    return from_dict({
        "data": {"image_size": [32, 32]},
        "model": {"base_channels": 4, "depth": 2, "embed_dim": 8, "proj_hidden": 8},
        "patches": {"size": 16, "min_pixels": 10, "per_image": 6, "batch_size": 8},
        "consistency": {"batch_size": 2},
        "pseudo": {"threshold": 0.3},
        "train": {"steps_per_round": 2, **train},
    })


IMAGES, MASKS = make_synthetic(6, (32, 32), 4, seed=0)


def fresh_model(cfg, device="cpu"):
    torch.manual_seed(0)
    return Precision.from_config(cfg.train, device).prepare_model(
        create_model(cfg.model, 1, cfg.data.num_classes).to(device))


def round_inputs(cfg):
    model = fresh_model(small_cfg())  # the same patches for every precision: labelled in fp32, NCHW
    fp32 = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, channels_last=False, amp="off"))
    patches, classes, _ = labelling.round_patches(model, fp32, IMAGES[:2], MASKS[:2], IMAGES[2:],
                                             generator=torch.Generator().manual_seed(0))
    assert patches.shape[0] > 0
    return patches, classes


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    """The equality tests' optimiser. Adam's first step is lr * sign(g): it would turn rounding noise on a
    gradient that is zero in exact arithmetic (the bias of a conv followed by BatchNorm) into +-lr, so
    parameters after Adam differ by ~lr between two orders of the same sums; SGD keeps them within
    lr x the gradients' rounding."""
    return torch.optim.SGD(model.parameters(), lr=0.1)


def run_supervised(cfg, device="cpu", scaler=None):
    model = fresh_model(cfg, device)
    stats = loop.supervised_epoch(model, sgd(model), IMAGES[:4], MASKS[:4],
                                  batch_size=2, generator=torch.Generator().manual_seed(0),
                                  precision=Precision.from_config(cfg.train, device), scaler=scaler)
    return model, stats


def run_cssl(cfg, device="cpu", scaler=None):
    patches, classes = round_inputs(cfg)
    model = fresh_model(cfg, device)
    streams = RandomStreams(0)
    plan = step_plan.epoch_plan(IMAGES[2:].shape[0], cfg, streams)
    stats = loop.cssl_epoch(model, Teacher(model), sgd(model), step_plan.pooled_steps(plan, IMAGES[2:], patches, classes),
                            len(plan), cfg, lambda_=0.5, streams=streams, scaler=scaler)
    return model, stats


def assert_same_parameters(a: nn.Module, b: nn.Module, atol: float = 1e-5) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=atol, rtol=0), name


# -- config -------------------------------------------------------------------------------------


def test_config_rejects_unknown_amp_in_one_line():
    with pytest.raises(ConfigError) as e:
        from_dict({"train": {"amp": "fp8"}})
    assert str(e.value) == "train.amp: 'fp8' is not allowed; choose one of off, bf16, fp16"
    with pytest.raises(ConfigError, match="train.channels_last: expected true or false"):
        from_dict({"train": {"channels_last": "yes"}})
    assert (small_cfg().train.amp, small_cfg().train.channels_last) == ("off", False)


def test_fp16_needs_cuda():
    with pytest.raises(ConfigError, match=r"^train\.amp: 'fp16' is out of range.*fp16 needs CUDA"):
        from_dict({"train": {"amp": "fp16", "device": "cpu"}})
    cfg = small_cfg(amp="fp16")  # device auto: decided where the run starts
    with pytest.raises(ConfigError, match=r"^train\.amp: fp16 needs a CUDA device.*use bf16 or off$"):
        Precision.from_config(cfg.train, "cpu")
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        RunState(cfg, torch.device("cpu"))
    # a forward-only caller on a CPU (the Ray driver's test pass) runs fp32
    assert Precision.from_config(cfg.train, "cpu", inference=True).dtype is None


# -- the step helper ----------------------------------------------------------------------------


def test_backward_step_averages_scaled_gradients_and_skips_a_non_finite_step():
    """The all-reduce hook sees the scaled gradients; the step is the unscaled one; an inf that reaches
    the averaged gradients (any rank's overflow) skips the step and lowers the scale."""
    def setup():
        torch.manual_seed(0)
        net = nn.Linear(3, 2)
        return net, torch.optim.SGD(net.parameters(), lr=0.1), torch.randn(4, 3)

    net, opt, x = setup()
    backward_step(net(x).square().mean(), opt)
    reference = [p.detach().clone() for p in net.parameters()]

    net, opt, x = setup()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    seen = []
    loss = net(x).square().mean()
    true_grad = torch.autograd.grad(loss, net.weight, retain_graph=True)[0]
    backward_step(loss, opt, scaler, after_backward=lambda: seen.append(net.weight.grad.clone()))
    assert torch.allclose(seen[0], 1024.0 * true_grad)
    assert all(torch.allclose(p, r, atol=1e-6) for p, r in zip(net.parameters(), reference))

    before = [p.detach().clone() for p in net.parameters()]
    backward_step(net(x).square().mean(), opt, scaler, after_backward=lambda: net.weight.grad.fill_(math.inf))
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))  # skipped
    assert scaler.get_scale() == 512.0


def test_layout_makes_4d_batches_nhwc_only():
    nhwc = Precision(channels_last=True)
    x = torch.randn(2, 3, 4, 5)
    assert nhwc.layout(x).is_contiguous(memory_format=torch.channels_last)
    assert nhwc.layout(x).stride() == (60, 1, 15, 3) and torch.equal(nhwc.layout(x), x)
    assert FP32.layout(x) is x and nhwc.layout(None) is None
    mask = torch.zeros(2, 4, 5, dtype=torch.long)
    assert nhwc.layout(mask) is mask


# -- fp32 with channels_last: the same numbers --------------------------------------------------


def test_channels_last_fp32_supervised_epoch_equals_default():
    base, stats = run_supervised(small_cfg())
    nhwc, stats_nhwc = run_supervised(small_cfg(channels_last=True))
    assert nhwc.enc[0][3].weight.is_contiguous(memory_format=torch.channels_last)
    assert not base.enc[0][3].weight.is_contiguous(memory_format=torch.channels_last)
    assert stats_nhwc["loss_sup"] == pytest.approx(stats["loss_sup"], abs=1e-5)
    assert_same_parameters(nhwc, base)


def test_channels_last_fp32_cssl_epoch_equals_default():
    # unmasked patches: the zeros of masked ones tie in max-pooling, and NCHW and NHWC kernels break
    # the ties differently (both right), routing L_CL's gradient to different pixels
    def unmasked(cfg):
        return dataclasses.replace(cfg, patches=dataclasses.replace(cfg.patches, mask="none"))

    base, stats = run_cssl(unmasked(small_cfg()))
    nhwc, stats_nhwc = run_cssl(unmasked(small_cfg(channels_last=True)))
    assert stats["steps"] == stats_nhwc["steps"] == 2
    for k in ("loss", "loss_cl", "loss_cr", "omega"):
        assert stats_nhwc[k] == pytest.approx(stats[k], abs=1e-5), k
    assert_same_parameters(nhwc, base)


# -- bf16 autocast on the CPU -------------------------------------------------------------------


def record_conv_dtypes(model: nn.Module) -> list[torch.dtype]:
    dtypes: list[torch.dtype] = []
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            m.register_forward_hook(lambda mod, args, out: dtypes.append(out.dtype))
    return dtypes


def spy_backward_step(monkeypatch) -> list[torch.Tensor]:
    losses = []

    def spy(loss, optimizer, scaler=None, **kw):
        losses.append(loss.detach())
        return backward_step(loss, optimizer, scaler, **kw)

    monkeypatch.setattr(loop, "backward_step", spy)
    return losses


def test_bf16_supervised_epoch(monkeypatch):
    losses = spy_backward_step(monkeypatch)
    cfg = small_cfg(amp="bf16")
    model = fresh_model(cfg)
    logits_dtypes = []
    model.register_forward_hook(lambda mod, args, out: logits_dtypes.append(out.dtype))
    stats = loop.supervised_epoch(model, torch.optim.Adam(model.parameters(), 1e-3), IMAGES[:4], MASKS[:4],
                                  batch_size=2, precision=Precision.from_config(cfg.train, "cpu"))
    assert logits_dtypes == [torch.bfloat16] * 2
    assert [loss.dtype for loss in losses] == [torch.float32] * 2
    assert math.isfinite(stats["loss_sup"])
    assert all(p.dtype == torch.float32 and p.isfinite().all() for p in model.parameters())


def test_bf16_cssl_epoch(monkeypatch):
    losses = spy_backward_step(monkeypatch)
    outs = []
    orig = loop.cssl_objective

    def spy(*args, **kw):
        outs.append(orig(*args, **kw))
        return outs[-1]

    monkeypatch.setattr(loop, "cssl_objective", spy)
    cfg = small_cfg(amp="bf16", channels_last=True)
    patches, classes = round_inputs(cfg)
    model = fresh_model(cfg)
    conv_dtypes = record_conv_dtypes(model)
    teacher = Teacher(model)
    before = [p.detach().clone() for p in model.parameters()]
    streams = RandomStreams(0)
    plan = step_plan.epoch_plan(IMAGES[2:].shape[0], cfg, streams)
    stats = loop.cssl_epoch(model, teacher, torch.optim.Adam(model.parameters(), 1e-3),
                            step_plan.pooled_steps(plan, IMAGES[2:], patches, classes), len(plan), cfg, lambda_=0.5,
                            streams=streams)
    assert stats["steps"] == 2
    assert conv_dtypes and set(conv_dtypes) == {torch.bfloat16}  # student and teacher (a copy: hooks too)
    for out in outs:
        assert {out[k].dtype for k in ("loss", "loss_cl", "loss_cr", "z")} == {torch.float32}
    assert [loss.dtype for loss in losses] == [torch.float32] * 2
    assert all(math.isfinite(stats[k]) for k in ("loss", "loss_cl", "loss_cr", "omega"))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    # bf16 rounding only: the losses stay close to fp32's
    _, fp32 = run_cssl(small_cfg())
    assert stats["loss"] == pytest.approx(fp32["loss"], rel=0.05)


def test_bf16_evaluate_and_pseudo_labels_close_to_fp32():
    model = fresh_model(small_cfg())
    bf16 = Precision("bf16", "cpu", channels_last=True)
    val = loop.evaluate(model, IMAGES, MASKS, num_classes=4, class_names=list("abcd"), precision=bf16)
    ref = loop.evaluate(model, IMAGES, MASKS, num_classes=4, class_names=list("abcd"))
    assert val["loss"] == pytest.approx(ref["loss"], rel=0.02)
    labels = predict_pseudo_labels(model, IMAGES, 0.3, precision=bf16)
    assert labels.shape == (6, 32, 32) and labels.dtype == torch.int64
    agree = (labels == predict_pseudo_labels(model, IMAGES, 0.3)).float().mean()
    assert agree > 0.95


def test_run_state_builds_the_precision():
    state = RunState(small_cfg(amp="bf16", channels_last=True), torch.device("cpu"))
    assert state.precision == Precision("bf16", "cpu", True)
    assert state.model.enc[0][3].weight.is_contiguous(memory_format=torch.channels_last)
    assert state.teacher.model.enc[0][3].weight.is_contiguous(memory_format=torch.channels_last)
    assert state.scaler is None and state.cssl_scaler is None  # bf16 needs no loss scaling
    s = state.state_dict()
    assert s["scaler"] is None and s["cssl_scaler"] is None
    state.load_state_dict(s)
    assert RunState(small_cfg(), torch.device("cpu")).precision == FP32


# -- fp16 (CUDA only) ---------------------------------------------------------------------------


@CUDA
def test_fp16_on_cuda_scales_the_loss_and_checkpoints_the_scaler():
    cfg = small_cfg(amp="fp16", channels_last=True)
    state = RunState(cfg, torch.device("cuda"))
    assert isinstance(state.scaler, torch.amp.GradScaler) and state.cssl_scaler is not state.scaler
    stats = loop.supervised_epoch(state.model, state.optimizer, IMAGES[:4], MASKS[:4], batch_size=2,
                                  precision=state.precision, scaler=state.scaler)
    assert math.isfinite(stats["loss_sup"])
    assert all(p.dtype == torch.float32 and p.isfinite().all() for p in state.model.parameters())
    patches, classes = round_inputs(cfg)
    state.start_round()
    plan = step_plan.epoch_plan(IMAGES[2:].shape[0], cfg, state.streams)
    record = state.l_tot_epoch(cfg, step_plan.pooled_steps(plan, IMAGES[2:], patches, classes), len(plan))
    assert record["steps"] == 2 and math.isfinite(record["loss"])
    saved = state.state_dict()
    assert saved["scaler"]["scale"] == state.scaler.get_scale()
    again = RunState(cfg, torch.device("cuda"))
    again.load_state_dict(saved)
    assert again.cssl_scaler.get_scale() == state.cssl_scaler.get_scale()


@CUDA
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_on_cuda_matches_fp32_roughly(amp):
    cfg = small_cfg(amp=amp, channels_last=True)
    scaler = Precision.from_config(cfg.train, "cuda").grad_scaler()
    _, stats = run_supervised(cfg, "cuda", scaler)
    _, ref = run_supervised(small_cfg(), "cuda")
    assert stats["loss_sup"] == pytest.approx(ref["loss_sup"], rel=0.05)
    _, cssl = run_cssl(cfg, "cuda")
    assert all(math.isfinite(cssl[k]) for k in ("loss", "loss_cl", "loss_cr"))
