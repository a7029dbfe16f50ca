"""cssl_ray.experiments.trials, trainable and trial_recorder without a Ray cluster: trial configs, Tune
metrics, the MLflow recorder's statuses."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cssl_ray.config import ConfigError, from_dict, to_dict
from cssl_ray.experiments.ablation_cells import ABLATION_CELLS, cell_of
from cssl_ray.experiments.trainable import trial_config, tune_metrics
from cssl_ray.experiments.trial_recorder import make_callback, run_tags
from cssl_ray.experiments.trials import TrialOutcome, best_outcome
from cssl_ray.tracking.run_record import selected_value
from cssl_ray.tracking.runs import find_runs, metric_history


@dataclass
class FakeTrial:
    """The attributes of ray.tune.experiment.Trial the recorder reads."""

    trial_id: str
    config: dict[str, Any]
    status: str = "RUNNING"
    last_result: dict[str, Any] = field(default_factory=dict)
    metric_analysis: dict[str, dict[str, float]] = field(default_factory=dict)
    error_file: str | None = None


def test_trial_config_applies_dotted_params_and_cells():
    base = to_dict(from_dict({"train": {"max_rounds": 3}}))
    cfg = trial_config(base, {"contrastive.tau": 0.25, "train.seed": 4})
    assert cfg.contrastive.tau == 0.25 and cfg.train.seed == 4 and cfg.train.max_rounds == 3
    for cell in ABLATION_CELLS:
        if cell != "supervised_all":  # a config cannot tell it from supervised: trials carry the name
            assert cell_of(trial_config(base, {"cell": cell})) == cell
    ref = trial_config(base, {"cell": "supervised_all"})
    assert ref.data.labelled_fraction == 1.0 and ref.data.labelled_count == 0 and not ref.train.use_cl
    tags = run_tags(ref, "supervised_all", trial_config(base, {}))
    assert tags["cssl.cell"] == "supervised_all" and tags["cssl.labelled_fraction"] == str(base["data"]["labelled_fraction"])
    assert tags["cssl.method"] == "supervised"
    methods = {cell: run_tags(trial_config(base, {"cell": cell}), cell)["cssl.method"] for cell in ABLATION_CELLS}
    assert methods["cssl"] == methods["cl"] == "cssl" and methods["mean_teacher"] == "mean_teacher"
    assert methods["bn_mix"] == "bn_mix" and methods["pseudo_label"] == "pseudo_label"
    assert trial_config(base, {"cell": "bn_stats"}).baselines.bn_batch == "separate"  # bn_mix's, one change
    assert trial_config(base, {"cell": "bn_mix"}).baselines.bn_batch == "mixed" and methods["bn_stats"] == "bn_mix"
    assert trial_config(base, {"cell": "simclr_dl"}).baselines.simclr_images == "labelled"
    assert trial_config(base, {"cell": "simclr_pretrain"}).baselines.simclr_images == "all"
    assert methods["simclr_dl"] == "simclr_pretrain"
    with pytest.raises(ConfigError, match="contrastive.tau"):
        trial_config(base, {"contrastive.tau": -1.0})


def test_tune_metrics_keeps_numbers_and_adds_round_and_step():
    m = tune_metrics({"stage": "supervised", "epoch": 2, "val_dice_mean": 0.5, "ok": True, "step": 3}, step=9)
    assert m == {"epoch": 2.0, "val_dice_mean": 0.5, "round": 0.0, "step": 3.0}
    assert tune_metrics({"round": 2, "loss": 1.0}, step=7)["step"] == 7.0


def test_best_outcome_uses_the_metric_over_rounds_and_needs_test_metrics():
    def o(tid, best, test=True, mode="max"):
        return TrialOutcome(tid, {}, "TERMINATED", Path("."), test={"dice_mean": 0.1} if test else {},
                            metric_analysis={"val_dice_mean": {mode: best}})
    outs = [o("a", 0.4), o("b", 0.6), o("c", 0.9, test=False)]  # c was stopped early: no test metrics
    assert best_outcome(outs, "val_dice_mean", "max").trial_id == "b"
    outs = [o("a", 0.4, mode="min"), o("b", 0.2, mode="min")]
    assert best_outcome(outs, "val_dice_mean", "min").trial_id == "b"
    assert best_outcome([o("c", 0.9, test=False)], "val_dice_mean", "max") is None


def test_best_outcome_ranks_the_kept_weights_not_stage_a_peak():
    """Under the paper's protocol Tune's maximum is stage A's best epoch (0.65 here), shared by every
    trial with that stage A and not kept; the kept weights' validation Dice (best_val) decides."""
    def o(tid, kept):
        return TrialOutcome(tid, {}, "TERMINATED", Path("."), test={"dice_mean": 0.1},
                            best_val={"dice_mean": kept, "loss": 1 - kept},
                            metric_analysis={"val_dice_mean": {"max": 0.65}, "val_loss": {"min": 0.1}})
    outs = [o("a", 0.62), o("b", 0.63), o("c", 0.61)]
    assert best_outcome(outs, "val_dice_mean", "max").trial_id == "b"
    assert best_outcome(outs, "val_loss", "min").trial_id == "b"  # loss 0.37, the lowest kept
    assert selected_value({"dice_mean": 0.63}, {"val_dice_mean": {"max": 0.65}}, "val_dice_mean", "max") == 0.63
    assert selected_value({}, {"val_dice_mean": {"max": 0.65}}, "val_dice_mean", "max") == 0.65  # no result.json
    assert math.isnan(selected_value({}, {}, "val_dice_mean", "max"))


