from __future__ import annotations

import numpy as np
import pytest
import torch

from cssl_ray.data.synthetic import SYNTHETIC_CLASS_NAMES, class_names, make_synthetic, synthetic_images


def test_shapes_dtypes_and_ranges():
    images, masks = make_synthetic(6, (40, 56), num_classes=4, seed=1)
    assert images.shape == (6, 1, 40, 56) and images.dtype == torch.float32
    assert masks.shape == (6, 40, 56) and masks.dtype == torch.int64
    assert torch.isfinite(images).all()
    assert masks.min() >= 0 and masks.max() <= 3


def test_empty_dataset():
    images, masks = make_synthetic(0, (32, 32), in_channels=3)
    assert images.shape == (0, 3, 32, 32) and masks.shape == (0, 32, 32)


def test_image_i_does_not_depend_on_n():
    small_x, small_m = make_synthetic(3, (48, 48), seed=7)
    big_x, big_m = make_synthetic(9, (48, 48), seed=7)
    assert torch.equal(small_x, big_x[:3]) and torch.equal(small_m, big_m[:3])


def test_images_by_index_equal_the_whole_set():
    """What a Ray worker or stream task makes: just the images it needs, the same as the whole set's."""
    x, m = make_synthetic(9, (24, 24), num_classes=3, seed=5, difficulty=0.5, in_channels=2)
    some_x, some_m = synthetic_images([7, 2, 2], (24, 24), num_classes=3, seed=5, difficulty=0.5, in_channels=2)
    assert torch.equal(some_x, x[[7, 2, 2]]) and torch.equal(some_m, m[[7, 2, 2]])
    none_x, none_m = synthetic_images([], (24, 24), in_channels=2)
    assert none_x.shape == (0, 2, 24, 24) and none_m.shape == (0, 24, 24)
    with pytest.raises(ValueError, match="seed must be >= 0"):
        synthetic_images([0], seed=-1)


def test_deterministic_and_seed_dependent():
    a = make_synthetic(4, (48, 48), seed=3)
    b = make_synthetic(4, (48, 48), seed=3)
    c = make_synthetic(4, (48, 48), seed=4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    assert not torch.equal(a[1][0], a[1][1])  # images within a dataset differ too


def test_difficulty_changes_pixels_not_masks():
    clean_x, clean_m = make_synthetic(4, (64, 64), difficulty=0.0)
    hard_x, hard_m = make_synthetic(4, (64, 64), difficulty=1.0)
    assert torch.equal(clean_m, hard_m)
    assert not torch.allclose(clean_x, hard_x)


def test_roughly_standardised():
    images, _ = make_synthetic(24, (128, 128), seed=5)
    assert abs(images.mean().item()) < 0.4
    assert 0.6 < images.std().item() < 1.6


def test_every_foreground_class_appears_in_most_images():
    _, masks = make_synthetic(40, (128, 128), num_classes=4, seed=2)
    present = torch.stack([(masks == k).flatten(1).any(1) for k in range(4)], 1).float().mean(0)  # (4,)
    assert present[0] == 1.0 and present[1] >= 0.9 and present[2] >= 0.9
    assert 0.6 <= present[3] < 1.0  # dots: absent from some images, by design


def test_one_foreground_class_variant():
    images, masks = make_synthetic(8, (64, 64), num_classes=2)
    assert set(masks.unique().tolist()) == {0, 1}
    assert class_names(2) == ["background", "nucleus"]
    # several separate nuclei per image: the foreground is a modest share of the pixels
    share = (masks == 1).float().mean().item()
    assert 0.02 < share < 0.4


def test_more_classes_cycle_through_shapes():
    _, masks = make_synthetic(12, (96, 96), num_classes=7)
    assert set(masks.unique().tolist()) == set(range(7))
    assert class_names(7) == ["background", "blob", "band", "dot", "blob_2", "band_2", "dot_2"]
    assert SYNTHETIC_CLASS_NAMES == ["background", "blob", "band", "dot"]


def test_classes_1_to_3_keep_their_outlines_when_more_classes_are_added():
    _, m4 = make_synthetic(3, (64, 64), num_classes=4)
    _, m7 = make_synthetic(3, (64, 64), num_classes=7)
    uncovered = m7 <= 3  # pixels not painted by classes 4-6
    assert torch.equal(m4[uncovered], m7[uncovered])


@pytest.mark.parametrize("size", [(8, 8), (16, 16), (16, 40), (200, 72)])
def test_any_size(size):
    images, masks = make_synthetic(3, size)
    assert images.shape == (3, 1, *size) and masks.shape == (3, *size)
    assert torch.isfinite(images).all()


def test_channels_share_geometry_but_differ():
    images, masks = make_synthetic(2, (48, 48), in_channels=3)
    assert images.shape == (2, 3, 48, 48)
    assert not torch.allclose(images[:, 0], images[:, 1])
    _, masks1 = make_synthetic(2, (48, 48), in_channels=1)
    assert torch.equal(masks, masks1)


def _intensity_only_iou(images: torch.Tensor, masks: torch.Tensor, num_classes: int) -> np.ndarray:
    """Per-class IoU of the best classifier that sees one pixel's grey value only (a histogram
    Bayes rule fitted on the very pixels it is scored on: an optimistic bound)."""
    values = images[:, 0].flatten().numpy()
    labels = masks.flatten().numpy()
    bins = np.clip(np.digitize(values, np.linspace(-4, 4, 81)), 0, 81)
    hist = np.zeros((82, num_classes))
    np.add.at(hist, (bins, labels), 1)
    pred = hist.argmax(1)[bins]
    return np.array([((pred == k) & (labels == k)).sum() / max(1, ((pred == k) | (labels == k)).sum()) for k in range(num_classes)])


def test_intensity_alone_does_not_segment_at_default_difficulty():
    clean = _intensity_only_iou(*make_synthetic(16, (96, 96), difficulty=0.0), 4)
    hard = _intensity_only_iou(*make_synthetic(16, (96, 96), difficulty=1.0), 4)
    # Clean data is easy from intensity; at difficulty 1 shape and texture are needed.
    assert clean[1:3].mean() > 0.6
    assert hard[1:].mean() < 0.3


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"n": -1}, "n"),
        ({"n": 2, "size": (4, 32)}, "size"),
        ({"n": 2, "num_classes": 1}, "num_classes"),
        ({"n": 2, "difficulty": -0.5}, "difficulty"),
        ({"n": 2, "seed": -1}, "seed"),
        ({"n": 2, "in_channels": 0}, "in_channels"),
    ],
)
def test_bad_arguments_raise(kwargs, word):
    with pytest.raises(ValueError, match=word):
        make_synthetic(**kwargs)


