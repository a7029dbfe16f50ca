"""The run's schedule (cssl_ray.run.schedule): the L_tot epoch as a pass over D_U, fair cells (equal steps,
bit-identical supervised batches), stage A's early stop, omega before round 1, the coverage warning,
the rounds' learning rate, the stop rule and the best weights by train.select_metric."""
from __future__ import annotations

import dataclasses
import hashlib
import math

import pytest
import torch

import cssl_ray.run.loop as loop
from cssl_ray.config import from_dict
from cssl_ray.data.batches import labelled_slices
from cssl_ray.data.synthetic import make_synthetic
from cssl_ray.experiments.ablation_cells import ABLATION_CELLS
from cssl_ray.experiments.train import build_config
from cssl_ray.method.consistency import Teacher
from cssl_ray.method.streams import RandomStreams
from cssl_ray.models import create_model
from cssl_ray.run import labelling
from cssl_ray.run import plan as step_plan
from cssl_ray.run.local import run_local
from cssl_ray.run.records import stage_a_summary
from cssl_ray.run.schedule import RunState
from cssl_ray.run.selection import is_better


def small_cfg(**sections):
    base = {
        "data": {"image_size": [32, 32]},
        "model": {"base_channels": 4, "depth": 2, "embed_dim": 8, "proj_hidden": 8},
        "patches": {"size": 16, "min_pixels": 10, "per_image": 6, "batch_size": 10},
        "consistency": {"batch_size": 3},
        "pseudo": {"threshold": 0.3},
    }
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v}
    return from_dict(base)


def epoch_inputs(cfg, n_unlabelled: int = 7):
    torch.manual_seed(0)
    model = create_model(cfg.model, 1, cfg.data.num_classes)
    images, masks = make_synthetic(2 + n_unlabelled, (32, 32), 4, seed=0)
    patches, classes, _ = labelling.round_patches(model, cfg, images[:2], masks[:2], images[2:],
                                             generator=torch.Generator().manual_seed(0))
    # image i of D_U is the constant i: the L_CR batches tell which images they hold
    unlabelled = torch.arange(n_unlabelled, dtype=torch.float32)[:, None, None, None].expand(-1, 1, 32, 32).clone()
    return model, patches, classes, unlabelled


def spy_objective(monkeypatch):
    seen: list = []
    orig = loop.cssl_objective

    def spy(model, teacher, inputs, cfg, **kw):
        seen.append(inputs)
        return orig(model, teacher, inputs, cfg, **kw)

    monkeypatch.setattr(loop, "cssl_objective", spy)
    return seen


def run_epoch(cfg, model, patches, classes, unlabelled):
    streams = RandomStreams(0)
    plan = step_plan.epoch_plan(unlabelled.shape[0], cfg, streams)
    return loop.cssl_epoch(model, Teacher(model), torch.optim.Adam(model.parameters(), 1e-3),
                           step_plan.pooled_steps(plan, unlabelled, patches, classes), len(plan), cfg, lambda_=0.5,
                           streams=streams)


def test_l_tot_epoch_is_one_pass_over_d_u(monkeypatch):
    cfg = small_cfg()
    model, patches, classes, unlabelled = epoch_inputs(cfg, n_unlabelled=7)
    seen = spy_objective(monkeypatch)
    stats = run_epoch(cfg, model, patches, classes, unlabelled)
    assert stats["steps"] == 3 == math.ceil(7 / 3) == len(seen)
    used = [int(v) for s in seen for v in s.unlabelled[:, 0, 0, 0].tolist()]
    assert sorted(used) == list(range(7))  # every D_U image exactly once
    assert [s.unlabelled.shape[0] for s in seen] == [3, 3, 1]
    assert all(s.patches.shape[0] == min(10, patches.shape[0]) for s in seen)  # patches.batch_size each
    # the cap stays an option
    capped = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps_per_round=2))
    assert step_plan.l_tot_steps(7, capped) == 2 and step_plan.l_tot_steps(7, cfg) == 3


