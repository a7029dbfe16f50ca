"""L_sup's Dice term (``train.sup_loss: ce_dice``, SSL4MIS's 0.5 (CE + Dice)) against oracles: a
naive per-pixel loop, a hand-computed case, and its wiring into the supervised epoch."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cssl_ray.config import load_config
from cssl_ray.method.objective import Terms
from cssl_ray.method.supervised import DICE_SMOOTH, dice_loss, supervised_loss
from cssl_ray.run.loop import supervised_epoch


def _naive_dice(logits: torch.Tensor, target: torch.Tensor, ignore: int) -> float:
    """SSL4MIS's DiceLoss written pixel by pixel: per class, I = sum p y, Z = sum p^2, Y = sum y^2 over
    the batch's non-ignored pixels; 1 - mean_c (2 I + s) / (Z + Y + s)."""
    b, c, h, w = logits.shape
    total = 0.0
    for k in range(c):
        inter = z = y_ = 0.0
        for i in range(b):
            for r in range(h):
                for q in range(w):
                    t = int(target[i, r, q])
                    if t == ignore:
                        continue
                    probs = [math.exp(float(logits[i, j, r, q])) for j in range(c)]
                    p = probs[k] / sum(probs)
                    onehot = 1.0 if t == k else 0.0
                    inter += p * onehot
                    z += p * p
                    y_ += onehot * onehot
        total += (2 * inter + DICE_SMOOTH) / (z + y_ + DICE_SMOOTH)
    return 1.0 - total / c


def test_dice_loss_equals_a_naive_loop_with_ignored_pixels():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, 4, generator=g)
    target = torch.randint(0, 3, (2, 5, 4), generator=g)
    target[0, :2] = 255
    target[1, 3, 1] = 255
    assert dice_loss(logits, target, 255).item() == pytest.approx(_naive_dice(logits, target, 255), rel=1e-6)


def test_dice_loss_hand_computed():
    # 2 classes, 2 pixels: logits make p = (0.5, 0.5) at both; targets class 0 and class 1.
    # class 0: I = 0.5, Z = 0.25 + 0.25, Y = 1 -> 1 / 1.5; class 1 the same -> loss 1 - 2/3
    logits = torch.zeros(1, 2, 1, 2)
    target = torch.tensor([[[0, 1]]])
    assert dice_loss(logits, target, 255).item() == pytest.approx(1 - 2 / 3, abs=1e-5)
    # a confident, correct prediction: loss ~ 0; the same confidence, wrong: ~ 1
    sure = torch.tensor([[[[20.0, -20.0]], [[-20.0, 20.0]]]])  # (1, 2, 1, 2): pixel 0 class 0, pixel 1 class 1
    assert dice_loss(sure, target, 255).item() == pytest.approx(0.0, abs=1e-5)
    assert dice_loss(sure, 1 - target, 255).item() == pytest.approx(1.0, abs=1e-5)


def test_a_rare_class_weighs_a_whole_share_of_the_dice_term():
    # one rare pixel predicted as background: CE barely notices, Dice loses 1/C
    logits = torch.zeros(1, 2, 10, 10)
    logits[:, 0] = 5.0
    target = torch.zeros(1, 10, 10, dtype=torch.int64)
    target[0, 0, 0] = 1
    ce = F.cross_entropy(logits, target)
    assert ce.item() < 0.06
    assert dice_loss(logits, target, 255).item() > 0.45


def test_supervised_loss_kinds():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    target = torch.randint(0, 3, (1, 4, 4))
    ce = F.cross_entropy(logits, target)
    assert supervised_loss(ce, logits, target, 255, "ce") is ce
    both = supervised_loss(ce, logits, target, 255, "ce_dice")
    assert both.item() == pytest.approx(0.5 * (ce.item() + dice_loss(logits, target, 255).item()))
    both.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="train.sup_loss: 'dice' is not one of ce, ce_dice"):
        supervised_loss(ce, logits, target, 255, "dice")
    with pytest.raises(ValueError, match=r"logits must be \(B, C, H, W\)"):
        dice_loss(logits[0], target, 255)


def test_the_config_key_is_checked_and_reaches_the_objective():
    cfg = load_config("configs/smoke.yaml", {"train": {"sup_loss": "ce_dice"}})
    assert cfg.train.sup_loss == "ce_dice" and Terms.of(cfg).sup_loss == "ce_dice"
    assert load_config("configs/smoke.yaml").train.sup_loss == "ce"  # the paper's default
    with pytest.raises(ValueError, match="sup_loss"):
        load_config("configs/smoke.yaml", {"train": {"sup_loss": "dice"}})


@pytest.mark.parametrize("kind", ["ce", "ce_dice"])
def test_the_supervised_epoch_reports_the_configured_loss(kind):
    torch.manual_seed(0)
    model = torch.nn.Conv2d(1, 3, 3, padding=1)
    images = torch.randn(4, 1, 8, 8)
    masks = torch.randint(0, 3, (4, 8, 8))
    with torch.no_grad():
        logits = model(images)
    ce = F.cross_entropy(logits, masks).item()
    expected = ce if kind == "ce" else 0.5 * (ce + dice_loss(logits, masks, 255).item())
    # one step of the whole set (a permutation of it: both terms are sums over the batch), rate 0
    stats = supervised_epoch(model, torch.optim.SGD(model.parameters(), lr=0.0), images, masks, batch_size=4,
                             steps=1, augment=False, generator=torch.Generator().manual_seed(1), sup_loss=kind)
    assert stats["loss_sup"] == pytest.approx(expected, rel=1e-5)
