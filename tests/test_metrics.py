from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, f1_score, jaccard_score
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

from cssl_ray.evaluation.metrics import (
    SegmentationMetrics,
    average_precision_from_histograms,
    confusion_matrix,
    dice_from_confusion,
    iou_from_confusion,
    pr_histograms,
)

# The hand case: C = 3, 16 pixels.
TARGET_4X4 = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 1, 1], [2, 2, 0, 0]])
PRED_4X4 = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1], [2, 2, 1, 0], [2, 0, 0, 0]])
CM_4X4 = torch.tensor([[5, 1, 0], [1, 5, 0], [1, 0, 3]])  # rows = target
DICE_4X4 = [10 / 13, 10 / 12, 6 / 7]  # 2TP / (2TP + FP + FN)
IOU_4X4 = [5 / 8, 5 / 7, 3 / 4]  # TP / (TP + FP + FN)


def _random_batch(
    b: int, c: int, h: int, w: int, seed: int, ignore_frac: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, C, H, W) that favour the target class, and targets with some ignore pixels."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, c, (b, h, w), generator=g)
    onehot = torch.nn.functional.one_hot(target, c).permute(0, 3, 1, 2)  # (B, C, H, W)
    logits = torch.randn(b, c, h, w, generator=g) + 1.5 * onehot
    if ignore_frac > 0:
        target[torch.rand(b, h, w, generator=g) < ignore_frac] = 255
    return logits, target


def _assert_same_metrics(a: dict[str, float], b: dict[str, float], tol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if math.isnan(a[key]):
            assert math.isnan(b[key]), key
        else:
            assert a[key] == pytest.approx(b[key], abs=tol), key


# ---------------------------------------------------------------- confusion, Dice, IoU


def test_hand_computed_4x4() -> None:
    cm = confusion_matrix(PRED_4X4, TARGET_4X4, 3)
    assert cm.dtype == torch.int64
    assert torch.equal(cm, CM_4X4)
    assert dice_from_confusion(cm).tolist() == pytest.approx(DICE_4X4, abs=1e-15)
    assert iou_from_confusion(cm).tolist() == pytest.approx(IOU_4X4, abs=1e-15)

    m = SegmentationMetrics(3, class_names=["bg", "a", "b"])
    m.update(PRED_4X4[None], TARGET_4X4[None])
    out = m.compute()
    assert out["dice/bg"] == pytest.approx(10 / 13, abs=1e-15)
    assert out["iou/b"] == pytest.approx(3 / 4, abs=1e-15)
    assert out["dice_mean"] == pytest.approx((10 / 12 + 6 / 7) / 2, abs=1e-15)  # foreground only
    assert out["iou_mean"] == pytest.approx((5 / 7 + 3 / 4) / 2, abs=1e-15)


def test_absent_class_is_nan_and_left_out_of_the_mean() -> None:
    m = SegmentationMetrics(4)  # class 3 never appears in target or prediction
    m.update(PRED_4X4[None], TARGET_4X4[None])
    out = m.compute()
    assert math.isnan(out["dice/class_3"]) and math.isnan(out["iou/class_3"])
    assert out["dice_mean"] == pytest.approx((10 / 12 + 6 / 7) / 2, abs=1e-15)
    names = ("background", "class_1", "class_2", "class_3")
    assert set(out) == {f"{k}/{n}" for k in ("dice", "iou") for n in names} | {"dice_mean", "iou_mean"}


def test_class_missing_in_target_but_predicted_scores_zero_not_nan() -> None:
    cm = confusion_matrix(torch.tensor([0, 1, 1]), torch.tensor([0, 0, 0]), 2)
    assert dice_from_confusion(cm).tolist() == pytest.approx([2 / 4, 0.0])
    assert iou_from_confusion(cm).tolist() == pytest.approx([1 / 3, 0.0])


def test_all_foreground_absent_means_are_nan() -> None:
    m = SegmentationMetrics(3)
    m.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 2, dtype=torch.long))
    out = m.compute()
    assert out["dice/background"] == 1.0
    assert math.isnan(out["dice_mean"]) and math.isnan(out["iou_mean"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_confusion_dice_iou_match_sklearn(seed: int) -> None:
    c = 5
    logits, target = _random_batch(3, c, 9, 11, seed)
    target[target == 4] = 3  # class 4 absent from the target
    pred = logits.argmax(1)
    t, p = target.flatten().numpy(), pred.flatten().numpy()
    cm = confusion_matrix(pred, target, c)
    assert np.array_equal(cm.numpy(), sk_confusion_matrix(t, p, labels=list(range(c))))

    present = np.isin(np.arange(c), np.union1d(t, p))
    dice, iou = dice_from_confusion(cm).numpy(), iou_from_confusion(cm).numpy()
    sk_f1 = f1_score(t, p, labels=list(range(c)), average=None, zero_division=0)
    sk_jac = jaccard_score(t, p, labels=list(range(c)), average=None, zero_division=0)
    np.testing.assert_allclose(dice[present], sk_f1[present], atol=1e-12)
    np.testing.assert_allclose(iou[present], sk_jac[present], atol=1e-12)
    assert np.isnan(dice[~present]).all() and np.isnan(iou[~present]).all()


def test_ignore_index_pixels_are_skipped() -> None:
    logits, target = _random_batch(2, 3, 8, 8, seed=3, ignore_frac=0.3)
    keep = target != 255
    pred = logits.argmax(1)
    expected = sk_confusion_matrix(target[keep].numpy(), pred[keep].numpy(), labels=[0, 1, 2])
    assert np.array_equal(confusion_matrix(pred, target, 3).numpy(), expected)
    assert confusion_matrix(pred, target, 3).sum() == keep.sum()

    # uint8 masks with 255 work too; a custom ignore value is honoured
    cm_u8 = confusion_matrix(pred.to(torch.uint8), target.to(torch.uint8), 3)
    assert np.array_equal(cm_u8.numpy(), expected)
    t7 = target.masked_fill(~keep, 7)
    assert np.array_equal(confusion_matrix(pred, t7, 3, ignore_index=7).numpy(), expected)


def test_ignore_index_none_counts_everything_and_rejects_255() -> None:
    target = torch.tensor([0, 1, 255])
    with pytest.raises(ValueError, match="255"):
        confusion_matrix(torch.tensor([0, 1, 1]), target, 2, ignore_index=None)
    cm = confusion_matrix(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]), 2, ignore_index=None)
    assert cm.sum() == 3


