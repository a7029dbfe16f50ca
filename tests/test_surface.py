"""cssl_ray.evaluation.surface: hand-computed HD95 / ASD / per-image Dice, a brute-force oracle, MONAI (when
installed) on random masks, the degenerate cases, the accumulator and evaluate(surface=True)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

from cssl_ray.evaluation.surface import SurfaceMetrics, image_scores, surface, surface_distances, worst_distance
from cssl_ray.method.collectives import Collectives
from cssl_ray.run import loop


def _mask(shape: tuple[int, int], *pixels: tuple[int, int]) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    for p in pixels:
        m[p] = True
    return m


def _square(shape: tuple[int, int], top: int, left: int, size: int) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[top:top + size, left:left + size] = True
    return m


def _brute_force(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float, float]:
    """The oracle: surface = mask pixels with a 4-neighbour outside the mask (or off the image), all
    pairwise distances between the two surfaces, HD95 / ASD / Dice as MONAI defines them."""
    def surface_points(m: np.ndarray) -> np.ndarray:
        padded = np.pad(m, 1)  # off the image = background
        inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        return np.argwhere(m & ~inner).astype(np.float64)

    if not pred.any() and not gt.any():
        return math.nan, math.nan, math.nan
    if not pred.any() or not gt.any():
        return worst_distance(pred.shape), worst_distance(pred.shape), 0.0
    sp, sg = surface_points(pred), surface_points(gt)
    pairs = np.linalg.norm(sp[:, None, :] - sg[None, :, :], axis=-1)  # (|S(P)|, |S(G)|)
    d_pg, d_gp = pairs.min(1), pairs.min(0)
    hd95 = max(np.quantile(d_pg, 0.95), np.quantile(d_gp, 0.95))
    asd = np.concatenate([d_pg, d_gp]).mean()
    return float(hd95), float(asd), 2 * (pred & gt).sum() / (pred.sum() + gt.sum())


def _blobs(rng: np.random.Generator, shape: tuple[int, int], frac: float) -> np.ndarray:
    """Random blob-shaped mask (smoothed noise above a quantile), sometimes with speckle."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=rng.uniform(1.0, 4.0))
    m = field > np.quantile(field, 1 - frac)
    return m ^ (rng.random(shape) < 0.01) if rng.random() < 0.3 else m


# ---------------------------------------------------------------------------------------------
# Hand-computed cases


def test_surface_is_the_mask_minus_its_erosion_with_the_image_border_as_background() -> None:
    sq = _square((6, 6), 1, 1, 4)
    want = sq.copy()
    want[2:4, 2:4] = False  # the 2x2 interior
    assert np.array_equal(surface(sq), want)
    full = np.ones((3, 4), dtype=bool)  # touches every border: only the centre row's inner pixels erode
    assert surface(full).sum() == 10 and not surface(full)[1, 1:3].any()


def test_two_single_pixels_at_a_3_4_5_distance() -> None:
    pred, gt = _mask((8, 8), (1, 1)), _mask((8, 8), (4, 5))
    assert image_scores(pred, gt) == (5.0, 5.0, 0.0)
    d_pg, d_gp = surface_distances(pred, gt)
    assert d_pg.tolist() == [5.0] and d_gp.tolist() == [5.0]


def test_square_shifted_by_one_pixel() -> None:
    # 4x4 squares, pred one column to the right: each 12-pixel ring has 6 pixels on the other ring
    # (distance 0) and 6 one pixel away. ASD = 12 / 24; q95 of six 0s and six 1s = 1; Dice = 24 / 32.
    gt, pred = _square((10, 10), 2, 2, 4), _square((10, 10), 2, 3, 4)
    d_pg, d_gp = surface_distances(pred, gt)
    assert sorted(d_pg.tolist()) == [0.0] * 6 + [1.0] * 6 and sorted(d_gp.tolist()) == sorted(d_pg.tolist())
    assert image_scores(pred, gt) == (1.0, 0.5, 0.75)


def test_hd95_interpolates_between_distances_and_takes_the_larger_direction() -> None:
    # pred = two pixels 3 apart, gt = one of them: d(P -> G) = (0, 3), d(G -> P) = (0,).
    # q95(0, 3) = 0.95 * 3 = 2.85 (linear); ASD = (0 + 3 + 0) / 3 = 1; Dice = 2 / 3.
    pred, gt = _mask((5, 5), (0, 0), (0, 3)), _mask((5, 5), (0, 0))
    hd95, asd, dice = image_scores(pred, gt)
    assert hd95 == pytest.approx(2.85) and asd == pytest.approx(1.0) and dice == pytest.approx(2 / 3)
    assert image_scores(gt, pred) == (hd95, asd, dice)  # symmetric


