"""Class-wise patches (step C of a CSSL round), sampled without per-patch Python loops.

From every image (labelled: ground truth; unlabelled: pseudo-labels with ``ignore_index``), for
each foreground class ``c`` present, windows of ``size x size`` holding at least ``min_pixels``
pixels of ``c`` are drawn; the patch keeps the image's pixels of ``c`` and zeroes the others
(``mask``). Each patch carries its class ``c_i``; contrastive batches are class-balanced.

    mask         "others_all"        zero every pixel whose label is not the patch class, including
                                     background and ignore (the paper)
                 "others_foreground" zero only pixels of other foreground classes; background and
                                     ignore pixels keep their values (the released code)
                 "none"              no masking

Window counts for every top-left position (stride 1) come from an integral image of the class
map, so one class costs O(B H W) whatever ``size`` is; exact integer arithmetic, no float box
filter rounding."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from cssl_ray.method.windows import (
    PatchWindows,
    check_labels,
    check_size,
    dense_windows,
    sample_windows,
    seeded_windows,
)

MASK_MODES = ("others_all", "others_foreground", "none")


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
    check_size(size, images.shape[2], images.shape[3])
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

def _check_images_labels(images: Tensor, labels: Tensor) -> None:
    check_labels(labels)
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    if images.shape[0] != labels.shape[0] or images.shape[2:] != labels.shape[1:]:
        raise ValueError(
            f"images (B, C, H, W) = {tuple(images.shape)} and labels (B, H, W) = {tuple(labels.shape)} do not match"
        )

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