def test_empty_and_all_ignored_give_zeros() -> None:
    empty = torch.empty(0, dtype=torch.long)
    assert confusion_matrix(empty, empty, 3).sum() == 0
    assert confusion_matrix(torch.zeros(4, dtype=torch.long), torch.full((4,), 255), 3).sum() == 0


# ---------------------------------------------------------------- accumulation and merging


def test_two_updates_equal_one_update_on_the_concatenation() -> None:
    l1, t1 = _random_batch(2, 4, 8, 8, seed=4, ignore_frac=0.2)
    l2, t2 = _random_batch(3, 4, 8, 8, seed=5, ignore_frac=0.2)
    twice = SegmentationMetrics(4, auprc=True, auprc_bins=50)
    twice.update(l1, t1)
    twice.update(l2, t2)
    once = SegmentationMetrics(4, auprc=True, auprc_bins=50)
    once.update(torch.cat([l1, l2]), torch.cat([t1, t2]))
    for key, value in once.state().items():
        assert torch.equal(twice.state()[key], value), key
    _assert_same_metrics(twice.compute(), once.compute())


def test_merge_state_equals_one_accumulator_over_both() -> None:
    l1, t1 = _random_batch(2, 3, 8, 8, seed=6, ignore_frac=0.1)
    l2, t2 = _random_batch(2, 3, 8, 8, seed=7, ignore_frac=0.1)
    a, b, both = (SegmentationMetrics(3, auprc=True, auprc_bins=100) for _ in range(3))
    a.update(l1, t1)
    b.update(l2, t2)
    both.update(l1, t1)
    both.update(l2, t2)

    # all-reduce as a worker would do it: sum the states, load into a fresh accumulator
    summed = {k: a.state()[k] + b.state()[k] for k in a.state()}
    fresh = SegmentationMetrics(3, auprc=True, auprc_bins=100)
    fresh.merge_state(summed)
    _assert_same_metrics(fresh.compute(), both.compute())

    a.merge_state(b.state())
    _assert_same_metrics(a.compute(), both.compute())


