"""Ray Train: the schedule of ``cssl_ray.run.local`` on TorchTrainer workers fed by streamed L_tot steps.

    driver  run_ray: config and data checks (one-line errors, before Ray starts) -> ray.init ->
            WeightStore + LabellerPool (long-lived pseudo-labeller actors, started once) ->
            TorchTrainer.fit (one fit runs every round: a fit start costs ~10 s here) -> test
            metrics on the best-validation weights
    worker  train_loop_per_worker: stage A (supervised epochs), then per round r
              rank 0 publishes the student as version r -> barrier
              -> each rank plans its share of the epoch's steps (``loop.epoch_plan``) and streams
                 them (``pipeline.RankSteps``: its step's images labelled by the pool with version
                 r, their patches sampled, one Ray Data row per step, in step order) while it trains:
                 the L_tot epoch steps on each step as it arrives
              -> pseudo-label counts of the steps all-reduced (pseudo_coverage, pseudo_accuracy as in
                 --local) -> fine-tune epoch -> validation (counts all-reduced)
              -> ray.train.report(metrics, checkpoint) on EVERY rank (rank 0 attaches the checkpoint)
            stage A reports every epoch, like --local's records (same keys and ``step``); only its
            last report (stage A's end) carries a checkpoint

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
- Gradients: data parallel over the process group Ray Train sets up (gloo on CPU, NCCL on GPU),
  but with one explicit all-reduce of the gradients after every backward instead of a DDP
  wrapper, because the L_tot step reaches encode/decode/project, not forward (see
  ``cssl_ray.method.collectives``). ``prepare_model`` only places the student on the device. The teacher
  is a plain module, never wrapped, never given gradients.
- World-size invariance: ``train.batch_size``, ``consistency.batch_size`` and ``patches.batch_size``
  are global. Each rank takes its ``rank_share`` of every batch, L_CL runs on the all-gathered
  embeddings (so every anchor sees the paper's 816-patch batch whatever the worker count), pixel
  means divide by the global count, and a step on N ranks is one process's step on the same
  global batch (tests/test_world_size.py). Left per rank: BatchNorm's batch statistics (unless
  ``train.sync_bn``, CUDA), the draws of the consistency noise and of which patches and images
  form a batch (each rank draws from its own shard): statistically, not bitwise, the same run.
- Checkpoints hold ``schedule.RunState.state_dict()`` plus every rank's random streams; rank 0 writes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cssl_ray.config import Config, ConfigError, check_metric, from_dict, to_dict, validate
from cssl_ray.data.bundle import DataSource, open_source
from cssl_ray.distributed.collectives import TorchCollectives
from cssl_ray.distributed.placement import check_labeller_flags
from cssl_ray.distributed.preflight import check_fits_here, check_shared_paths, check_worker_gpus, dataset_paths
from cssl_ray.distributed.ray_init import init_ray, shutdown_ray
from cssl_ray.method.collectives import Collectives, rank_share
from cssl_ray.models import check_geometry
from cssl_ray.models.precision import Precision
from cssl_ray.run.loop import evaluate, labelled_confidence, supervised_epoch
from cssl_ray.run.records import RunResult, evaluate_best, resolve_device, write_run_files
from cssl_ray.run.schedule import RunState, stage_a_plan, sup_steps
from cssl_ray.tracking.progress import record_warnings

if TYPE_CHECKING:  # pipeline imports ray at module level; the CLI loads this module before Ray
    from cssl_ray.distributed.stream import RankSteps, StreamResources

STATE_FILE = "state.pt"  # inside every Train checkpoint directory
WORLD_FILE = "world.json"  # beside it: the worker count that wrote it (read before Ray starts on --resume)
RUN_NAME = "ray_train"  # the Train run's folder under train.out_dir
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # ScalingConfig's; SPREAD: 1 worker per node
# Worker progress goes through logging, not print: Train V2 patches print in its workers to log
# AND, since a Ray worker's sys.stdout is a wrapper (not sys.__stdout__), to tee it to stdout, so the
# driver got every printed line twice (stdout and the root logger's console handler, both forwarded).
log = logging.getLogger(__name__)


def _own_log_handler() -> None:
    """One stderr handler for the progress lines, not propagated: Ray Data, once used in a worker
    (the step streams), adds its own handler up the logger tree and every line reached the driver twice."""
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    # Ray Data logs two INFO lines per execution: one stream per rank and round would flood the driver
    logging.getLogger("ray.data").setLevel(logging.WARNING)


@dataclass
class RayRunResult(RunResult):
    """``RunResult`` plus the metrics of every kept Train checkpoint (one per report), oldest first."""

    reports: list[dict[str, Any]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Worker side


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Train worker (rank) of a CSSL run; ``config`` = {"config": to_dict(cfg), "weight_store": name,
    "source": the split's ``DataSource`` (None: opened here), "labellers": the pool's actors,
    "resources": ``StreamResources``}. Its Python warnings also go to ``warnings_rank<r>.json`` in
    the run folder when that is an absolute path (Tune trials: the experiment's driver shows them)."""
    import ray.train

    out_dir = Path(config["config"]["train"]["out_dir"])
    if not out_dir.is_absolute():  # a worker's working folder is Ray's, not the driver's
        return _train_loop(config)
    with record_warnings(out_dir / f"warnings_rank{ray.train.get_context().get_world_rank()}.json"):
        return _train_loop(config)


