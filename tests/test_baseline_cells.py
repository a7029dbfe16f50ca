"""The baseline cells in the schedule (issue 11): the same unlabelled steps per round as CSSL's, the
same D_L slices and D_U batches, no hidden mask read, Mean Teacher's EMA teacher checkpointed, and
a clear line where they do not run yet (Ray Train)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import cssl_ray.run.records as records
from cssl_ray.config import ConfigError, from_dict
from cssl_ray.data.synthetic import make_synthetic
from cssl_ray.experiments.ablation_cells import ABLATION_CELLS
from cssl_ray.experiments.train import build_config
from cssl_ray.method.streams import RandomStreams
from cssl_ray.models import create_model
from cssl_ray.run.baseline_rounds import ROUND_METHODS, baseline_epoch, baseline_steps
from cssl_ray.run.local import run_local
from cssl_ray.run.plan import epoch_plan, local_steps


def smoke(tmp_path, cell: str, *overrides: str):
    cfg = build_config(None, [f"train.out_dir={tmp_path / cell}", "train.progress=false", "train.figures=false",
                              *overrides], smoke=True)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **ABLATION_CELLS[cell]))


def rounds_of(result):
    return [h for h in result.history if h["stage"] == "round"]


def test_a_baseline_needs_the_cssl_switches_off():
    with pytest.raises(ConfigError, match="train.method: 'mean_teacher' is out of range; allowed: cssl with "
                                          "train.use_cl / use_cr; a baseline needs both false"):
        from_dict({"train": {"method": "mean_teacher"}})
    with pytest.raises(ConfigError, match="baselines.mt_ema_decay"):
        from_dict({"train": {"method": "mean_teacher", "use_cl": False, "use_cr": False},
                   "baselines": {"mt_ema_decay": 1.0}})


def test_every_baseline_cell_takes_cssl_s_steps_at_cssl_s_rate(tmp_path):
    cssl = rounds_of(run_local(smoke(tmp_path, "cssl", "pseudo.threshold=0.3")))
    for cell in ROUND_METHODS:  # the baselines with an unlabelled epoch per round (simclr_pretrain: none)
        got = rounds_of(run_local(smoke(tmp_path, cell, "pseudo.threshold=0.3")))
        assert len(got) == len(cssl) == 2
        for mine, theirs in zip(got, cssl):
            assert mine["steps"] == theirs["steps"] > 0, cell  # one pass over D_U, the same steps
            assert mine["lr_cssl"] == theirs["lr_cssl"] and mine["lr"] == theirs["lr"], cell
        if cell == "bn_mix":
            assert all(h["loss_unsup"] == 0.0 and h["loss_sup_step"] > 0 for h in got)
        if cell == "pseudo_label":
            assert all(h["pseudo_coverage"] > 0 and h["loss_unsup"] > 0 for h in got)
        if cell == "mean_teacher":
            assert all(h["loss_unsup"] >= 0 for h in got) and any(h["loss_unsup"] > 0 for h in got)


def test_baseline_steps_are_cssl_s_steps():
    """The same D_U images and the same D_L slice in every step as CSSL's steps of that plan."""
    cfg = from_dict({"data": {"image_size": [32, 32]}, "patches": {"size": 16, "min_pixels": 10},
                     "consistency": {"batch_size": 3}})
    images, masks = make_synthetic(9, (32, 32), 4, seed=0)
    u, l_img, l_mask = images[2:], images[:2], masks[:2]
    plan = epoch_plan(u.shape[0], cfg, RandomStreams(0))
    ours = list(baseline_steps(plan, u, masks[2:], l_img, l_mask))
    theirs = list(local_steps(cfg, 1, plan, u, masks[2:], l_img, l_mask))
    assert len(ours) == len(theirs) == 3
    for k, (a, b) in enumerate(zip(ours, theirs)):
        assert torch.equal(a.unlabelled, b.unlabelled) and torch.equal(a.pseudo, masks[2:][plan[k]])
        assert torch.equal(a.labelled, l_img[[k % 2]]) and torch.equal(a.masks, l_mask[[k % 2]])


def test_mean_teacher_epoch_moves_the_teacher_by_ema_only():
    cfg = from_dict({"data": {"image_size": [16, 16]}, "model": {"base_channels": 4, "depth": 2, "embed_dim": 8,
                                                                  "proj_hidden": 8},
                     "patches": {"size": 8, "min_pixels": 4}, "consistency": {"batch_size": 2},
                     "train": {"method": "mean_teacher", "use_cl": False, "use_cr": False},
                     "baselines": {"mt_ema_decay": 0.5}})
    torch.manual_seed(0)
    student = create_model(cfg.model, 1, 4)
    teacher = create_model(cfg.model, 1, 4)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad_(False)
    images, masks = make_synthetic(6, (16, 16), 4, seed=1)
    plan = [torch.tensor([0, 1])]
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    stats = baseline_epoch(student, torch.optim.SGD(student.parameters(), lr=0.1),
                           baseline_steps(plan, images[2:], None, images[:2], masks[:2]), cfg, teacher=teacher,
                           step0=10, rampup_steps=1, generator=torch.Generator().manual_seed(0))
    assert stats["steps"] == 1 and stats["loss_unsup"] > 0
    after_s = student.state_dict()
    for name, p in teacher.named_parameters():  # alpha = min(1 - 1/11, 0.5) = 0.5
        assert torch.allclose(p, 0.5 * before[name] + 0.5 * after_s[name]) and p.grad is None


