"""The projection head g and the interface every segmentation model shares.

Paper symbols (Pandey et al., MICCAI 2021):

    E    encoder; ``encode(x)`` returns its feature maps fine to coarse, the last one is the
         bottleneck h, the others are the skip connections
    D    decoder; ``decode(feats)`` maps (possibly perturbed) features to logits
    g    projection head, a 2-layer MLP on the pooled bottleneck
    z    ``normalize(g(pool(h)))``, the unit embedding of the contrastive loss (Eq. 1)

``SegmentationModel`` holds the parts of the interface that do not depend on the architecture
(``forward``, ``project``, ``embed``), so ``AttentionUNet`` and ``TimmUNet`` only write E and D.
The model returns logits and embeddings; loss math stays out of it.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class ProjectionHead(nn.Module):
    """g: Linear(in_dim, hidden) -> ReLU -> Linear(hidden, out_dim), as in SimCLR / the paper.

    (B, in_dim) -> (B, out_dim), un-normalised.
    """

    def __init__(self, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        if min(in_dim, hidden, out_dim) < 1:
            raise ValueError(f"ProjectionHead: sizes must be >= 1, got in_dim={in_dim}, hidden={hidden}, out_dim={out_dim}")
        self.in_dim, self.hidden, self.out_dim = in_dim, hidden, out_dim
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"ProjectionHead: expected (B, {self.in_dim}), got {tuple(x.shape)}")
        return self.net(x)


class SegmentationModel(nn.Module):
    """Base of every model in the registry: E (``encode``), D (``decode``) and g (``head``).

    Subclasses set ``num_classes``, ``in_channels``, ``stride``, ``embed_dim``,
    ``feature_channels`` (channels of each ``encode`` output, fine to coarse) and ``head``, and
    implement ``encode`` and ``decode``. ``decode`` must use only the features it is given (no
    state cached by ``encode``), so ``teacher.decode(student.encode(x))`` and perturbed features
    both work.
    """

    num_classes: int
    in_channels: int
    stride: int
    embed_dim: int
    feature_channels: list[int]
    head: ProjectionHead

    def encode(self, x: Tensor) -> list[Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode(self, feats: list[Tensor]) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """(B, C_in, H, W) -> (B, num_classes, H, W) logits."""
        return self.decode(self.encode(x))

    def project(self, h: Tensor) -> Tensor:
        """g(pool(h)): (B, C_h, h, w) bottleneck -> (B, embed_dim), NOT normalised.

        Normalisation is the caller's, so losses differentiate through it.
        """
        if h.dim() != 4 or h.shape[1] != self.feature_channels[-1]:
            raise ValueError(f"project: expected a (B, {self.feature_channels[-1]}, h, w) bottleneck, got {tuple(h.shape)}")
        # mean over space rather than nn.AdaptiveAvgPool2d: its CUDA backward has no deterministic
        # algorithm and would raise under torch.use_deterministic_algorithms(True).
        pooled = h.mean(dim=(2, 3))  # (B, C_h)
        return self.head(pooled)  # (B, embed_dim)

    def embed(self, x: Tensor) -> Tensor:
        """z = normalize(g(pool(E(x)[-1]))): (B, C_in, H, W) -> (B, embed_dim) unit vectors."""
        return F.normalize(self.project(self.encode(x)[-1]), dim=1)

    def _check_input(self, x: Tensor) -> None:
        """One-line ValueError for inputs the decoder cannot restore to full size."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"{type(self).__name__}: expected (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        H, W = x.shape[-2:]
        if H % self.stride or W % self.stride:
            raise ValueError(f"{type(self).__name__}: input H and W must be multiples of the stride {self.stride}, got {H}x{W}")


__all__ = ["ProjectionHead", "SegmentationModel"]
