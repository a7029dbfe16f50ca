"""World-size invariance of the baselines' steps on Ray Train workers: the joint protocol's step
(``cssl_ray.run.joint.joint_steps`` with collectives, as ``distributed.joint_worker`` runs it) and
the paper protocol's unlabelled epoch (``run.baseline_rounds.baseline_epoch``, as
``distributed.baseline_worker`` runs it). One step on 2 gloo ranks, each holding half of a global
batch, moves every trained network (CPS's B and Mean Teacher's EMA included) as one process's step
on the whole batch, for the supervised reference, bn_mix, mean_teacher, pseudo_label and cps (and the
supervised reference and cps with ``train.sup_loss: ce_dice``, whose Dice term is the global batch's); a
joint CSSL step (L_CL's all-gather, L_CR) keeps the ranks bitwise equal. BatchNorm is swapped for GroupNorm (per-rank batch statistics are the documented
exception) and the optimiser for SGD (Adam's first step, g / |g|, would magnify rounding)."""
from __future__ import annotations

import pytest
import torch
from gloo_ranks import group_norm, on_ranks

from cssl_ray.config import load_config
from cssl_ray.data.bundle import DataBundle
from cssl_ray.data.splits import Split
from cssl_ray.method.collectives import Collectives
from cssl_ray.models import create_model
from cssl_ray.run.baseline_rounds import BaselineStep, baseline_epoch
from cssl_ray.run.joint import joint_state, joint_steps

WORLD = 2
METHODS = ["supervised", "bn_mix", "mean_teacher", "pseudo_label", "cps", "supervised+dice", "cps+dice"]


def _cfg(method: str):
    """``method``, or ``method+dice`` with ``train.sup_loss: ce_dice`` (its Dice term is over the global batch)."""
    method, dice = method.removesuffix("+dice"), method.endswith("+dice")
    cell = {"sup_loss": "ce_dice" if dice else "ce", "method": "cssl" if method in ("supervised", "cssl") else method,
            "use_cl": method == "cssl", "use_cr": method == "cssl", "use_hard_negatives": method == "cssl"}
    return load_config("configs/smoke.yaml", {
        "data": {"num_classes": 2},
        "train": {"protocol": "joint", "total_steps": 6, "rampup_steps": 1, "pseudo_refresh_steps": 6,
                  "batch_size": 4, "augment": False, "progress": False, "figures": False, **cell},
        "consistency": {"batch_size": 4},
        "patches": {"batch_size": 8, "min_pixels": 1},
        "pseudo": {"threshold": 0.3},
        "baselines": {"mt_noise_std": 0.0},
    })


def _global_data():
    g = torch.Generator().manual_seed(3)
    masks = torch.randint(0, 2, (4, 32, 32), generator=g)
    masks[1, :6] = 255  # ignored pixels, unevenly over the ranks' shares
    return torch.randn(4, 1, 32, 32, generator=g), masks, torch.randn(4, 1, 32, 32, generator=g)


def _step(method: str, rank: int, world: int, col: Collectives) -> dict:
    """The last step of the budget (w(t) = 1) on this rank's shard ([rank::world]) of the global batch."""
    cfg = _cfg(method)
    method = method.removesuffix("+dice")
    state = joint_state(cfg, torch.device("cpu"), rank)
    nets = [state.model] + [n for n in (state.ema, state.peer.model if state.peer else None) if n is not None]
    for net in nets:
        group_norm(net)
    if state.ema is not None:  # a teacher that differs from the student, so its MSE is not trivially zero
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for p in state.ema.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    params = [p for net in nets[:1] + ([state.peer.model] if state.peer else []) for p in net.parameters()]
    state.cssl_optimizer = torch.optim.SGD(params, lr=cfg.optim.lr)
    x, y, u = _global_data()
    if method == "cssl":  # pseudo-labels of D_U: half of it confident class 1 windows, the rest ignored
        pseudo = torch.full((4, 32, 32), 255, dtype=torch.int64)
        pseudo[:, 8:24, 8:24] = 1
        pseudo[:, :8, :8] = 0
    else:
        pseudo = None
    shard = (lambda t: t[rank::world]) if world > 1 else (lambda t: t)
    empty = x[:0]
    bundle = DataBundle(shard(x), shard(y), shard(u), None, empty, y[:0], empty, y[:0], ["bg", "fg"],
                        Split([], [], [], []))
    before = [torch.cat([p.detach().reshape(-1).clone() for p in net.parameters()]) for net in nets]
    stats = joint_steps(state, cfg, bundle, first=5, n_steps=1, pseudo=shard(pseudo) if pseudo is not None else None,
                        collectives=col)
    moved = [torch.cat([p.detach().reshape(-1) for p in net.parameters()]) - b for net, b in zip(nets, before)]
    return {"stats": stats, "moved": moved}