def _train_loop(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    _own_log_handler()
    cfg = from_dict(config["config"])
    store_name: str = config["weight_store"]
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if t.num_threads > 0:
        torch.set_num_threads(t.num_threads)
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL collectives (all_gather_object too) use the current device
    col = TorchCollectives(device) if world > 1 else Collectives()

    source: DataSource = config.get("source") or open_source(cfg.data)
    shard = _RankShard(source, rank, world)  # this rank's D_L and val, read here (module docstring)
    state = RunState(cfg, device, rank=rank)  # ranks draw different batches of their shards (streams per rank)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # a resumed run, or a restart after a worker failure
        with checkpoint.as_directory() as d:
            # CPU: the RNG states must stay CPU tensors; load_state_dict moves the rest to the device
            saved = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)
        state.load_state_dict(saved)
        streams = saved.get("rank_streams") or []
        if streams and len(streams) != world:  # run_ray refuses it before Ray starts (local storage)
            raise RuntimeError(resume_world_message(world, len(streams), "the checkpoint"))
        if streams:
            state.streams.load_state_dict(streams[rank])
    republish = checkpoint is not None  # the first publish after a restore may go back in version
    # The student only, on this worker's device. No DDP wrapper: gradients are averaged explicitly
    # after every backward over the gloo / NCCL group Ray Train set up (cssl_ray.method.collectives says
    # why); broadcast_state starts every rank from rank 0's weights, as DDP's constructor would.
    # The teacher is never wrapped and never gets gradients.
    if t.sync_bn and world > 1:  # BatchNorm statistics over the global batch (CUDA; check_ray_run says so)
        state.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(state.model)
    ray.train.torch.prepare_model(state.model, parallel_strategy=None)
    col.broadcast_state(state.model)

    # train.batch_size is global: this rank takes its share, for the steps of one pass over all of D_L
    sup = dict(batch_size=rank_share(t.batch_size, rank, world), steps=sup_steps(t, source.count("labelled")),
               augment=t.augment, ignore_index=cfg.pseudo.ignore_index, generator=state.streams.sup,
               precision=state.precision, scaler=state.scaler)

    def fine_tune(steps: int = 0) -> dict[str, float]:
        """One supervised epoch (``steps``: stage A's epoch of ``stage_a_plan``; 0 = ``sup_steps``)."""
        stats = supervised_epoch(state.model, state.optimizer, shard.labelled_images, shard.labelled_masks,
                                 collectives=col, **{**sup, "steps": steps or sup["steps"]})
        col.broadcast_buffers(state.model)  # BN statistics moved on each rank's own batches
        return stats

    def validate_and_record(record: dict[str, Any]) -> dict[str, float]:
        val = evaluate(state.model, shard.val_images, shard.val_masks, num_classes=cfg.data.num_classes,
                       class_names=source.class_names, ignore_index=cfg.pseudo.ignore_index,
                       batch_size=cfg.consistency.batch_size, collectives=col, precision=state.precision)
        record.update({f"val_{k}": v for k, v in val.items()})
        record["lr"] = state.optimizer.param_groups[0]["lr"]
        state.history.append(record)
        record["step"] = len(state.history)  # validation index: MLflow's step, equal in local and Ray runs
        if rank == 0:
            where = f"supervised epoch {record['epoch']}" if "epoch" in record else f"round {record['round']}"
            log.info("[cssl_ray] %s: val dice %.4f, val loss %.4f", where, val["dice_mean"], val["loss"])
        return val

    if not state.stage_a_done:  # stage A (skipped when resuming past it)
        # one report per epoch, as --local's records (MLflow curves and ASHA's round 0 alike whatever
        # the workers); only the last carries a checkpoint: stage A's end
        plan = stage_a_plan(t, source.count("labelled"))
        for epoch, n_steps in enumerate(plan):
            stats = fine_tune(n_steps)
            val = validate_and_record({"stage": "supervised", "round": 0, "epoch": epoch,
                                       "stage_a_step": sum(plan[:epoch + 1]), **stats})
            # the same loss and val on every rank: the same scheduler step and stop
            last = state.after_stage_a_epoch(epoch, val, stats["loss_sup"]) or epoch == len(plan) - 1
            if last:
                state.finish_stage_a()
            _report(state, cfg, state.history[-1], col, checkpoint=last)
            if last:
                break
        if not state.stage_a_done:  # no supervised epoch: stage A's checkpoint alone
            state.finish_stage_a()
            _report(state, cfg, {"stage": "supervised", "round": 0}, col)

    cssl_on = t.use_cl or t.use_cr
    while state.round < t.max_rounds:
        state.start_round()
        record: dict[str, Any] = {"stage": "round", "round": state.round}
        if cssl_on:
            if rank == 0 and cfg.train.figures:  # Fig. 2: pseudo-labels of the model published this round
                state.take_snapshot(cfg, shard.snapshot_images())
            steps = _round_steps(state, cfg, shard, config["labellers"], config["resources"], store_name, col,
                                 restart=republish)
            republish = False
            # the labelling model's confidence on D_L (as --local's label_round): before L_tot moves it
            labelled_conf = labelled_confidence(state.model, cfg, shard.labelled_images, source.class_names, col)
            started = time.perf_counter()
            record.update(state.l_tot_epoch(cfg, steps, len(steps.plan), col,
                                            labelled=(shard.labelled_images, shard.labelled_masks)))
            state.check_patches(record)
            record.update(_stream_stats(steps, time.perf_counter() - started, col))
            if source.count("unlabelled"):  # --local's pseudo_coverage (per class too) / _accuracy, all ranks' images
                record.update(_pseudo_stats(steps.counts, source.hidden_known, col, source.class_names))
                record.update(labelled_conf)
                state.check_coverage(record, source.class_names)
        record.update(fine_tune())
        state.track_best(validate_and_record(record))
        stop = state.should_stop(record)
        _report(state, cfg, record, col)
        if stop:
            break


