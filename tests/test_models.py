"""Tests of cssl_ray.models: the common interface, parametrised over the registry."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cssl_ray.config import ConfigError, ModelConfig
from cssl_ray.models import (
    AttentionUNet,
    ProjectionHead,
    TimmUNet,
    check_geometry,
    create_model,
    list_models,
    model_stride,
)
from cssl_ray.models.attention_unet import AttentionGate

# Tiny configs per registered model: (config, in_channels, image side). Every registered name must
# appear here, so a new model is tested by adding one line.
TINY: dict[str, list[tuple[ModelConfig, int, int]]] = {
    "attention_unet": [
        (ModelConfig(name="attention_unet", base_channels=4, depth=2, embed_dim=8, proj_hidden=16), 1, 32),
        (ModelConfig(name="attention_unet", base_channels=4, depth=3, embed_dim=8, proj_hidden=16), 3, 64),
    ],
    "timm_unet": [
        (ModelConfig(name="timm_unet", encoder="resnet18", embed_dim=8, proj_hidden=16), 1, 64),
        (ModelConfig(name="timm_unet", encoder="mobilenetv3_small_050", embed_dim=8, proj_hidden=16), 3, 64),
    ],
}
CASES = [case for name in sorted(TINY) for case in TINY[name]]
IDS = [f"{c.name}-{c.encoder if c.name == 'timm_unet' else f'd{c.depth}'}-in{ch}-{s}px" for c, ch, s in CASES]
ENCODER_PREFIX = {"attention_unet": "enc.", "timm_unet": "encoder."}  # parameters of E
NUM_CLASSES = 3


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # Tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's
    # barriers wait on a preempted thread for every op (100x slower); restored afterwards.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def build(cfg: ModelConfig, in_channels: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(cfg, in_channels, NUM_CLASSES)


def batch(in_channels: int, side: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, in_channels, side, side, generator=g)


def test_every_registered_model_has_tiny_configs() -> None:
    assert sorted(TINY) == list_models()


@pytest.mark.parametrize(("cfg", "in_ch", "side"), CASES, ids=IDS)
def test_shapes_and_attributes(cfg: ModelConfig, in_ch: int, side: int) -> None:
    model = build(cfg, in_ch).eval()
    x = batch(in_ch, side)
    assert (model.num_classes, model.in_channels, model.embed_dim) == (NUM_CLASSES, in_ch, cfg.embed_dim)
    assert model.stride == model_stride(cfg)
    with torch.no_grad():
        logits = model(x)
        feats = model.encode(x)
        z = model.embed(x)
        p = model.project(feats[-1])
    assert logits.shape == (2, NUM_CLASSES, side, side)
    assert [f.shape[1] for f in feats] == model.feature_channels
    assert all(f.shape[0] == 2 for f in feats)
    assert feats[-1].shape[-2:] == (side // model.stride, side // model.stride)
    assert z.shape == p.shape == (2, cfg.embed_dim)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(2))
    assert not torch.allclose(p.norm(dim=1), torch.ones(2), atol=1e-3)  # project leaves norms alone
    torch.testing.assert_close(z, F.normalize(p, dim=1))


@pytest.mark.parametrize(("cfg", "in_ch", "side"), CASES, ids=IDS)
def test_decode_of_encode_is_forward(cfg: ModelConfig, in_ch: int, side: int) -> None:
    model = build(cfg, in_ch).eval()
    x = batch(in_ch, side)
    with torch.no_grad():
        assert torch.equal(model.decode(model.encode(x)), model(x))


@pytest.mark.parametrize(("cfg", "in_ch", "side"), CASES, ids=IDS)
def test_teacher_decodes_student_features_without_cached_state(cfg: ModelConfig, in_ch: int, side: int) -> None:
    student, teacher = build(cfg, in_ch, seed=0).eval(), build(cfg, in_ch, seed=1).eval()
    x = batch(in_ch, side)
    with torch.no_grad():
        feats = student.encode(x)
        y = teacher.decode(feats)
        teacher(batch(in_ch, side, seed=7))  # another call in between must not change the result
        assert torch.equal(teacher.decode(feats), y)
        assert y.shape == (2, NUM_CLASSES, side, side)
        assert not torch.allclose(y, student.decode(feats))  # the teacher's own decoder ran


@pytest.mark.parametrize(("cfg", "in_ch", "side"), CASES, ids=IDS)
def test_perturbed_features_are_decoded(cfg: ModelConfig, in_ch: int, side: int) -> None:
    model = build(cfg, in_ch).eval()
    x = batch(in_ch, side)
    with torch.no_grad():
        feats = model.encode(x)
        clean = model.decode(feats)
        bottleneck = feats[:-1] + [feats[-1] + torch.randn_like(feats[-1])]  # consistency.perturb: bottleneck
        all_levels = [f + 0.1 * torch.randn_like(f) for f in feats]  # consistency.perturb: all_levels
        assert not torch.allclose(model.decode(bottleneck), clean)
        assert model.decode(all_levels).shape == clean.shape
        assert torch.equal(model.decode(feats), clean)  # the list passed in was not modified


@pytest.mark.parametrize(("cfg", "in_ch", "side"), CASES, ids=IDS)
def test_gradients(cfg: ModelConfig, in_ch: int, side: int) -> None:
    model = build(cfg, in_ch).train()
    x = batch(in_ch, side).requires_grad_(True)
    model(x).square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # logits -> input
    assert all(p.grad is None for p in model.head.parameters())  # forward() never touches g

    model.zero_grad(set_to_none=True)
    target = torch.randn(2, cfg.embed_dim, generator=torch.Generator().manual_seed(3))
    (model.embed(x) * target).sum().backward()
    encoder = {n: p for n, p in model.named_parameters() if n.startswith(ENCODER_PREFIX[cfg.name])}
    assert encoder and all(p.grad is not None for p in encoder.values())  # embed -> every parameter of E
    assert sum(p.grad.abs().sum() for p in encoder.values()) > 0
    assert all(p.grad is not None for p in model.head.parameters())
    decoder = [p for n, p in model.named_parameters() if not n.startswith((ENCODER_PREFIX[cfg.name], "head."))]
    assert decoder and all(p.grad is None for p in decoder)  # embed never runs D


@pytest.mark.parametrize(("cfg", "in_ch", "side"), CASES, ids=IDS)
def test_same_seed_same_model(cfg: ModelConfig, in_ch: int, side: int) -> None:
    a, b, c = build(cfg, in_ch, seed=5), build(cfg, in_ch, seed=5), build(cfg, in_ch, seed=6)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.parametrize(("cfg", "in_ch", "side"), CASES, ids=IDS)
def test_input_not_a_multiple_of_the_stride_is_rejected(cfg: ModelConfig, in_ch: int, side: int) -> None:
    model = build(cfg, in_ch)
    with pytest.raises(ValueError, match="multiples of the stride"):
        model.encode(torch.zeros(2, in_ch, side + model.stride // 2, side))
    with pytest.raises(ValueError, match=r"expected \(B, "):
        model.encode(torch.zeros(2, in_ch + 1, side, side))


# --- Attention U-Net ----------------------------------------------------------------------------


@pytest.mark.parametrize("depth", range(1, 7))
def test_attention_unet_any_depth_and_width(depth: int) -> None:
    model = AttentionUNet(2, 2, base_channels=1, depth=depth, embed_dim=4, proj_hidden=4).eval()
    assert model.stride == 2**depth and model.feature_channels == [2**l for l in range(depth + 1)]
    with torch.no_grad():
        feats = model.encode(torch.randn(2, 2, 64, 64))
        assert len(feats) == depth + 1
        assert model.decode(feats).shape == (2, 2, 64, 64)


def test_attention_unet_vanilla_size() -> None:
    # base 64, depth 4 is the vanilla U-Net (31.0M) plus attention gates, BN and the head g.
    model = AttentionUNet(1, 2, base_channels=64, depth=4)
    n = sum(p.numel() for p in model.parameters())
    assert 31e6 <= n <= 35e6, n
    assert model.feature_channels == [64, 128, 256, 512, 1024]


def test_attention_gate_scales_the_skip_by_psi_in_unit_interval() -> None:
    torch.manual_seed(0)
    gate = AttentionGate(g_ch=6, x_ch=5, inter_ch=3).eval()
    g, x = 10 * torch.randn(2, 6, 8, 8), torch.randn(2, 5, 8, 8)  # large g spreads psi over [0, 1]
    with torch.no_grad():
        psi = gate.coefficients(g, x)
        out = gate(g, x)
    assert psi.shape == (2, 1, 8, 8)
    assert psi.min() >= 0 and psi.max() <= 1 and psi.max() - psi.min() > 0.1
    torch.testing.assert_close(out, x * psi)
    with pytest.raises(ValueError, match="differ in size"):
        gate(g, x[..., :4, :4])


def test_projection_head() -> None:
    head = ProjectionHead(6, 10, 4)
    assert [type(m) for m in head.net] == [nn.Linear, nn.ReLU, nn.Linear]
    assert (head.net[0].in_features, head.net[0].out_features, head.net[2].out_features) == (6, 10, 4)
    assert head(torch.randn(3, 6)).shape == (3, 4)
    with pytest.raises(ValueError, match=r"expected \(B, 6\), got \(3, 5\)"):
        head(torch.randn(3, 5))


# --- registry, stride and geometry --------------------------------------------------------------


def test_unknown_model_name() -> None:
    with pytest.raises(ConfigError) as e:
        create_model(ModelConfig(name="foo"), 1, 2)
    assert str(e.value) == "model.name: 'foo' is unknown; choose one of attention_unet, timm_unet"


def test_unknown_timm_encoder() -> None:
    with pytest.raises(ConfigError, match=r"^model\.encoder: 'no_such_net' is not a timm model"):
        create_model(ModelConfig(name="timm_unet", encoder="no_such_net"), 1, 2)


def test_model_stride() -> None:
    assert model_stride(ModelConfig(name="attention_unet", depth=3)) == 8
    assert model_stride(ModelConfig(name="attention_unet", depth=4)) == 16
    assert model_stride(ModelConfig(name="timm_unet", encoder="resnet18")) == 32


def test_check_geometry_patch_size() -> None:
    cfg = ModelConfig(name="attention_unet", depth=4)
    with pytest.raises(ConfigError) as e:
        check_geometry(cfg, (128, 128), 60)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(
        "patches.size: 60 is not a multiple of the network stride 16 (model.name=attention_unet, model.depth=4); "
        "allowed: 16, 32, 48, 64, ..."
    )
    assert "nearest: 48 or 64" in msg
    with pytest.raises(ConfigError, match=r"^patches\.size: 8 is not a multiple of the network stride 16"):
        check_geometry(cfg, (128, 128), 8)  # smaller than the stride


def test_check_geometry_image_size() -> None:
    cfg = ModelConfig(name="attention_unet", depth=3)
    with pytest.raises(ConfigError) as e:
        check_geometry(cfg, (100, 128), 64)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("data.image_size: [100, 128] has side 100, which is not a multiple of the network stride 8 ")
    assert "(model.name=attention_unet, model.depth=3)" in msg
    timm_cfg = ModelConfig(name="timm_unet", encoder="resnet18")
    with pytest.raises(ConfigError, match=r"^data\.image_size: .* stride 32 \(model\.name=timm_unet, model\.encoder=resnet18\)"):
        check_geometry(timm_cfg, (128, 80), 64)


@pytest.mark.parametrize(
    ("cfg", "image_size", "patch"),
    [
        (ModelConfig(name="attention_unet", depth=4), (128, 128), 64),
        (ModelConfig(name="attention_unet", depth=4), (320, 256), 16),
        (ModelConfig(name="attention_unet", depth=3), (40, 64), 24),
        (ModelConfig(name="timm_unet", encoder="resnet18"), (256, 320), 64),
    ],
)
def test_check_geometry_passes(cfg: ModelConfig, image_size: tuple[int, int], patch: int) -> None:
    check_geometry(cfg, image_size, patch)


def test_importing_models_does_not_import_timm() -> None:
    code = "import sys, cssl_ray.models; assert 'timm' not in sys.modules, 'timm imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


# --- timm encoder weights -----------------------------------------------------------------------

TIMM = ModelConfig(name="timm_unet", encoder="resnet18", embed_dim=8, proj_hidden=16)


def _encoder_equal(model: TimmUNet, reference: dict[str, torch.Tensor]) -> bool:
    # Plain timm keys "stages.0.x" are "stages_0.x" in the features_only encoder.
    ref = {k.replace(".", "_"): v for k, v in reference.items()}
    return all(torch.equal(v, ref[k.replace(".", "_")]) for k, v in model.encoder.state_dict().items())


def test_encoder_weights_features_state_dict(tmp_path: Path) -> None:
    torch.manual_seed(11)
    source = create_model(TIMM, 1, NUM_CLASSES)
    path = tmp_path / "encoder.pt"
    torch.save(source.encoder.state_dict(), path)
    torch.manual_seed(12)
    fresh = create_model(TIMM, 1, NUM_CLASSES)
    assert not _encoder_equal(fresh, source.encoder.state_dict())
    torch.manual_seed(12)
    loaded = create_model(replace(TIMM, encoder_weights=str(path)), 1, NUM_CLASSES)
    assert _encoder_equal(loaded, source.encoder.state_dict())
    # Only E is loaded: the decoder and g are those of a fresh model with the same seed.
    dec = {k: v for k, v in loaded.state_dict().items() if not k.startswith("encoder.")}
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in dec.items())


@pytest.mark.parametrize("encoder", ["resnet18", "convnext_atto"])  # convnext: flattened key names
def test_encoder_weights_plain_timm_state_dict(tmp_path: Path, encoder: str) -> None:
    import timm

    torch.manual_seed(13)
    plain = timm.create_model(encoder, pretrained=False, in_chans=1)
    path = tmp_path / "plain.pt"
    torch.save({"state_dict": plain.state_dict()}, path)  # a wrapped checkpoint is accepted too
    model = create_model(replace(TIMM, encoder=encoder, encoder_weights=str(path)), 1, NUM_CLASSES)
    assert _encoder_equal(model, plain.state_dict())


def test_encoder_weights_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        create_model(replace(TIMM, encoder_weights=str(missing)), 1, NUM_CLASSES)

    other = tmp_path / "mobilenet.pt"  # another architecture's weights
    mobilenet = create_model(replace(TIMM, encoder="mobilenetv3_small_050"), 1, NUM_CLASSES)
    torch.save(mobilenet.encoder.state_dict(), other)
    with pytest.raises(ValueError) as e:
        create_model(replace(TIMM, encoder_weights=str(other)), 1, NUM_CLASSES)
    assert str(other) in str(e.value) and "\n" not in str(e.value)
    assert "missing keys [" in str(e.value) and "unexpected keys [" in str(e.value)

    partial = tmp_path / "partial.pt"  # one tensor short: no silent partial load
    sd = create_model(TIMM, 1, NUM_CLASSES).encoder.state_dict()
    sd.pop("layer4.1.conv2.weight")
    torch.save(sd, partial)
    with pytest.raises(ValueError, match=r"missing keys \[layer4\.1\.conv2\.weight\]"):
        create_model(replace(TIMM, encoder_weights=str(partial)), 1, NUM_CLASSES)

    rgb = tmp_path / "rgb.pt"  # right keys, 3 input channels for a 1-channel model
    torch.save(create_model(TIMM, 3, NUM_CLASSES).encoder.state_dict(), rgb)
    with pytest.raises(ValueError, match=r"wrong shape .* conv1\.weight \(64, 3, 7, 7\) vs \(64, 1, 7, 7\)"):
        create_model(replace(TIMM, encoder_weights=str(rgb)), 1, NUM_CLASSES)

    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="is not a loadable PyTorch state dict"):
        create_model(replace(TIMM, encoder_weights=str(junk)), 1, NUM_CLASSES)
