"""Ray Train: the schedule of ``cssl_ray.run.local`` on TorchTrainer workers fed by streamed L_tot steps,
or, under ``train.protocol: joint``, ``cssl_ray.run.joint``'s loop for every method (``joint_worker``).

    driver  run_ray: config and data checks (one-line errors, before Ray starts) -> ray.init ->
            WeightStore + LabellerPool (long-lived pseudo-labeller actors, started once) ->
            TorchTrainer.fit (one fit runs every round: a fit start costs ~10 s here) -> test
            metrics on the best-validation weights
    worker  train_loop_per_worker (``train_worker``): stage A, then per round the streamed L_tot
            epoch, a fine-tune epoch and validation; ray.train.report on every rank
    checkpoints: their files and the worker count that wrote them (``train_checkpoints``)

Design choices:
- No driver copy of the data: the driver computes the split from the store's index (names,
  groups, subsets; no pixels) and sends the workers a ``DataSource`` (the store's path or URI and
  the split's row indices). Each worker reads its rank's slice ``[rank::world]`` of D_L and val
  (the supervised loop needs random access by index and the same number of steps on every rank);
  D_U is read only by the rank's step tasks, a step's rows at a time (``pipeline``). Every node
  therefore reads the store: a shared folder or an ``s3://`` / ``gs://`` / ``file://``
  ``data.cache_dir`` on a cluster (synthetic images are generated where they are needed, each
  seeded by its index). The driver reads test (and the figures' val and first D_U images) at the
  end.
- One stream per rank and round, not a Dataset split by Ray Train (``pipeline`` says why): every
  row arrives, in step order, so a run is reproducible and the pseudo-label counts are complete.
  ``data_wait_frac`` (reported every round) is the share of the epoch a rank spent waiting on its
  next step after the first.
- The workers' design (gradients, world-size invariance, checkpoints): ``train_worker``.
"""
from __future__ import annotations

import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cssl_ray.config import Config, ConfigError, check_metric, to_dict, validate
from cssl_ray.data.bundle import DataSource, open_source
from cssl_ray.distributed.placement import check_labeller_flags
from cssl_ray.distributed.preflight import check_fits_here, check_shared_paths, check_worker_gpus, dataset_paths
from cssl_ray.distributed.ray_init import init_ray, is_verbose, shutdown_ray
from cssl_ray.distributed.train_checkpoints import RUN_NAME, STATE_FILE, check_resume_world
from cssl_ray.distributed.train_worker import train_loop_per_worker
from cssl_ray.models import check_geometry
from cssl_ray.models.precision import Precision
from cssl_ray.run.joint import uses_unlabelled
from cssl_ray.run.records import RunResult, evaluate_best, resolve_device, write_run_files
from cssl_ray.run.schedule import RunState

if TYPE_CHECKING:  # stream imports ray at module level; the CLI loads this module before Ray
    from cssl_ray.distributed.stream import StreamResources

PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # ScalingConfig's; SPREAD: 1 worker per node


@dataclass
class RayRunResult(RunResult):
    """``RunResult`` plus the metrics of every kept Train checkpoint (one per report), oldest first."""

    reports: list[dict[str, Any]] = field(default_factory=list)


def check_ray_run(cfg: Config, source: DataSource, workers: int, gpus_per_worker: float,
                  cpus_per_worker: float = 0.5, placement_strategy: str = "PACK", labellers: int = 1,
                  gpus_per_labeller: float = 0.0) -> None:
    """One-line ConfigErrors for settings a Train run cannot honour (before Ray starts)."""
    joint = cfg.train.protocol == "joint"
    if placement_strategy not in PLACEMENT_STRATEGIES:
        raise ConfigError(f"--placement-strategy: {placement_strategy!r} is not a placement strategy; "
                          f"allowed: {', '.join(PLACEMENT_STRATEGIES)}")
    if workers < 1:
        raise ConfigError(f"--workers: {workers} is out of range; allowed: >= 1")
    if cpus_per_worker <= 0:
        raise ConfigError(f"--cpus-per-worker: {cpus_per_worker} is out of range; allowed: > 0")
    if gpus_per_worker < 0:
        raise ConfigError(f"--gpus-per-worker: {gpus_per_worker} is out of range; allowed: >= 0")
    check_worker_gpus(workers, gpus_per_worker)
    check_labeller_flags(labellers, gpus_per_labeller)
    if cfg.train.amp == "fp16" and gpus_per_worker == 0:
        raise ConfigError("train.amp: fp16 needs CUDA workers (--gpus-per-worker > 0); use bf16 or off on CPUs")
    n_l, n_u = source.count("labelled"), source.count("unlabelled")
    # Every rank needs >= 1 labelled image (its supervised steps) and, with L_CR, >= 1 unlabelled one:
    # a rank with nothing to step on would leave the others waiting in the gradient all-reduce.
    if workers > n_l:
        raise ConfigError(f"--workers: {workers} ranks but only {n_l} labelled images; each rank needs one "
                          f"(use fewer workers or raise data.labelled_fraction / data.labelled_count)")
    baseline = cfg.train.method != "cssl"
    with_u = uses_unlabelled(cfg) if (joint or baseline) else cfg.train.use_cr
    if with_u and n_u and workers > n_u:
        raise ConfigError(f"--workers: {workers} ranks but only {n_u} unlabelled images; each rank needs one "
                          f"with train.{'method ' + cfg.train.method if (joint or baseline) else 'use_cr'} "
                          "(use fewer workers)")
    # The batch sizes are global (each rank holds a share): every rank needs an item of every batch it uses.
    batches = [("train.batch_size", cfg.train.batch_size)]
    if with_u or not joint:
        batches.append(("consistency.batch_size", cfg.consistency.batch_size))
    if cfg.train.use_cl or not joint:
        batches.append(("patches.batch_size", cfg.patches.batch_size))
    for key, size in batches:
        if size < workers:
            raise ConfigError(f"{key}: {size} is a global batch; with --workers {workers} it must be >= {workers} "
                              "(each rank holds a share)")
    if cfg.train.sync_bn and workers > 1 and gpus_per_worker == 0:
        raise ConfigError("train.sync_bn: torch's SyncBatchNorm runs on CUDA only; set it false for CPU workers "
                          "(BatchNorm then normalises each rank's share of a batch by its own statistics)")


