"""cssl_ray.distributed.placement: what a trial holds, how many trials fit at once, and the one-line errors.

The last two tests start one Ray instance with 2 logical GPUs (scheduling only: nothing here has
CUDA) and place the shipped monuseg space's placement groups with cheap actors, no training: two
trials and their Train workers fit in the order that deadlocks an unsafe split, a third trial is
queued, and the 0.75 + 0.25 split really strands a worker (why GPUs are counted per device).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import ray
from conftest_ray import local_ray

from cssl_ray.config import ConfigError, load_config
from cssl_ray.distributed.placement import (
    Demand,
    Resources,
    StreamResources,
    check_run_fits,
    concurrent_trials,
    fits,
    labeller_group,
    run_demand,
    stream_resources,
    trial_bundles,
    trial_demand,
    trials_that_fit,
)
from cssl_ray.experiments import train
from cssl_ray.experiments.search_space import load_space
from cssl_ray.experiments.trainable import trials_label

# Ray 2.60's own DataContext warns about its deprecated fields on first use; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")
ROOT = Path(__file__).resolve().parent.parent
MONUSEG = ROOT / "tune_spaces" / "monuseg.yaml"


def _trial(worker_gpus: float, labeller_gpus: float, workers: int = 1) -> Demand:
    return trial_demand(Resources(workers=workers, cpus_per_worker=1.0, gpus_per_worker=worker_gpus,
                                  gpus_per_labeller=labeller_gpus), labelling=True)


def test_monuseg_trial_holds_its_labeller_and_two_fit_on_two_gpus():
    r = load_space(MONUSEG).resources
    assert trial_bundles(r, labelling=True) == [{"CPU": 0.01}, {"CPU": 0.5, "GPU": 0.5}]  # driver, labeller
    d = trial_demand(r, labelling=True)
    assert d.gpus == (0.5, 0.5) and d.cpus == pytest.approx(0.01 + 4 + 0.5 + 2 * 0.25)  # + Train worker, its stream
    assert trials_that_fit(d, cpus=100, gpus=2, most=8) == 2
    assert trials_that_fit(d, cpus=10, gpus=8, most=8) == 1  # CPUs: the sum (2 x 5.01 > 10)


@pytest.mark.parametrize("worker, labeller, gpus, expected", [
    (0.5, 0.5, 2, 2),  # halves always pack
    (0.75, 0.25, 2, 1),  # two quarters on one GPU strand a 0.75 worker (measured below)
    (1, 1, 2, 1),  # the old default: a whole GPU per labeller, 4 requests on 2 GPUs
    (1, 0, 2, 2),
    (2, 0, 4, 2),  # a 2-GPU worker takes whole devices
    (0.25, 0.25, 1, 2),
    (1, 0.5, 3, 1),  # labellers on 2 different GPUs leave one empty GPU for 2 whole workers
    (1, 0.5, 4, 2),
    (0, 0, 0, 8),  # CPU only
    (0, 0.5, 0, 0),  # a GPU labeller on a cluster without GPUs
])
def test_trials_that_fit_count_gpus_per_device(worker, labeller, gpus, expected):
    assert trials_that_fit(_trial(worker, labeller), cpus=100, gpus=gpus, most=8) == expected


def test_in_process_trials_and_cpu_runs():
    r = Resources(workers=0, cpus_per_worker=1.0)
    assert trial_bundles(r, labelling=True) == [{"CPU": 1.0}]
    assert (trial_demand(r, True).cpus, trial_demand(r, True).gpus) == (1.0, ())
    assert trial_bundles(Resources(workers=2), labelling=False) == [{"CPU": 0.01}]  # no CL / CR: no labellers
    run = run_demand(2, 0.5, 0.0, StreamResources(labellers=2))
    assert run.cpus == 2 * 0.5 + 2 * 0.5 + 2 * 4 * 0.25 and run.gpus == ()  # 2 ranks x 4 stream tasks
    assert "2 labellers x 0.5 CPU" in str(run)
    assert fits(run, 1, cpus=4, gpus=0) and not fits(run, 1, cpus=3.5, gpus=0)


def test_concurrent_trials_lowers_fails_or_queues():
    d, lines = _trial(0.5, 0.5), []
    assert concurrent_trials(2, d, {"CPU": 100, "GPU": 2}, can_grow=False, log=lines.append) == 2 and not lines
    assert concurrent_trials(4, d, {"CPU": 100, "GPU": 2}, can_grow=False, log=lines.append) == 2
    assert len(lines) == 1 and "2 trial(s) at a time, not max_concurrent_trials 4" in lines[0]
    with pytest.raises(ConfigError) as info:  # a local instance without GPUs can never hold one
        concurrent_trials(2, d, {"CPU": 100}, can_grow=False, log=lines.append)
    assert str(info.value).startswith("resources: one trial needs 2.01 CPU and 1 GPU (driver 0.01 CPU, 1 Train worker")
    assert "\n" not in str(info.value)
    lines.clear()  # a cluster given by address may grow: one at a time, queued for the autoscaler's nodes
    assert concurrent_trials(2, d, {"CPU": 8}, can_grow=True, log=lines.append) == 1
    assert len(lines) == 1 and "queued" in lines[0]
    with pytest.raises(ConfigError, match="the run needs .* more than this Ray instance has"):
        check_run_fits(run_demand(1, 0.5, 0.0, StreamResources(labeller_gpus=0.5)), {"CPU": 4})


def test_trials_label_from_the_base_the_cells_or_a_searched_switch():
    base = load_config(ROOT / "configs" / "smoke.yaml")
    assert base.train.use_cl and trials_label(base, {})
    sup = train.build_config(None, ["train.use_cl=false", "train.use_cr=false"])
    assert not trials_label(sup, {})
    assert trials_label(sup, {"cell": {"grid_search": ["supervised", "cssl"]}})
    assert not trials_label(sup, {"cell": {"grid_search": ["supervised", "supervised_all"]}})
    assert trials_label(sup, {"train.use_cr": object()})


@pytest.mark.parametrize("argv, expected", [
    (["--labellers", "0"], "--labellers: 0 is out of range; allowed: >= 1"),
    (["--gpus-per-labeller", "1.5"], "--gpus-per-labeller: 1.5 is out of range; allowed: 0 (CPU labellers) to 1"),
])
def test_labeller_flags_are_one_line_errors(argv, expected, tmp_path, capsys):
    assert train.main(["--smoke", "--out", str(tmp_path), "--dry-run", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err


def test_dry_run_shows_the_labellers(tmp_path, capsys):
    assert train.main(["--smoke", "--out", str(tmp_path), "--dry-run", "--labellers", "2",
                       "--gpus-per-labeller", "0.5", "--gpus-per-worker", "0.5", "--address", "auto"]) == 0
    assert "2 pseudo-labeller(s) x 0.5 GPU, 0.5 CPU each" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Ray: placement groups on 2 logical GPUs


@pytest.fixture(scope="module")
def two_gpus():
    with local_ray(num_cpus=12, num_gpus=2):
        yield


@ray.remote
class _Probe:
    """Stands in for a labeller: holds its bundle and says which GPU it got."""

    def gpu_ids(self) -> list:
        return ray.get_gpu_ids()


def _in(group, bundle: int, cpus: float, gpus: float):
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
    return _Probe.options(num_cpus=cpus, num_gpus=gpus,
                          scheduling_strategy=PlacementGroupSchedulingStrategy(group, bundle)).remote()


@pytest.mark.slow
def test_monuseg_trials_place_without_deadlock_and_a_third_is_queued(two_gpus):
    from ray.util.placement_group import placement_group, remove_placement_group

    r = load_space(MONUSEG).resources
    assert concurrent_trials(2, trial_demand(r, True), ray.cluster_resources(), can_grow=False, log=pytest.fail) == 2
    workers = [{"CPU": r.cpus_per_worker, "GPU": r.gpus_per_worker}] * r.workers  # Train V2's own group
    groups = []
    try:
        # both trials' groups (driver + labeller) before either trial's workers: the order that deadlocks a bad split
        trials = [placement_group(trial_bundles(r, True)) for _ in range(2)]
        groups += trials
        assert all(g.wait(60) for g in trials)
        labellers = [_in(g, len(g.bundle_specs) - 1, 0.5, r.gpus_per_labeller) for g in trials]  # LabellerPool's bundle
        trains = [placement_group(workers) for _ in range(2)]
        groups += trains
        assert all(g.wait(60) for g in trains)  # both trials' Train workers start: no deadlock
        assert [len(ids) for ids in ray.get([p.gpu_ids.remote() for p in labellers])] == [1, 1]  # a GPU, not a CPU
        third = placement_group(trial_bundles(r, True))  # Tune would not start it (the cap is 2): queued, not hung
        groups.append(third)
        assert not third.wait(1)
        lines: list[str] = []  # a GPU labeller outside Tune waits for a GPU too; it never falls back to a CPU
        with pytest.raises(TimeoutError):
            labeller_group(stream_resources(r), lines.append, wait_s=0.2, timeout_s=0.5)
        assert len(lines) == 1 and "waiting for the labellers' resources" in lines[0]
        for g in (trials[0], trains[0]):  # trial 1 ends: the third is placed
            remove_placement_group(g)
            groups.remove(g)
        assert third.wait(60)
    finally:
        for g in groups:
            remove_placement_group(g)


@pytest.mark.slow
def test_quarter_gpu_labellers_strand_a_worker(two_gpus):
    """Measured Ray behaviour behind the per-device count: the 0.75 + 0.25 split that totals 2 GPUs."""
    from ray.util.placement_group import placement_group, remove_placement_group

    split = Resources(workers=1, cpus_per_worker=1.0, gpus_per_worker=0.75, gpus_per_labeller=0.25)
    assert trials_that_fit(trial_demand(split, True), cpus=12, gpus=2, most=2) == 1
    groups = [placement_group(trial_bundles(split, True)) for _ in range(2)]
    try:
        assert all(g.wait(60) for g in groups)  # 60: a loaded 2-core box took over 10 s once
        trains = [placement_group([{"CPU": 1.0, "GPU": 0.75}]) for _ in range(2)]
        groups += trains
        assert trains[0].wait(60) and not trains[1].wait(1)  # both quarters went to one GPU
    finally:
        for g in groups:
            remove_placement_group(g)