class _RankShard:
    """This rank's slice ``[rank::world]`` of D_L and val, read from ``source`` by this worker (test
    stays with the driver). Of D_U it holds only the size of its slice (the slices are what
    ``loop.pass_shares`` expects): the rank's step tasks read the images."""

    def __init__(self, source: DataSource, rank: int, world: int) -> None:
        self.source = source
        self.labelled_images, self.labelled_masks = source.take("labelled", range(rank, source.count("labelled"), world))
        self.val_images, self.val_masks = source.take("val", range(rank, source.count("val"), world))
        self.n_unlabelled = len(range(rank, source.count("unlabelled"), world))
        self._snapshot: torch.Tensor | None = None

    def snapshot_images(self) -> torch.Tensor:
        """The first images of the whole D_U (Fig. 2 follows them; rank 0 labels them), read once."""
        if self._snapshot is None:
            from cssl_ray.evaluation.figures import SNAPSHOT_IMAGES
            n = min(SNAPSHOT_IMAGES, self.source.count("unlabelled"))
            self._snapshot = self.source.take("unlabelled", range(n))[0]
        return self._snapshot


def _round_steps(state: RunState, cfg: Config, shard: _RankShard, actors: list[Any], resources: StreamResources,
                 store_name: str, col: Collectives, restart: bool = False) -> RankSteps:
    """Publish round r's weights (rank 0), then this rank's streamed steps of the round's L_tot epoch
    (``pipeline.RankSteps``: labelled with version r by the run's labellers, consumed as they arrive).
    ``restart``: the first publish of a worker restored from a checkpoint, which may be older than
    the store's weights (``weights.WeightStore.publish``)."""
    from cssl_ray.distributed.stream import RankSteps
    from cssl_ray.distributed.weights import publish_weights
    from cssl_ray.run.loop import epoch_plan

    if col.rank == 0:
        publish_weights(store_name, state.model, version=state.round, restart=restart)  # round r - 1's model as version r
    col.barrier()  # no rank starts its stream before the new weights are in the store
    plan = epoch_plan(shard.n_unlabelled, cfg, state.streams, col)
    return RankSteps(cfg, state.round, plan, rank=col.rank, world=col.world_size, source=shard.source,
                     labelled_images=shard.labelled_images, labelled_masks=shard.labelled_masks, actors=actors,
                     resources=resources)


