"""Where class-wise patches come from: windows of ``size x size`` holding at least ``min_pixels``
pixels of one foreground class (step C of a CSSL round), sampled without per-patch Python loops.

    size         side of the square window (config ``patches.size``, default 64)
    min_pixels   pixels of the patch's class a window must hold (default 25)
    per_image    windows drawn per image, shared equally by the foreground classes that have a valid
                 window in it (``dense_windows``, the trainer's rule): an image gives its full
                 budget whichever classes it holds, so a step's pool does not shrink where a class
                 is absent (config ``patches.per_image``)
    per_class    the older rule (``sample_windows``): windows per (image, foreground class present)

Window counts for every top-left position (stride 1) come from an integral image of the class
map, so one class costs O(B H W) whatever ``size`` is; exact integer arithmetic, no float box
filter rounding. The patches cut from these windows: ``cssl_ray.method.patches``.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor


class PatchWindows(NamedTuple):
    """Sampled windows, one entry per patch (all ``(P,)`` int64)."""

    classes: Tensor  # c_i, the class the patch was drawn for
    sources: Tensor  # index of the image in the batch
    top: Tensor  # row of the window's top-left pixel
    left: Tensor  # column of the window's top-left pixel


def window_counts(class_map: Tensor, size: int) -> Tensor:
    """Pixels of a class in every ``size x size`` window (stride 1).

    Args:
        class_map: ``(B, H, W)`` bool (or 0/1 integer) map of one class.
        size: window side, ``1 <= size <= min(H, W)``.

    Returns:
        ``(B, H - size + 1, W - size + 1)`` int64 counts; ``[b, y, x]`` counts the window whose
        top-left pixel is ``(y, x)``.
    """
    if class_map.dim() != 3:
        raise ValueError(f"class_map must be (B, H, W), got shape {tuple(class_map.shape)}")
    b, h, w = class_map.shape
    check_size(size, h, w)
    # Integral image with a zero first row/column: S[y, x] = sum of class_map[:y, :x].
    integral = torch.zeros((b, h + 1, w + 1), dtype=torch.int64, device=class_map.device)
    integral[:, 1:, 1:] = class_map.to(torch.int64).cumsum(1).cumsum(2)
    s = size
    return integral[:, s:, s:] - integral[:, :-s, s:] - integral[:, s:, :-s] + integral[:, :-s, :-s]


def valid_windows(labels: Tensor, cls: int, size: int, min_pixels: int) -> Tensor:
    """Windows that hold at least ``min_pixels`` pixels of class ``cls``.

    Args:
        labels: ``(B, H, W)`` integer label map (ground truth or pseudo-labels), or a bool
            ``(B, H, W)`` map of the class itself (then ``cls`` is ignored).
        cls: the class id.
        size: window side, ``1 <= size <= min(H, W)``.
        min_pixels: ``1 <= min_pixels <= size * size``.

    Returns:
        ``(B, H - size + 1, W - size + 1)`` bool, True at the top-left corner of every valid window.
    """
    if labels.dim() != 3:
        raise ValueError(f"labels must be (B, H, W), got shape {tuple(labels.shape)}")
    check_size(size, labels.shape[1], labels.shape[2])
    check_min_pixels(min_pixels, size)
    class_map = labels if labels.dtype == torch.bool else labels == cls
    return window_counts(class_map, size) >= min_pixels


def sample_windows(
    labels: Tensor,
    size: int,
    min_pixels: int,
    *,
    per_class: int = 4,
    classes: Sequence[int] | None = None,
    ignore_index: int = 255,
    generator: torch.Generator | None = None,
) -> PatchWindows:
    """Draw ``per_class`` valid windows for every (image, foreground class present).

    Args:
        labels: ``(B, H, W)`` integer labels; ``ignore_index`` marks unlabelled pixels.
        size, min_pixels: window side and the class pixels a window needs (see ``valid_windows``).
        per_class: windows per (image, class), >= 1.
        classes: the classes to sample; default ``1 .. max label`` (ignore_index excluded).
        ignore_index: never a class.
        generator: a ``torch.Generator`` for reproducible draws (on the labels' device, or CPU).

    Returns:
        ``PatchWindows`` of ``P`` windows, ordered by class, then image, then draw.

    The ``per_class`` windows of an (image, class) are drawn uniformly without replacement among
    its valid windows. When there are fewer valid windows ``n`` than ``per_class``, every valid
    window is used, in random order, and the list repeats cyclically (draw ``j`` is the
    ``j mod n``-th) - so duplicates appear only then, and as evenly as possible. An (image, class)
    with no valid window contributes nothing; nothing valid anywhere gives ``P = 0``.
    """
    check_labels(labels)
    b, h, w = labels.shape
    check_size(size, h, w)
    check_min_pixels(min_pixels, size)
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    class_ids = _foreground_classes(labels, classes, ignore_index)
    device = labels.device
    key_device = generator.device if generator is not None else device
    hv, wv = h - size + 1, w - size + 1
    k = min(per_class, hv * wv)
    draw = torch.arange(per_class, device=key_device)  # (per_class,)
    out_cls, out_src, out_pos = [], [], []
    for c in class_ids:
        valid = valid_windows(labels, c, size, min_pixels).reshape(b, hv * wv).to(key_device)  # (B, L)
        n_valid = valid.sum(1)  # (B,)
        has = n_valid > 0
        if not bool(has.any()):
            continue
        # Uniform random subset per row: i.i.d. keys, invalid windows pushed past every valid one,
        # then the k smallest keys (sorted, so the first n_valid of them are the valid windows).
        keys = torch.rand((b, hv * wv), generator=generator, device=key_device)
        keys.masked_fill_(~valid, 2.0)
        order = keys.topk(k, dim=1, largest=False, sorted=True).indices  # (B, k)
        column = draw[None, :] % n_valid.clamp(min=1)[:, None]  # (B, per_class), < min(k, n_valid)
        positions = order.gather(1, column)[has]  # (B', per_class) flat window indices
        sources = torch.arange(b, device=key_device)[has, None].expand_as(positions)
        out_pos.append(positions.reshape(-1))
        out_src.append(sources.reshape(-1))
        out_cls.append(torch.full((positions.numel(),), c, dtype=torch.int64, device=key_device))
    if not out_pos:
        empty = torch.empty(0, dtype=torch.int64, device=device)
        return PatchWindows(empty, empty, empty, empty)
    pos = torch.cat(out_pos).to(device)
    return PatchWindows(
        classes=torch.cat(out_cls).to(device),
        sources=torch.cat(out_src).to(device),
        top=pos // wv,
        left=pos % wv,
    )


def dense_windows(
    labels: Tensor,
    size: int,
    min_pixels: int,
    *,
    per_image: int,
    classes: Sequence[int] | None = None,
    ignore_index: int = 255,
    generator: torch.Generator | None = None,
) -> PatchWindows:
    """``per_image`` windows from every image that has a valid window of some class: the budget is
    shared equally by the classes present (valid windows in this image), the remainder going one
    window each to classes chosen at random; within a class, as ``sample_windows`` (uniform without
    replacement, cycling when it has fewer valid windows than its share).

    Args:
        labels: ``(B, H, W)`` integer labels; ``ignore_index`` marks unlabelled pixels.
        per_image: windows per image, >= 1. Other arguments: as ``sample_windows``.

    Returns ``PatchWindows`` ordered by image, then class, then draw; an image with no valid window
    of any class contributes nothing."""
    check_labels(labels)
    b, h, w = labels.shape
    check_size(size, h, w)
    check_min_pixels(min_pixels, size)
    if per_image < 1:
        raise ValueError(f"per_image must be >= 1, got {per_image}")
    class_ids = _foreground_classes(labels, classes, ignore_index)
    parts: list[PatchWindows] = []
    for i in range(b):
        one = labels[i:i + 1]
        present = [c for c in class_ids if bool(valid_windows(one, c, size, min_pixels).any())]
        if not present:
            continue
        share, extra = divmod(per_image, len(present))
        lucky = set(torch.randperm(len(present), generator=generator)[:extra].tolist()) if extra else set()
        for j, c in enumerate(present):
            n = share + (j in lucky)
            if n == 0:
                continue
            win = sample_windows(one, size, min_pixels, per_class=n, classes=[c], ignore_index=ignore_index,
                                 generator=generator)
            parts.append(win._replace(sources=torch.full_like(win.sources, i)))
    if not parts:
        empty = torch.empty(0, dtype=torch.int64, device=labels.device)
        return PatchWindows(empty, empty, empty, empty)
    return PatchWindows(*(torch.cat([getattr(p, f) for p in parts]) for f in PatchWindows._fields))

def check_size(size: int, h: int, w: int) -> None:
    if size < 1 or size > h or size > w:
        raise ValueError(f"patch size {size} must be in 1..min(H, W) for images of H x W = {h} x {w}")


def check_min_pixels(min_pixels: int, size: int) -> None:
    if not 1 <= min_pixels <= size * size:
        raise ValueError(f"min_pixels must be in 1..size^2 ({size * size}), got {min_pixels}")


def check_labels(labels: Tensor) -> None:
    if labels.dim() != 3:
        raise ValueError(f"labels must be (B, H, W), got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")


def _foreground_classes(labels: Tensor, classes: Sequence[int] | None, ignore_index: int) -> list[int]:
    """The classes to sample: ``classes`` as given (deduplicated, sorted), or ``1 .. max label``
    with ignore pixels excluded. Labels below 0 (other than ignore_index) are an error."""
    if classes is not None:
        wanted = sorted({int(c) for c in classes})
        if any(c == ignore_index for c in wanted):
            raise ValueError(f"classes {wanted} contain ignore_index {ignore_index}")
        return wanted
    labelled = labels[labels != ignore_index]
    if labelled.numel() == 0:
        return []
    low, high = int(labelled.min()), int(labelled.max())
    if low < 0:
        raise ValueError(f"labels hold {low}: class ids must be >= 0 (or ignore_index {ignore_index})")
    return [c for c in range(1, high + 1)]

def patch_seed(seed: int, round_: int, labelled: bool, index: int) -> int:
    """Seed of one image's window draws in one round (a 64-bit hash of the four, all >= 0): an
    image's patches do not depend on batching, worker count or the order images are labelled in."""
    import numpy as np  # only here: the module's sampling is pure torch

    return int(np.random.SeedSequence([seed, round_, int(labelled), index]).generate_state(1, np.uint64)[0])


def seeded_windows(labels: Tensor, indices: Sequence[int], *, size: int, min_pixels: int, per_image: int,
                   classes: Sequence[int], seed: int, round_: int, labelled: bool,
                   ignore_index: int = 255) -> PatchWindows:
    """The class-wise windows of each image of ``labels`` (B, H, W) (``dense_windows``: ``per_image``
    windows shared by the classes present), drawn with ``patch_seed(seed, round_, labelled, index)``
    for the image's dataset index in ``indices`` (B,): the same windows in ``--local``, in any Ray
    worker and in the labelling stream. ``sources`` = position in ``labels``. Windows need only the
    labels: the stream sends them, never the patches' pixels (``pipeline``)."""
    if labels.shape[0] != len(indices):
        raise ValueError(f"labels ({labels.shape[0]}) and indices ({len(indices)}) must have the same length")
    wins = []
    for i, index in enumerate(indices):
        gen = torch.Generator().manual_seed(patch_seed(seed, round_, labelled, int(index)))
        w = dense_windows(labels[i:i + 1], size, min_pixels, per_image=per_image, classes=classes,
                          ignore_index=ignore_index, generator=gen)
        wins.append(w._replace(sources=torch.full_like(w.sources, i)))
    if not wins:
        empty = torch.zeros(0, dtype=torch.int64)
        return PatchWindows(empty, empty.clone(), empty.clone(), empty.clone())
    return PatchWindows(*(torch.cat([getattr(w, f) for w in wins]) for f in PatchWindows._fields))