def test_patch_budget_per_image():
    """patches.per_image windows from every image with a valid window, shared by the classes it holds:
    the pool is exactly per_image x images, whichever classes each image lacks."""
    cfg = small_cfg(patches={"per_image": 9})
    images, masks = make_synthetic(4, (32, 32), 4, seed=0)
    masks[0][masks[0] == 2] = 0  # image 0 loses a class: its 9 windows go to the other classes
    model = create_model(cfg.model, 1, cfg.data.num_classes)
    patches, classes, _ = labelling.round_patches(model, cfg, images, masks, images[:0],
                                             generator=torch.Generator().manual_seed(0))
    assert patches.shape[0] == 9 * 4
    for k in range(4):
        p, c = step_plan.image_patches(cfg, images[k:k + 1], masks[k:k + 1], [k], 1, labelled=True)
        present = sorted(set(masks[k].unique().tolist()) - {0})
        assert p.shape[0] == 9 and sorted(set(c.tolist())) == present
        counts = torch.bincount(c, minlength=4)[present]
        assert int(counts.max() - counts.min()) <= 1  # the budget shared equally (remainder: one each)


def test_the_realised_contrastive_batch_fills_patches_batch_size(monkeypatch):
    """The product path (local_steps): step k's pool is its own images' windows plus its D_L slice's,
    and L_CL's realised batch (patches_per_step) is patches.batch_size when every class is present."""
    cfg = small_cfg(patches={"per_image": 6, "batch_size": 24}, consistency={"batch_size": 4})
    images, masks = make_synthetic(14, (32, 32), 4, seed=0)
    l_img, l_mask, u_img, u_mask = images[:2], masks[:2], images[2:], masks[2:]
    streams = RandomStreams(0)
    plan = step_plan.epoch_plan(u_img.shape[0], cfg, streams)
    assert [len(p) for p in plan] == [4, 4, 4]
    steps = list(step_plan.local_steps(cfg, 1, plan, u_img, u_mask, l_img, l_mask))  # pseudo-labels = the truth here
    slices = labelled_slices(2, 3)
    for step, idx, l_idx in zip(steps, plan, slices):
        assert step.patches.shape[0] == 6 * (len(idx) + len(l_idx))  # 4 + 1 images x 6 windows = 30 >= 24
        assert torch.equal(step.unlabelled, u_img[idx])
    seen = spy_objective(monkeypatch)
    model = create_model(cfg.model, 1, cfg.data.num_classes)
    stats = loop.cssl_epoch(model, Teacher(model), torch.optim.Adam(model.parameters(), 1e-4), iter(steps), 3, cfg,
                            lambda_=0.5, streams=streams)
    assert [s.patches.shape[0] for s in seen] == [24, 24, 24]
    assert stats["patches_per_step"] == 24 and stats["patch_classes_per_step"] == 3
    assert stats["patches"] == 3 * 30


def test_a_thin_patch_pool_is_warned():
    cfg = small_cfg(patches={"per_image": 1, "batch_size": 24})
    state = RunState(cfg, torch.device("cpu"))
    state.round = 2
    state.check_patches({"patches_per_step": 20.0})  # >= 80%: quiet
    assert state.warnings == []
    state.check_patches({"patches_per_step": 5.0})
    state.check_patches({"patches_per_step": 4.0})  # once per run
    assert len(state.warnings) == 1 and "5 patches per step" in state.warnings[0] and "per_image" in state.warnings[0]


@pytest.mark.parametrize("cell", ["cl", "cr", "cl_cr", "cssl"])
def test_every_cell_takes_the_same_l_tot_steps(cell, monkeypatch):
    cfg = small_cfg(train=ABLATION_CELLS[cell])
    model, patches, classes, unlabelled = epoch_inputs(cfg, n_unlabelled=7)
    seen = spy_objective(monkeypatch)
    assert run_epoch(cfg, model, patches, classes, unlabelled)["steps"] == 3 == len(seen)


def digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def test_cells_of_a_seed_see_bit_identical_supervised_batches(tmp_path, monkeypatch):
    """The supervised batches and their augmentation draw from their own stream: switching CL / CR on
    changes nothing about them (stage A and every fine-tune epoch)."""
    seen: list[str] = []
    orig = loop.flip_rotate

    def spy(x, y, generator):
        out = orig(x, y, generator)
        seen.append(digest(x, y, *out))
        return out

    monkeypatch.setattr(loop, "flip_rotate", spy)
    sequences = {}
    # (cps is left out: its network B adds batches of its own seed; simclr_pretrain's views draw elsewhere)
    cells = ("supervised", "cssl", "cr", "bn_mix", "pseudo_label", "mean_teacher", "simclr_pretrain")
    for cell in cells:
        seen.clear()
        cfg = build_config(None, [f"train.out_dir={tmp_path / cell}", "train.progress=false", "train.figures=false",
                                  "train.steps_per_round=0"], smoke=True)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **ABLATION_CELLS[cell]))
        run_local(cfg)
        sequences[cell] = list(seen)
    assert len(sequences["supervised"]) == 4  # 2 stage-A epochs + 2 fine-tune epochs, one batch each
    assert all(sequences[cell] == sequences["supervised"] for cell in cells)


def test_omega_before_round_1_is_measured_on_the_supervised_model(tmp_path):
    cfg = build_config(None, [f"train.out_dir={tmp_path}", "train.progress=false", "train.figures=false"], smoke=True)
    result = run_local(cfg)
    first = next(h for h in result.history if h["stage"] == "round")
    assert -1.0 <= first["omega_before"] <= 1.0
    assert first["lambda"] == pytest.approx((first["omega_before"] + 1) / 2 + cfg.consistency.eps)


def test_stage_a_runs_its_whole_budget_and_goes_on_from_its_last_weights(tmp_path):
    """train.stage_a_steps optimiser steps, in epochs of sup_steps_per_epoch (the last one shortened);
    no early stopping by default; the rounds start from, and are measured against, the last weights."""
    cfg = build_config(None, [f"train.out_dir={tmp_path}", "train.progress=false", "train.figures=false",
                              "train.stage_a_steps=7", "train.sup_steps_per_epoch=3", "train.max_rounds=0",
                              "optim.lr=0.05"], smoke=True)
    steps: list[int] = []
    orig = loop.supervised_epoch

    def counting(*args, **kw):
        out = orig(*args, **kw)
        steps.append(kw["steps"])
        return out

    import cssl_ray.run.local as local
    local_epoch = local.supervised_epoch
    local.supervised_epoch = counting
    try:
        result = run_local(cfg)
    finally:
        local.supervised_epoch = local_epoch
    assert steps == [3, 3, 1]  # 7 steps exactly
    stage_a = [h for h in result.history if h["stage"] == "supervised"]
    assert [h["stage_a_step"] for h in stage_a] == [3, 6, 7]
    assert result.best_round == 0 and result.best_val["dice_mean"] == stage_a[-1]["val_dice_mean"]
    import json
    summary = json.loads((tmp_path / "result.json").read_text())["stage_a"]
    assert summary["epochs"] == 3 and summary["steps"] == 7 and summary["start_epoch"] == 2
    saved = torch.load(tmp_path / "round_000.pt", weights_only=False)
    assert all(torch.equal(saved["model"][k], v) for k, v in saved["best_model"].items())  # the last weights


def test_stage_a_cuts_the_rate_on_a_training_loss_plateau():
    state = RunState(small_cfg(optim={"plateau_patience": 1}), torch.device("cpu"))
    val = _evaluated()
    lrs = []
    for epoch, loss in enumerate([1.0, 0.9, 0.95, 0.97, 0.8]):  # no better loss after epoch 1: two epochs -> cut
        state.after_stage_a_epoch(epoch, dict(val, loss=0.1 * epoch), train_loss=loss)  # val loss rises: ignored
        lrs.append(state.optimizer.param_groups[0]["lr"])
    assert lrs == pytest.approx([1e-3, 1e-3, 1e-3, 1e-4, 1e-4])
    by_val = RunState(small_cfg(optim={"plateau_patience": 1, "plateau_metric": "val_loss"}), torch.device("cpu"))
    for epoch in range(4):
        by_val.after_stage_a_epoch(epoch, dict(val, loss=1.0 + epoch), train_loss=1.0 / (epoch + 1))
    assert by_val.optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)


