"""Ray Train runs of CSSL (``cssl_ray.distributed.ray_train``) against the single-process trainer.

One Ray instance for the module (4 logical CPUs on 2 cores, see conftest_ray). Three fits of a tiny
config, ~20 s each (mostly Ray Train's and the labeller pool's start); 2 workers run in
test_multinode.py (one per node, parameters bitwise equal on both ranks at every report):
    straight   1 worker, 2 rounds     -> compared with ``run_local``, an oracle of its pseudo-label
                                         statistics, and the killed run; then resumed to 3 rounds
    killed     1 worker, SIGKILLed in round 2 -> restarted by FailureConfig from round 1's checkpoint,
                                         ends equal to the straight run

Every run uses one torch thread. The labellers label each step's images in one forward pass, the
in-process references per image or per D_U batch: a pixel whose confidence sits at the threshold
may flip between batch shapes, hence the tolerances.
"""
from __future__ import annotations

import json
import math
import os
import signal
import threading
import time

import pytest
import torch
from conftest_ray import descendant_processes, local_ray

from cssl_ray.config import ConfigError
from cssl_ray.data.bundle import load_bundle
from cssl_ray.distributed.ray_train import run_ray
from cssl_ray.distributed.stream import StreamResources
from cssl_ray.experiments.train import build_config, main
from cssl_ray.method.pseudo_labels import predict_pseudo_labels
from cssl_ray.models import create_model
from cssl_ray.run.local import run_local

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # Ray 2.60's own deprecated fields
]

RES = StreamResources()
# The smoke preset, plus enough stage-A steps (epochs of one step: 2 labelled images) and lr to leave Dice 0 (every method ties there);
# a smoke model is never sure (max softmax 0.31-0.36): a threshold some pixels pass.
EXTRA = ["train.progress=false", "train.num_threads=1", "train.stage_a_steps=6", "optim.lr=0.01",
         "train.keep_checkpoints=10", "pseudo.threshold=0.33"]


def cfg(out, *overrides: str):
    return build_config(None, [f"train.out_dir={out}", *EXTRA, *overrides], smoke=True)


@pytest.fixture(scope="module")
def ray_session():
    with local_ray(num_cpus=4):
        yield


def _report_log(path):
    """A Ray Train callback appending every report (rank 0's metrics, and whether it carries a
    checkpoint) to ``path`` as JSON lines: Train's controller runs it, in another process."""
    import ray.train

    class ReportLog(ray.train.UserCallback):
        def after_report(self, run_context, metrics, checkpoint) -> None:
            with open(path, "a") as f:
                f.write(json.dumps({**metrics[0], "checkpoint": checkpoint is not None}) + "\n")

    return ReportLog()


@pytest.fixture(scope="module")
def straight(ray_session, tmp_path_factory):
    reports = tmp_path_factory.mktemp("straight_reports") / "reports.jsonl"
    result = run_ray(cfg(tmp_path_factory.mktemp("straight")), workers=1, resources=RES,
                     callbacks=[_report_log(str(reports))])
    result.report_log = reports  # every report of the run, as Tune's forwarder sees them
    return result


def _rounds(result) -> list[int]:
    return [int(m["round"]) for m in result.reports]


def _round_records(result) -> list[dict]:
    return [h for h in result.history if h["stage"] == "round"]