def test_a_source_keeps_the_rows_it_made_within_its_budget(monkeypatch):
    """DataSource.take generates (or reads) a row once per process, then serves it from memory; the
    least recently used rows leave when the budget is spent."""
    from cssl_ray.config import DataConfig
    from cssl_ray.data import bundle
    from cssl_ray.data.splits import Split

    source = bundle.DataSource(DataConfig(image_size=[16, 16], seed=2), None, Split([0], [1, 2, 3, 4], [5], [6]),
                               class_names(4))
    made: list[int] = []
    read = bundle.DataSource.read_rows
    monkeypatch.setattr(bundle.DataSource, "read_rows", lambda self, idx: made.extend(idx) or read(self, idx))
    monkeypatch.setattr(bundle, "_ROWS", bundle._RowCache(budget=3 * (16 * 16 * 4 + 16 * 16 * 8)))  # 3 rows
    x, m = make_synthetic(7, (16, 16), seed=2)
    got, masks = source.take("unlabelled", [2, 0])
    assert torch.equal(got, x[[3, 1]]) and torch.equal(masks, m[[3, 1]]) and made == [1, 3]
    assert torch.equal(source.take("unlabelled", [0])[0], x[[1]]) and made == [1, 3]  # from memory
    source.take("unlabelled", [1, 3])  # rows 2 and 4: row 3 (least recently used) leaves
    assert made == [1, 3, 2, 4] and len(bundle._ROWS.rows) == 3
    assert torch.equal(source.take("unlabelled", [2])[0], x[[3]]) and made == [1, 3, 2, 4, 3]


def test_percentile_normalisation_is_per_image_and_keyed_in_the_row_cache():
    """data.normalise: percentile maps each synthetic image's 1st / 99.8th percentiles to 0 / 1 (as the
    real readers do); the labelled images' brightness then matches D_U's (docs/science.md 0.5)."""
    from cssl_ray.config import from_dict
    from cssl_ray.data.bundle import open_source
    from cssl_ray.data.preprocess import percentile_normalise

    d = {"image_size": [32, 32], "n_train": 12, "n_val": 2, "n_test": 2, "labelled_count": 3}
    raw = open_source(from_dict({"data": d, "patches": {"size": 16}}).data)
    norm = open_source(from_dict({"data": {**d, "normalise": "percentile"}, "patches": {"size": 16}}).data)
    x_raw, y_raw = raw.take("labelled")
    x, y = norm.take("labelled")  # the same rows, read after the raw ones: not the cached raw pixels
    assert torch.equal(y, y_raw)
    for a, b in zip(x_raw.numpy(), x.numpy()):
        np.testing.assert_allclose(b, percentile_normalise(a, 1.0, 99.8), atol=1e-6)
        assert b.min() == 0.0 and b.max() == 1.0
    assert not torch.equal(x, x_raw)