def test_stage_a_stops_early_and_goes_on_from_its_best_weights(tmp_path):
    cfg = build_config(None, [f"train.out_dir={tmp_path}", "train.progress=false", "train.figures=false",
                              "train.stage_a_steps=40", "train.stage_a_patience=2", "train.max_rounds=0",
                              "optim.lr=0.05"], smoke=True)
    result = run_local(cfg)
    stage_a = [h for h in result.history if h["stage"] == "supervised"]
    dice = [h["val_dice_mean"] for h in stage_a]
    best = max(range(len(dice)), key=lambda i: (dice[i], -i))  # ties: the earlier epoch is kept
    assert len(stage_a) < 40, "patience 2 never stopped 40 epochs on 8 smoke images"
    assert best >= 1 and dice[best] > dice[0]  # a real best after learning (measured: 0.0, 0.174, 0.105, 0.058)
    assert len(stage_a) - 1 - best == 2  # stopped exactly `patience` epochs after the best
    assert result.best_round == 0 and result.best_val["dice_mean"] == dice[best]
    import json
    summary = json.loads((tmp_path / "result.json").read_text())["stage_a"]
    assert summary["epochs"] == len(stage_a) and summary["best_epoch"] == best == summary["start_epoch"]
    saved = torch.load(tmp_path / "round_000.pt", weights_only=False)
    assert all(torch.equal(saved["model"][k], v) for k, v in saved["best_model"].items())  # goes on from the best


def test_low_pseudo_label_coverage_is_warned_at_round_1(tmp_path, caplog):
    cfg = build_config(None, [f"train.out_dir={tmp_path}", "train.progress=false", "train.figures=false",
                              "pseudo.threshold=1.0", "train.max_rounds=1"], smoke=True)
    with caplog.at_level("WARNING"):
        result = run_local(cfg)
    first = next(h for h in result.history if h["stage"] == "round")
    low = [k for k, v in first.items() if k.startswith("pseudo_coverage/") and v < 0.01]
    assert low, first
    assert any("pseudo-label coverage" in r.message for r in caplog.records)
    import json
    warnings = json.loads((tmp_path / "result.json").read_text())["warnings"]
    assert warnings and all("round 1" in w for w in warnings)


def test_rounds_rates_own_l_tot_adam_warmup_and_cosine():
    cfg = small_cfg(optim={"lr": 1e-3, "cssl_lr": 4e-4, "finetune_lr": 2e-4, "round_warmup_steps": 4,
                           "round_schedule": "cosine"}, train={"max_rounds": 4})
    state = RunState(cfg, torch.device("cpu"))
    state.optimizer.param_groups[0]["lr"] = 1e-5  # as stage A's plateaus leave it
    sup = state.optimizer
    state.start_round()
    assert state.optimizer is sup  # the supervised Adam continues (its moments too) ...
    assert sup.param_groups[0]["lr"] == pytest.approx(2e-4)  # ... at finetune_lr
    assert state.cssl_optimizer is not None and not state.cssl_optimizer.state  # L_tot: a fresh Adam
    assert state.cssl_optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)  # warm-up step 1 of 4
    for _ in range(3):
        state.after_l_tot_step()
    assert state.cssl_optimizer.param_groups[0]["lr"] == pytest.approx(4e-4)
    state.start_round()  # round 2 of 4: cosine 0.5 * (1 + cos(pi / 4)) on both rates
    decay = 0.5 * (1 + math.cos(math.pi / 4))
    assert state.cssl_optimizer.param_groups[0]["lr"] == pytest.approx(4e-4 * decay)
    assert sup.param_groups[0]["lr"] == pytest.approx(2e-4 * decay)
    # checkpoints carry the L_tot optimiser
    again = RunState(cfg, torch.device("cpu"))
    again.load_state_dict(state.state_dict())
    assert again.cssl_optimizer is not None and again.cssl_optimizer.param_groups[0]["lr"] == pytest.approx(4e-4 * decay)