def test_state_is_a_copy_and_reset_zeroes() -> None:
    m = SegmentationMetrics(3, auprc=True, auprc_bins=10)
    m.update(*_random_batch(1, 3, 4, 4, seed=8))
    s = m.state()
    assert set(s) == {"confusion", "auprc_pos", "auprc_neg"}
    assert s["confusion"].shape == (3, 3) and s["auprc_pos"].shape == (3, 10)
    s["confusion"].zero_()
    assert m.state()["confusion"].sum() == 16
    m.reset()
    assert all(v.sum() == 0 for v in m.state().values())
    assert set(SegmentationMetrics(3).state()) == {"confusion"}


def test_merge_state_rejects_mismatched_state() -> None:
    m = SegmentationMetrics(3)
    with pytest.raises(ValueError, match=r"\(4, 4\).*\(3, 3\)"):
        m.merge_state({"confusion": torch.zeros(4, 4, dtype=torch.long)})
    with pytest.raises(ValueError, match="keys"):
        m.merge_state(SegmentationMetrics(3, auprc=True).state())


# ---------------------------------------------------------------- AUPRC


@pytest.mark.parametrize("bins", [1, 7, 20, 1000])
def test_auprc_exact_on_bin_quantised_probabilities(bins: int) -> None:
    g = torch.Generator().manual_seed(bins)
    c = 3
    target = torch.randint(0, c, (2, 10, 12), generator=g)
    k = torch.randint(0, bins, (2, c, 10, 12), generator=g)
    k = (k + 3 * torch.nn.functional.one_hot(target, c).permute(0, 3, 1, 2)).clamp(max=bins - 1)
    probs = (k.double() + 0.5) / bins  # one distinct value per bin; many ties within a bin
    pos, neg = pr_histograms(probs, target, bins)
    ap = average_precision_from_histograms(pos, neg)
    t = target.flatten().numpy()
    for cls in range(c):
        expected = average_precision_score(t == cls, probs[:, cls].flatten().numpy())
        assert float(ap[cls]) == pytest.approx(expected, abs=1e-9), cls


def test_auprc_from_logits_matches_sklearn() -> None:
    bins = 1000
    logits, target = _random_batch(2, 4, 16, 16, seed=9, ignore_frac=0.15)
    m = SegmentationMetrics(4, auprc=True, auprc_bins=bins)
    m.update(logits, target)
    out = m.compute()
    keep = (target != 255).flatten().numpy()
    t = target.flatten().numpy()[keep]
    probs = logits.float().softmax(1)  # the same float32 probabilities the accumulator bins
    ap = []
    for cls in range(1, 4):
        p = probs[:, cls].flatten()
        binned = (p * bins).floor().clamp(max=bins - 1).numpy()[keep]  # scores = bin indices
        on_bins = average_precision_score(t == cls, binned)
        assert out[f"auprc/class_{cls}"] == pytest.approx(on_bins, abs=1e-9)
        exact = average_precision_score(t == cls, p.double().numpy()[keep])
        assert out[f"auprc/class_{cls}"] == pytest.approx(exact, abs=1e-2)
        ap.append(out[f"auprc/class_{cls}"])
    assert out["auprc_mean"] == pytest.approx(np.mean(ap), abs=1e-12)
    assert "auprc/background" not in out


