from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from cssl_ray.method.patches import MASK_MODES, class_balanced_batches, extract_patches, sample_patches
from cssl_ray.method.windows import sample_windows, valid_windows, window_counts

IGNORE = 255


def _naive_valid_windows(labels: np.ndarray, cls: int, size: int, min_pixels: int) -> np.ndarray:
    """Oracle: scan every top-left position with Python loops and count with numpy."""
    b, h, w = labels.shape
    out = np.zeros((b, h - size + 1, w - size + 1), dtype=bool)
    for i, y, x in itertools.product(range(b), range(h - size + 1), range(w - size + 1)):
        out[i, y, x] = (labels[i, y : y + size, x : x + size] == cls).sum() >= min_pixels
    return out


def _manual_patch(image: np.ndarray, label: np.ndarray, cls: int, y: int, x: int, size: int, mask: str) -> np.ndarray:
    """Oracle: crop (C, size, size) and apply the masking rule pixel by pixel."""
    crop = image[:, y : y + size, x : x + size].copy()
    lab = label[y : y + size, x : x + size]
    for r, c in itertools.product(range(size), range(size)):
        v = lab[r, c]
        if mask == "others_all" and v != cls:
            crop[:, r, c] = 0
        if mask == "others_foreground" and v not in (cls, 0, IGNORE):
            crop[:, r, c] = 0
    return crop


def _random_labels(seed: int, b: int = 3, h: int = 11, w: int = 9, num_classes: int = 4, ignore_share: float = 0.2):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (b, h, w), generator=g)
    labels[torch.rand((b, h, w), generator=g) < ignore_share] = IGNORE
    return labels


@pytest.mark.parametrize("seed, size, min_pixels", [(0, 3, 1), (1, 4, 5), (2, 5, 9), (3, 9, 20), (4, 1, 1)])
def test_valid_windows_match_naive_scanner(seed, size, min_pixels):
    labels = _random_labels(seed)
    for cls in range(4):
        got = valid_windows(labels, cls, size, min_pixels)
        assert got.shape == (3, 11 - size + 1, 9 - size + 1)
        np.testing.assert_array_equal(got.numpy(), _naive_valid_windows(labels.numpy(), cls, size, min_pixels))


def test_window_counts_exact_on_hand_example():
    class_map = torch.tensor([[[1, 0, 1], [1, 1, 0], [0, 1, 1]]], dtype=torch.bool)
    assert torch.equal(window_counts(class_map, 2), torch.tensor([[[3, 2], [3, 3]]]))
    assert torch.equal(window_counts(class_map, 3), torch.tensor([[[6]]]))
    # a bool class map is accepted by valid_windows as well
    assert torch.equal(valid_windows(class_map, 0, 2, 3), torch.tensor([[[True, False], [True, True]]]))