def test_pseudo_label_never_reads_the_hidden_d_u_masks(tmp_path, monkeypatch):
    straight = run_local(smoke(tmp_path / "a", "pseudo_label", "pseudo.threshold=0.3"))  # some coverage
    load = records.load_bundle  # run_local's dataset (records.open_run)

    def scrambled(data):
        bundle = load(data)
        hidden = bundle.unlabelled_masks_hidden
        return dataclasses.replace(bundle, unlabelled_masks_hidden=(hidden + 1) % data.num_classes)

    monkeypatch.setattr(records, "load_bundle", scrambled)
    other = run_local(smoke(tmp_path / "b", "pseudo_label", "pseudo.threshold=0.3"))
    assert all(h["pseudo_coverage"] > 0 and h["loss_unsup"] > 0 for h in rounds_of(straight))
    assert other.test == straight.test  # training never saw them (only pseudo_accuracy changes)
    accuracy = [[h.get("pseudo_accuracy") for h in rounds_of(r)] for r in (other, straight)]
    assert accuracy[0] != accuracy[1]


def test_mean_teacher_resume_matches_the_straight_run(tmp_path):
    straight = run_local(smoke(tmp_path / "a", "mean_teacher"))
    run_local(smoke(tmp_path / "b", "mean_teacher", "train.max_rounds=1"))
    resumed = run_local(smoke(tmp_path / "b", "mean_teacher"), resume=True)
    assert resumed.test == straight.test


def test_cps_trains_two_networks_from_two_stage_as(tmp_path):
    """Network B is seed + 1's stage A (shared through the cache with that seed's supervised cell), both
    networks move in the unlabelled steps, B has its own fine-tune epochs, and a resumed run ends as
    the straight one."""
    cache = tmp_path / "stage_a"
    sup1 = smoke(tmp_path / "s1", "supervised", "train.seed=1")
    run_local(sup1, stage_a_cache=cache)  # seed 1's stage A, cached
    cached = sorted(p.name for p in cache.glob("stage_a_*.pt"))
    straight = run_local(smoke(tmp_path / "a", "cps"), stage_a_cache=cache)
    assert len(sorted(p.name for p in cache.glob("stage_a_*.pt"))) == len(cached) + 1  # seed 0's; B reused seed 1's
    rounds = rounds_of(straight)
    assert all(h["loss_unsup"] > 0 and h["loss_sup_peer"] > 0 and h["steps"] > 0 for h in rounds)
    saved = torch.load(tmp_path / "a" / "cps" / "round_002.pt", weights_only=False)
    a, b = saved["model"], saved["peer"]["model"]
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert saved["peer"]["round"] == 2 and saved["peer"]["stage_a_done"]
    run_local(smoke(tmp_path / "b", "cps", "train.max_rounds=1"), stage_a_cache=cache)
    resumed = run_local(smoke(tmp_path / "b", "cps"), resume=True, stage_a_cache=cache)
    assert resumed.test == straight.test
    alone = run_local(smoke(tmp_path / "c", "cps"))  # no cache: B's stage A trained here, the same
    assert alone.test == straight.test


def test_simclr_pretrains_before_its_own_stage_a(tmp_path):
    """NT-Xent epochs on D_L + D_U before stage A (whose cache key they enter), then the supervised
    schedule: no unlabelled steps in the rounds."""
    from cssl_ray.run.local import stage_a_key

    cfg = smoke(tmp_path, "simclr_pretrain", "baselines.simclr_epochs=2", "baselines.simclr_batch_size=4")
    sup = smoke(tmp_path, "supervised")
    assert stage_a_key(cfg) != stage_a_key(sup)
    assert stage_a_key(cfg) != stage_a_key(dataclasses.replace(
        cfg, baselines=dataclasses.replace(cfg.baselines, simclr_temperature=0.1)))
    assert stage_a_key(cfg) != stage_a_key(dataclasses.replace(  # the simclr_dl control pretrains on D_L alone
        cfg, baselines=dataclasses.replace(cfg.baselines, simclr_images="labelled")))
    result = run_local(cfg)
    first = result.history[0]
    assert first["stage"] == "supervised" and first["simclr_loss_first"] > 0 and first["simclr_loss_last"] > 0
    assert all("simclr_loss_first" not in h for h in result.history[1:])
    assert all("steps" not in h for h in rounds_of(result))  # the rounds: fine-tune epochs only
    assert result.history[0]["val_loss"] != run_local(sup).history[0]["val_loss"]  # other starting weights


