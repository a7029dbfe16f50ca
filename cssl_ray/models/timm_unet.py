"""U-Net decoder on any timm ``features_only`` encoder.

    E (encode)  ``timm.create_model(name, features_only=True, in_chans=...)``; returns the
                encoder's feature list, fine to coarse (the last one is the bottleneck h)
    D (decode)  from the deepest feature upward: nearest up-sampling to the next feature's size,
                concat the skip, double conv; if the finest feature is still reduced
                (reduction r_0 > 1, e.g. 2 for ResNets), up-sample by r_0 to the input size and
                refine with a 3x3 conv before the 1x1 classifier
    geometry    read only from ``encoder.feature_info`` (channels, reductions); never hard-coded
                per architecture. ``stride`` = the largest reduction.

timm is imported inside the functions: importing ``cssl_ray.models`` must stay cheap (timm costs
seconds to import) for the modules that only need the Attention U-Net.

Weights are never downloaded by default (``pretrained=False``); ``encoder_weights`` loads a local
state dict, either one saved from the ``features_only`` encoder or one of the plain timm model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cssl_ray.models.attention_unet import DoubleConv
from cssl_ray.models.heads import ProjectionHead, SegmentationModel


def create_encoder(name: str, in_channels: int, pretrained: bool = False) -> nn.Module:
    """The timm ``features_only`` encoder; ValueError (one line) for names timm does not know."""
    import timm  # lazy: see the module docstring

    if not timm.is_model(name):
        raise ValueError(f"{name!r} is not a timm model; see timm.list_models()")
    try:
        return timm.create_model(name, features_only=True, pretrained=pretrained, in_chans=in_channels)
    except RuntimeError as e:  # e.g. "features_only not implemented for ..."
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"timm model {name!r} cannot be built as a features_only encoder ({first})") from None


def _norm_key(key: str) -> str:
    # timm's FeatureListNet flattens top-level Sequentials: plain "stages.0.x" becomes "stages_0.x".
    return key.replace(".", "_")


def _fmt_keys(keys: set[str], limit: int = 3) -> str:
    ordered = sorted(keys)
    shown = ", ".join(ordered[:limit])
    more = f", ... ({len(ordered)} in all)" if len(ordered) > limit else ""
    return f"[{shown}{more}]"


def _plain_to_features_keys(encoder: nn.Module, plain_keys: set[str]) -> dict[str, str]:
    """Map each plain-model key the features encoder uses to the encoder's own key."""
    by_norm: dict[str, str] = {}
    for pk in plain_keys:
        by_norm[_norm_key(pk)] = pk
        by_norm.setdefault(_norm_key(f"model.{pk}"), pk)  # FeatureGetterNet keeps the model as .model
    mapping: dict[str, str] = {}
    for fk in encoder.state_dict():
        pk = by_norm.get(_norm_key(fk))
        if pk is not None:
            mapping[pk] = fk
    return mapping


