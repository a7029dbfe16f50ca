"""The single-process trainer: schedule, ablation switches, checkpoints, resume, CLI errors."""
from __future__ import annotations

import math

import pytest
import torch

from cssl_ray.config import ConfigError
from cssl_ray.experiments.train import build_config, main
from cssl_ray.run import checkpoint as ckpt
from cssl_ray.run.local import run_local


def smoke(tmp_path, *overrides: str):
    return build_config(None, [f"train.out_dir={tmp_path}", "train.progress=false", *overrides], smoke=True)


def test_smoke_run_writes_config_split_checkpoints_and_metrics(tmp_path):
    result = run_local(smoke(tmp_path))
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "split.json").is_file()
    assert (tmp_path / "best.pt").is_file() and (tmp_path / "result.json").is_file()
    assert [r for r, _ in ckpt.round_checkpoints(tmp_path)] == [1, 2]  # keep_checkpoints = 2
    rounds = [h for h in result.history if h["stage"] == "round"]
    assert len(rounds) == 2
    for h in rounds:
        for key in ("loss", "loss_cl", "loss_cr", "loss_sup", "omega", "lambda", "patches",
                    "pseudo_coverage", "val_dice_mean", "lr"):
            assert key in h and math.isfinite(h[key]), key
        assert h["lambda"] == pytest.approx(h["lambda"])  # finite
    # lambda of round 2 follows omega measured in round 1
    eps = 0.01
    assert rounds[1]["lambda"] == pytest.approx((rounds[0]["omega"] + 1) / 2 + eps)
    assert 0.0 <= result.test["dice_mean"] <= 1.0
    assert "auprc_mean" in result.test
    for key in ("hd95_mean", "asd_mean", "dice_image_mean"):  # the test set's per-image metrics
        assert math.isfinite(result.test[key]), key
    assert "val_dice_mean" in rounds[0] and "val_hd95_mean" not in rounds[0]  # never at validation


def test_supervised_arm_runs_no_cssl_epoch(tmp_path):
    result = run_local(smoke(tmp_path, "train.use_cl=false", "train.use_cr=false", "train.use_hard_negatives=false"))
    rounds = [h for h in result.history if h["stage"] == "round"]
    assert len(rounds) == 2
    assert all("loss_cl" not in h and "omega" not in h for h in rounds)


@pytest.mark.parametrize("switches", [("train.use_cr=false",), ("train.use_cl=false",),
                                      ("train.use_hard_negatives=false",)])
def test_ablation_cells_run(tmp_path, switches):
    result = run_local(smoke(tmp_path, *switches))
    last = [h for h in result.history if h["stage"] == "round"][-1]
    if "train.use_cr=false" in switches:
        assert last["loss_cr"] == 0.0 and last["loss_cl"] > 0
    if "train.use_cl=false" in switches:
        assert last["loss_cl"] == 0.0 and last["loss_cr"] >= 0
        assert math.isfinite(last["omega"])  # omega is still measured for lambda


def test_one_foreground_class_uses_auxiliary_negatives(tmp_path):
    result = run_local(smoke(tmp_path, "data.num_classes=2"))
    last = [h for h in result.history if h["stage"] == "round"][-1]
    assert last["loss_cl"] > 0  # without auxiliary negatives a single class has no negatives: 0
    assert math.isfinite(last["omega"])


def test_same_seed_same_result_and_resume_matches_straight_run(tmp_path):
    a = run_local(smoke(tmp_path / "a"))
    b = run_local(smoke(tmp_path / "b"))
    assert a.test == b.test
    # stop after round 1, then resume to round 2: identical weights to the straight run
    run_local(smoke(tmp_path / "c", "train.max_rounds=1"))
    c = run_local(smoke(tmp_path / "c"), resume=True)
    assert c.test == a.test
    wa = torch.load(tmp_path / "a" / "round_002.pt", weights_only=False)["model"]
    wc = torch.load(tmp_path / "c" / "round_002.pt", weights_only=False)["model"]
    assert all(torch.equal(wa[k], wc[k]) for k in wa)


def test_cli_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("contrastive:\n  tau: -1\n")
    assert main(["--local", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bad.yaml" in err and "contrastive.tau" in err
    assert main(["--local", "--smoke", "--set", "patches.size=13", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "patches.size" in err and err.count("\n") == 0
    assert not (tmp_path / "x").exists()  # nothing written before the config is valid


def test_selection_metric_class_is_checked_against_the_data_in_one_line(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"^train.select_metric: 'val_dice/liver' is not a validation record key; "
                                          r"allowed: .*val_dice/blob.*val_iou/dot$"):
        run_local(smoke(tmp_path / "a", "train.select_metric=val_dice/liver"))
    assert not (tmp_path / "a").exists()  # nothing written: the data's class names are known before
    assert main(["--local", "--smoke", "--select-metric", "val_dice/liver", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "train.select_metric: 'val_dice/liver'" in err
    assert main(["--local", "--smoke", "--select-metric", "loss", "--out", str(tmp_path / "c")]) == 2
    assert "'loss' is not a validation record key" in capsys.readouterr().err


def test_cli_select_flags_set_the_config():
    from cssl_ray.experiments.train import parser, selection_overrides
    args = parser().parse_args(["--select-metric", "val_loss"])
    assert selection_overrides(args.select_metric, args.select_mode) == ["train.select_metric=val_loss",
                                                                         "train.select_mode=auto"]
    assert build_config(None, selection_overrides("val_loss", None), smoke=True).train.selection() == ("val_loss", "min")
    assert build_config(None, selection_overrides("val_dice/blob", "min")).train.selection() == ("val_dice/blob", "min")
    assert selection_overrides(None, None) == [] and selection_overrides(None, "min") == ["train.select_mode=min"]


def test_cli_smoke_prints_test_metrics(tmp_path, capsys):
    assert main(["--local", "--smoke", "--quiet", "--out", str(tmp_path)]) == 0
    assert '"dice_mean"' in capsys.readouterr().out


def test_ema_teacher_starts_from_the_supervised_model(tmp_path):
    import cssl_ray.run.schedule as local

    seen = []
    orig = local.cssl_epoch

    def spy(model, teacher, *args, **kwargs):
        teacher_w = next(iter(teacher.model.state_dict().values()))
        model_w = next(iter(model.state_dict().values()))
        seen.append(torch.equal(teacher_w, model_w))
        return orig(model, teacher, *args, **kwargs)

    local.cssl_epoch = spy
    try:
        run_local(smoke(tmp_path, "consistency.teacher=ema"))
    finally:
        local.cssl_epoch = orig
    assert seen[0] is True  # round 1: the EMA teacher is a copy of the supervised model
    assert seen[1] is False  # round 2: it is an average, lagging the student
