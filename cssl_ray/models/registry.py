"""Models by name: ``create_model(cfg.model, in_channels, num_classes)`` over a small registry.

A builder is ``fn(cfg: ModelConfig, in_channels: int, num_classes: int) -> nn.Module`` registered
with ``@register_model("name")``; the module it returns has the interface of
``cssl_ray.models.heads.SegmentationModel``. ``model_stride`` and ``check_geometry`` read the
network's stride so that patch and image sizes are checked before any training starts.
"""
from __future__ import annotations

import functools
from typing import Callable

from torch import nn

from cssl_ray.config import ConfigError, ModelConfig
from cssl_ray.models.attention_unet import AttentionUNet
from cssl_ray.models.timm_unet import TimmUNet, create_encoder

Builder = Callable[[ModelConfig, int, int], nn.Module]
_REGISTRY: dict[str, Builder] = {}


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator: register ``fn(cfg, in_channels, num_classes) -> nn.Module`` under ``name``."""

    def deco(fn: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return deco


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def _check_name(cfg: ModelConfig) -> None:
    if cfg.name not in _REGISTRY:
        raise ConfigError(f"model.name: {cfg.name!r} is unknown; choose one of {', '.join(list_models())}")


def create_model(cfg: ModelConfig, in_channels: int, num_classes: int) -> nn.Module:
    """Build the model ``cfg.name``; unknown names raise ``ConfigError`` listing the known ones."""
    _check_name(cfg)
    return _REGISTRY[cfg.name](cfg, in_channels, num_classes)


@register_model("attention_unet")
def _build_attention_unet(cfg: ModelConfig, in_channels: int, num_classes: int) -> nn.Module:
    return AttentionUNet(
        in_channels, num_classes, base_channels=cfg.base_channels, depth=cfg.depth,
        embed_dim=cfg.embed_dim, proj_hidden=cfg.proj_hidden,
    )


@register_model("timm_unet")
def _build_timm_unet(cfg: ModelConfig, in_channels: int, num_classes: int) -> nn.Module:
    _timm_encoder_stride(cfg.encoder)  # a bad encoder name fails here as a one-line ConfigError
    return TimmUNet(
        cfg.encoder, in_channels, num_classes, embed_dim=cfg.embed_dim, proj_hidden=cfg.proj_hidden,
        pretrained=cfg.pretrained, encoder_weights=cfg.encoder_weights,
    )


@functools.lru_cache(maxsize=None)
def _timm_encoder_stride(encoder: str) -> int:
    # The reduction does not depend on in_chans or weights; one random-init build per name.
    try:
        enc = create_encoder(encoder, in_channels=3, pretrained=False)
    except ValueError as e:
        raise ConfigError(f"model.encoder: {e}") from None
    return int(max(enc.feature_info.reduction()))


def model_stride(cfg: ModelConfig) -> int:
    """Total down-sampling of the bottleneck; H, W and patch sides must be multiples of it."""
    _check_name(cfg)
    if cfg.name == "attention_unet":
        return 2**cfg.depth
    if cfg.name == "timm_unet":
        return _timm_encoder_stride(cfg.encoder)
    # A model registered elsewhere: its instance knows (costs one build).
    return int(create_model(cfg, 1, 2).stride)


def _describe(cfg: ModelConfig) -> str:
    if cfg.name == "attention_unet":
        return f"model.name={cfg.name}, model.depth={cfg.depth}"
    if cfg.name == "timm_unet":
        return f"model.name={cfg.name}, model.encoder={cfg.encoder}"
    return f"model.name={cfg.name}"


def _allowed(value: int, stride: int) -> str:
    lower = (value // stride) * stride
    nearest = f"{lower} or {lower + stride}" if lower > 0 else f"{stride}"
    return f"{', '.join(str(stride * k) for k in range(1, 5))}, ... (nearest: {nearest})"


def check_geometry(cfg: ModelConfig, image_size: tuple[int, int], patch_size: int) -> None:
    """Raise a one-line ``ConfigError`` when an image side or the patch side is not a multiple of
    the network stride (the decoder could not restore the input size)."""
    stride = model_stride(cfg)
    for side in image_size:
        if side <= 0 or side % stride:
            raise ConfigError(
                f"data.image_size: {list(image_size)} has side {side}, which is not a multiple of the network "
                f"stride {stride} ({_describe(cfg)}); allowed: {_allowed(side, stride)}"
            )
    if patch_size <= 0 or patch_size % stride:
        raise ConfigError(
            f"patches.size: {patch_size} is not a multiple of the network stride {stride} "
            f"({_describe(cfg)}); allowed: {_allowed(patch_size, stride)}"
        )