def _stream_stats(steps: RankSteps, epoch_s: float, col: Collectives) -> dict[str, float]:
    """How the trainer saw the stream (means over ranks): ``data_wait_frac`` = time waiting on the
    next step over the epoch's time, first step excluded (it includes the stream's start);
    ``first_step_wait_s``; ``patches_per_s`` = patches the steps delivered per second of the epoch;
    ``stream_bytes_per_image`` = bytes of the stream's rows per D_U image (pseudo-labels, windows, counts)."""
    after_first = max(epoch_s - steps.first_wait_s, 1e-9)
    stats = col.mean_floats({"data_wait_frac": (steps.wait_s - steps.first_wait_s) / after_first,
                             "first_step_wait_s": steps.first_wait_s, "patch_wait_s": steps.wait_s,
                             "epoch_s": epoch_s})
    patches, row_bytes, images = col.sum_(torch.tensor([steps.patches, steps.row_bytes, steps.images],
                                                       dtype=torch.float64)).tolist()
    stats["patches_per_s"] = patches / max(epoch_s, 1e-9)
    stats["stream_bytes_per_image"] = row_bytes / max(images, 1)  # what the rows carried to the ranks
    return stats


def _pseudo_stats(counts: dict[str, Any], with_accuracy: bool, col: Collectives,
                  class_names: list[str]) -> dict[str, float]:
    """``pseudo_coverage`` (and ``pseudo_accuracy``) of the whole D_U, and ``pseudo_coverage/<class>``
    as ``pseudo_labels.class_coverage`` defines it: counts summed over ranks."""
    from cssl_ray.distributed.stream import CLASS_COUNT_COLUMNS, CONFIDENCE_COLUMN, COUNT_COLUMNS, pseudo_stats
    from cssl_ray.run.loop import confidence_stats

    summed = col.sum_(torch.tensor([float(counts[k]) for k in COUNT_COLUMNS], dtype=torch.float64))
    out = pseudo_stats(dict(zip(COUNT_COLUMNS, summed.tolist())), with_accuracy)
    c = len(class_names)
    vectors = [[float(v) for v in counts.get(k, [0] * c)] for k in CLASS_COUNT_COLUMNS]  # (2, C)
    predicted, confident = col.sum_(torch.tensor(vectors, dtype=torch.float64)).tolist()  # summed over ranks
    for name, p, k in zip(class_names, predicted, confident):
        out[f"pseudo_coverage/{name}"] = k / p if p else float("nan")
    hist = torch.as_tensor(np.asarray(counts[CONFIDENCE_COLUMN], np.int64)).reshape(c, -1)  # (C, bins)
    out.update(confidence_stats(col.sum_(hist), class_names))
    return out