def check_run(cfg: Config, *, workers: int = 1, gpus_per_worker: float = 0.0, cpus_per_worker: float = 0.5,
              placement_strategy: str = "PACK", labellers: int = 1, gpus_per_labeller: float = 0.0,
              address: str | None = None, storage_path: str | None = None, here: bool = False,
              resume: bool = False) -> DataSource:
    """Every check ``run_ray`` makes before Ray starts (``--dry-run`` runs only these): the config's
    ranges, the model's geometry, the dataset (prepared and split: a missing or bad dataset is one
    line here), ``check_ray_run``, and ``cssl_ray.distributed.preflight``'s: with a remote ``address``, the run
    folder (``storage_path``, else train.out_dir) and the prepared dataset on shared storage;
    ``here`` (Ray will start on this machine): the run's workers and labellers fit this machine's
    GPUs; ``resume``: the run's newest checkpoint was written by as many workers. Returns the split's
    ``DataSource`` (no pixels read). Writes nothing but the dataset cache."""
    validate(cfg)
    check_geometry(cfg.model, cfg.data.image_size, cfg.patches.size)
    source = open_source(cfg.data)  # data errors: one-line ConfigErrors, before Ray starts
    check_metric("train.select_metric", cfg.train.select_metric, source.class_names)
    check_ray_run(cfg, source, workers, gpus_per_worker, cpus_per_worker, placement_strategy, labellers,
                  gpus_per_labeller)
    check_shared_paths(address, [("--storage-path" if storage_path else "train.out_dir (the default --storage-path)",
                                  storage_path or cfg.train.out_dir), *dataset_paths(cfg.data, source.store)])
    if resume:
        check_resume_world(storage_path or str(Path(cfg.train.out_dir).resolve()), workers)
    if here:
        from cssl_ray.distributed.placement import StreamResources, run_demand
        stream = StreamResources(labellers=labellers, labeller_gpus=gpus_per_labeller)
        check_fits_here(run_demand(workers, cpus_per_worker, gpus_per_worker, stream if run_labels(cfg, source) else None),
                        "the run", "lower --gpus-per-worker / --gpus-per-labeller")
    return source


def run_labels(cfg: Config, source: DataSource) -> bool:
    """Whether a Train run starts labellers: the paper's protocol with L_CL or L_CR on, and D_U not
    empty (the joint protocol's ranks label their own shards: ``joint_worker``)."""
    t = cfg.train
    return t.protocol == "paper" and (t.use_cl or t.use_cr) and source.count("unlabelled") > 0