def test_paper_letter_shares_the_supervised_optimiser():
    cfg = small_cfg(optim={"cssl_lr": 0.0, "finetune_lr": 0.0})
    state = RunState(cfg, torch.device("cpu"))
    state.optimizer.param_groups[0]["lr"] = 1e-5
    state.start_round()
    assert state.cssl_optimizer is None and state.optimizer.param_groups[0]["lr"] == pytest.approx(1e-5)
    supervised = RunState(small_cfg(train=ABLATION_CELLS["supervised"]), torch.device("cpu"))
    supervised.start_round()
    assert supervised.cssl_optimizer is None  # no L_tot epoch, no optimiser for it


def test_stop_rule_is_the_same_for_every_cell():
    cfg = small_cfg(train={"stop": "loss_plateau", "plateau_rounds": 2, "plateau_delta": 0.0})
    state = RunState(cfg, torch.device("cpu"))
    assert [state.should_stop({"loss_sup": v}) for v in (1.0, 0.9, 0.95, 0.91)] == [False, False, False, True]
    fixed = RunState(small_cfg(), torch.device("cpu"))
    assert not any(fixed.should_stop({"loss": 1.0}) for _ in range(10))  # max_rounds: never early


@pytest.mark.slow
def test_one_l_tot_epoch_keeps_a_converged_model():
    """Regression (issue 9): after a converged stage A at the live rate (lr 1e-3, no plateau cut), one
    L_tot epoch with the defaults (its own fresh Adam at optim.cssl_lr) keeps validation Dice within a
    few points, while it still moves the weights. The paper's letter (L_tot on the supervised Adam at
    1e-3, stage A's moments carried) drops it more on the same model."""
    from cssl_ray.data.bundle import load_bundle
    from cssl_ray.run.loop import evaluate, supervised_epoch

    def config(**optim):
        return from_dict({
            "data": {"image_size": [48, 48], "n_train": 24, "n_val": 6, "n_test": 2, "labelled_count": 4},
            "model": {"base_channels": 8, "depth": 2, "embed_dim": 16, "proj_hidden": 16},
            "patches": {"size": 16, "min_pixels": 10, "per_image": 24, "batch_size": 96},
            "consistency": {"batch_size": 4}, "pseudo": {"threshold": 0.7},
            "optim": {"plateau_patience": 1000, **optim},  # the rate stays live through stage A
            "train": {"batch_size": 4, "sup_steps_per_epoch": 5, "stage_a_patience": 10},
        })

    cfg = config()
    bundle = load_bundle(cfg.data)
    state = RunState(cfg, torch.device("cpu"))

    def validate(model) -> dict[str, float]:
        return evaluate(model, bundle.val_images, bundle.val_masks, num_classes=4, class_names=bundle.class_names)

    def val_dice(model) -> float:
        return validate(model)["dice_mean"]

    for epoch in range(60):  # converge: early stopping on validation
        supervised_epoch(state.model, state.optimizer, bundle.labelled_images, bundle.labelled_masks,
                         batch_size=4, steps=5, generator=state.streams.sup)
        if state.after_stage_a_epoch(epoch, validate(state.model)):
            break
    state.finish_stage_a()
    converged, dice0 = state.state_dict(), val_dice(state.model)
    assert epoch < 59 and dice0 > 0.2

    drops = {}
    for name, optim in (("default", {}), ("paper_letter", {"cssl_lr": 0.0, "finetune_lr": 0.0})):
        run = RunState(config(**optim), torch.device("cpu"))
        run.load_state_dict(converged)
        run.start_round()
        pseudo, _ = labelling.label_round(run.model, run.cfg, bundle.unlabelled_images)  # the product's round
        plan = step_plan.epoch_plan(bundle.unlabelled_images.shape[0], run.cfg, run.streams)
        steps = step_plan.local_steps(run.cfg, run.round, plan, bundle.unlabelled_images, pseudo, bundle.labelled_images,
                                 bundle.labelled_masks)
        before = [p.detach().clone() for p in run.model.parameters()]
        stats = run.l_tot_epoch(run.cfg, steps, len(plan))
        assert stats["steps"] == 5 and stats["loss_cr"] > 0  # CR had confident targets to learn from
        assert any(not torch.equal(a, p) for a, p in zip(before, run.model.parameters()))
        drops[name] = dice0 - val_dice(run.model)
    # Measured on this model (seed 0, 2-core CPU): default 0.032, the paper's letter 0.041. With the
    # round's whole patch pool behind every batch (before the per-step stream) the letter dropped 0.116:
    # docs/science.md, "Per-step patch pools".
    assert drops["default"] < 0.05, drops
    assert drops["paper_letter"] > drops["default"], drops