def test_recorder_statuses_metrics_and_artifacts(tmp_path):
    """finished -> FINISHED with test metrics; stopped early -> FINISHED + tag; error -> FAILED + reason;
    one line per start and end counted against the whole experiment; each warning shown once."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    from cssl_ray.tracking.tracker import Tracker
    tracker = Tracker(uri, "exp")
    parent = tracker.start_parent("tune:x", {"cssl.kind": "tune"}, session="s1")
    runs_root = tmp_path / "runs"
    lines: list[str] = []
    cb = make_callback(uri, "exp", parent, to_dict(from_dict({})), runs_root, {"cssl.kind": "trial"},
                       "val_dice_mean", "max", log=lines.append, total=18,
                       warned=["UserWarning: shown by the driver's checks"])
    done = FakeTrial("t_done", {"contrastive.tau": 0.2})
    stopped = FakeTrial("t_stop", {"contrastive.tau": 0.3})
    failed = FakeTrial("t_fail", {"contrastive.tau": 0.4})
    trials = [done, stopped, failed]
    for t in trials:
        cb.on_trial_start(0, trials, t)
        (runs_root / t.trial_id).mkdir(parents=True)  # every trial raises the dataset's warning
        (runs_root / t.trial_id / "warnings.json").write_text(json.dumps(
            ["UserWarning: nuclei: dropped 2 val/test image(s)", "UserWarning: shown by the driver's checks"]))
    for step, r in enumerate([{"round": 0, "val_dice_mean": 0.3, "step": 1}, {"round": 1, "val_dice_mean": 0.5,
                                                                               "step": 2, "training_iteration": 2}]):
        cb.on_trial_result(0, trials, done, r)
        cb.on_trial_result(0, trials, stopped, r)
    (runs_root / "t_done" / "figures").mkdir()
    (runs_root / "t_done" / "figures" / "omega.png").write_bytes(b"\x89PNG")
    (runs_root / "t_done" / "config.yaml").write_text("train: {}\n")
    (runs_root / "t_done" / "result.json").write_text(json.dumps({"test": {"dice_mean": 0.42}, "best_val": {}}))
    error = tmp_path / "error.txt"
    error.write_text("Traceback (most recent call last):\n  ...\nRuntimeError: out of memory\n")
    failed.error_file = str(error)
    for t, status in ((done, "TERMINATED"), (stopped, "TERMINATED"), (failed, "ERROR")):
        t.status = status
        t.last_result = {"round": 1, "step": 2}
        (cb.on_trial_error if status == "ERROR" else cb.on_trial_complete)(0, trials, t)

    runs = {r["tags"]["cssl.trial_key"]: r for r in find_runs(uri, "exp", parent_id=parent)}
    assert runs["t_done"]["status"] == "FINISHED" and runs["t_done"]["tags"]["cssl.early_stopped"] == "false"
    assert runs["t_done"]["metrics"]["test_dice_mean"] == pytest.approx(0.42)
    assert runs["t_done"]["params"]["contrastive.tau"] == "0.2"  # the resolved config, flattened
    assert metric_history(uri, runs["t_done"]["run_id"], "val_dice_mean") == [(1, 0.3), (2, 0.5)]
    assert "training_iteration" not in runs["t_done"]["metrics"]  # Tune's bookkeeping is not a metric
    assert runs["t_stop"]["status"] == "FINISHED" and runs["t_stop"]["tags"]["cssl.early_stopped"] == "true"
    assert runs["t_fail"]["status"] == "FAILED" and runs["t_fail"]["tags"]["cssl.error"] == "RuntimeError: out of memory"
    assert not any(r["status"] == "RUNNING" for r in runs.values())
    artifacts = tracker.client.list_artifacts(runs["t_done"]["run_id"])
    assert {a.path for a in artifacts} >= {"config.yaml", "result.json", "figures"}
    assert any("FAILED: RuntimeError: out of memory" in line for line in lines)
    assert any("stopped early" in line for line in lines)
    assert [line.split("] ")[0] + "]" for line in lines if line.startswith("[")] == [
        "[start  1/18]", "[start  2/18]", "[start  3/18]", "[done   1/18]", "[done   2/18]", "[done   3/18]"]
    assert [line for line in lines if line.startswith("warning")] == [
        "warning (t_done): UserWarning: nuclei: dropped 2 val/test image(s)"]
    assert runs["t_stop"]["tags"]["cssl.warning"].startswith("UserWarning: nuclei: dropped")
    assert not math.isnan(runs["t_done"]["metrics"]["val_dice_mean"])


def test_ablation_grids_table5_and_fraction_sweep(tmp_path):
    from cssl_ray.experiments.ablate import ablation_grid, fixed_config
    from cssl_ray.experiments.ablation_cells import DEFAULT_CELLS
    from cssl_ray.experiments.search_space import load_space

    space = load_space(Path(__file__).resolve().parent.parent / "tune_spaces" / "smoke.yaml")
    grid = ablation_grid(space, 3, None, None)
    assert grid["cell"] == {"grid_search": DEFAULT_CELLS} and grid["train.seed"] == {"grid_search": [0, 1, 2]}
    assert "data.labelled_fraction" not in grid
    sweep = ablation_grid(space, 2, None, [0.1, 0.5])  # Table 2 style: supervised vs CSSL per fraction
    assert sweep["cell"] == {"grid_search": ["supervised", "cssl"]}
    assert sweep["data.labelled_fraction"] == {"grid_search": [0.1, 0.5]} and sweep["data.labelled_count"] == 0
    for bad, match in (((0, None, None), "--seeds"), ((1, ["cl", "nope"], None), "--cells: 'nope'"),
                       ((1, None, [0.0]), "--fractions"),
                       ((1, None, None, ["both"]), "--protocols: 'both' is not a protocol")):
        with pytest.raises(ConfigError, match=match):
            ablation_grid(space, *bad)
    # Ray Train trials (resources.workers 1 here): every cell under both protocols
    on_train = ablation_grid(space, 1, ["supervised", "mean_teacher", "cps"], None, ["joint"])
    assert on_train["cell"] == {"grid_search": ["supervised", "mean_teacher", "cps"]}
    assert ablation_grid(space, 1, ["bn_mix", "cssl"], None, ["paper", "joint"])["train.protocol"]["grid_search"] == [
        "paper", "joint"]
    from cssl_ray.experiments.trainable import trials_label
    assert trials_label(space.base_config(), ablation_grid(space, 1, ["cssl"], None, ["paper", "joint"]))
    assert not trials_label(space.base_config(), on_train)  # joint ranks label their own shards: no labellers
    in_process = dataclasses.replace(space, resources=dataclasses.replace(space.resources, workers=0))
    both = ablation_grid(in_process, 1, ["supervised", "cssl"], None, ["paper", "joint"])
    assert both["train.protocol"] == {"grid_search": ["paper", "joint"]}
    assert "train.protocol" not in ablation_grid(in_process, 1, None, None)  # the config's own
    # fixed hyperparameters: --config, else the tuned best config, else the space's base
    assert fixed_config(space, None, str(tmp_path), log=lambda _: None) == space.base_config()
    best = tmp_path / f"{space.name}-tune" / "best_config.yaml"
    best.parent.mkdir(parents=True)
    from cssl_ray.config import dump_config
    tuned = space.trial_config({"contrastive.tau": 0.33})
    dump_config(tuned, best)
    assert fixed_config(space, None, str(tmp_path), log=lambda _: None).contrastive.tau == 0.33
    other = tmp_path / "other.yaml"
    dump_config(space.trial_config({"contrastive.tau": 0.44}), other)
    assert fixed_config(space, str(other), str(tmp_path), log=lambda _: None).contrastive.tau == 0.44
