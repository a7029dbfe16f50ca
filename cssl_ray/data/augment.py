"""Paired geometric augmentation: the same flip / 90-degree rotation for an image and its mask.

The released CSSL code augmented images but not their masks; here every transform is drawn once
per sample and applied to both, so labels stay aligned with pixels.
"""
from __future__ import annotations

import torch
from torch import Tensor


def flip_rotate(images: Tensor, masks: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Random horizontal/vertical flips and k*90 degree rotations, one draw per sample.

    images (B, C, H, W), masks (B, H, W). Rotations by 90/270 degrees need H == W; for non-square
    inputs only flips and 180-degree rotations are drawn. Returns new tensors of the same shapes.
    """
    if images.dim() != 4 or masks.dim() != 3 or images.shape[0] != masks.shape[0] or images.shape[2:] != masks.shape[1:]:
        raise ValueError(f"flip_rotate: images (B, C, H, W) and masks (B, H, W) must agree, got "
                         f"{tuple(images.shape)} and {tuple(masks.shape)}")
    b = images.shape[0]
    square = images.shape[-1] == images.shape[-2]
    draws = torch.randint(0, 8, (b,), generator=generator).tolist()  # 3 bits: hflip, vflip, transpose
    out_x, out_y = [], []
    for i, code in enumerate(draws):
        x, y = images[i], masks[i]  # (C, H, W), (H, W)
        if code & 1:
            x, y = x.flip(-1), y.flip(-1)
        if code & 2:
            x, y = x.flip(-2), y.flip(-2)
        if code & 4 and square:  # transpose + flips spans all 8 symmetries of the square
            x, y = x.transpose(-1, -2), y.transpose(-1, -2)
        out_x.append(x)
        out_y.append(y)
    return torch.stack(out_x), torch.stack(out_y)
