from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cssl_ray.method.pseudo_labels import coverage, merge_with_ground_truth, predict_pseudo_labels, pseudo_labels


def _logits() -> torch.Tensor:
    """(1, 3, 2, 2) logits with hand-computable softmax maxima:
    (0,0): [0, 0, 0]      -> p = 1/3 each, argmax 0 (first of a tie)
    (0,1): [0, 0, -100]   -> p = [0.5, 0.5, ~0]: exactly 0.5 in float32, argmax 0
    (1,0): [-100, 100, 0] -> p = 1.0 exactly in float32 (the others underflow), class 1
    (1,1): [0, 0, 0] + 2 on class 2 -> p2 = e^2 / (e^2 + 2) = 0.787..., class 2
    """
    x = torch.zeros(1, 3, 2, 2)
    x[0, 2, 0, 1] = -100.0
    x[0, :, 1, 0] = torch.tensor([-100.0, 100.0, 0.0])
    x[0, 2, 1, 1] = 2.0
    return x


def test_hand_computed_labels():
    logits = _logits()
    assert torch.equal(pseudo_labels(logits, 0.3), torch.tensor([[[0, 0], [1, 2]]]))
    assert torch.equal(pseudo_labels(logits, 0.5), torch.tensor([[[255, 0], [1, 2]]]))  # 0.5 >= 0.5
    assert torch.equal(pseudo_labels(logits, 0.78), torch.tensor([[[255, 255], [1, 2]]]))
    assert torch.equal(pseudo_labels(logits, 0.79), torch.tensor([[[255, 255], [1, 255]]]))


def test_probability_equal_to_threshold_passes():
    logits = torch.zeros(2, 4, 3, 5)  # softmax exactly 0.25 everywhere
    assert (pseudo_labels(logits, 0.25) == 0).all()
    assert (pseudo_labels(logits, 0.2500001) == 255).all()


def test_threshold_one_keeps_only_saturated_pixels():
    labels = pseudo_labels(_logits(), 1.0)
    assert torch.equal(labels, torch.tensor([[[255, 255], [1, 255]]]))


def test_custom_ignore_index_and_dtype():
    labels = pseudo_labels(_logits().double(), 0.9, ignore_index=-1)
    assert labels.dtype == torch.int64
    assert torch.equal(labels, torch.tensor([[[-1, -1], [1, -1]]]))


def test_low_precision_logits():
    logits = _logits().to(torch.bfloat16)
    assert torch.equal(pseudo_labels(logits, 0.5), torch.tensor([[[255, 0], [1, 2]]]))


def test_nan_logits_are_ignored():
    logits = _logits()
    logits[0, 0, 1, 1] = float("nan")
    assert pseudo_labels(logits, 0.3)[0, 1, 1] == 255


@pytest.mark.parametrize("threshold", [0.0, -0.1, 1.01, float("nan")])
def test_bad_threshold_raises(threshold):
    with pytest.raises(ValueError, match="threshold"):
        pseudo_labels(_logits(), threshold)


def test_bad_shapes_and_ignore_index_raise():
    with pytest.raises(ValueError, match="logits"):
        pseudo_labels(torch.zeros(3, 2, 2), 0.5)
    with pytest.raises(ValueError, match="ignore_index"):
        pseudo_labels(_logits(), 0.5, ignore_index=2)
    with pytest.raises(ValueError, match="dtype"):
        pseudo_labels(torch.zeros(1, 2, 2, 2, dtype=torch.int64), 0.5)