def _image_batch(labels: torch.Tensor, channels: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    b, h, w = labels.shape
    return torch.rand((b, channels, h, w), generator=g) + 1.0  # never zero, so masking is visible


@pytest.mark.parametrize("mask", MASK_MODES)
def test_every_patch_is_a_valid_masked_crop(mask):
    labels = _random_labels(5, b=4, h=12, w=10, ignore_share=0.15)
    images = _image_batch(labels)
    size, min_pixels = 5, 7
    windows = sample_windows(labels, size, min_pixels, per_class=3, generator=torch.Generator().manual_seed(0))
    patches, classes, sources = sample_patches(
        images, labels, size, min_pixels, per_class=3, mask=mask, generator=torch.Generator().manual_seed(0)
    )
    assert patches.shape == (classes.numel(), 2, size, size) and patches.numel() > 0
    assert torch.equal(classes, windows.classes) and torch.equal(sources, windows.sources)
    assert classes.dtype == sources.dtype == torch.int64
    lab_np, img_np = labels.numpy(), images.numpy()
    for p in range(classes.numel()):
        c, s, y, x = (int(t[p]) for t in windows)
        assert (lab_np[s, y : y + size, x : x + size] == c).sum() >= min_pixels
        expected = _manual_patch(img_np[s], lab_np[s], c, y, x, size, mask)
        np.testing.assert_array_equal(patches[p].numpy(), expected)


def test_masking_modes_on_hand_example():
    # one 1-channel 3x3 image; labels: background 0, class 1, class 2 and an ignore pixel
    labels = torch.tensor([[[1, 1, 0], [1, 2, IGNORE], [0, 2, 1]]])
    images = torch.arange(1.0, 10.0).reshape(1, 1, 3, 3)
    kwargs = dict(size=3, min_pixels=4, classes=[1], generator=torch.Generator().manual_seed(0), per_class=1)
    expect = {
        "others_all": [[1, 2, 0], [4, 0, 0], [0, 0, 9]],
        "others_foreground": [[1, 2, 3], [4, 0, 6], [7, 0, 9]],
        "none": [[1, 2, 3], [4, 5, 6], [7, 8, 9]],
    }
    for mode, grid in expect.items():
        patches, classes, sources = sample_patches(images, labels, mask=mode, **kwargs)
        assert torch.equal(patches, torch.tensor(grid, dtype=torch.float32)[None, None]), mode
        assert classes.tolist() == [1] and sources.tolist() == [0]


def test_windows_are_uniform_without_replacement_when_enough():
    labels = torch.zeros(1, 8, 8, dtype=torch.int64)
    labels[0, 2:6, 2:6] = 1  # 16 pixels of class 1
    # size 3 with min_pixels 9: exactly the 2x2 = 4 windows fully inside the square
    valid = {(y, x) for y in range(2, 4) for x in range(2, 4)}
    w = sample_windows(labels, 3, 9, per_class=4, generator=torch.Generator().manual_seed(1))
    assert set(zip(w.top.tolist(), w.left.tolist())) == valid  # all four, no repeats
    w = sample_windows(labels, 3, 9, per_class=3, generator=torch.Generator().manual_seed(1))
    drawn = list(zip(w.top.tolist(), w.left.tolist()))
    assert len(set(drawn)) == 3 and set(drawn) <= valid


def test_fewer_valid_windows_than_per_class_repeat_cyclically():
    labels = torch.zeros(1, 6, 6, dtype=torch.int64)
    labels[0, 0:2, 0:3] = 1  # 6 pixels; with size 2 and min 4 only windows (0,0) and (0,1) qualify
    w = sample_windows(labels, 2, 4, per_class=5, generator=torch.Generator().manual_seed(2))
    drawn = list(zip(w.top.tolist(), w.left.tolist()))
    assert len(drawn) == 5 and set(drawn) == {(0, 0), (0, 1)}
    assert drawn[0::2] == [drawn[0]] * 3 and drawn[1::2] == [drawn[1]] * 2  # each once, then cycle


def test_image_class_without_valid_window_contributes_nothing():
    labels = torch.zeros(2, 8, 8, dtype=torch.int64)
    labels[0, :4, :4] = 1  # 16 pixels of class 1 in image 0
    labels[1, 0, 0] = 1  # a single pixel in image 1: not enough
    labels[1, 4:, 4:] = 2  # class 2 only in image 1
    patches, classes, sources = sample_patches(
        _image_batch(labels), labels, 4, 10, per_class=2, generator=torch.Generator().manual_seed(0)
    )
    assert classes.tolist() == [1, 1, 2, 2] and sources.tolist() == [0, 0, 1, 1]


def test_empty_cases():
    images = torch.ones(2, 3, 8, 8)
    # only background and ignore: nothing to sample
    labels = torch.zeros(2, 8, 8, dtype=torch.int64)
    labels[:, :4] = IGNORE
    patches, classes, sources = sample_patches(images, labels, 4, 1)
    assert patches.shape == (0, 3, 4, 4) and classes.shape == (0,) and sources.shape == (0,)
    assert classes.dtype == torch.int64 and patches.dtype == images.dtype
    # foreground present but too sparse for min_pixels
    labels[0, 7, 7] = 1
    assert sample_patches(images, labels, 4, 2)[0].shape == (0, 3, 4, 4)
    # no images at all
    assert sample_patches(images[:0], labels[:0], 4, 1)[0].shape == (0, 3, 4, 4)
    assert class_balanced_batches(torch.empty(0, dtype=torch.int64), 8) == []


def test_pseudo_labels_with_ignore_pixels():
    labels = torch.full((1, 10, 10), IGNORE, dtype=torch.int64)
    labels[0, 1:6, 1:6] = 2  # a confident square of class 2 amid unconfident pixels
    labels[0, 3, 3] = 0
    images = _image_batch(labels, channels=1)
    patches, classes, _ = sample_patches(images, labels, 6, 20, per_class=4, generator=torch.Generator().manual_seed(3))
    assert set(classes.tolist()) == {2}  # ignore (255) is never a class
    kept = patches != 0
    assert kept.sum((1, 2, 3)).min() >= 20
    # others_all zeroes ignore pixels; others_foreground keeps them (they are not foreground)
    fg_patches, _, _ = sample_patches(
        images, labels, 6, 20, per_class=4, mask="others_foreground", generator=torch.Generator().manual_seed(3)
    )
    assert (fg_patches != 0).sum() > kept.sum()


def test_explicit_classes_and_determinism():
    labels = _random_labels(7, b=4, h=16, w=16, ignore_share=0.1)
    images = _image_batch(labels)
    a = sample_patches(images, labels, 6, 8, classes=[3, 1], generator=torch.Generator().manual_seed(11))
    b = sample_patches(images, labels, 6, 8, classes=[3, 1], generator=torch.Generator().manual_seed(11))
    c = sample_patches(images, labels, 6, 8, classes=[3, 1], generator=torch.Generator().manual_seed(12))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert set(a[1].tolist()) == {1, 3} and a[1].tolist() == sorted(a[1].tolist())
    assert not torch.equal(a[0], c[0])


def test_bad_arguments_raise():
    images, labels = torch.ones(1, 1, 8, 6), torch.ones(1, 8, 6, dtype=torch.int64)
    with pytest.raises(ValueError, match="size 7.*8 x 6"):
        sample_patches(images, labels, 7, 1)
    with pytest.raises(ValueError, match="min_pixels"):
        sample_patches(images, labels, 4, 17)
    with pytest.raises(ValueError, match="mask"):
        sample_patches(images, labels, 4, 1, mask="others")
    with pytest.raises(ValueError, match="per_class"):
        sample_patches(images, labels, 4, 1, per_class=0)
    with pytest.raises(ValueError, match="labels"):
        sample_patches(images, labels[0], 4, 1)
    with pytest.raises(ValueError, match="labels"):
        sample_patches(images, labels.float(), 4, 1)
    with pytest.raises(ValueError, match="do not match"):
        sample_patches(images, torch.ones(2, 8, 6, dtype=torch.int64), 4, 1)
    with pytest.raises(ValueError, match="images"):
        extract_patches(images[0], labels, sample_windows(labels, 4, 1), 4)
    with pytest.raises(ValueError, match="class ids"):
        sample_patches(images, -labels, 4, 1)


# --- class-balanced batches ------------------------------------------------------------------


def test_balanced_batches_hand_example_use_every_patch_once():
    # 3 classes x 4 patches, batch 6 -> 2 batches of 2 per class, all 12 patches used once
    patch_classes = torch.tensor([1, 1, 2, 3, 2, 1, 3, 3, 2, 1, 2, 3])
    batches = class_balanced_batches(patch_classes, 6, generator=torch.Generator().manual_seed(0))
    assert len(batches) == 2
    for batch in batches:
        assert batch.dtype == torch.int64 and batch.numel() == 6
        assert torch.bincount(patch_classes[batch], minlength=4).tolist() == [0, 2, 2, 2]
    assert sorted(torch.cat(batches).tolist()) == list(range(12))


def test_balanced_batches_remainder_rotates_and_small_classes_reuse():
    # class 0: 9 patches, class 1: 9 patches, class 2: 1 patch; batch 8 over 4 batches
    patch_classes = torch.tensor([0] * 9 + [1] * 9 + [2])
    batches = class_balanced_batches(patch_classes, 8, num_batches=4, generator=torch.Generator().manual_seed(1))
    counts = [torch.bincount(patch_classes[b], minlength=3).tolist() for b in batches]
    # class 2 has one patch: it appears once per batch and its freed slots are shared (8 = 1 + 7)
    assert all(c[2] == 1 and sorted(c[:2]) == [3, 4] for c in counts)
    assert sum(c[0] for c in counts) == sum(c[1] for c in counts) == 14  # the extra slot rotates
    for b in batches:
        assert b.unique().numel() == b.numel()  # no duplicates within a batch
    # without replacement within a pass: class 0's 8 draws of batches 0-1 are distinct, and the
    # pass ends in batch 2, so batches 0-2 cover all 9 of its patches
    draws = [b[patch_classes[b] == 0].tolist() for b in batches]
    assert len(set(draws[0] + draws[1])) == 8
    assert set(draws[0] + draws[1] + draws[2]) == set(range(9))


def test_balanced_batches_more_classes_than_slots_and_default_count():
    patch_classes = torch.arange(5).repeat_interleave(2)  # 5 classes x 2
    batches = class_balanced_batches(patch_classes, 3, generator=torch.Generator().manual_seed(0))
    assert len(batches) == math.ceil(10 / 3)
    seen = torch.cat([patch_classes[b] for b in batches])
    assert torch.bincount(seen, minlength=5).tolist() == [3, 3, 2, 2, 2]  # 12 slots spread by rotation


def test_balanced_batches_capped_by_patch_count_and_deterministic():
    patch_classes = torch.tensor([4, 4, 7])
    batches = class_balanced_batches(patch_classes, 16, generator=torch.Generator().manual_seed(0))
    assert len(batches) == 1 and sorted(batches[0].tolist()) == [0, 1, 2]
    pc = torch.randint(0, 4, (50,), generator=torch.Generator().manual_seed(5))
    a = class_balanced_batches(pc, 8, generator=torch.Generator().manual_seed(9))
    b = class_balanced_batches(pc, 8, generator=torch.Generator().manual_seed(9))
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and len(a) == 7
    assert class_balanced_batches(pc, 8, num_batches=0) == []


def test_balanced_batches_bad_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        class_balanced_batches(torch.tensor([1, 2]), 0)
    with pytest.raises(ValueError, match="patch_classes"):
        class_balanced_batches(torch.tensor([[1, 2]]), 2)
    with pytest.raises(ValueError, match="patch_classes"):
        class_balanced_batches(torch.tensor([1.0, 2.0]), 2)
    with pytest.raises(ValueError, match="num_batches"):
        class_balanced_batches(torch.tensor([1, 2]), 2, num_batches=-1)