def run_ray(cfg: Config, *, workers: int = 1, gpus_per_worker: float = 0.0, address: str | None = None,
            storage_path: str | None = None, resume: bool = False, cpus_per_worker: float = 0.5,
            max_failures: int = 2, resources: StreamResources | None = None,
            callbacks: list[Any] | None = None, placement_strategy: str = "PACK",
            labeller_group: Any = None) -> RayRunResult:
    """Train one CSSL run on Ray Train; returns test metrics on the best-validation weights.

    Args:
        cfg: the run's config (validated here; data errors are one-line ``ConfigError``s).
        workers, gpus_per_worker: Train ranks and the GPUs each holds (0 = CPU, gloo).
        address: an existing cluster ("auto", "ray://...", "host:port"); None = start Ray locally
            (or use the instance this process already started).
        storage_path: absolute folder (or s3://, gs://) for the Train run; default train.out_dir.
            On a multi-node cluster give shared or cloud storage.
        resume: continue the run named ``RUN_NAME`` under ``storage_path`` from its latest
            checkpoint; otherwise an existing local run folder is replaced (as ``--local`` does).
        cpus_per_worker: fractional by default, so Ray Data stages keep CPUs on small machines.
        max_failures: worker failures the run survives (each restarts from the latest checkpoint).
        resources: ``pipeline.StreamResources`` of the patch stream (default: its defaults: 1
            labeller on 0.5 CPU, no GPU; ``labeller_gpus`` is never taken from the cluster).
        callbacks: Ray Train callbacks, e.g. ``TuneReportCallback()`` when this run is a Tune trial.
        placement_strategy: how the Train workers' bundles are placed (``PLACEMENT_STRATEGIES``):
            PACK (default) fills nodes in turn, SPREAD puts one worker per node where it can, the
            STRICT_ forms fail instead of falling back.
        labeller_group: the Tune trial's placement group, whose last bundles hold the labellers
            (``placement.trial_bundles``); None = the labellers reserve a group of their own and
            wait until it is placed (on a cluster given by ``address``, for the autoscaler's nodes).
    """
    from cssl_ray.distributed import placement

    start = time.perf_counter()
    r = resources or placement.StreamResources()
    import ray  # only to ask whether this process already runs an instance: nothing starts before the checks

    ray_running = ray.is_initialized()
    source = check_run(cfg, workers=workers, gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker,
                       placement_strategy=placement_strategy, labellers=r.labellers, gpus_per_labeller=r.labeller_gpus,
                       address=address, storage_path=storage_path, resume=resume,
                       here=address is None and labeller_group is None and not ray_running)
    out_dir = write_run_files(cfg, source)
    storage = storage_path or str(out_dir.resolve())
    local_storage = "://" not in storage
    if local_storage:
        storage = str(Path(storage).resolve())
        if not resume and (Path(storage) / RUN_NAME).exists():
            shutil.rmtree(Path(storage) / RUN_NAME)  # Train V2 would resume from it otherwise

    # --- Ray from here on ---------------------------------------------------------------------
    import ray.train
    from ray.train.torch import TorchTrainer

    from cssl_ray.distributed.stream import LabellerPool
    from cssl_ray.distributed.weights import get_or_create_weight_store

    labelling = run_labels(cfg, source)
    demand = placement.run_demand(workers, cpus_per_worker, gpus_per_worker, r if labelling else None)
    started_ray = init_ray(address, demand.cpus)
    # A local instance cannot grow: fail now, not wait forever. One started here was checked against
    # this machine before Ray (check_run's ``here``); one this process already had is checked here.
    if address is None and labeller_group is None and ray_running:
        try:
            placement.check_run_fits(demand, ray.cluster_resources())
        except ConfigError:
            if started_ray:
                shutdown_ray()
            raise
    store_name = f"cssl_weights_{uuid.uuid4().hex[:8]}"
    store = get_or_create_weight_store(store_name)  # lives in the driver: outlives restarted workers
    labellers = None
    try:
        if not cfg.train.progress:  # --quiet, and Tune trials: Ray Data's bars would interleave with their lines
            ray.data.DataContext.get_current().enable_progress_bars = False
        if labelling:  # long-lived, like the store: started once, used by every round
            labellers = LabellerPool(cfg, store_name, r, placement_group=labeller_group)
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"config": to_dict(cfg), "weight_store": store_name,
                               "source": source, "resources": r, "verbose": is_verbose(),
                               "labellers": labellers.actors if labellers is not None else []},
            scaling_config=ray.train.ScalingConfig(
                num_workers=workers, use_gpu=gpus_per_worker > 0, placement_strategy=placement_strategy,
                resources_per_worker={"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if gpus_per_worker else {})}),
            run_config=ray.train.RunConfig(
                name=RUN_NAME, storage_path=storage,
                failure_config=ray.train.FailureConfig(max_failures=max_failures), callbacks=callbacks,
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints)),
        )
        result = trainer.fit()
    finally:
        if labellers is not None:
            labellers.close()
        ray.kill(store)
        if started_ray:
            shutdown_ray()

    # Test once, here, on the best-validation weights the last checkpoint carries.
    with result.checkpoint.as_directory() as d:
        saved = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)
    device = resolve_device(cfg.train.device)  # the driver's: fp16 falls back to fp32 on its CPU
    state = RunState(cfg, device, precision=Precision.from_config(cfg.train, device, inference=True))
    state.load_state_dict(saved)
    from cssl_ray.evaluation.figures import SNAPSHOT_IMAGES
    bundle = source.bundle(labelled=False, unlabelled=SNAPSHOT_IMAGES)  # test, and what the figures show
    done = evaluate_best(state, cfg, bundle, out_dir, start)
    return RayRunResult(**vars(done), reports=[m for _, m in (result.best_checkpoints or [])])