def test_one_worker_matches_local(straight, tmp_path):
    records: list[dict] = []
    local = run_local(cfg(tmp_path / "local"), log=records.append)
    # Reports: one per stage-A epoch and one per round, with --local's keys and steps (the same MLflow
    # curves, and ASHA sees round 0 for stage A, whatever resources.workers); only stage A's end and
    # the rounds carry a checkpoint
    # (a worker restarted by FailureConfig, as a loaded box's failed health check does, repeats its steps
    # since the last checkpoint: MLflow keeps a step's last value, so does this)
    reports = list({r["step"]: r for r in map(json.loads, straight.report_log.read_text().splitlines())}.values())
    epochs = straight.history[:6]
    assert [r["stage"] for r in reports] == ["supervised"] * 6 + ["round"] * 2 == [r["stage"] for r in records]
    assert [r["step"] for r in reports] == [r["step"] for r in records] == list(range(1, 9))
    assert [r["round"] for r in reports] == [r["round"] for r in records] == [0] * 6 + [1, 2]
    assert [r["epoch"] for r in reports[:6]] == [h["epoch"] for h in epochs] == list(range(6))
    assert [r["checkpoint"] for r in reports] == [False] * 5 + [True] * 3
    for ray_report, local_record in zip(reports, records, strict=True):  # rounds add the stream's statistics
        extra = set(ray_report) - set(local_record)
        assert set(local_record) <= set(ray_report) and (extra == {"ranks_identical", "checkpoint"}
                                                         or local_record["stage"] == "round"), local_record["step"]
    # Stage A runs the same supervised steps with the same seed on one rank: identical.
    sup_ray = [h["val_dice_mean"] for h in straight.history if h["stage"] == "supervised"]
    sup_local = [h["val_dice_mean"] for h in local.history if h["stage"] == "supervised"]
    assert sup_ray == sup_local and sup_ray[-1] > 0
    # Rounds: the same steps, pools and draws as --local (pipeline.RankSteps equals plan.local_steps,
    # test_pipeline.py), but pseudo-labels from another batch shape can flip a pixel at the threshold
    # and every later draw follows. Tolerance: 0.05 Dice on the best validation Dice (one 32x32 image).
    print(f"best val Dice: ray {straight.best_val['dice_mean']:.4f}, local {local.best_val['dice_mean']:.4f}")
    assert abs(straight.best_val["dice_mean"] - local.best_val["dice_mean"]) <= 0.05
    assert [h["round"] for h in _round_records(straight)] == [1, 2]
    for h in _round_records(straight):
        for key in ("loss", "loss_cl", "loss_cr", "loss_sup", "omega", "lambda", "patches", "val_dice_mean"):
            assert math.isfinite(h[key]), key
    assert (straight.out_dir / "best.pt").is_file() and (straight.out_dir / "result.json").is_file()
    assert 0.0 <= straight.test["dice_mean"] <= 1.0 and "auprc_mean" in straight.test


def test_round_records_carry_pseudo_statistics(straight):
    """Round records carry --local's pseudo_coverage / pseudo_accuracy, against an oracle: round 1
    labels with the weights of round 0's checkpoint (the end of stage A)."""
    rounds_ = _round_records(straight)
    for h in rounds_:
        assert 0.0 <= h["pseudo_coverage"] <= 1.0 and 0.0 <= h["pseudo_accuracy"] <= 1.0
    assert all("pseudo_coverage" in m for m in straight.reports if m["stage"] == "round")  # reported too
    cfg_ = cfg(straight.out_dir)  # the straight run's config
    bundle = load_bundle(cfg_.data)
    states = [torch.load(f, map_location="cpu", weights_only=False)
              for f in sorted((straight.out_dir / "ray_train").glob("checkpoint_*/state.pt"))]
    model = create_model(cfg_.model, cfg_.data.in_channels, cfg_.data.num_classes)
    model.load_state_dict(next(s for s in states if s["round"] == 0)["model"])
    pseudo = predict_pseudo_labels(model, bundle.unlabelled_images, cfg_.pseudo.threshold, cfg_.pseudo.ignore_index,
                                   batch_size=1)
    covered = pseudo != cfg_.pseudo.ignore_index
    accuracy = ((pseudo == bundle.unlabelled_masks_hidden) & covered).sum().item() / max(covered.sum().item(), 1)
    assert rounds_[0]["pseudo_coverage"] == pytest.approx(covered.float().mean().item(), abs=1e-3)
    assert rounds_[0]["pseudo_accuracy"] == pytest.approx(accuracy, abs=1e-3)
    assert rounds_[0]["pseudo_coverage"] > 0 and math.isfinite(rounds_[1]["pseudo_coverage"])
    # the confidence medians: the labellers' summed histograms, and the ranks' D_L, against torch's median
    for images, prefix in ((bundle.unlabelled_images, "confidence"), (bundle.labelled_images, "confidence_labelled")):
        with torch.no_grad():
            conf, argmax = torch.softmax(model.eval()(images), 1).max(1)
        for c, name in enumerate(bundle.class_names):
            values = conf[argmax == c]
            got = rounds_[0][f"{prefix}/{name}"]
            if values.numel() == 0:
                assert math.isnan(got), (prefix, name)
            else:
                assert got == pytest.approx(float(values.median()), abs=0.011), (prefix, name)


