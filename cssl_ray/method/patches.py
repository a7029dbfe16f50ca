"""Class-wise patches (step C of a CSSL round), sampled without per-patch Python loops.

From every image (labelled: ground truth; unlabelled: pseudo-labels with ``ignore_index``), for
each foreground class ``c`` present, windows of ``size x size`` holding at least ``min_pixels``
pixels of ``c`` are drawn; the patch keeps the image's pixels of ``c`` and zeroes the others
(``mask``). Each patch carries its class ``c_i``; contrastive batches are class-balanced.

    size         side of the square window (config ``patches.size``, default 64)
    min_pixels   pixels of the patch's class a window must hold (default 25)
    per_image    windows drawn per image, shared equally by the foreground classes that have a valid
                 window in it (``dense_windows``, the trainer's rule): an image gives its full
                 budget whichever classes it holds, so a step's pool does not shrink where a class
                 is absent (config ``patches.per_image``)
    per_class    the older rule (``sample_windows``): windows per (image, foreground class present)
    mask         "others_all"        zero every pixel whose label is not the patch class, including
                                     background and ignore (the paper)
                 "others_foreground" zero only pixels of other foreground classes; background and
                                     ignore pixels keep their values (the released code)
                 "none"              no masking

Window counts for every top-left position (stride 1) come from an integral image of the class
map, so one class costs O(B H W) whatever ``size`` is; exact integer arithmetic, no float box
filter rounding.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

MASK_MODES = ("others_all", "others_foreground", "none")


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
    _check_size(size, h, w)
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
    _check_size(size, labels.shape[1], labels.shape[2])
    _check_min_pixels(min_pixels, size)
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
    _check_labels(labels)
    b, h, w = labels.shape
    _check_size(size, h, w)
    _check_min_pixels(min_pixels, size)
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
    _check_labels(labels)
    b, h, w = labels.shape
    _check_size(size, h, w)
    _check_min_pixels(min_pixels, size)
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


def extract_patches(
    images: Tensor,
    labels: Tensor,
    windows: PatchWindows,
    size: int,
    *,
    mask: str = "others_all",
    ignore_index: int = 255,
) -> Tensor:
    """Crop every window of ``windows`` from ``images`` at once and mask it.

    Args:
        images: ``(B, C, H, W)``.
        labels: ``(B, H, W)`` integer labels the windows were drawn from.
        windows: ``PatchWindows`` of ``P`` windows.
        size: window side.
        mask: one of ``MASK_MODES`` (see the module docstring).
        ignore_index: label of unlabelled pixels (never "foreground" for ``others_foreground``).

    Returns:
        ``(P, C, size, size)`` patches, same dtype and device as ``images``.
    """
    _check_images_labels(images, labels)
    if mask not in MASK_MODES:
        raise ValueError(f"mask must be one of {', '.join(MASK_MODES)}, got {mask!r}")
    _check_size(size, images.shape[2], images.shape[3])
    p = windows.sources.numel()
    if p == 0:
        return images.new_zeros((0, images.shape[1], size, size))
    offset = torch.arange(size, device=images.device)
    rows = (windows.top[:, None] + offset[None, :])[:, :, None]  # (P, size, 1)
    cols = (windows.left[:, None] + offset[None, :])[:, None, :]  # (P, 1, size)
    src = windows.sources[:, None, None]  # (P, 1, 1)
    patches = images.permute(0, 2, 3, 1)[src, rows, cols].permute(0, 3, 1, 2)  # (P, C, size, size)
    if mask == "none":
        return patches.contiguous()
    patch_labels = labels[src, rows, cols]  # (P, size, size)
    own = patch_labels == windows.classes[:, None, None]
    if mask == "others_all":
        keep = own
    else:  # others_foreground: drop only pixels of another foreground class
        other_foreground = (patch_labels != 0) & (patch_labels != ignore_index) & ~own
        keep = ~other_foreground
    return patches * keep[:, None].to(patches.dtype)


def sample_patches(
    images: Tensor,
    labels: Tensor,
    size: int,
    min_pixels: int,
    *,
    per_class: int = 4,
    mask: str = "others_all",
    classes: Sequence[int] | None = None,
    ignore_index: int = 255,
    generator: torch.Generator | None = None,
    per_image: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Class-wise patches of a batch of images: ``sample_windows`` then ``extract_patches``.

    Args:
        images: ``(B, C, H, W)``.
        labels: ``(B, H, W)`` integer ground truth or pseudo-labels (with ``ignore_index``).
        size, min_pixels, per_class, classes, ignore_index, generator: see ``sample_windows``.
        mask: one of ``MASK_MODES``.
        per_image: > 0: ``dense_windows`` (this many windows per image, shared by the classes
            present) instead of ``per_class`` windows per (image, class).

    Returns:
        patches ``(P, C, size, size)`` (images' dtype), patch_classes ``(P,)`` int64 and sources
        ``(P,)`` int64 (image index in the batch). Nothing found (no foreground, or no window with
        enough pixels) gives ``P = 0``. ``size`` larger than H or W raises ValueError.
    """
    _check_images_labels(images, labels)
    if mask not in MASK_MODES:
        raise ValueError(f"mask must be one of {', '.join(MASK_MODES)}, got {mask!r}")
    if per_image > 0:
        windows = dense_windows(labels, size, min_pixels, per_image=per_image, classes=classes,
                                ignore_index=ignore_index, generator=generator)
    else:
        windows = sample_windows(labels, size, min_pixels, per_class=per_class, classes=classes,
                                 ignore_index=ignore_index, generator=generator)
    patches = extract_patches(images, labels, windows, size, mask=mask, ignore_index=ignore_index)
    return patches, windows.classes, windows.sources