def load_encoder_weights(encoder: nn.Module, path: str | Path, encoder_name: str, in_channels: int) -> None:
    """Load a local state dict into ``encoder`` with ``strict=True``; nothing is matched silently.

    Accepted: the state dict of the ``features_only`` encoder itself (tried first), or that of the
    plain timm model ``encoder_name`` (its keys are mapped onto the features encoder; keys of the
    classifier head, which the features encoder drops, are ignored). A ``{"state_dict": ...}``
    wrapper is unwrapped. Missing file -> FileNotFoundError; anything else that does not match ->
    ValueError, one line naming the file and the first missing / unexpected / mis-shaped keys.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"encoder_weights: no such file {path}")
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types; the user needs one line
        first = (str(e).splitlines() or [""])[0][:120]
        raise ValueError(f"encoder_weights: {path} is not a loadable PyTorch state dict ({type(e).__name__}: {first})") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"encoder_weights: {path} does not hold a state dict (a mapping of names to tensors)")
    state: dict[str, Tensor] = dict(obj)
    target = encoder.state_dict()
    file_keys, feat_keys = set(state), set(target)

    if file_keys == feat_keys:
        mapped = state
    else:
        import timm  # lazy: see the module docstring

        plain_keys = set(timm.create_model(encoder_name, pretrained=False, in_chans=in_channels).state_dict())
        to_feat = _plain_to_features_keys(encoder, plain_keys)
        missing_plain = {pk for pk in to_feat if pk not in file_keys} | (feat_keys - set(to_feat.values()))
        unexpected_plain = file_keys - plain_keys
        if missing_plain or unexpected_plain:
            # Report against whichever layout the file resembles more.
            missing_feat, unexpected_feat = feat_keys - file_keys, file_keys - feat_keys
            if len(missing_feat) + len(unexpected_feat) <= len(missing_plain) + len(unexpected_plain):
                missing, unexpected, layout = missing_feat, unexpected_feat, "features_only"
            else:
                missing, unexpected, layout = missing_plain, unexpected_plain, "plain"
            raise ValueError(
                f"encoder_weights: {path} does not match timm encoder {encoder_name!r} (in_chans={in_channels}) "
                f"(closest: {layout} layout): missing keys {_fmt_keys(missing)}, unexpected keys {_fmt_keys(unexpected)}"
            )
        mapped = {fk: state[pk] for pk, fk in to_feat.items()}

    bad_shapes = [f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}" for k, v in mapped.items() if v.shape != target[k].shape]
    if bad_shapes:
        more = f", ... ({len(bad_shapes)} in all)" if len(bad_shapes) > 3 else ""
        raise ValueError(
            f"encoder_weights: {path} has tensors of the wrong shape for timm encoder {encoder_name!r} "
            f"(in_chans={in_channels}), file vs model: {', '.join(bad_shapes[:3])}{more}"
        )
    encoder.load_state_dict(mapped, strict=True)


class TimmUNet(SegmentationModel):
    """U-Net decoder on a timm encoder, with the common interface.

    ``decoder_channels``: output widths of the decoder blocks, fine to coarse, one per skip
    (len(feature_channels) - 1); default: the skip's own width, at least 16.
    Input H and W must be multiples of ``stride`` (the encoder's largest reduction).
    """

    def __init__(
        self,
        encoder_name: str,
        in_channels: int,
        num_classes: int,
        embed_dim: int = 256,
        proj_hidden: int = 512,
        pretrained: bool = False,
        encoder_weights: str = "",
        decoder_channels: list[int] | None = None,
    ) -> None:
        super().__init__()
        if in_channels < 1 or num_classes < 1:
            raise ValueError(f"TimmUNet: in_channels and num_classes must be >= 1, got {in_channels}, {num_classes}")
        self.encoder_name, self.in_channels = encoder_name, in_channels
        self.num_classes, self.embed_dim = num_classes, embed_dim
        self.encoder = create_encoder(encoder_name, in_channels, pretrained)
        if encoder_weights:
            load_encoder_weights(self.encoder, encoder_weights, encoder_name, in_channels)

        info = self.encoder.feature_info
        self.feature_channels: list[int] = list(info.channels())
        self.reductions: list[int] = list(info.reduction())
        if any(b < a for a, b in zip(self.reductions, self.reductions[1:])):
            raise ValueError(
                f"TimmUNet: encoder {encoder_name!r} features are not ordered fine to coarse: reductions {self.reductions}"
            )
        self.stride = max(self.reductions)
        n_skips = len(self.feature_channels) - 1
        if decoder_channels is None:
            # Mobile encoders have skips as narrow as 8 channels; 16 keeps the decoder expressive.
            decoder_channels = [max(c, 16) for c in self.feature_channels[:-1]]
        if len(decoder_channels) != n_skips:
            raise ValueError(f"TimmUNet: decoder_channels needs {n_skips} widths (one per skip), got {list(decoder_channels)}")
        self.decoder_channels = list(decoder_channels)

        # blocks[i] fuses the path coming from level i+1 with skip i.
        below = self.decoder_channels[1:] + [self.feature_channels[-1]]  # width arriving at level i
        self.blocks = nn.ModuleList(
            DoubleConv(below[i] + self.feature_channels[i], self.decoder_channels[i]) for i in range(n_skips)
        )
        top = self.decoder_channels[0] if n_skips else self.feature_channels[-1]
        # Nearest up-sampling + conv rather than bilinear: bilinear's CUDA backward has no
        # deterministic algorithm; the 3x3 conv smooths the blocky up-sampled map.
        self.refine = (
            nn.Sequential(nn.Conv2d(top, top, 3, padding=1, bias=False), nn.BatchNorm2d(top), nn.ReLU(inplace=True))
            if self.reductions[0] > 1
            else nn.Identity()
        )
        self.classifier = nn.Conv2d(top, num_classes, 1)
        self.head = ProjectionHead(self.feature_channels[-1], proj_hidden, embed_dim)

    def encode(self, x: Tensor) -> list[Tensor]:
        """E: (B, C_in, H, W) -> encoder features fine to coarse, (B, c_i, H/r_i, W/r_i)."""
        self._check_input(x)
        return list(self.encoder(x))

    def decode(self, feats: list[Tensor]) -> Tensor:
        """D: features -> (B, num_classes, H, W) logits; uses only ``feats``."""
        if len(feats) != len(self.feature_channels):
            raise ValueError(f"TimmUNet.decode: expected {len(self.feature_channels)} feature maps, got {len(feats)}")
        y = feats[-1]  # (B, c_last, H/stride, W/stride)
        for i in reversed(range(len(self.blocks))):
            y = F.interpolate(y, size=feats[i].shape[-2:], mode="nearest")  # (B, ., H/r_i, W/r_i)
            y = self.blocks[i](torch.cat([y, feats[i]], dim=1))  # (B, decoder_channels[i], H/r_i, W/r_i)
        r0 = self.reductions[0]
        if r0 > 1:
            h, w = feats[0].shape[-2:]
            y = F.interpolate(y, size=(h * r0, w * r0), mode="nearest")  # (B, ., H, W)
        return self.classifier(self.refine(y))  # (B, num_classes, H, W)