def test_auprc_perfect_and_class_without_positives() -> None:
    # class 1 perfectly separated; class 2 has no positive pixel -> NaN, excluded from the mean
    target = torch.tensor([[[0, 1], [1, 0]]])
    logits = torch.zeros(1, 3, 2, 2)
    logits[:, 1] = 10.0 * (target == 1)
    m = SegmentationMetrics(3, auprc=True)
    m.update(logits, target)
    out = m.compute()
    assert out["auprc/class_1"] == pytest.approx(1.0, abs=1e-12)
    assert math.isnan(out["auprc/class_2"])
    assert out["auprc_mean"] == pytest.approx(1.0, abs=1e-12)


def test_auprc_ignore_pixels_skipped() -> None:
    logits, target = _random_batch(1, 2, 8, 8, seed=10)
    masked = target.clone()
    masked[:, :4] = 255  # hide the top half
    m = SegmentationMetrics(2, auprc=True, auprc_bins=64)
    m.update(logits, masked)
    top = SegmentationMetrics(2, auprc=True, auprc_bins=64)
    top.update(logits[:, :, 4:], target[:, 4:])
    for key, value in top.state().items():
        assert torch.equal(m.state()[key], value), key


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("pred", "target", "match"),
    [
        (torch.tensor([0, 3]), torch.tensor([0, 1]), "pred holds class 3"),
        (torch.tensor([0, -1]), torch.tensor([0, 1]), "pred holds class -1"),
        (torch.tensor([0, 1]), torch.tensor([0, 5]), "target holds class 5"),
        (torch.tensor([0, 1]), torch.tensor([-2, 1]), "target holds class -2"),
    ],
)
def test_out_of_range_class_raises_naming_the_value(
    pred: torch.Tensor, target: torch.Tensor, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        confusion_matrix(pred, target, 3)
    m = SegmentationMetrics(3)
    with pytest.raises(ValueError, match=match):
        m.update(pred[None], target[None])


def test_bad_shapes_and_dtypes_raise() -> None:
    long = torch.long
    with pytest.raises(ValueError, match=r"\(2, 4, 4\).*\(2, 4, 5\)"):
        confusion_matrix(torch.zeros(2, 4, 4, dtype=long), torch.zeros(2, 4, 5, dtype=long), 3)
    with pytest.raises(ValueError, match="float32"):
        confusion_matrix(torch.zeros(4, dtype=torch.long), torch.zeros(4), 3)
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        dice_from_confusion(torch.zeros(2, 3))

    m = SegmentationMetrics(4)
    with pytest.raises(ValueError, match=r"3 channels.*num_classes = 4"):
        m.update(torch.randn(2, 3, 4, 4), torch.zeros(2, 4, 4, dtype=long))
    with pytest.raises(ValueError, match=r"\(2, 4, 4, 4\).*\(3, 4, 4\)"):
        m.update(torch.randn(2, 4, 4, 4), torch.zeros(3, 4, 4, dtype=long))
    with pytest.raises(ValueError, match=r"\(2, 4, 4\).*\(2, 4, 4\)"):  # float predictions
        m.update(torch.randn(2, 4, 4), torch.zeros(2, 4, 4, dtype=long))
    with pytest.raises(ValueError, match="auprc=True needs"):
        SegmentationMetrics(4, auprc=True).update(
            torch.zeros(2, 4, 4, dtype=long), torch.zeros(2, 4, 4, dtype=long)
        )
    with pytest.raises(ValueError, match=r"probs .*\(2, 3, 4, 4\).*\(2, 5, 4\)"):
        pr_histograms(torch.rand(2, 3, 4, 4), torch.zeros(2, 5, 4, dtype=torch.long))


def test_bad_constructor_arguments_raise() -> None:
    with pytest.raises(ValueError, match="class_names"):
        SegmentationMetrics(3, class_names=["bg", "a"])
    with pytest.raises(ValueError, match="num_classes"):
        SegmentationMetrics(1)
    with pytest.raises(ValueError, match="auprc_bins"):
        SegmentationMetrics(3, auprc=True, auprc_bins=0)