def class_balanced_batches(
    patch_classes: Tensor,
    batch_size: int,
    *,
    num_batches: int | None = None,
    generator: torch.Generator | None = None,
) -> list[Tensor]:
    """Index batches with (as near as possible) equal counts of every class.

    Args:
        patch_classes: ``(P,)`` integer class of every patch.
        batch_size: patches per batch, >= 1; batches hold ``min(batch_size, P)`` patches.
        num_batches: default ``ceil(P / batch_size)`` (an epoch-like pass); 0 gives ``[]``.
        generator: for reproducible draws (CPU).

    Returns:
        ``num_batches`` int64 index tensors into ``patch_classes`` (on its device), each in random
        order (so any slice of a batch - e.g. a DDP shard - stays mixed).

    Each of the ``K`` classes present gets ``batch_size // K`` slots per batch, and the remainder
    ``batch_size % K`` goes to one extra slot for ``r`` classes chosen in rotation from batch to
    batch. A class with fewer patches than its slots contributes all of them, and the freed slots
    are shared among the other classes the same way. No index repeats within a batch. Across
    batches every class draws from its own stream of reshuffled passes over its patches: without
    replacement until the class is exhausted, then a new pass - so when the counts divide evenly
    every patch is used exactly once, and only classes with fewer patches than the batches need are
    reused. A class with a single patch still appears (it has no positive; the loss handles that).
    ``P = 0`` gives ``[]``.
    """
    if patch_classes.dim() != 1:
        raise ValueError(f"patch_classes must be (P,), got shape {tuple(patch_classes.shape)}")
    if patch_classes.is_floating_point() or patch_classes.is_complex():
        raise ValueError(f"patch_classes must be an integer tensor, got dtype {patch_classes.dtype}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_batches is not None and num_batches < 0:
        raise ValueError(f"num_batches must be >= 0, got {num_batches}")
    p = patch_classes.numel()
    if p == 0:
        return []
    if num_batches is None:
        num_batches = math.ceil(p / batch_size)
    cpu_classes = patch_classes.detach().cpu()
    present = torch.unique(cpu_classes).tolist()  # sorted
    members = [torch.nonzero(cpu_classes == c).flatten() for c in present]  # per-class patch indices
    counts = [m.numel() for m in members]
    streams = [_ClassStream(m, generator) for m in members]
    target = min(batch_size, p)
    batches = []
    for t in range(num_batches):
        quota = _quotas(counts, target, rotation=t)
        parts = [streams[j].take(q) for j, q in enumerate(quota) if q > 0]
        batch = torch.cat(parts)
        batch = batch[torch.randperm(batch.numel(), generator=generator)]
        batches.append(batch.to(patch_classes.device))
    return batches


class _ClassStream:
    """Endless reshuffled passes over one class's patch indices, never repeating within a take."""

    def __init__(self, members: Tensor, generator: torch.Generator | None) -> None:
        self.members = members
        self.generator = generator
        self.queue: list[int] = []

    def take(self, q: int) -> Tensor:
        """``q <= len(members)`` distinct indices, continuing the current pass."""
        out = self.queue[:q]
        self.queue = self.queue[q:]
        if len(out) < q:
            # New pass; the indices already taken in this batch go to the back of it so this take
            # has no duplicates, and the new pass still holds every index once.
            fresh = self.members[torch.randperm(self.members.numel(), generator=self.generator)].tolist()
            taken = set(out)
            fresh = [i for i in fresh if i not in taken] + [i for i in fresh if i in taken]
            need = q - len(out)
            out += fresh[:need]
            self.queue = fresh[need:]
        return torch.tensor(out, dtype=torch.int64)


def _quotas(counts: list[int], target: int, rotation: int) -> list[int]:
    """Slots per class for one batch of ``target <= sum(counts)`` patches: equal shares, the
    remainder to classes in rotation, capped at each class's count with the excess re-shared."""
    k = len(counts)
    quota = [0] * k
    open_ = list(range(k))  # classes that can still take more
    left = target
    while left > 0 and open_:
        share, extra = divmod(left, len(open_))
        start = (rotation * extra) % len(open_) if extra else 0
        lucky = {open_[(start + i) % len(open_)] for i in range(extra)}
        for j in open_:
            quota[j] += share + (1 if j in lucky else 0)
        overflow = sum(max(0, quota[j] - counts[j]) for j in open_)
        for j in open_:
            quota[j] = min(quota[j], counts[j])
        open_ = [j for j in open_ if quota[j] < counts[j]]
        left = overflow
    return quota


# ---------------------------------------------------------------------------------------------
# Argument checks (ValueError naming the argument).


def _check_size(size: int, h: int, w: int) -> None:
    if size < 1 or size > h or size > w:
        raise ValueError(f"patch size {size} must be in 1..min(H, W) for images of H x W = {h} x {w}")


def _check_min_pixels(min_pixels: int, size: int) -> None:
    if not 1 <= min_pixels <= size * size:
        raise ValueError(f"min_pixels must be in 1..size^2 ({size * size}), got {min_pixels}")


def _check_labels(labels: Tensor) -> None:
    if labels.dim() != 3:
        raise ValueError(f"labels must be (B, H, W), got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")


def _check_images_labels(images: Tensor, labels: Tensor) -> None:
    _check_labels(labels)
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    if images.shape[0] != labels.shape[0] or images.shape[2:] != labels.shape[1:]:
        raise ValueError(
            f"images (B, C, H, W) = {tuple(images.shape)} and labels (B, H, W) = {tuple(labels.shape)} do not match"
        )


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


def seeded_patches(images: Tensor, labels: Tensor, indices: Sequence[int], *, size: int, min_pixels: int,
                   per_image: int, classes: Sequence[int], seed: int, round_: int, labelled: bool,
                   mask: str = "others_all", ignore_index: int = 255) -> tuple[Tensor, Tensor, PatchWindows]:
    """``seeded_windows`` of ``labels``, cut from ``images`` (B, C, H, W) and masked
    (``extract_patches``). Returns patches (P, C, size, size), their classes (P,) and the windows."""
    if images.shape[0] != labels.shape[0] or images.shape[0] != len(indices):
        raise ValueError(f"images ({images.shape[0]}), labels ({labels.shape[0]}) and indices ({len(indices)}) "
                         "must have the same length")
    windows = seeded_windows(labels, indices, size=size, min_pixels=min_pixels, per_image=per_image,
                             classes=classes, seed=seed, round_=round_, labelled=labelled, ignore_index=ignore_index)
    patches = extract_patches(images, labels, windows, size, mask=mask, ignore_index=ignore_index)
    return patches, windows.classes, windows
