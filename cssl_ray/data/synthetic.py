"""Procedural medical-like segmentation data: the ``synthetic`` dataset.

Every image is a textured background (a smooth random field) with structures of ``num_classes - 1``
foreground classes painted over it, class by class (later classes cover earlier ones):

    class 1  blob   large ellipses with wobbly outlines (organ-like), mottled texture
    class 2  band   thin curved bands (vessel-like), dark and smooth
    class 3  dot    small round dots (lesion- / nucleus-like), bright with a darker core
    class 4+        the three shapes again, with other intensities and textures (striped, ...)

``num_classes=2`` is the one-foreground-class variant: many nucleus-like blobs.

The class intensities overlap with the background, so a pixel's grey value alone does not tell its
class: shape and texture do. Per image, nuisance factors a few labelled images cannot cover are
applied, each scaled by ``difficulty`` (0 = clean and easy, 1 = default, larger = harder):
a blur (point-spread function), a smooth multiplicative bias field (like MRI inhomogeneity), a
gamma, a global contrast and brightness shift, a jitter of every class's intensity, and Gaussian
noise. The masks never depend on ``difficulty``, only the pixel values do.

Determinism: image ``i`` depends only on ``(seed, i, size, num_classes, difficulty, in_channels)``,
never on ``n`` (each image has its own generators seeded from ``(seed, i)``), so a dataset of 40
images and one of 400 share their first 40. Class ``k``'s shapes use a generator of their own, so
classes 1-3 have the same outlines whatever ``num_classes`` is (up to occlusion by later classes).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

# Fixed affine normalisation of the raw [0, 1]-ish intensities, measured on difficulty 1.0 so the
# default data is roughly zero-mean unit-std. Deliberately not per image: per-image
# standardisation would undo the random brightness/contrast shifts that make the data hard.
_RAW_MEAN = 0.425
_RAW_STD = 0.21

_SHAPES = ("blob", "band", "dot")
_BACKGROUND_MEAN = 0.40

# (mean intensity, texture) per (shape, cycle), cycle = (class - 1) // 3; later cycles wrap around.
_CLASS_LOOKS = (
    {"blob": (0.58, "mottled"), "band": (0.22, "smooth"), "dot": (0.80, "cored")},
    {"blob": (0.28, "striped"), "band": (0.64, "mottled"), "dot": (0.10, "smooth")},
    {"blob": (0.70, "smooth"), "band": (0.50, "striped"), "dot": (0.32, "cored")},
)


def class_names(num_classes: int) -> list[str]:
    """Names of the synthetic classes: ``background`` then ``blob, band, dot, blob_2, ...``.

    With ``num_classes=2`` the single foreground class is ``nucleus``.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background + one class), got {num_classes}")
    if num_classes == 2:
        return ["background", "nucleus"]
    names = ["background"]
    for k in range(1, num_classes):
        shape, cycle = _SHAPES[(k - 1) % 3], (k - 1) // 3
        names.append(shape if cycle == 0 else f"{shape}_{cycle + 1}")
    return names


SYNTHETIC_CLASS_NAMES: list[str] = class_names(4)  # the default 4-class variant


