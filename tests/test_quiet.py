"""A quiet terminal: a Ray run prints its progress lines and its result, not Ray's own output
(``cssl_ray.distributed.ray_init``), unless ``--verbose``; an error Ray raises is one line.

Measured on the 2-core build machine (``train --config configs/smoke.yaml --workers 2``): 1,893
lines before (Ray Data's progress bars of each rank redrawn as new lines, Train's TrainingReport
dumps, a core_worker ``E`` line), 43 after (the progress lines, the MLflow line, the result).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cssl_ray.distributed.ray_init import VERBOSE_ENV, is_verbose, set_verbose, shown_line
from cssl_ray.tracking.progress import error_line

ROOT = Path(__file__).resolve().parents[1]
RAY_WORDS = ("raylet", "core_worker", "DeprecationWarning", "TrainingReport")

# Lines of the measured run (ANSI colours removed), by what a quiet terminal does with them.
HIDDEN = [
    "(TrainController pid=5408) Requesting resources: {'CPU': 0.5} * 2",
    "(TrainController pid=5408) [2026-12-06 23:19:26,413 E 5408 5537] core_worker.cc:2465: Actor with class name: "
    "'PreemptionWatcher' and ID: 'ce9f' has constructor arguments in the object store and max_restarts > 0.",
    "(RayTrainWorker pid=5838) Reporting training result 1: TrainingReport(checkpoint=None, metrics={'stage': 0})",
    "(pid=5906) - MapBatches(label_and_sample_step): Tasks: 0; Actors: 0; Queued blocks: 0 (0.0B): 100%|#| 2.00/2.00",
    "WARNING: 8 PYTHON worker processes have been started on node: 54ee with address: 192.0.2.2, which is 4x",
    "/x/ray/train/v2/api/config.py:12: RayDeprecationWarning: `ray.train.RunConfig(verbose)` is deprecated",
    "/x/torch/__init__.py:61: DeprecationWarning: torch.foo is deprecated",
    "Traceback (most recent call last):",
]
SHOWN = [
    "[cssl_ray] round 1: val dice 0.0000, val loss 1.2330",
    "/x/cssl_ray/data/nuclei.py:40: UserWarning: nuclei: dropped 2 val/test image(s)",
    "ValueError: boom",
    "ray.exceptions.RayTaskError(ValueError): ray::label_and_sample_step() (pid=1, ip=1)",
]


def test_a_quiet_terminal_shows_the_projects_lines_warnings_and_errors_only():
    assert [line for line in SHOWN if not shown_line(line)] == []
    assert [line for line in HIDDEN if shown_line(line)] == []


def test_set_verbose(monkeypatch):
    monkeypatch.delenv(VERBOSE_ENV, raising=False)
    assert not is_verbose()  # quiet by default
    set_verbose(True)
    assert is_verbose()
    set_verbose(False)
    assert not is_verbose()


def test_every_ray_command_takes_verbose():
    from cssl_ray.experiments import ablate, train, tune

    for cli in (train, tune, ablate):
        assert "--verbose" in cli.parser().format_help()


def test_a_failed_worker_is_one_line(monkeypatch, capsys):
    from ray.train.v2.api.exceptions import WorkerGroupError

    from cssl_ray.experiments import train

    traceback = ("Traceback (most recent call last):\n  File \"train_worker.py\", line 9, in _train_loop\n"
                 "    raise ValueError('boom')\nValueError: boom")
    error = WorkerGroupError(f"[Rank 0 Error Snippet]:\n{traceback}", {0: RuntimeError(traceback)})
    assert error_line(error) == "WorkerGroupError: rank 0: ValueError: boom"

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(train, "tracked", fail)
    monkeypatch.delenv(VERBOSE_ENV, raising=False)
    assert train.main(["--smoke", "--no-track", "--workers", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["cssl_ray.train: error: WorkerGroupError: rank 0: ValueError: boom "
                   "(the traceback and Ray's output: --verbose)"]
    with pytest.raises(WorkerGroupError):  # --verbose: the whole traceback
        train.main(["--smoke", "--no-track", "--workers", "1", "--verbose"])


@pytest.mark.slow
def test_a_smoke_ray_run_prints_a_few_lines(tmp_path):
    """2 Train workers of the joint protocol's CPS (``joint_worker``; its two networks, no labellers):
    the project's lines and the result only. The same run is the end-to-end check of the joint
    protocol on Ray Train (CI time: one fit for both); the paper protocol's 2-worker runs are in
    test_multinode.py (CSSL, labellers) and test_distributed.py (CPS)."""
    import json

    import torch
    from conftest_ray import ray_test_env

    cps = ["train.protocol=joint", "train.method=cps", "train.use_cl=false", "train.use_cr=false",
           "train.use_hard_negatives=false", "train.total_steps=4", "train.pseudo_refresh_steps=2"]
    with ray_test_env("cssl_quiet") as ray_tmp:
        env = {**os.environ, "RAY_TMPDIR": str(ray_tmp)}
        env.pop(VERBOSE_ENV, None)
        done = subprocess.run(
            [sys.executable, "-m", "cssl_ray.train", "--config", "configs/smoke.yaml", "--workers", "2",
             "--out", str(tmp_path / "run"), "--no-track", *[a for kv in cps for a in ("--set", kv)]],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    lines = output.splitlines()
    assert len(lines) <= 60, f"{len(lines)} lines:\n" + "\n".join(lines[:80])
    assert [w for w in RAY_WORDS if w in output] == [], output[-3000:]
    assert "[cssl_ray] round 1" in output and "[cssl_ray] round 2" in output  # progress kept
    assert '"test": {' in done.stdout  # the result
    # the joint protocol on 2 ranks: both networks checkpointed, ranks bitwise equal at every report
    last = max((tmp_path / "run" / "ray_train").rglob("world.json"), key=lambda f: json.loads(f.read_text())["round"])
    saved = torch.load(last.parent / "state.pt", weights_only=False)
    rounds = [h for h in saved["history"] if h.get("stage") == "round"]
    assert [h["joint_step"] for h in rounds] == [2, 4] and all(h["ranks_identical"] == 1.0 for h in rounds)
    assert saved["peer"] is not None and len(saved["rank_streams"]) == 2