def test_degenerate_cases() -> None:
    empty = np.zeros((5, 7), dtype=bool)
    assert all(math.isnan(v) for v in image_scores(empty, empty))  # nothing to score
    diag = math.sqrt(4 ** 2 + 6 ** 2)  # the largest pixel-to-pixel distance of a 5x7 image
    assert worst_distance((5, 7)) == diag
    one = _mask((5, 7), (2, 3))
    assert image_scores(one, empty) == (diag, diag, 0.0)  # hallucinated object
    assert image_scores(empty, one) == (diag, diag, 0.0)  # missed object
    with pytest.raises(ValueError, match="non-empty"):
        surface_distances(one, empty)
    with pytest.raises(ValueError, match="same shape"):
        image_scores(one, np.zeros((5, 6), dtype=bool))


# ---------------------------------------------------------------------------------------------
# Oracles on random masks


def test_random_masks_match_the_brute_force_oracle() -> None:
    rng = np.random.default_rng(0)
    for _ in range(40):
        shape = (int(rng.integers(3, 40)), int(rng.integers(3, 40)))
        pred, gt = _blobs(rng, shape, rng.uniform(0.01, 0.6)), _blobs(rng, shape, rng.uniform(0.01, 0.6))
        assert image_scores(pred, gt) == pytest.approx(_brute_force(pred, gt), rel=1e-12, abs=1e-12)