def test_resume_continues_from_the_latest_train_checkpoint(straight, capfd):
    """--resume of the finished 2-round run to 3 rounds: rounds 0-2 come from the checkpoints, round 3
    runs once; each rank-0 progress line reaches the driver once (Train V2's print patch printed it twice)."""
    resumed = run_ray(cfg(straight.out_dir, "train.max_rounds=3"), workers=1, resources=RES, resume=True)
    assert _rounds(resumed) == [0, 1, 2, 3]  # no round lost or repeated
    assert [h["round"] for h in _round_records(resumed)] == [1, 2, 3]
    for a, b in zip(_round_records(resumed)[:2], _round_records(straight), strict=True):  # restored history
        for key in ("loss", "omega", "lambda", "loss_sup", "val_loss", "val_dice_mean"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), key
    time.sleep(2)  # the driver prints worker output from a log-monitor thread
    captured = capfd.readouterr()
    bodies = [ln.split("[cssl_ray] ", 1)[1] for ln in (captured.out + captured.err).splitlines() if "[cssl_ray] " in ln]
    assert any("round 3" in b for b in bodies), bodies
    assert len(bodies) == len(set(bodies)), bodies


def test_paper_cps_on_two_workers_keeps_both_networks_equal_on_every_rank(ray_session, tmp_path):
    """CPS under the paper's protocol on Ray Train, 2 ranks, no labellers (``baseline_worker``: network
    B's own stage A, its fine-tune epochs, the unlabelled epochs). The joint protocol's 2-worker CPS
    run is test_quiet.py's (one fit for both checks)."""
    result = run_ray(cfg(tmp_path, "train.protocol=paper", "train.method=cps", "train.use_cl=false",
                         "train.use_cr=false", "train.use_hard_negatives=false", "train.total_steps=4",
                         "train.pseudo_refresh_steps=2", "train.max_rounds=2", "train.stage_a_steps=2"),
                     workers=2, resources=RES)
    rounds = [r for r in result.history if r.get("stage") == "round"]
    assert [r["round"] for r in rounds] == [1, 2]
    # stage A's last epoch, then the rounds; B trained alongside
    assert all(r["steps"] > 0 and math.isfinite(r["loss_sup_peer"]) for r in rounds)
    assert [int(m["round"]) for m in result.reports] == [0, 1, 2]
    assert all(r["loss_unsup"] >= 0 and math.isfinite(r["loss_sup"]) for r in rounds)
    assert all(m["ranks_identical"] == 1.0 for m in result.reports)
    last = max((tmp_path / "ray_train").rglob("world.json"), key=lambda f: json.loads(f.read_text())["round"])
    saved = torch.load(last.parent / "state.pt", weights_only=False)  # the last round's checkpoint
    assert saved["peer"] is not None and len(saved["rank_streams"]) == 2  # network B and both ranks' streams
    assert not math.isnan(result.test["dice_mean"])


def test_bad_settings_fail_before_ray_starts(tmp_path, capsys):
    with pytest.raises(ConfigError, match="--workers: 3 ranks but only 2 labelled images"):
        run_ray(cfg(tmp_path), workers=3)
    assert main(["--smoke", "--workers", "3", "--out", str(tmp_path)]) == 2
    assert "labelled images" in capsys.readouterr().err
    assert main(["--smoke", "--set", "patches.size=13", "--out", str(tmp_path)]) == 2


def test_killed_worker_restarts_from_its_checkpoint(straight, tmp_path):
    """SIGKILL the Train worker once round 1's checkpoint exists: FailureConfig restarts it, it
    resumes from that checkpoint and the run ends as the straight run does, each round reported once."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = run_ray(cfg(tmp_path), workers=1, resources=RES, max_failures=1)
        except BaseException as e:  # noqa: BLE001 - surfaced below
            outcome["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    deadline, killed = time.time() + 120, []
    while time.time() < deadline and thread.is_alive() and not killed:
        if len(list((tmp_path / "ray_train").glob("checkpoint_*"))) >= 2:  # rounds 0 and 1 reported
            for pid in [p for p, cmd in descendant_processes().items() if "RayTrainWorker" in cmd]:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        time.sleep(0.2)
    thread.join(timeout=180)
    assert killed, "the run ended before a worker could be killed"
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert _rounds(result) == [0, 1, 2]  # no round lost or repeated
    for a, b in zip(_round_records(result), _round_records(straight), strict=True):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-6, abs=1e-7)