# -- the selection metric (train.select_metric / select_mode) -------------------------------------


def _evaluated(**values) -> dict[str, float]:
    """A ``loop.evaluate`` dict (no ``val_`` prefix); ``values`` replace its entries."""
    return {"loss": 1.0, "dice_mean": 0.5, "iou_mean": 0.4, "dice/blob": 0.5, "iou/blob": 0.4, **values}


def _track(state: RunState, vals: list[dict[str, float]]) -> list[bool]:
    """``track_best`` on each of ``vals`` as rounds 1, 2, ... with the first weight set to the round."""
    kept = []
    for r, val in enumerate(vals, start=1):
        state.round = r
        with torch.no_grad():
            next(state.model.parameters()).fill_(float(r))
        kept.append(state.track_best(val))
    return kept


def _kept_round(state: RunState) -> float:
    return float(next(iter(state.best_model.values())).flatten()[0])


def test_track_best_by_val_loss_keeps_the_lowest_and_breaks_ties_by_val_dice():
    state = RunState(small_cfg(train={"select_metric": "val_loss"}), torch.device("cpu"))
    assert state.cfg.train.selection() == ("val_loss", "min")  # auto: a loss gets better downwards
    assert state.cfg.train.selection_order() == [("val_loss", "min"), ("val_dice_mean", "max")]
    losses = [0.9, 0.7, 0.8, 0.7, math.nan, 0.75, 0.7]
    dice = [0.9, 0.1, 0.9, 0.5, 0.9, 0.9, 0.5]  # Dice alone would pick otherwise
    assert _track(state, [_evaluated(loss=l, dice_mean=d) for l, d in zip(losses, dice)]) == \
        [True, True, False, True, False, False, False]
    assert state.best_round == 4 and state.best_score == 0.7 and state.best_val["dice_mean"] == 0.5
    assert _kept_round(state) == 4.0  # round 2's tie, broken by Dice; round 7 ties on both: the earlier


def test_a_flat_selection_metric_falls_back_to_val_dice():
    """nuclei's val_dice/micronucleus is 0.0 at every epoch: the tie-break keeps the best mean Dice,
    not the first (barely trained) epoch."""
    state = RunState(small_cfg(train={"select_metric": "val_dice/blob", "stage_a_patience": 2}), torch.device("cpu"))
    dice = [0.1, 0.3, 0.5, 0.4, 0.45, 0.44]
    stops = [state.after_stage_a_epoch(e, _evaluated(**{"dice/blob": 0.0, "dice_mean": d}))
             for e, d in enumerate(dice)]
    assert stops == [False, False, False, False, True, True] and state.stage_a_best_epoch == 2


def test_track_best_by_a_class_metric_and_max_mode():
    state = RunState(small_cfg(train={"select_metric": "val_dice/blob", "select_mode": "max"}), torch.device("cpu"))
    vals = [_evaluated(**{"dice/blob": b, "dice_mean": m}) for b, m in ((0.2, 0.8), (0.6, 0.1), (0.4, 0.9))]
    assert _track(state, vals) == [True, True, False]
    assert state.best_round == 2 and state.best_val["dice/blob"] == 0.6 and _kept_round(state) == 2.0


def test_nan_is_never_best():
    state = RunState(small_cfg(), torch.device("cpu"))  # the default: val dice_mean, max
    assert _track(state, [_evaluated(dice_mean=math.nan), _evaluated(dice_mean=0.3),
                          _evaluated(dice_mean=math.nan), _evaluated(dice_mean=0.3)]) == [False, True, False, False]
    assert state.best_round == 2 and state.best_score == 0.3
    only_nan = RunState(small_cfg(), torch.device("cpu"))
    assert _track(only_nan, [_evaluated(dice_mean=math.nan)] * 2) == [False, False]
    assert only_nan.best_model == {} and only_nan.best_round == 0  # the test then uses the last weights
    assert not is_better(math.nan, 0.1, "max") and is_better(0.1, math.nan, "min")
    assert not is_better(0.5, 0.5, "max") and not is_better(0.5, 0.5, "min") and is_better(0.4, 0.5, "min")