PAPER_METHODS = ["bn_mix", "mean_teacher", "pseudo_label", "cps"]


def _paper_step(method: str, rank: int, world: int, col: Collectives) -> dict:
    """One step of the paper protocol's unlabelled epoch on this rank's share of the global batch."""
    cfg = _cfg(method)
    torch.manual_seed(0)
    model = group_norm(create_model(cfg.model, 1, 2))
    torch.manual_seed(1)
    peer = group_norm(create_model(cfg.model, 1, 2)) if method == "cps" else None
    torch.manual_seed(2)
    teacher = group_norm(create_model(cfg.model, 1, 2)) if method == "mean_teacher" else None
    nets = [n for n in (model, peer, teacher) if n is not None]
    trained = [p for n in (model, peer) if n is not None for p in n.parameters()]
    x, y, u = _global_data()
    shard = (lambda t: t[rank::world]) if world > 1 else (lambda t: t)
    pseudo = y.clone()
    pseudo[2:, 10:] = 255  # pseudo_label's targets: some pixels uncovered, unevenly over the ranks
    step = BaselineStep(shard(u), shard(pseudo) if method == "pseudo_label" else None, shard(x), shard(y))
    before = [torch.cat([p.detach().reshape(-1).clone() for p in n.parameters()]) for n in nets]
    stats = baseline_epoch(model, torch.optim.SGD(trained, lr=0.01), iter([step]), cfg, teacher=teacher, peer=peer,
                           step0=3, rampup_steps=0, collectives=col)
    moved = [torch.cat([p.detach().reshape(-1) for p in n.parameters()]) - b for n, b in zip(nets, before)]
    return {"stats": stats, "moved": moved}


def _all_steps(rank: int, world: int, col: Collectives) -> dict:
    out = {m: _step(m, rank, world, col) for m in [*METHODS, "cssl"]}
    return {**out, **{f"paper_{m}": _paper_step(m, rank, world, col) for m in PAPER_METHODS}}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return on_ranks(_all_steps, WORLD, tmp_path_factory.mktemp("gloo"))


@pytest.mark.parametrize("method", METHODS)
def test_one_joint_step_on_two_ranks_equals_one_process(two_ranks, method):
    torch.set_num_threads(1)
    one = _step(method, 0, 1, Collectives())
    assert one["stats"]["unsup_weight"] == 1.0
    if method.endswith("+dice"):  # the Dice term is in L_sup: not the plain-CE step's loss
        assert one["stats"]["loss_sup"] != pytest.approx(_step(method[:-5], 0, 1, Collectives())["stats"]["loss_sup"])
    if method.removesuffix("+dice") in ("mean_teacher", "pseudo_label", "cps"):
        assert one["stats"]["loss_unsup"] > 0  # the unlabelled term is in the step, not trivially zero
    for rank in range(WORLD):
        got = two_ranks[rank][method]
        for k in ("loss", "loss_sup", "loss_unsup"):
            assert got["stats"][k] == pytest.approx(one["stats"][k], rel=1e-4, abs=1e-6), k
        assert len(got["moved"]) == len(one["moved"])  # student (+ EMA, + CPS's network B)
        for mine, ref in zip(got["moved"], one["moved"]):
            assert ref.abs().max() > 0
            torch.testing.assert_close(mine, ref, rtol=1e-3, atol=1e-7)
    for a, b in zip(two_ranks[0][method]["moved"], two_ranks[1][method]["moved"]):
        assert torch.equal(a, b)  # the ranks stay bitwise equal


def test_a_joint_cssl_step_keeps_the_ranks_equal(two_ranks):
    stats = [two_ranks[r]["cssl"]["stats"] for r in range(WORLD)]
    assert stats[0]["loss_cl"] > 0 and stats[0]["loss_cr"] >= 0 and stats[0]["patches_per_step"] == 8
    assert stats[0] == stats[1]
    for a, b in zip(two_ranks[0]["cssl"]["moved"], two_ranks[1]["cssl"]["moved"]):
        assert torch.equal(a, b) and a.abs().max() > 0


@pytest.mark.parametrize("method", PAPER_METHODS)
def test_one_paper_baseline_step_on_two_ranks_equals_one_process(two_ranks, method):
    torch.set_num_threads(1)
    one = _paper_step(method, 0, 1, Collectives())
    if method != "bn_mix":
        assert one["stats"]["loss_unsup"] > 0
    for rank in range(WORLD):
        got = two_ranks[rank][f"paper_{method}"]
        for k in ("loss", "loss_sup_step", "loss_unsup"):
            assert got["stats"][k] == pytest.approx(one["stats"][k], rel=1e-4, abs=1e-6), k
        for mine, ref in zip(got["moved"], one["moved"]):
            torch.testing.assert_close(mine, ref, rtol=1e-3, atol=1e-7)
    assert one["moved"][0].abs().max() > 0