def make_synthetic(
    n: int,
    size: tuple[int, int] = (128, 128),
    num_classes: int = 4,
    seed: int = 0,
    difficulty: float = 1.0,
    in_channels: int = 1,
) -> tuple[Tensor, Tensor]:
    """Generate ``n`` images and their masks.

    Args:
        n: number of images, >= 0 (0 gives empty tensors of the right shapes).
        size: ``(H, W)``, both >= 8 (the shapes are designed for >= 16; at 8 they are crude).
        num_classes: C, including background 0; >= 2.
        seed: non-negative dataset seed.
        difficulty: >= 0; scales every nuisance factor (0 = clean).
        in_channels: image channels, >= 1; channels differ in their class intensities (like
            stains) and noise, and share the geometry, blur and bias field.

    Returns:
        images: ``(n, in_channels, H, W)`` float32, roughly zero-mean unit-std at difficulty 1.
        masks: ``(n, H, W)`` int64 in ``[0, num_classes)``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}")
    if len(size) != 2 or any(int(s) != s or s < 8 for s in size):
        raise ValueError(f"size must be (H, W) with both sides >= 8, got {size!r}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background + one class), got {num_classes}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if not difficulty >= 0:  # also rejects NaN
        raise ValueError(f"difficulty must be >= 0, got {difficulty}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    h, w = int(size[0]), int(size[1])
    images = np.empty((n, in_channels, h, w), dtype=np.float32)
    masks = np.empty((n, h, w), dtype=np.int64)
    for i in range(n):
        images[i], masks[i] = _make_one(i, h, w, num_classes, seed, float(difficulty), in_channels)
    return torch.from_numpy(images), torch.from_numpy(masks)


def synthetic_images(indices: Sequence[int], size: tuple[int, int] = (128, 128), num_classes: int = 4, seed: int = 0,
                     difficulty: float = 1.0, in_channels: int = 1) -> tuple[Tensor, Tensor]:
    """Images ``indices`` of ``make_synthetic(n, ...)`` for any n > max(indices), without the others:
    each image is seeded by (seed, index), so a worker makes exactly the rows it needs."""
    images, masks = make_synthetic(0, size, num_classes, seed, difficulty, in_channels)  # validates the arguments
    h, w = int(size[0]), int(size[1])
    made = [_make_one(int(i), h, w, num_classes, seed, float(difficulty), in_channels) for i in indices]
    if not made:
        return images, masks
    return (torch.from_numpy(np.stack([x for x, _ in made])),  # (N, C, H, W)
            torch.from_numpy(np.stack([m for _, m in made])))  # (N, H, W)


# ---------------------------------------------------------------------------------------------
# One image.


def _make_one(
    i: int, h: int, w: int, num_classes: int, seed: int, d: float, in_channels: int
) -> tuple[np.ndarray, np.ndarray]:
    """Image ``(in_channels, H, W)`` float32 and mask ``(H, W)`` int64 of image ``i``."""
    scale = min(h, w) / 128.0  # shape sizes are specified at 128 px and scaled
    grid = _grid(h, w)
    rng_bg = np.random.default_rng([seed, i, 0])
    rng_nuisance = np.random.default_rng([seed, i, 1])

    mask = np.zeros((h, w), dtype=np.int64)
    # Per-channel intensity offsets of each class: channel 0 is the reference look; the others
    # shift every class differently (fixed, like stains), so extra channels carry information.
    chan = np.arange(in_channels)[:, None, None]  # (Cin, 1, 1)

    def channel_offset(k: int) -> np.ndarray:
        return np.where(chan == 0, 0.0, 0.12 * np.sin(2.1 * k + 1.3 * chan))  # (Cin, 1, 1)

    coarse = _smooth_field(rng_bg, h, w, 0.15 * min(h, w))
    fine = _smooth_field(rng_bg, h, w, 1.0)
    bg = _BACKGROUND_MEAN + (0.05 + 0.08 * d) * coarse + 0.03 * fine  # (H, W)
    raw = bg[None] + channel_offset(0)  # (Cin, H, W)

    for k in range(1, num_classes):
        rng_k = np.random.default_rng([seed, i, 2, k])
        if num_classes == 2:
            shape, (mean, texture) = "nucleus", (0.62, "mottled")
        else:
            shape = _SHAPES[(k - 1) % 3]
            mean, texture = _CLASS_LOOKS[((k - 1) // 3) % len(_CLASS_LOOKS)][shape]
        region, radial = _paint_shape(shape, rng_k, grid, h, w, scale)
        if not region.any():
            continue
        tex = _texture(texture, rng_k, grid, h, w, scale, radial)  # (H, W)
        mean = mean + 0.05 * d * rng_nuisance.standard_normal()  # per-image class jitter
        mask[region] = k
        raw[:, region] = (mean + channel_offset(k) + tex[None])[:, region]

    raw = _nuisance(raw, rng_nuisance, h, w, d)
    image = ((raw - _RAW_MEAN) / _RAW_STD).astype(np.float32)
    return image, mask


def _nuisance(raw: np.ndarray, rng: np.random.Generator, h: int, w: int, d: float) -> np.ndarray:
    """Blur, bias field, gamma, contrast/brightness and noise on raw ``(Cin, H, W)``."""
    # Draw every random number whatever d is, so the stream (and anything drawn after) is stable.
    blur_sigma = d * rng.uniform(0.4, 1.2)
    bias = _smooth_field(rng, h, w, 0.35 * min(h, w))
    bias_strength = 0.2 * d
    gamma = math.exp(0.2 * d * rng.standard_normal())
    contrast = math.exp(0.2 * d * rng.standard_normal())
    brightness = 0.08 * d * rng.standard_normal()
    noise_std = 0.04 * d * rng.uniform(0.5, 1.5)
    noise = rng.standard_normal(raw.shape, dtype=np.float32)

    if blur_sigma > 0.05:
        raw = _gaussian_blur(raw, blur_sigma)
    raw = raw * np.exp(bias_strength * bias)[None]
    raw = np.clip(raw, 1e-3, None) ** gamma
    raw = (raw - _BACKGROUND_MEAN) * contrast + _BACKGROUND_MEAN + brightness
    return raw + noise_std * noise


# ---------------------------------------------------------------------------------------------
# Shapes: each returns a boolean region (H, W) and a radial coordinate (H, W) in [0, 1] inside
# the shape (0 at a centre, 1 at the outline) used by the "cored" texture.


def _paint_shape(
    shape: str, rng: np.random.Generator, grid: tuple[np.ndarray, np.ndarray], h: int, w: int, scale: float
) -> tuple[np.ndarray, np.ndarray]:
    side = min(h, w)
    if shape == "blob":  # organ-like: 1-2 large wobbly ellipses
        count = int(rng.integers(1, 3))
        return _ellipses(rng, grid, h, w, count, (0.13 * side, 0.28 * side), wobble=0.12)
    if shape == "nucleus":  # one-class variant: many medium blobs
        count = int(rng.integers(5, 15))
        return _ellipses(rng, grid, h, w, count, (max(1.5, 0.035 * side), max(2.0, 0.07 * side)), wobble=0.08)
    if shape == "band":
        return _bands(rng, grid, h, w, scale)
    if shape == "dot":  # lesion-like: absent from ~15% of images
        if rng.uniform() < 0.15:
            return np.zeros((h, w), dtype=bool), np.ones((h, w))
        count = int(rng.integers(3, 11))
        r_lo, r_hi = max(1.0, 1.5 * scale), max(1.5, 3.2 * scale)
        return _ellipses(rng, grid, h, w, count, (r_lo, r_hi), wobble=0.0, aspect=0.15)
    raise AssertionError(shape)  # pragma: no cover


def _ellipses(
    rng: np.random.Generator,
    grid: tuple[np.ndarray, np.ndarray],
    h: int,
    w: int,
    count: int,
    radius: tuple[float, float],
    wobble: float,
    aspect: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """Union of ``count`` rotated ellipses with outlines r(phi) = 1 + sum_k a_k cos(k phi + p_k)."""
    yy, xx = grid  # (H, 1), (1, W)
    cy = rng.uniform(0.12, 0.88, count)[:, None, None] * (h - 1)  # (n, 1, 1)
    cx = rng.uniform(0.12, 0.88, count)[:, None, None] * (w - 1)
    ry = rng.uniform(*radius, count)[:, None, None]
    rx = ry * rng.uniform(1.0 - aspect, 1.0 + aspect, count)[:, None, None]
    theta = rng.uniform(0, math.pi, count)[:, None, None]
    amp = rng.uniform(0, wobble, (3, count))[:, :, None, None]  # harmonics 2..4
    phase = rng.uniform(0, 2 * math.pi, (3, count))[:, :, None, None]
    cy, cx, ry, rx, theta, amp, phase = (a.astype(np.float32) for a in (cy, cx, ry, rx, theta, amp, phase))
    dy, dx = yy[None] - cy, xx[None] - cx  # (n, H, 1), (n, 1, W)
    u = (dx * np.cos(theta) + dy * np.sin(theta)) / rx  # (n, H, W) ellipse-normalised coordinates
    v = (-dx * np.sin(theta) + dy * np.cos(theta)) / ry
    r = np.sqrt(u * u + v * v)
    if wobble > 0:
        # cos(k phi + p) = cos(k phi) cos(p) - sin(k phi) sin(p), with cos/sin(k phi) from the
        # angle-addition recurrence on c = u / r, s = v / r (no arctan2 / cos over the grid).
        c = u / np.maximum(r, 1e-6)
        s = v / np.maximum(r, 1e-6)
        ck, sk = c * c - s * s, 2 * c * s  # k = 2
        outline = 1.0
        for j in range(3):  # k = 2, 3, 4
            outline = outline + amp[j] * (ck * np.cos(phase[j]) - sk * np.sin(phase[j]))
            ck, sk = ck * c - sk * s, sk * c + ck * s
        r = r / outline
    radial = r.min(0)  # (H, W): the nearest ellipse wins
    return radial < 1.0, np.clip(radial, 0.0, 1.0)


def _bands(
    rng: np.random.Generator, grid: tuple[np.ndarray, np.ndarray], h: int, w: int, scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """Vessel-like bands: pieces of a level curve of a smooth random field.

    The distance of a pixel to the level set {f = c} is about |f - c| / |grad f|, so thresholding
    that ratio gives a band of constant width along a random smooth curve. A second field keeps
    only part of the curves, so the bands start and end inside the image.
    """
    side = min(h, w)
    f = _smooth_field(rng, h, w, 0.16 * side)
    support = _smooth_field(rng, h, w, 0.25 * side)
    level = rng.uniform(-0.5, 0.5)
    half_width = max(0.7, rng.uniform(0.9, 1.8) * scale)
    gy, gx = np.gradient(f)
    dist = np.abs(f - level) / (np.sqrt(gy * gy + gx * gx) + 1e-6)  # (H, W) pixels to the curve
    band = dist < half_width
    kept = band & (support > rng.uniform(-0.6, 0.0))
    region = kept if kept.sum() >= 4 * side * half_width else band  # never lose the class
    return region, np.clip(dist / half_width, 0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Textures (H, W), added to the class mean inside the region.


def _texture(
    kind: str,
    rng: np.random.Generator,
    grid: tuple[np.ndarray, np.ndarray],
    h: int,
    w: int,
    scale: float,
    radial: np.ndarray,
) -> np.ndarray:
    if kind == "mottled":
        return 0.07 * _smooth_field(rng, h, w, max(1.0, 2.0 * scale))
    if kind == "smooth":
        return 0.02 * _smooth_field(rng, h, w, max(1.0, 4.0 * scale))
    if kind == "striped":
        yy, xx = grid
        angle = rng.uniform(0, math.pi)
        period = max(3.0, rng.uniform(5.0, 8.0) * scale)
        return 0.08 * np.sin(2 * math.pi * (xx * math.cos(angle) + yy * math.sin(angle)) / period)
    if kind == "cored":  # darker centre, brighter rim
        return -0.22 * (1.0 - radial * radial)
    raise AssertionError(kind)  # pragma: no cover


# ---------------------------------------------------------------------------------------------
# Fields and filters.


@functools.lru_cache(maxsize=16)
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates ``(H, 1)`` and ``(1, W)`` (broadcast, never materialised)."""
    return np.arange(h, dtype=np.float32)[:, None], np.arange(w, dtype=np.float32)[None, :]