def test_stage_a_early_stop_counts_epochs_without_a_better_selection_metric():
    state = RunState(small_cfg(train={"select_metric": "val_loss", "stage_a_patience": 2}), torch.device("cpu"))
    stops = [state.after_stage_a_epoch(e, _evaluated(loss=l)) for e, l in enumerate([0.9, 0.5, 0.6, 0.5])]
    assert stops == [False, False, False, True] and state.stage_a_best_epoch == 1  # the tie at epoch 3 is no better


def test_checkpoints_with_best_dice_still_load():
    """Checkpoints written before train.select_metric held ``best_dice``: the score comes from best_val."""
    old = RunState(small_cfg(), torch.device("cpu"))
    _track(old, [_evaluated(loss=0.4, dice_mean=0.3)])
    saved = old.state_dict()
    saved["best_dice"] = saved.pop("best_score")
    new = RunState(small_cfg(train={"select_metric": "val_loss"}), torch.device("cpu"))
    new.load_state_dict(saved)
    assert new.best_score == 0.4 and new.best_round == 1
    assert not new.track_best(_evaluated(loss=0.5)) and new.track_best(_evaluated(loss=0.3))


def test_stage_a_summary_by_the_selection_metric():
    history = [{"stage": "supervised", "round": 0, "epoch": e, "val_loss": l, "val_dice_mean": d}
               for e, (l, d) in enumerate(((0.9, 0.1), (math.nan, 0.2), (0.5, 0.3), (0.5, 0.4), (0.6, 0.5)))]
    history.append({"stage": "round", "round": 1, "val_loss": 0.1, "val_dice_mean": 0.9})
    by_loss = stage_a_summary(history, [("val_loss", "min"), ("val_dice_mean", "max")])
    assert {k: by_loss[k] for k in ("epochs", "best_epoch", "val_dice_mean", "val_loss")} == {
        "epochs": 5.0, "best_epoch": 3.0, "val_dice_mean": 0.4, "val_loss": 0.5}  # tie: Dice
    assert stage_a_summary(history)["best_epoch"] == 4.0  # the default: val dice_mean, max


def test_a_run_selected_by_val_loss_tests_the_lowest_val_loss_weights(tmp_path):
    """A local smoke run with train.select_metric val_loss, select_mode min: best_val / best_round in
    result.json and best.pt are those of the lowest val loss of its history, best.pt holds that round's weights."""
    import json

    # lr 0.03: val loss and Dice disagree here (measured: stage A's best epoch 2 by loss, 3 by Dice;
    # best round 3 by loss, 0 by Dice)
    cfg = build_config(None, [f"train.out_dir={tmp_path}", "train.progress=false", "train.figures=false",
                              "train.stage_a_steps=4", "train.max_rounds=3", "train.keep_checkpoints=10",
                              "optim.lr=0.03", "pseudo.threshold=0.33", "train.stage_a_patience=10",
                              "train.select_metric=val_loss", "train.select_mode=min"], smoke=True)
    result = run_local(cfg)
    losses = [h["val_loss"] for h in result.history]
    first_min = min(range(len(losses)), key=lambda i: (losses[i], i))
    assert result.best_val["loss"] == losses[first_min] and result.best_round == result.history[first_min]["round"]
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["best_round"] == result.best_round and saved["best_val"]["loss"] == losses[first_min]
    stage_a = [h for h in result.history if h["stage"] == "supervised"]
    best_epoch = min(range(len(stage_a)), key=lambda i: (stage_a[i]["val_loss"], i))
    assert saved["stage_a"]["best_epoch"] == best_epoch and saved["stage_a"]["val_loss"] == stage_a[best_epoch]["val_loss"]
    best = torch.load(tmp_path / "best.pt", weights_only=False)
    assert best["round"] == result.best_round and best["val"]["loss"] == losses[first_min]
    kept = torch.load(tmp_path / f"round_{result.best_round:03d}.pt", weights_only=False)["model"]
    assert all(torch.equal(kept[k], v) for k, v in best["model"].items())  # stage A (patience 10): its best epoch


