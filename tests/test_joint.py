"""train.protocol: joint (cssl_ray.run.joint): the fixed-budget loop, its schedule and ramp against
hand-computed values, Mean Teacher's per-step EMA against the SSL4MIS update, CPS's two
independently initialised networks, equal labelled batches in every cell, and an exact resume."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from cssl_ray.config import ConfigError, load_config
from cssl_ray.data.bundle import load_bundle
from cssl_ray.run import joint
from cssl_ray.run.joint import joint_lr, joint_state, joint_steps, unsup_weight
from cssl_ray.run.local import run_local

SMOKE = "configs/smoke.yaml"


def joint_cfg(tmp_path, method="cssl", use_cl=False, use_cr=False, **train):
    t = {"protocol": "joint", "total_steps": 6, "pseudo_refresh_steps": 3, "method": method, "use_cl": use_cl,
         "use_cr": use_cr, "out_dir": str(tmp_path / f"run_{method}_{use_cl}_{use_cr}"), "progress": False,
         "figures": False, **train}
    return load_config(SMOKE, {"train": t})


def test_poly_and_cosine_rates_and_the_ramp_match_hand_computed_values(tmp_path):
    cfg = joint_cfg(tmp_path, total_steps=10)
    lr = cfg.optim.lr
    assert joint_lr(cfg, 0) == pytest.approx(lr)
    assert joint_lr(cfg, 5) == pytest.approx(lr * 0.5 ** 0.9)  # SSL4MIS: base (1 - t/T)^0.9
    assert joint_lr(cfg, 10) == 0.0
    cos = load_config(SMOKE, {"train": {"protocol": "joint", "total_steps": 10}, "optim": {"joint_schedule": "cosine"}})
    assert joint_lr(cos, 5) == pytest.approx(lr * 0.5) and joint_lr(cos, 10) == pytest.approx(0.0, abs=1e-12)
    # w(t) = exp(-5 (1 - t/L)^2), L = rampup_steps, 0 = the whole budget
    assert unsup_weight(cfg, 0) == pytest.approx(math.exp(-5.0))
    assert unsup_weight(cfg, 5) == pytest.approx(math.exp(-5.0 * 0.25))
    assert unsup_weight(cfg, 10) == 1.0
    short = joint_cfg(tmp_path, total_steps=10, rampup_steps=4)
    assert unsup_weight(short, 2) == pytest.approx(math.exp(-5.0 * 0.25)) and unsup_weight(short, 7) == 1.0


def test_mean_teacher_updates_its_ema_every_step_and_its_weight_ramps(tmp_path, monkeypatch):
    cfg = joint_cfg(tmp_path, "mean_teacher", total_steps=4)
    bundle = load_bundle(cfg.data)
    state = joint_state(cfg, torch.device("cpu"))
    initial = {k: v.clone() for k, v in state.ema.state_dict().items()}
    joint_steps(state, cfg, bundle, first=0, n_steps=1)
    # step 0: alpha = min(1 - 1/1, decay) = 0, the teacher becomes the student
    for (name, p), q in zip(state.model.named_parameters(), state.ema.parameters()):
        assert torch.equal(p, q), name
    assert any(not torch.equal(initial[k], v) for k, v in state.ema.state_dict().items())
    before = [q.clone() for q in state.ema.parameters()]
    joint_steps(state, cfg, bundle, first=1, n_steps=1)
    # step 1: alpha = min(1 - 1/2, 0.99) = 0.5
    for b, p, q in zip(before, state.model.parameters(), state.ema.parameters()):
        torch.testing.assert_close(q, 0.5 * b + 0.5 * p.detach())
    # the consistency term is w(t) x mt_weight x MSE: with an MSE of 1 its mean is the ramp's mean
    monkeypatch.setattr(joint, "mean_teacher_loss", lambda s, t: s.sum() * 0.0 + 1.0)
    stats = joint_steps(state, cfg, bundle, first=2, n_steps=2)
    expected = cfg.baselines.mt_weight * (unsup_weight(cfg, 2) + unsup_weight(cfg, 3)) / 2
    assert stats["loss_unsup"] == pytest.approx(expected)
    assert unsup_weight(cfg, 2) < unsup_weight(cfg, 3)


def test_cps_networks_start_different_and_one_optimiser_trains_both(tmp_path):
    cfg = joint_cfg(tmp_path, "cps")
    state = joint_state(cfg, torch.device("cpu"))
    a, b = list(state.model.parameters()), list(state.peer.model.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(a, b))  # independently initialised
    trained = {id(p) for g in state.cssl_optimizer.param_groups for p in g["params"]}
    assert {id(p) for p in a + b} <= trained
    b0 = [q.clone() for q in b]
    joint_steps(state, cfg, load_bundle(cfg.data), first=0, n_steps=1)
    assert any(not torch.equal(q0, q) for q0, q in zip(b0, state.peer.model.parameters()))
    # the seed's own network starts as the supervised cell's does
    sup = joint_state(joint_cfg(tmp_path), torch.device("cpu"))
    assert all(torch.equal(p, q) for p, q in zip(joint_state(cfg, torch.device("cpu")).model.parameters(),
                                                  sup.model.parameters()))


@pytest.mark.parametrize("cell", [("bn_mix", False, False), ("mean_teacher", False, False),
                                  ("pseudo_label", False, False), ("cps", False, False), ("cssl", True, True)])
def test_every_cell_draws_the_supervised_cells_labelled_batches(tmp_path, cell):
    method, cl, cr = cell
    sup_cfg, cfg = joint_cfg(tmp_path), joint_cfg(tmp_path, method, cl, cr)
    bundle = load_bundle(cfg.data)
    sup, other = joint_state(sup_cfg, torch.device("cpu")), joint_state(cfg, torch.device("cpu"))
    joint_steps(sup, sup_cfg, bundle, first=0, n_steps=3)
    pseudo = torch.zeros(bundle.unlabelled_images.shape[0], *bundle.unlabelled_images.shape[2:], dtype=torch.int64)
    joint_steps(other, cfg, bundle, first=0, n_steps=3, pseudo=pseudo if method == "cssl" else None)
    # the labelled batches and their augmentation come from streams.sup alone: equal draws, equal state
    assert torch.equal(sup.streams.sup.get_state(), other.streams.sup.get_state())
    assert not torch.equal(sup.streams.cr.get_state(), other.streams.cr.get_state())  # its unlabelled batches


def test_bn_batch_separate_normalises_each_half_by_its_own_statistics(tmp_path, monkeypatch):
    from cssl_ray.run.baseline_rounds import forward_halves
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2)).train()
    x_l, x_u = torch.randn(2, 1, 4, 4), 3.0 + torch.randn(3, 1, 4, 4)
    mixed, separate = forward_halves(net, x_l, x_u, "mixed"), forward_halves(net, x_l, x_u, "separate")
    torch.testing.assert_close(mixed, net(torch.cat([x_l, x_u])))
    torch.testing.assert_close(separate[:2], net(x_l))
    torch.testing.assert_close(separate[2:], net(x_u))
    assert not torch.allclose(mixed[:2], separate[:2])
    torch.testing.assert_close(forward_halves(net, x_l, x_u[:0], "separate"), net(x_l))  # no empty forward
    # the joint step forwards bn_mix's halves as the key says
    calls, seen = [], {}
    for bn_batch in ("mixed", "separate"):
        cfg = joint_cfg(tmp_path, "bn_mix", batch_size=3)
        cfg = dataclasses.replace(cfg, baselines=dataclasses.replace(cfg.baselines, bn_batch=bn_batch),
                                  consistency=dataclasses.replace(cfg.consistency, batch_size=4))
        state = joint_state(cfg, torch.device("cpu"))
        calls.clear()
        hook = state.model.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
        joint_steps(state, cfg, load_bundle(cfg.data), first=0, n_steps=1)
        hook.remove()
        seen[bn_batch] = list(calls)
    assert len(seen["separate"]) == 2 and seen["mixed"] == [sum(seen["separate"])]  # labelled, then D_U
    with pytest.raises(ConfigError, match="baselines.bn_batch"):
        load_config(SMOKE, {"baselines": {"bn_batch": "split"}})


def test_a_joint_run_validates_every_refresh_and_resumes_exactly(tmp_path):
    cfg = joint_cfg(tmp_path, "cssl", True, True, total_steps=7)  # rounds of 3, 3 and 1 steps
    result = run_local(cfg)
    rounds = [h for h in result.history if h["stage"] == "round"]
    assert [h["round"] for h in rounds] == [1, 2, 3] and [h["joint_step"] for h in rounds] == [3, 6, 7]
    assert [h["steps"] for h in rounds] == [3.0, 3.0, 1.0]
    assert rounds[-1]["lr"] == pytest.approx(joint_lr(cfg, 6))
    assert all("pseudo_coverage" in h and "loss_cl" in h for h in rounds)
    written = json.loads((result.out_dir / "result.json").read_text())
    assert written["last_round"] == 3 and set(written["test_last"]) >= {"dice_mean"}
    # a run that stopped after round 2 and resumes ends where the uninterrupted one did
    (result.out_dir / "round_003.pt").unlink()
    emitted = []
    resumed = run_local(cfg, resume=True, log=emitted.append)
    assert [r["round"] for r in emitted] == [3]  # only the missing round ran
    assert resumed.test == result.test and resumed.best_round == result.best_round


def test_the_supervised_cell_takes_no_unlabelled_batch(tmp_path, monkeypatch):
    cfg = joint_cfg(tmp_path)
    seen = []
    real = joint._batches
    monkeypatch.setattr(joint, "_batches", lambda n, *a: seen.append(n) or real(n, *a))
    joint_steps(joint_state(cfg, torch.device("cpu")), cfg, load_bundle(cfg.data), first=0, n_steps=2)
    assert seen[1] == 0  # D_U's batches: empty


def test_bad_joint_settings_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="train.protocol: 'both' is not allowed"):
        load_config(SMOKE, {"train": {"protocol": "both"}})
    with pytest.raises(ConfigError, match="train.total_steps"):
        load_config(SMOKE, {"train": {"protocol": "joint", "total_steps": 0}})
    with pytest.raises(ConfigError, match="train.pseudo_refresh_steps"):
        load_config(SMOKE, {"train": {"protocol": "joint", "pseudo_refresh_steps": 0}})
    from cssl_ray.data.bundle import open_source
    from cssl_ray.distributed.ray_train import check_ray_run
    cfg = joint_cfg(tmp_path, "mean_teacher")
    source = open_source(cfg.data)
    check_ray_run(cfg, source, 2, 0.0, 0.5, "PACK", 1, 0.0)  # every method runs on Train workers under joint
    paper = load_config(SMOKE, {"train": {"method": "mean_teacher", "use_cl": False, "use_cr": False}})
    check_ray_run(paper, source, 2, 0.0, 0.5, "PACK", 1, 0.0)  # and under the paper's protocol
    small = joint_cfg(tmp_path, "mean_teacher", batch_size=2)
    small = dataclasses.replace(small, consistency=dataclasses.replace(small.consistency, batch_size=1))
    with pytest.raises(ConfigError, match="consistency.batch_size: 1 is a global batch; with --workers 2"):
        check_ray_run(small, source, 2, 0.0, 0.5, "PACK", 1, 0.0)
    supervised = dataclasses.replace(small, train=dataclasses.replace(small.train, method="cssl"))
    check_ray_run(supervised, source, 2, 0.0, 0.5, "PACK", 1, 0.0)  # no unlabelled batch: its size is not read