@pytest.mark.slow  # importing MONAI takes 6-10 s here; the comparison itself under 1 s
@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI's own deprecation notice
def test_random_masks_match_monai() -> None:
    metrics = pytest.importorskip("monai.metrics")
    rng = np.random.default_rng(1)
    b, c, shape = 12, 3, (48, 40)
    pred = np.stack([[_blobs(rng, shape, rng.uniform(0.02, 0.4)) for _ in range(c)] for _ in range(b)])
    gt = np.stack([[_blobs(rng, shape, rng.uniform(0.02, 0.4)) for _ in range(c)] for _ in range(b)])
    pred[0, 1] = False  # one missed object: MONAI says NaN / inf, we say the diagonal
    yp, yt = torch.from_numpy(pred).float(), torch.from_numpy(gt).float()  # (B, C, H, W) one mask per channel
    with pytest.warns(UserWarning):  # MONAI warns about the empty prediction
        hd95 = metrics.compute_hausdorff_distance(yp, yt, include_background=True, percentile=95).double()
        asd = metrics.compute_average_surface_distance(yp, yt, include_background=True, symmetric=True).double()
    ours = torch.tensor([[image_scores(pred[i, j], gt[i, j])[:2] for j in range(c)] for i in range(b)],
                        dtype=torch.float64)  # (B, C, 2)
    # MONAI's HD95 is NaN there (max of an empty direction's NaN and inf), its ASD inf
    assert not math.isfinite(hd95[0, 1]) and math.isinf(asd[0, 1])
    assert ours[0, 1].tolist() == [worst_distance(shape)] * 2
    hd95[0, 1] = asd[0, 1] = worst_distance(shape)
    torch.testing.assert_close(ours[..., 0], hd95, rtol=1e-5, atol=1e-5)  # MONAI is float32
    torch.testing.assert_close(ours[..., 1], asd, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The accumulator


def _hand_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two 10x10 images, C = 3. Image 0: class 1 the shifted square (HD95 1, ASD 0.5, Dice 0.75),
    class 2 absent from both (NaN). Image 1: class 1 identical squares (0, 0, 1), class 2 missed."""
    target = torch.zeros(2, 10, 10, dtype=torch.int64)
    pred = torch.zeros(2, 10, 10, dtype=torch.int64)
    target[0, 2:6, 2:6] = 1
    pred[0, 2:6, 3:7] = 1
    target[1, 0:3, 0:3] = 1
    pred[1, 0:3, 0:3] = 1
    target[1, 7, 7] = 2
    return pred, target


def test_accumulator_keys_means_and_the_one_empty_count() -> None:
    pred, target = _hand_batch()
    acc = SurfaceMetrics(3, class_names=["bg", "liver", "tumour"])
    acc.update(pred, target)
    out = acc.compute()
    diag = math.sqrt(2 * 9 ** 2)
    assert out["hd95/liver"] == 0.5 and out["asd/liver"] == 0.25 and out["dice_image/liver"] == 0.875
    assert out["hd95/tumour"] == diag and out["asd/tumour"] == diag and out["dice_image/tumour"] == 0.0
    assert out["hd95_mean"] == pytest.approx((0.5 + diag) / 2) and out["dice_image_mean"] == 0.4375
    assert out["surface_one_empty/liver"] == 0.0 and out["surface_one_empty/tumour"] == 1.0
    assert not any(k.startswith(("hd95/bg", "asd/bg", "dice_image/bg")) for k in out)  # foreground only
    empty = SurfaceMetrics(3).compute()  # nothing seen: every mean NaN, every count 0
    assert math.isnan(empty["hd95_mean"]) and math.isnan(empty["dice_image/class_1"])
    assert empty["surface_one_empty/class_2"] == 0.0


def test_logits_and_integer_predictions_agree_and_ignored_pixels_are_in_neither_mask() -> None:
    pred, target = _hand_batch()
    logits = torch.nn.functional.one_hot(pred, 3).permute(0, 3, 1, 2).float()  # (B, C, H, W)
    a, b = SurfaceMetrics(3), SurfaceMetrics(3)
    a.update(logits, target)
    b.update(pred, target)
    assert a.compute() == pytest.approx(b.compute(), nan_ok=True)
    # Class 1 predicted on ignored pixels beside a perfect square: not part of the prediction.
    t = torch.zeros(1, 8, 8, dtype=torch.int64)
    t[0, 2:5, 2:5] = 1
    t[0, :, 6:] = 255
    p = t.clone()
    p[0, :, 6:] = 1
    acc = SurfaceMetrics(2)
    acc.update(p, t)
    assert acc.compute()["hd95/class_1"] == 0.0 and acc.compute()["dice_image/class_1"] == 1.0
    only_ignored = SurfaceMetrics(2)  # the class only where the target is ignored: nothing to score
    only_ignored.update(torch.ones(1, 4, 4, dtype=torch.int64), torch.full((1, 4, 4), 255))
    assert math.isnan(only_ignored.compute()["asd/class_1"])


def test_merge_state_equals_one_shot() -> None:
    rng = np.random.default_rng(2)
    target = torch.from_numpy(rng.integers(0, 3, (6, 16, 16)))
    target = torch.from_numpy(ndimage.median_filter(target.numpy(), size=(1, 5, 5)))  # blobby classes
    pred = torch.where(torch.from_numpy(rng.random((6, 16, 16)) < 0.1), (target + 1) % 3, target)
    whole = SurfaceMetrics(3)
    whole.update(pred, target)
    ranks = [SurfaceMetrics(3) for _ in range(3)]
    for r, acc in enumerate(ranks):
        acc.update(pred[2 * r:2 * r + 2], target[2 * r:2 * r + 2])
    summed = {k: sum(acc.state()[k] for acc in ranks) for k in whole.state()}  # the all-reduce
    merged = SurfaceMetrics(3)
    merged.merge_state(summed)
    assert merged.compute() == pytest.approx(whole.compute(), rel=1e-12, nan_ok=True)
    with pytest.raises(ValueError, match="state keys"):
        merged.merge_state({"sums": summed["sums"]})


def test_bad_inputs_raise() -> None:
    acc = SurfaceMetrics(3)
    with pytest.raises(ValueError, match="same shape|like target"):
        acc.update(torch.zeros(2, 4, 4, dtype=torch.int64), torch.zeros(2, 4, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="C=3"):
        acc.update(torch.zeros(2, 2, 4, 4), torch.zeros(2, 4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="outside"):
        acc.update(torch.full((1, 4, 4), 3), torch.zeros(1, 4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="num_classes"):
        SurfaceMetrics(1)


def test_evaluate_with_surface_returns_the_keys() -> None:
    torch.manual_seed(0)
    model = nn.Conv2d(1, 3, 3, padding=1)
    images = torch.randn(5, 1, 12, 12)
    masks = torch.randint(0, 3, (5, 12, 12))
    masks[0, :2] = 255
    kw = dict(num_classes=3, class_names=["bg", "a", "b"], batch_size=2)
    plain = loop.evaluate(model, images, masks, **kw)
    assert not any("hd95" in k or "asd" in k for k in plain)  # off by default: not on the hot path
    out = loop.evaluate(model, images, masks, surface=True, collectives=Collectives(), **kw)
    for key in ("hd95/a", "hd95/b", "hd95_mean", "asd/a", "asd_mean", "dice_image/b", "dice_image_mean",
                "surface_one_empty/a"):
        assert math.isfinite(out[key]), key
    assert out["dice_mean"] == plain["dice_mean"]
    direct = SurfaceMetrics(3, class_names=["bg", "a", "b"])
    direct.update(model(images).argmax(1), masks)
    assert {k: out[k] for k in direct.compute()} == pytest.approx(direct.compute())
