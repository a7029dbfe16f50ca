"""Preprocessing per modality, against hand-computed values."""
from __future__ import annotations

import numpy as np
import pytest

from cssl_ray.data.preprocess import (
    Preprocessing,
    jsrt12,
    percentile_normalise,
    preprocess,
    resize_image,
    resize_mask,
    scale_to_unit,
    to_channels_first,
)


def test_percentile_normalise_maps_percentiles_to_0_and_1_and_clips():
    x = np.arange(101, dtype=np.uint16).reshape(1, 101)  # percentile p of 0..100 is exactly p
    out = percentile_normalise(x, low=10, high=90)
    assert out.dtype == np.float32
    assert out[0, 10] == 0.0 and out[0, 90] == 1.0
    assert out[0, 50] == pytest.approx(0.5)
    assert out[0, 30] == pytest.approx(0.25)
    assert out[0, 0] == 0.0 and out[0, 100] == 1.0  # clipped


def test_percentile_normalise_is_per_image_and_constant_image_is_zero():
    a = np.array([[0, 10], [20, 30]], dtype=np.uint8)
    assert np.allclose(percentile_normalise(a, 0, 100), [[0, 1 / 3], [2 / 3, 1]])
    assert np.allclose(percentile_normalise(a * 2, 0, 100), percentile_normalise(a, 0, 100))  # scale-free
    assert not percentile_normalise(np.full((3, 3), 7, np.uint16)).any()


def test_scale_to_unit_by_dtype():
    assert np.allclose(scale_to_unit(np.array([0, 51, 255], np.uint8)), [0, 0.2, 1])
    assert np.allclose(scale_to_unit(np.array([0, 65535], np.uint16)), [0, 1])
    assert np.allclose(scale_to_unit(np.array([0.25], np.float64)), [0.25])
    assert scale_to_unit(np.array([True, False])).tolist() == [1.0, 0.0]


def test_jsrt12_inverts_white_is_zero_12_bit():
    raw = np.array([0, 1024, 2048, 4095], dtype=">u2")  # big-endian as stored
    assert np.allclose(jsrt12(raw), [1.0, 0.75, 0.5, 1 - 4095 / 4096])


@pytest.mark.parametrize("shape, channels, out_shape", [
    ((4, 5), 1, (1, 4, 5)),
    ((4, 5, 3), 3, (3, 4, 5)),
    ((4, 5, 4), 3, (3, 4, 5)),  # alpha dropped
    ((4, 5), 3, (3, 4, 5)),  # grey repeated
    ((4, 5, 1), 1, (1, 4, 5)),
])
def test_channels_first_shapes(shape, channels, out_shape):
    assert to_channels_first(np.zeros(shape, np.float32), channels).shape == out_shape


def test_rgb_to_one_channel_is_luma_and_rgb_keeps_order():
    rgb = np.zeros((1, 2, 3), np.float32)
    rgb[0, 0] = [1, 0, 0]
    rgb[0, 1] = [0, 0, 1]
    grey = to_channels_first(rgb, 1)
    assert np.allclose(grey[0, 0], [0.299, 0.114])
    chw = to_channels_first(rgb, 3)
    assert chw[0, 0, 0] == 1 and chw[2, 0, 1] == 1
    with pytest.raises(ValueError, match="2-channel"):
        to_channels_first(np.zeros((2, 2, 2)), 3)


def test_area_downsampling_averages_blocks():
    x = np.arange(16, dtype=np.float32).reshape(1, 4, 4)
    out = resize_image(x, (2, 2))
    assert np.allclose(out[0], [[2.5, 4.5], [10.5, 12.5]])  # means of the 2x2 blocks


def test_bilinear_upsampling_uses_pixel_centres():
    x = np.array([[[0.0, 4.0]]], dtype=np.float32)  # (1, 1, 2)
    out = resize_image(x, (1, 4))
    assert np.allclose(out[0, 0], [0, 1, 3, 4])  # centres at -0.25, 0.25, 0.75, 1.25 (edge-clamped)


def test_mask_resize_is_nearest_and_keeps_only_class_ids():
    mask = np.array([[0, 0, 1, 1],
                     [0, 0, 1, 1],
                     [2, 2, 3, 3],
                     [2, 2, 3, 3]], dtype=np.uint8)
    assert resize_mask(mask, (2, 2)).tolist() == [[0, 1], [2, 3]]
    up = resize_mask(mask, (8, 8))
    assert up.dtype == np.uint8 and set(np.unique(up)) == {0, 1, 2, 3}
    assert np.array_equal(up[::2, ::2], mask)
    rng = np.random.default_rng(0)
    big = rng.integers(0, 5, (37, 53)).astype(np.uint8)
    assert set(np.unique(resize_mask(big, (16, 21)))) <= set(range(5))


def test_odd_factor_mask_sampling_is_hand_computable():
    mask = np.arange(9, dtype=np.uint8).reshape(3, 3)
    # out i takes row floor((i + 0.5) * 3 / 2): 0 -> 0, 1 -> 2
    assert resize_mask(mask, (2, 2)).tolist() == [[0, 2], [6, 8]]


def test_preprocess_grey_uint16_with_resize():
    image = np.array([[0, 100], [200, 300]], dtype=np.uint16).repeat(2, 0).repeat(2, 1)  # (4, 4)
    mask = np.array([[0, 1], [2, 0]], dtype=np.uint8).repeat(2, 0).repeat(2, 1)
    x, y = preprocess(image, mask, Preprocessing(normalise="percentile", low=0, high=100, size=(2, 2)))
    assert x.shape == (1, 2, 2) and x.dtype == np.float32
    assert np.allclose(x[0], [[0, 1 / 3], [2 / 3, 1]])
    assert y.tolist() == [[0, 1], [2, 0]]


def test_preprocess_rgb_uint8_and_unlabelled():
    image = np.full((2, 3, 3), 255, np.uint8)
    x, y = preprocess(image, None, Preprocessing(normalise="scale", channels=3))
    assert x.shape == (3, 2, 3) and np.allclose(x, 1.0) and y is None


@pytest.mark.parametrize("kwargs, word", [
    ({"normalise": "zscore"}, "normalise"),
    ({"low": 50, "high": 10}, "percentiles"),
    ({"size": (0, 4)}, "size"),
    ({"channels": 2}, "channels"),
])
def test_bad_settings_raise(kwargs, word):
    with pytest.raises(ValueError, match=word):
        Preprocessing(**kwargs)