@functools.lru_cache(maxsize=64)
def _lowpass(h: int, w: int, sigma: float) -> np.ndarray:
    """Fourier transform ``(H, W//2 + 1)`` float32 of a Gaussian of std ``sigma`` pixels."""
    fy = np.fft.fftfreq(h)[:, None]  # cycles per pixel
    fx = np.fft.rfftfreq(w)[None, :]
    return np.exp(-2.0 * math.pi**2 * sigma**2 * (fy * fy + fx * fx)).astype(np.float32)


def _smooth_field(rng: np.random.Generator, h: int, w: int, sigma: float) -> np.ndarray:
    """Zero-mean unit-std Gaussian random field ``(H, W)``: white noise low-passed by a Gaussian
    of std ``sigma`` pixels (periodic, which is harmless for a stationary texture)."""
    noise = rng.standard_normal((h, w), dtype=np.float32)
    field = np.fft.irfft2(np.fft.rfft2(noise) * _lowpass(h, w, float(sigma)), s=(h, w))
    field -= field.mean()
    std = field.std()
    return field / std if std > 1e-12 else field


def _gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of ``(..., H, W)`` with reflected borders."""
    radius = max(1, int(math.ceil(3 * sigma)))
    t = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (t / sigma) ** 2)
    kernel /= kernel.sum()
    for axis in (-2, -1):
        r = min(radius, x.shape[axis] - 1)  # reflect padding needs r < side
        k = kernel[radius - r : radius + r + 1]
        k = k / k.sum()
        pad = [(0, 0)] * x.ndim
        pad[axis] = (r, r)
        xp = np.pad(x, pad, mode="reflect")
        windows = np.lib.stride_tricks.sliding_window_view(xp, 2 * r + 1, axis=axis)
        x = windows @ k
    return x