class _TinyNet(nn.Module):
    """Conv + batch-norm (mode-dependent) + dropout (mode-dependent) -> 3-class logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.drop(self.bn(self.conv(x)))
        return logits, logits.mean((2, 3))  # (logits, embedding), like the project's models


def test_predict_matches_manual_eval_forward_and_restores_mode():
    torch.manual_seed(0)
    net = _TinyNet()
    net.bn.running_mean.uniform_(-1, 1)
    net.bn.running_var.uniform_(0.5, 2)
    images = torch.randn(5, 2, 6, 7) * 3
    net.train()
    net.bn.eval()  # a mixed-mode model (frozen batch-norm) must come back exactly as it was
    before = [m.training for m in net.modules()]
    running = net.bn.running_mean.clone()
    labels = predict_pseudo_labels(net, images, threshold=0.6, batch_size=2)
    assert [m.training for m in net.modules()] == before
    assert torch.equal(net.bn.running_mean, running)  # eval mode: statistics untouched
    net.eval()
    with torch.no_grad():
        expected = pseudo_labels(net(images)[0], 0.6)
    assert labels.shape == (5, 6, 7) and labels.dtype == torch.int64
    assert torch.equal(labels, expected)
    assert 0.0 < coverage(labels) < 1.0  # the case is not trivial


def test_predict_accepts_plain_and_dict_outputs_and_empty_input():
    conv = nn.Conv2d(1, 2, 1)
    images = torch.randn(3, 1, 4, 4)
    expected = pseudo_labels(conv(images).detach(), 0.7)
    assert torch.equal(predict_pseudo_labels(conv, images, 0.7), expected)

    class DictNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = conv

        def forward(self, x):
            return {"logits": self.conv(x), "embedding": None}

    assert torch.equal(predict_pseudo_labels(DictNet(), images, 0.7), expected)
    assert predict_pseudo_labels(conv, images[:0], 0.7).shape == (0, 4, 4)


def test_predict_rejects_bad_inputs():
    conv = nn.Conv2d(1, 2, 1)
    with pytest.raises(ValueError, match="images"):
        predict_pseudo_labels(conv, torch.zeros(1, 4, 4), 0.5)
    with pytest.raises(ValueError, match="threshold"):
        predict_pseudo_labels(conv, torch.zeros(1, 1, 4, 4), 1.5)
    with pytest.raises(ValueError, match="batch_size"):
        predict_pseudo_labels(conv, torch.zeros(1, 1, 4, 4), 0.5, batch_size=0)
    with pytest.raises(ValueError, match="logits"):
        predict_pseudo_labels(nn.Flatten(), torch.zeros(1, 1, 4, 4), 0.5)
    conv.train()
    with pytest.raises(ValueError):
        predict_pseudo_labels(nn.Sequential(conv, nn.MaxPool2d(2)), torch.zeros(2, 1, 4, 4), 0.5)
    assert conv.training  # restored even when the call fails


def test_merge_with_ground_truth():
    pseudo = torch.tensor([[[1, 255], [0, 2]]])
    gt = torch.tensor([[[1, 1], [0, 0]]], dtype=torch.uint8)
    assert torch.equal(merge_with_ground_truth(pseudo, None), pseudo)
    merged = merge_with_ground_truth(pseudo, gt)
    assert merged.dtype == torch.int64 and torch.equal(merged, gt.long())
    with pytest.raises(ValueError, match="shape"):
        merge_with_ground_truth(pseudo, gt[0])


def test_coverage():
    labels = torch.tensor([[[0, 255], [255, 3]]])
    assert coverage(labels) == 0.5
    assert coverage(labels, ignore_index=3) == 0.75
    assert coverage(torch.empty(0, 4, 4, dtype=torch.int64)) == 0.0
    assert coverage(torch.full((2, 3, 3), 255)) == 0.0


def test_class_coverage_hand_computed():
    from cssl_ray.method.pseudo_labels import class_coverage

    # argmax: 4 pixels of class 0, 3 of class 1, none of class 2; confident: 1 of class 0, 3 of class 1
    argmax = torch.tensor([[0, 0, 0, 0, 1, 1, 1]])
    pseudo = torch.tensor([[0, 255, 255, 255, 1, 1, 1]])
    cov = class_coverage(pseudo, argmax, 3)
    assert cov[:2] == [0.25, 1.0] and math.isnan(cov[2])
    with pytest.raises(ValueError, match="shapes differ"):
        class_coverage(pseudo, argmax[:, :3], 3)


def test_predict_with_argmax_matches_plain_argmax():
    torch.manual_seed(0)
    net = nn.Conv2d(1, 3, 3, padding=1)
    images = torch.rand(3, 1, 8, 8)
    pseudo, argmax = predict_pseudo_labels(net, images, 0.5, batch_size=2, with_argmax=True)
    with torch.no_grad():
        assert torch.equal(argmax, net(images).argmax(1))
    assert torch.equal(pseudo, predict_pseudo_labels(net, images, 0.5))
    empty = predict_pseudo_labels(net, images[:0], 0.5, with_argmax=True)
    assert empty[0].shape == empty[1].shape == (0, 8, 8)


# -- the class-wise rule and the confidence instrument ---------------------------------------------

from cssl_ray.method.pseudo_labels import confidence_histogram, confident_labels, histogram_medians  # noqa: E402


def _naive_confident(argmax, confidence, threshold, ignore, fraction, floor):
    """Pixel by pixel: passes the threshold, or is among its image's ceil(fraction n_c) most confident
    pixels of its class (ties at the cut included) and at least the floor."""
    out = torch.full_like(argmax, ignore)
    for b in range(argmax.shape[0]):
        for c in set(argmax[b].flatten().tolist()):
            values = sorted(confidence[b][argmax[b] == c].tolist(), reverse=True)
            k = max(1, math.ceil(fraction * len(values))) if fraction > 0 else 0
            cut = max(values[k - 1], floor) if k else math.inf
            for y in range(argmax.shape[1]):
                for x in range(argmax.shape[2]):
                    if argmax[b, y, x] == c and (confidence[b, y, x] >= threshold or confidence[b, y, x] >= cut):
                        out[b, y, x] = c
    return out


@pytest.mark.parametrize("fraction, floor", [(0.0, 0.5), (0.3, 0.0), (0.5, 0.5), (1.0, 0.6)])
def test_class_wise_rule_matches_a_naive_oracle(fraction, floor):
    g = torch.Generator().manual_seed(1)
    argmax = torch.randint(0, 3, (2, 6, 7), generator=g)
    confidence = torch.rand(2, 6, 7, generator=g) * 0.6 + 0.4
    got = confident_labels(argmax, confidence, 0.9, 255, class_fraction=fraction, floor=floor)
    assert torch.equal(got, _naive_confident(argmax, confidence, 0.9, 255, fraction, floor))


def test_class_wise_rule_by_hand():
    argmax = torch.tensor([[[1, 1, 1, 1, 0, 0]]])
    conf = torch.tensor([[[0.55, 0.6, 0.7, 0.8, 0.95, 0.3]]])
    plain = confident_labels(argmax, conf, 0.9)
    assert plain.tolist() == [[[255, 255, 255, 255, 0, 255]]]  # the paper's threshold: class 1 is gone
    half = confident_labels(argmax, conf, 0.9, class_fraction=0.5)
    assert half.tolist() == [[[255, 255, 1, 1, 0, 255]]]  # class 1's top half; class 0's top half is its 0.95
    floored = confident_labels(argmax, conf, 0.9, class_fraction=0.5, floor=0.75)
    assert floored.tolist() == [[[255, 255, 255, 1, 0, 255]]]  # tau_conf: 0.7 is under the floor
    logits = torch.randn(2, 3, 5, 5)
    conf_, arg_ = torch.softmax(logits, 1).max(1)
    assert torch.equal(confident_labels(arg_, conf_, 0.6), pseudo_labels(logits, 0.6))  # fraction 0 = the threshold
    with pytest.raises(ValueError, match="class_fraction"):
        confident_labels(argmax, conf, 0.9, class_fraction=1.2)
    with pytest.raises(ValueError, match="floor"):
        confident_labels(argmax, conf, 0.9, floor=-0.1)


def test_predict_with_the_class_wise_rule_and_confidence():
    torch.manual_seed(0)
    net = nn.Conv2d(1, 3, 3, padding=1)
    images = torch.randn(3, 1, 8, 8)
    pseudo, argmax, conf = predict_pseudo_labels(net, images, 0.99, class_fraction=0.25, floor=0.0,
                                                 batch_size=2, with_argmax=True, with_confidence=True)
    probs = torch.softmax(net(images), 1)
    assert torch.allclose(conf, probs.max(1).values.detach()) and torch.equal(argmax, probs.argmax(1))
    assert torch.equal(pseudo, confident_labels(argmax, conf, 0.99, class_fraction=0.25))
    for b in range(3):  # every class predicted in an image keeps some pseudo-label
        assert set(argmax[b].unique().tolist()) == set(pseudo[b].unique().tolist()) - {255}


def test_confidence_medians_from_histograms_match_torch_median():
    g = torch.Generator().manual_seed(0)
    argmax = torch.randint(0, 3, (4, 16, 16), generator=g)
    argmax[argmax == 2] = 0  # class 2 never predicted
    confidence = torch.rand(4, 16, 16, generator=g) ** 0.5
    hist = confidence_histogram(argmax, confidence, 3)
    assert hist.shape == (3, 100) and int(hist.sum()) == argmax.numel() and int(hist[2].sum()) == 0
    halves = confidence_histogram(argmax[:2], confidence[:2], 3) + confidence_histogram(argmax[2:], confidence[2:], 3)
    assert torch.equal(hist, halves)  # summable over images (steps, ranks)
    medians = histogram_medians(hist)
    for c in (0, 1):
        exact = float(confidence[argmax == c].median())
        assert abs(medians[c] - exact) <= 0.01
    assert math.isnan(medians[2])
    one = confidence_histogram(torch.zeros(1, 1, 1, dtype=torch.long), torch.ones(1, 1, 1), 2)
    assert one[0, 99] == 1  # 1.0 falls in the last bin
