"""Attention U-Net (Oktay et al. 2018, "Attention U-Net: Learning Where to Look for the Pancreas").

The paper's segmentation network: a U-Net whose skip connections pass through additive attention
gates. Written for this project (no code copied).

    levels      l = 0..depth, width w_l = base_channels * 2**l (base 64, depth 4: 64..1024, the
                vanilla U-Net); the bottleneck is level ``depth``, the stride is 2**depth
    E (encode)  double conv (3x3 conv, BN, ReLU) x2 per level, 2x2 max-pool between levels;
                returns [x_0, ..., x_depth] (depth skips, then the bottleneck h)
    D (decode)  per level, coarse to fine: 2x2 transposed conv up to w_l, attention gate on the
                skip x_l gated by the up-sampled signal g, concat [gated x_l, g], double conv;
                a final 1x1 conv to the classes
    gate        alpha = sigmoid(BN(psi(ReLU(BN(W_g g) + BN(W_x x))))), output x * alpha, alpha in
                [0, 1] per pixel
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from cssl_ray.models.heads import ProjectionHead, SegmentationModel


class DoubleConv(nn.Sequential):
    """(3x3 conv -> BN -> ReLU) x 2; convs carry no bias because BN follows."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )


class AttentionGate(nn.Module):
    """Additive attention gate: x * alpha(g, x), alpha in [0, 1] per pixel.

    g: (B, g_ch, H, W) gating signal (the up-sampled decoder path); x: (B, x_ch, H, W) skip.
    Both have the same spatial size because the gating signal is taken after up-sampling.
    """

    def __init__(self, g_ch: int, x_ch: int, inter_ch: int) -> None:
        super().__init__()
        self.W_g = nn.Sequential(nn.Conv2d(g_ch, inter_ch, 1, bias=True), nn.BatchNorm2d(inter_ch))
        self.W_x = nn.Sequential(nn.Conv2d(x_ch, inter_ch, 1, bias=False), nn.BatchNorm2d(inter_ch))
        self.psi = nn.Sequential(nn.Conv2d(inter_ch, 1, 1, bias=True), nn.BatchNorm2d(1), nn.Sigmoid())
        self.relu = nn.ReLU(inplace=True)

    def coefficients(self, g: Tensor, x: Tensor) -> Tensor:
        """alpha: (B, 1, H, W) attention coefficients in [0, 1]."""
        if g.shape[-2:] != x.shape[-2:]:
            raise ValueError(f"AttentionGate: g {tuple(g.shape)} and x {tuple(x.shape)} differ in size")
        return self.psi(self.relu(self.W_g(g) + self.W_x(x)))  # (B, 1, H, W)

    def forward(self, g: Tensor, x: Tensor) -> Tensor:
        return x * self.coefficients(g, x)  # (B, x_ch, H, W)


class AttentionUNet(SegmentationModel):
    """Attention U-Net with the common interface (``encode``, ``decode``, ``project``, ``embed``).

    Input H and W must be multiples of ``stride`` = 2**depth.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        base_channels: int = 64,
        depth: int = 4,
        embed_dim: int = 256,
        proj_hidden: int = 512,
    ) -> None:
        super().__init__()
        if in_channels < 1 or num_classes < 1 or base_channels < 1:
            raise ValueError(
                f"AttentionUNet: in_channels, num_classes and base_channels must be >= 1, "
                f"got {in_channels}, {num_classes}, {base_channels}"
            )
        if not 1 <= depth <= 6:
            raise ValueError(f"AttentionUNet: depth must be 1..6, got {depth}")
        self.in_channels, self.num_classes, self.depth = in_channels, num_classes, depth
        self.base_channels, self.embed_dim = base_channels, embed_dim
        self.stride = 2**depth
        widths = [base_channels * 2**l for l in range(depth + 1)]  # w_0 .. w_depth
        self.feature_channels = list(widths)

        self.pool = nn.MaxPool2d(2)
        self.enc = nn.ModuleList([DoubleConv(in_channels, widths[0])])
        self.enc.extend(DoubleConv(widths[l - 1], widths[l]) for l in range(1, depth + 1))

        # Decoder modules are indexed by the level they produce (0..depth-1).
        # Transposed 2x2 conv rather than bilinear + conv: it is the vanilla U-Net's learned
        # up-sampling (so base 64 / depth 4 keeps its ~31M parameter budget), it doubles the size
        # exactly, and it has a deterministic CUDA algorithm, whereas the backward pass of bilinear
        # interpolation on CUDA raises under torch.use_deterministic_algorithms(True).
        self.up = nn.ModuleList(nn.ConvTranspose2d(widths[l + 1], widths[l], 2, stride=2) for l in range(depth))
        self.gate = nn.ModuleList(AttentionGate(widths[l], widths[l], max(widths[l] // 2, 1)) for l in range(depth))
        self.dec = nn.ModuleList(DoubleConv(2 * widths[l], widths[l]) for l in range(depth))
        self.classifier = nn.Conv2d(widths[0], num_classes, 1)

        self.head = ProjectionHead(widths[-1], proj_hidden, embed_dim)

    def encode(self, x: Tensor) -> list[Tensor]:
        """E: (B, C_in, H, W) -> [x_0 (B, w_0, H, W), ..., h (B, w_depth, H/stride, W/stride)]."""
        self._check_input(x)
        feats = [self.enc[0](x)]
        for block in self.enc[1:]:
            feats.append(block(self.pool(feats[-1])))  # (B, w_l, H/2**l, W/2**l)
        return feats

    def decode(self, feats: list[Tensor]) -> Tensor:
        """D: [x_0, ..., h] -> (B, num_classes, H, W) logits; uses only ``feats``."""
        if len(feats) != self.depth + 1:
            raise ValueError(f"AttentionUNet.decode: expected {self.depth + 1} feature maps, got {len(feats)}")
        y = feats[-1]  # (B, w_depth, H/stride, W/stride)
        for l in reversed(range(self.depth)):
            g = self.up[l](y)  # (B, w_l, H/2**l, W/2**l)
            skip = self.gate[l](g, feats[l])  # (B, w_l, H/2**l, W/2**l)
            y = self.dec[l](torch.cat([skip, g], dim=1))  # (B, w_l, ...) from 2 * w_l channels
        return self.classifier(y)  # (B, num_classes, H, W)
