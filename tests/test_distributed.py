"""Ray Train runs of CSSL (``cssl_ray.ray_train``) against the single-process trainer.

One Ray instance for the module (4 logical CPUs on 2 cores, see conftest_ray). Five fits of a tiny
config, ~20 s each (mostly Ray Train's and the labeller pool's start):
    straight   1 worker, 2 rounds     -> compared with ``run_local``, the resumed and the killed run
    first      1 worker, max_rounds=1 -> resumed to 2 rounds from its Train checkpoint
    two        2 workers (gloo)       -> parameters bitwise equal on both ranks at every report
    killed     1 worker, SIGKILLed in round 2 -> restarted by FailureConfig from round 1's checkpoint

Every run labels one image per labeller call (``labeller_batch=1``) and uses one torch thread, so
pseudo-labels (hence the patch multiset) do not depend on batching (see test_pipeline.py).
"""
from __future__ import annotations

import math
import os
import signal
import threading
import time

import pytest

from conftest_ray import descendant_processes, local_ray
from cssl_ray.config import ConfigError
from cssl_ray.local import run_local
from cssl_ray.pipeline import StreamResources
from cssl_ray.ray_train import run_ray
from cssl_ray.train import build_config, main

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # Ray 2.60's own deprecated fields
]

RES = StreamResources(labeller_batch=1)
# The smoke preset, plus enough supervised epochs and lr to leave Dice 0 (every method ties there).
EXTRA = ["train.progress=false", "train.num_threads=1", "train.supervised_epochs=6", "optim.lr=0.01",
         "train.keep_checkpoints=10"]


def cfg(out, *overrides: str):
    return build_config(None, [f"train.out_dir={out}", *EXTRA, *overrides], smoke=True)


@pytest.fixture(scope="module")
def ray_session():
    with local_ray(num_cpus=4):
        yield


@pytest.fixture(scope="module")
def straight(ray_session, tmp_path_factory):
    return run_ray(cfg(tmp_path_factory.mktemp("straight")), workers=1, resources=RES)


def _rounds(result) -> list[int]:
    return [int(m["round"]) for m in result.reports]


def _round_records(result) -> list[dict]:
    return [h for h in result.history if h["stage"] == "round"]


def test_one_worker_matches_local(straight, tmp_path):
    local = run_local(cfg(tmp_path / "local"))
    # Stage A runs the same supervised steps with the same seed on one rank: identical.
    sup_ray = [h["val_dice_mean"] for h in straight.history if h["stage"] == "supervised"]
    sup_local = [h["val_dice_mean"] for h in local.history if h["stage"] == "supervised"]
    assert sup_ray == sup_local and sup_ray[-1] > 0
    # Rounds differ in their patches: the stream draws each image's windows from its own seed
    # (pipeline.patch_seed) while --local draws them from the run's generator, which also shifts
    # every later draw (batches, alphas, noise). Tolerance: 0.05 Dice on the best validation Dice
    # (measured difference on this config: see the report; one val image of 32x32 pixels).
    print(f"best val Dice: ray {straight.best_val['dice_mean']:.4f}, local {local.best_val['dice_mean']:.4f}")
    assert abs(straight.best_val["dice_mean"] - local.best_val["dice_mean"]) <= 0.05
    assert [h["round"] for h in _round_records(straight)] == [1, 2]
    for h in _round_records(straight):
        for key in ("loss", "loss_cl", "loss_cr", "loss_sup", "omega", "lambda", "patches", "val_dice_mean"):
            assert math.isfinite(h[key]), key
    assert (straight.out_dir / "best.pt").is_file() and (straight.out_dir / "result.json").is_file()
    assert 0.0 <= straight.test["dice_mean"] <= 1.0 and "auprc_mean" in straight.test


def test_resume_from_train_checkpoint_equals_straight_run(straight, tmp_path):
    first = run_ray(cfg(tmp_path, "train.max_rounds=1"), workers=1, resources=RES)
    assert _rounds(first) == [0, 1]
    resumed = run_ray(cfg(tmp_path, "train.max_rounds=2"), workers=1, resources=RES, resume=True)
    assert _rounds(resumed) == _rounds(straight) == [0, 1, 2]  # no round lost or repeated
    assert [h["round"] for h in _round_records(resumed)] == [1, 2]
    for a, b in zip(_round_records(resumed), _round_records(straight), strict=True):
        for key in ("loss", "omega", "lambda", "loss_sup", "val_loss", "val_dice_mean"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), key
    assert resumed.test == pytest.approx(straight.test, rel=1e-6, abs=1e-7, nan_ok=True)


def test_two_workers_keep_identical_parameters(ray_session, tmp_path):
    result = run_ray(cfg(tmp_path), workers=2, resources=RES)
    assert _rounds(result) == [0, 1, 2]
    # Every report gathers a hash of each rank's parameters: bitwise equal after every round.
    assert [m["ranks_identical"] for m in result.reports] == [1.0, 1.0, 1.0]
    for h in _round_records(result):  # the patches of both shards together, as with one worker
        assert h["patches"] > 0 and math.isfinite(h["omega"]) and math.isfinite(h["val_dice_mean"])


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
