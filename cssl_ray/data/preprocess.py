"""Preprocessing per modality: intensities to [0, 1], channels first, resized to the training size.

    normalise     used for                       what it does to one image
    percentile    microscopy (nuclei), MRI       (x - p_low) / (p_high - p_low), clipped to [0, 1];
                                                 p_low, p_high = the low-th / high-th percentile of
                                                 this image (default 1st / 99.8th), all channels
                                                 together; a constant image becomes all zeros
    scale         RGB photographs (H&E, fundus)  integer dtypes divided by their maximum
                                                 (uint8 / 255, uint16 / 65535); floats unchanged
    jsrt12        JSRT chest X-rays              1 - raw / 4096: 12-bit values stored white-is-zero
    none          synthetic, already-prepared    cast to float32, unchanged

Then channels: (H, W) grey -> (1, H, W); (H, W, 3) RGB -> (3, H, W); RGBA drops alpha; RGB to one
channel is the ITU-R 601 luma (0.299 R + 0.587 G + 0.114 B); grey to three channels repeats it.

Resizing to ``size`` = (H, W): images with an area filter (a box, exact pixel-area averaging) when
no side grows, bilinear (pixel centres, edge-clamped, as PIL) when one does; masks with nearest
neighbour at pixel centres, so a mask keeps exactly the class ids it had.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

NORMALISERS = ("percentile", "scale", "jsrt12", "none")
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass(frozen=True)
class Preprocessing:
    """Settings that turn a raw ``Sample`` into stored float32 (C, H, W); part of the cache key."""

    normalise: str = "percentile"  # one of NORMALISERS
    low: float = 1.0  # percentile mapped to 0 (normalise == "percentile")
    high: float = 99.8  # percentile mapped to 1
    size: tuple[int, int] | None = None  # (H, W) to resize to; None keeps each image's own size
    channels: int = 1  # channels of the stored image (1 grey, 3 RGB)

    def __post_init__(self) -> None:
        if self.normalise not in NORMALISERS:
            raise ValueError(f"normalise: {self.normalise!r} is not one of {', '.join(NORMALISERS)}")
        if not 0.0 <= self.low < self.high <= 100.0:
            raise ValueError(f"percentiles: need 0 <= low < high <= 100, got low={self.low}, high={self.high}")
        if self.size is not None:
            size = tuple(int(s) for s in self.size)
            if len(size) != 2 or min(size) < 1:
                raise ValueError(f"size: expected (H, W) with both sides >= 1, got {self.size!r}")
            object.__setattr__(self, "size", size)
        if self.channels not in (1, 3):
            raise ValueError(f"channels: expected 1 or 3, got {self.channels!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["size"] = list(self.size) if self.size is not None else None
        return d


def percentile_normalise(image: np.ndarray, low: float = 1.0, high: float = 99.8) -> np.ndarray:
    """Map this image's ``low``-th percentile to 0 and ``high``-th to 1, clipped; float32.

    A constant image (p_high == p_low) has no contrast to stretch and becomes all zeros.
    """
    x = np.asarray(image, dtype=np.float32)
    lo, hi = np.percentile(x, [low, high])
    if not hi > lo:
        return np.zeros_like(x)
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def scale_to_unit(image: np.ndarray) -> np.ndarray:
    """Integer dtypes divided by their maximum value (uint8 / 255); bool to {0, 1}; floats as is."""
    if image.dtype == np.bool_:
        return image.astype(np.float32)
    if np.issubdtype(image.dtype, np.integer):
        return (image.astype(np.float32) / np.float32(np.iinfo(image.dtype).max)).astype(np.float32)
    return image.astype(np.float32)


def jsrt12(raw: np.ndarray) -> np.ndarray:
    """JSRT raw 12-bit, stored white-is-zero, to display intensity ``1 - raw / 4096`` in (0, 1]."""
    return (1.0 - raw.astype(np.float32) / np.float32(4096.0)).astype(np.float32)


def normalise(image: np.ndarray, p: Preprocessing) -> np.ndarray:
    """Intensities of one (H, W) or (H, W, C) image as float32, by ``p.normalise``."""
    if p.normalise == "percentile":
        return percentile_normalise(image, p.low, p.high)
    if p.normalise == "scale":
        return scale_to_unit(image)
    if p.normalise == "jsrt12":
        return jsrt12(image)
    return np.asarray(image, dtype=np.float32)


def to_channels_first(image: np.ndarray, channels: int) -> np.ndarray:
    """(H, W) or (H, W, C) -> (channels, H, W) float32 (see the module docstring for the rules)."""
    x = np.asarray(image, dtype=np.float32)
    if x.ndim == 2:
        x = x[:, :, None]
    if x.ndim != 3:
        raise ValueError(f"expected an (H, W) or (H, W, C) image, got shape {image.shape}")
    c = x.shape[2]
    if c == 4:  # RGBA: alpha is not an intensity
        x, c = x[:, :, :3], 3
    if c == channels:
        out = x
    elif c == 1:
        out = np.repeat(x, channels, axis=2)
    elif c == 3 and channels == 1:
        out = (x @ _LUMA)[:, :, None]
    else:
        raise ValueError(f"cannot turn a {c}-channel image into {channels} channels")
    return np.ascontiguousarray(out.transpose(2, 0, 1), dtype=np.float32)


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize (C, H, W) float32 to (C, *size): area filter when shrinking, bilinear when growing."""
    h, w = int(size[0]), int(size[1])
    if image.shape[1:] == (h, w):
        return image.astype(np.float32, copy=False)
    grows = h > image.shape[1] or w > image.shape[2]
    resample = Image.Resampling.BILINEAR if grows else Image.Resampling.BOX
    out = np.empty((image.shape[0], h, w), dtype=np.float32)
    for k in range(image.shape[0]):  # PIL's "F" mode holds one float32 channel
        out[k] = np.asarray(Image.fromarray(np.ascontiguousarray(image[k], dtype=np.float32)).resize((w, h), resample))
    return out


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest neighbour at pixel centres: output (i, j) takes input (floor((i + .5) H / h), ...)."""
    h, w = int(size[0]), int(size[1])
    if mask.shape == (h, w):
        return mask
    rows = np.minimum(((np.arange(h) + 0.5) * mask.shape[0] / h).astype(np.int64), mask.shape[0] - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * mask.shape[1] / w).astype(np.int64), mask.shape[1] - 1)
    return np.ascontiguousarray(mask[rows[:, None], cols[None, :]])


def preprocess(image: np.ndarray, mask: np.ndarray | None, p: Preprocessing) -> tuple[np.ndarray, np.ndarray | None]:
    """One raw image and mask -> stored image (C, H, W) float32 and mask (H, W) uint8 (or None)."""
    x = to_channels_first(normalise(image, p), p.channels)  # (C, H, W)
    y = None if mask is None else np.asarray(mask, dtype=np.uint8)
    if p.size is not None:
        x = resize_image(x, p.size)
        y = None if y is None else resize_mask(y, p.size)
    return x, y
