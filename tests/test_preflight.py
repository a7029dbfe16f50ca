"""cssl_ray.distributed.preflight: resource settings no run can honour are one line (rc 2) before Ray starts.

The four of issue 20: a fractional GPU per worker with several workers (NCCL refuses two ranks on a
GPU), more than one GPU per worker (a rank uses one device), a path on this machine's own disk with
--address of a remote cluster, and labellers that cannot fit (an in-process trial's placement group
has no labeller bundles; a local instance cannot grow past this machine's GPUs). No Ray starts here.
"""
from __future__ import annotations

import socket
from pathlib import Path

import pytest

from cssl_ray.config import ConfigError
from cssl_ray.distributed import preflight
from cssl_ray.distributed.placement import Resources, StreamResources, run_demand
from cssl_ray.experiments import ablate, train, tune
from cssl_ray.experiments.trial_checks import check_trial_resources

ROOT = Path(__file__).resolve().parent.parent
SMOKE_SPACE = str(ROOT / "tune_spaces" / "smoke.yaml")


def _one_line_error(main, argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("workers, gpus, fragment", [
    (2, 0.5, "--gpus-per-worker: 0.5 with --workers 2 would put two ranks on one GPU, which NCCL refuses"),
    (4, 0.25, "--gpus-per-worker: 0.25 with --workers 4"),
    (1, 2, "--gpus-per-worker: 2 is more than one GPU, but a rank trains on one device"),
    (2, 1.5, "--gpus-per-worker: 1.5 is more than one GPU"),
])
def test_worker_gpus_that_no_rank_can_use(workers, gpus, fragment):
    with pytest.raises(ConfigError) as info:
        preflight.check_worker_gpus(workers, gpus)
    assert fragment in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("workers, gpus", [(1, 0.5), (1, 1), (2, 1), (8, 1), (3, 0)])
def test_worker_gpus_a_run_can_use(workers, gpus):
    preflight.check_worker_gpus(workers, gpus)


@pytest.mark.parametrize("argv, fragment", [
    (["--workers", "2", "--gpus-per-worker", "0.5"], "--gpus-per-worker: 0.5 with --workers 2"),
    (["--gpus-per-worker", "2"], "--gpus-per-worker: 2 is more than one GPU"),
])
def test_train_dry_run_refuses_bad_gpu_settings(argv, fragment, tmp_path, capsys):
    line = _one_line_error(train.main, ["--smoke", "--out", str(tmp_path / "run"), "--dry-run", *argv], capsys)
    assert line.startswith("cssl_ray.train: error: ") and fragment in line


MOUNTS = """\
overlay / overlay rw 0 0
/dev/sda1 /home ext4 rw 0 0
server:/export /shared nfs4 rw 0 0
/dev/sdb1 /shared/local ext4 rw 0 0
sshfs#me@host: /mnt/remote fuse.sshfs rw 0 0
"""


def test_file_system_is_the_longest_mount_above_the_path(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text(MOUNTS)
    assert preflight.file_system("/shared/runs/a", mounts) == "nfs4"
    assert preflight.file_system("/shared/local/x", mounts) == "ext4"  # a local disk mounted inside the share
    assert preflight.file_system("/sharedother", mounts) == "overlay"  # a prefix of the name is not a parent
    assert preflight.file_system("/", mounts) == "overlay"
    assert preflight.file_system("/x", tmp_path / "absent") is None


def test_remote_addresses():
    assert not preflight.is_remote_address(None)
    assert not preflight.is_remote_address("auto")
    assert not preflight.is_remote_address("ray://localhost:10001")
    assert not preflight.is_remote_address("127.0.0.1:6379")
    assert not preflight.is_remote_address(f"{socket.gethostname()}:6379")
    own = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # this machine's address on its default route
    try:
        own.connect(("192.0.2.254", 9))  # TEST-NET: nothing is sent
        assert not preflight.is_remote_address(f"{own.getsockname()[0]}:6379")
    except OSError:
        pass  # no route at all here
    finally:
        own.close()
    assert preflight.is_remote_address("ray://head.example.org:10001")
    assert preflight.is_remote_address("10.255.1.2:6379")


def test_local_paths_with_a_remote_cluster_name_their_key(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text(MOUNTS)
    remote = "ray://head.example.org:10001"
    shared = [("--storage-path", "/shared/runs"), ("data.cache_dir", "s3://bucket/cache"),
              ("x", "/mnt/remote/runs"), ("y", None)]
    preflight.check_shared_paths(remote, shared, mounts)
    preflight.check_shared_paths("auto", [("--storage-path", "/home/me/runs")], mounts)  # maybe one machine
    preflight.check_shared_paths(None, [("--storage-path", "/home/me/runs")], mounts)
    preflight.check_shared_paths(remote, [("--storage-path", "/home/me/runs")], tmp_path / "absent")  # unknown
    for key, path in (("--storage-path", "/home/me/runs"), ("data.cache_dir", "/shared/local/cache")):
        with pytest.raises(ConfigError) as info:
            preflight.check_shared_paths(remote, [("other", "/shared/x"), (key, path)], mounts)
        text = str(info.value)
        assert text.startswith(f"{key}: {path} is on this machine's own disk (") and remote in text
        assert "s3://" in text and "\n" not in text


def test_dataset_paths_only_where_a_node_cannot_prepare_its_own(tmp_path, monkeypatch):
    from cssl_ray.config import DataConfig
    store = str(tmp_path / "cache" / "monuseg-x.parquet")
    assert preflight.dataset_paths(DataConfig(name="synthetic"), None) == []
    assert preflight.dataset_paths(DataConfig(name="nuclei"), store) == []  # every node fetches and prepares it
    assert preflight.dataset_paths(DataConfig(name="monuseg"), "s3://bucket/monuseg.parquet") == []
    kinds = {str(tmp_path / "raw"): "ext4", "/nfs/raw": "nfs4"}
    monkeypatch.setattr(preflight, "file_system", lambda path, mounts=None: kinds.get(str(path)))
    local = DataConfig(name="monuseg", root=str(tmp_path / "raw"))
    assert preflight.dataset_paths(local, store) == [("data.cache_dir", store)]
    assert preflight.dataset_paths(DataConfig(name="monuseg", root="/nfs/raw"), store) == []


def _on_own_disk(path: Path) -> bool:
    kind = preflight.file_system(path)
    return kind is not None and not preflight.is_shared(kind)


def test_train_and_ablate_dry_runs_refuse_a_local_folder_for_a_remote_cluster(tmp_path, capsys):
    if not _on_own_disk(tmp_path):
        pytest.skip("the temporary folder is on a network file system here")
    remote = ["--address", "ray://head.example.org:10001"]
    line = _one_line_error(train.main, ["--smoke", "--out", str(tmp_path / "run"), "--dry-run", *remote,
                                        "--storage-path", str(tmp_path / "store")], capsys)
    assert f"--storage-path: {tmp_path / 'store'} is on this machine's own disk" in line
    line = _one_line_error(train.main, ["--smoke", "--out", str(tmp_path / "run"), "--dry-run", *remote], capsys)
    assert "train.out_dir (the default --storage-path)" in line
    line = _one_line_error(ablate.main, ["--space", SMOKE_SPACE, "--storage-path", str(tmp_path / "tune"),
                                         "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", "--dry-run", *remote],
                           capsys)
    assert line.startswith("cssl_ray.ablate: error: --storage-path: ") and "own disk" in line
    assert train.main(["--smoke", "--out", str(tmp_path / "run"), "--dry-run", "--address", "auto"]) == 0


ONE_GPU = {"CPU": float("inf"), "GPU": 1.0}


def test_a_run_that_cannot_fit_this_machine_fails_before_ray(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(preflight, "local_resources", lambda: ONE_GPU)
    run = ["--smoke", "--out", str(tmp_path / "run"), "--dry-run"]
    line = _one_line_error(train.main, [*run, "--gpus-per-worker", "1", "--gpus-per-labeller", "0.5"], capsys)
    assert "the run needs" in line and "1 Train worker x 0.5 CPU + 1 GPU, 1 labeller x 0.5 CPU + 0.5 GPU" in line
    assert "this machine has 1 GPU" in line and "--address" in line
    assert train.main([*run, "--gpus-per-worker", "0.5", "--gpus-per-labeller", "0.5"]) == 0  # halves share it
    assert train.main([*run, "--gpus-per-worker", "1", "--gpus-per-labeller", "0.5", "--address", "auto"]) == 0
    assert train.main([*run, "--gpus-per-worker", "1", "--gpus-per-labeller", "0.5", "--local"]) == 0
    capsys.readouterr()
    # a trial: the smoke space's Train worker on CPUs and a labeller on half a GPU, on a machine without one
    monkeypatch.setattr(preflight, "local_resources", lambda: {"CPU": float("inf"), "GPU": 0.0})
    line = _one_line_error(tune.main, ["--space", SMOKE_SPACE, "--storage-path", str(tmp_path / "t"), "--dry-run",
                                       "--gpus-per-labeller", "0.5", "--tracking-uri",
                                       f"sqlite:///{tmp_path / 'm.db'}"], capsys)
    assert line.startswith("cssl_ray.tune: error: one trial needs ") and "1 labeller x 0.5 CPU + 0.5 GPU" in line
    assert "this machine has 0 GPU" in line and "resources.*" in line


def test_fits_here_counts_gpus_per_device():
    two = run_demand(2, 0.5, 1.0, StreamResources(labellers=2, labeller_gpus=0.5))
    with pytest.raises(ConfigError, match="the run needs 4 CPU and 3 GPU"):
        preflight.check_fits_here(two, "the run", "lower it", {"CPU": 64, "GPU": 2})
    with pytest.raises(ConfigError):  # 3 in all, but the halves may take two devices and strand a worker
        preflight.check_fits_here(two, "the run", "lower it", {"CPU": 64, "GPU": 3})
    preflight.check_fits_here(two, "the run", "lower it", {"CPU": 64, "GPU": 4})


@pytest.mark.parametrize("resources, fragment", [
    (Resources(workers=0, labellers=2), "resources.labellers: 2 x 0 GPU with resources.workers 0"),
    (Resources(workers=0, gpus_per_labeller=0.5), "an in-process trial labels in its own process"),
    (Resources(workers=2, gpus_per_worker=0.5), "resources.gpus_per_worker: 0.5 with resources.workers 2"),
    (Resources(workers=1, gpus_per_worker=4), "resources.gpus_per_worker: 4 is more than one GPU"),
])
def test_trial_resources_no_trial_can_honour(resources, fragment):
    with pytest.raises(ConfigError) as info:
        check_trial_resources(resources)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_in_process_trials_may_share_a_gpu():
    check_trial_resources(Resources(workers=0, gpus_per_worker=0.25))
    check_trial_resources(Resources(workers=1, gpus_per_worker=0.5, gpus_per_labeller=0.5))


def test_ablate_dry_run_refuses_labellers_for_in_process_trials(tmp_path, capsys):
    line = _one_line_error(ablate.main, ["--space", SMOKE_SPACE, "--storage-path", str(tmp_path / "t"), "--dry-run",
                                         "--workers", "0", "--labellers", "2",
                                         "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"], capsys)
    assert line.startswith("cssl_ray.ablate: error: resources.labellers: 2 x 0 GPU with resources.workers 0")


# ---------------------------------------------------------------------------------------------
# --resume keeps the worker count: each rank's random streams are in the checkpoint


def _checkpoint(run_dir: Path, stamp: str, world: int | None, streams: int | None = None) -> None:
    import json

    import torch
    d = run_dir / "ray_train" / f"checkpoint_{stamp}"
    d.mkdir(parents=True)
    if world is not None:
        (d / "world.json").write_text(json.dumps({"world_size": world, "round": 1}))
    if streams is not None:  # a checkpoint from before world.json: the streams say it
        torch.save({"rank_streams": [{}] * streams}, d / "state.pt")


def test_checkpointed_world_reads_the_newest_checkpoint(tmp_path):
    from cssl_ray.distributed.train_checkpoints import checkpointed_world
    run = tmp_path / "ray_train"
    assert checkpointed_world(run) is None
    _checkpoint(tmp_path, "2026-12-06_10-00-00.000001", world=1)
    _checkpoint(tmp_path, "2026-12-06_10-05-00.000001", world=2)
    assert checkpointed_world(run) == 2
    _checkpoint(tmp_path, "2026-12-06_10-09-00.000001", world=None, streams=3)
    assert checkpointed_world(run) == 3


def test_resume_with_another_worker_count_is_one_line_before_ray(tmp_path, capsys):
    _checkpoint(tmp_path, "2026-12-06_10-05-00.000001", world=2)
    run = ["--smoke", "--out", str(tmp_path), "--resume", "--dry-run"]
    line = _one_line_error(train.main, [*run, "--workers", "1"], capsys)
    assert line.startswith("cssl_ray.train: error: --workers: 1, but the newest checkpoint in ")
    assert "written by 2 worker(s)" in line and "resume with --workers 2" in line
    assert train.main([*run, "--workers", "2"]) == 0
    assert train.main(["--smoke", "--out", str(tmp_path), "--dry-run", "--workers", "1"]) == 0  # a new run: replaced