def _report(state: RunState, cfg: Config, record: dict[str, Any], col: Collectives, checkpoint: bool = True) -> None:
    """ray.train.report on every rank (Train V2 requires it); rank 0 attaches the checkpoint
    (``checkpoint``: a stage-A epoch before the last reports its metrics only)."""
    import ray.train

    streams = col.gather_objects(state.streams.state_dict()) if checkpoint else []  # a collective: every rank
    digests = col.gather_objects(_parameter_digest(state.model))
    metrics = {k: v for k, v in record.items() if isinstance(v, (int, float, str))}
    metrics["ranks_identical"] = float(len(set(digests)) == 1)  # data-parallel invariant, checked every report
    if col.rank != 0 or not checkpoint:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as d:
        torch.save({**state.state_dict(), "config": to_dict(cfg), "rank_streams": streams},
                   Path(d) / STATE_FILE)
        (Path(d) / WORLD_FILE).write_text(json.dumps({"world_size": col.world_size, "round": state.round}))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def _parameter_digest(model: torch.nn.Module) -> str:
    """A hash of every parameter's bytes: equal on two ranks iff their weights are bitwise equal."""
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Driver side


def check_ray_run(cfg: Config, source: DataSource, workers: int, gpus_per_worker: float,
                  cpus_per_worker: float = 0.5, placement_strategy: str = "PACK", labellers: int = 1,
                  gpus_per_labeller: float = 0.0) -> None:
    """One-line ConfigErrors for settings a Train run cannot honour (before Ray starts)."""
    if cfg.train.protocol != "paper":
        raise ConfigError(f"train.protocol: {cfg.train.protocol} runs in one process for now (--local; in a space, "
                          "resources.workers: 0); Ray Train runs the paper's protocol")
    if cfg.train.method != "cssl":
        raise ConfigError(f"train.method: {cfg.train.method} runs in one process for now (--local; in a space, "
                          "resources.workers: 0); Ray Train runs the cssl method")
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
    if cfg.train.use_cr and n_u and workers > n_u:
        raise ConfigError(f"--workers: {workers} ranks but only {n_u} unlabelled images; each rank needs one "
                          "with train.use_cr (use fewer workers)")
    # The batch sizes are global (each rank holds a share): every rank needs an item of every batch.
    for key, size in (("train.batch_size", cfg.train.batch_size), ("consistency.batch_size", cfg.consistency.batch_size),
                      ("patches.batch_size", cfg.patches.batch_size)):
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


def resume_world_message(workers: int, saved: int, where: str) -> str:
    return (f"--workers: {workers}, but {where} was written by {saved} worker(s): each rank's random streams "
            f"(its data order, augmentation and noise) are in it, so another worker count would change the run; "
            f"resume with --workers {saved}, or start a new run (another --out / --storage-path)")


def checkpointed_world(run_dir: Path) -> int | None:
    """The worker count of the newest Train checkpoint in ``run_dir`` (Train V2 names them
    ``checkpoint_<timestamp>``); None when there is none or it does not say."""
    points = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
    if not points:
        return None
    meta = points[-1] / WORLD_FILE
    if meta.exists():
        return int(json.loads(meta.read_text())["world_size"])
    if (points[-1] / STATE_FILE).exists():  # a checkpoint from before world.json
        streams = torch.load(points[-1] / STATE_FILE, map_location="cpu", weights_only=False).get("rank_streams")
        return len(streams) if streams else None
    return None


def check_resume_world(storage: str, workers: int) -> None:
    """``--resume`` with another worker count than the run's checkpoints: one line (local storage;
    a URI's checkpoints are checked by the worker that loads them)."""
    if "://" in storage:
        return
    run_dir = Path(storage) / RUN_NAME
    saved = checkpointed_world(run_dir)
    if saved is not None and saved != workers:
        raise ConfigError(resume_world_message(workers, saved, f"the newest checkpoint in {run_dir}"))


def run_labels(cfg: Config, source: DataSource) -> bool:
    """Whether a Train run pseudo-labels (so starts labellers): L_CL or L_CR on, and D_U not empty."""
    return (cfg.train.use_cl or cfg.train.use_cr) and source.count("unlabelled") > 0


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
                               "source": source, "resources": r,
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