def test_best_and_last_round_test_metrics_are_both_reported(tmp_path):
    """result.json holds the test of the selected weights and, beside it, of the last round's; the
    instruments of round 1 (coverage and confidence per class, D_U and D_L) and the realised patches."""
    import json

    from cssl_ray.data.bundle import load_bundle
    from cssl_ray.run.loop import evaluate

    cfg = build_config(None, [f"train.out_dir={tmp_path}", "train.progress=false", "train.figures=false",
                              "train.max_rounds=3", "train.keep_checkpoints=10", "pseudo.threshold=0.3"], smoke=True)
    result = run_local(cfg)
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["last_round"] == 3 and set(saved["test_last"]) >= {"dice_mean", "iou_mean"}
    last = torch.load(tmp_path / "round_003.pt", weights_only=False)["model"]
    model = create_model(cfg.model, 1, cfg.data.num_classes)
    model.load_state_dict(last)
    bundle = load_bundle(cfg.data)
    expected = evaluate(model, bundle.test_images, bundle.test_masks, num_classes=4, class_names=bundle.class_names,
                        batch_size=cfg.consistency.batch_size)
    assert saved["test_last"]["dice_mean"] == pytest.approx(expected["dice_mean"])
    assert result.test_last == saved["test_last"] and result.test == saved["test"]
    rounds = saved["rounds"]
    names = bundle.class_names
    assert all(f"round1_pseudo_coverage/{n}" in rounds and f"round1_confidence/{n}" in rounds
               and f"round1_confidence_labelled/{n}" in rounds for n in names)
    first = next(h for h in result.history if h["stage"] == "round")
    assert rounds["round1_confidence/background"] == first["confidence/background"]
    assert 0 < rounds["patches_per_step_mean"] <= cfg.patches.batch_size
    assert rounds["val_dice_mean_last"] == result.history[-1]["val_dice_mean"]


def test_round_probe_knobs_lsup_bn_and_passes(monkeypatch):
    """train.lsup_in_ltot adds L_sup on a D_L batch to every L_tot step (its own stream: streams.sup
    untouched); train.ltot_bn update moves BatchNorm running statistics, frozen does not;
    train.round_passes multiplies the steps, each pass a reshuffled pass over D_U."""
    def epoch(**train):
        cfg = small_cfg(train=train)
        model, patches, classes, unlabelled = epoch_inputs(cfg, n_unlabelled=7)
        images, masks = make_synthetic(3, (32, 32), 4, seed=1)
        streams = RandomStreams(0)
        sup_state = streams.sup.get_state()
        plan = step_plan.epoch_plan(unlabelled.shape[0], cfg, streams)
        bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
        before = bn.running_mean.clone()
        stats = loop.cssl_epoch(model, Teacher(model), torch.optim.Adam(model.parameters(), 1e-3),
                                step_plan.pooled_steps(plan, unlabelled, patches, classes), len(plan), cfg, lambda_=0.5,
                                streams=streams, labelled=(images, masks))
        assert torch.equal(streams.sup.get_state(), sup_state)
        return stats, plan, not torch.equal(bn.running_mean, before)

    plain, _, moved = epoch(ltot_bn="frozen")
    assert "loss_sup_ltot" not in plain and not moved
    with_sup, _, _ = epoch(lsup_in_ltot=True)
    assert with_sup["loss_sup_ltot"] > 0
    assert with_sup["loss"] == pytest.approx(with_sup["loss_cl"] + with_sup["loss_cr"] + with_sup["loss_sup_ltot"],
                                             rel=1e-5)
    _, _, moved = epoch()  # the default: update
    assert moved
    stats, plan, _ = epoch(round_passes=3)
    assert stats["steps"] == 9 == len(plan)
    for p in range(3):  # every pass holds every D_U image once
        assert sorted(torch.cat(plan[3 * p:3 * p + 3]).tolist()) == list(range(7))
