"""Ray Train's worker side of a CSSL run (``ray_train.run_ray`` is the driver): one rank's schedule.

    worker  train_loop_per_worker: stage A (supervised epochs), then per round r
              rank 0 publishes the student as version r -> barrier
              -> each rank plans its share of the epoch's steps (``plan.epoch_plan``) and streams
                 them (``pipeline.RankSteps``: its step's images labelled by the pool with version
                 r, their patches sampled, one Ray Data row per step, in step order) while it trains:
                 the L_tot epoch steps on each step as it arrives
              -> pseudo-label counts of the steps all-reduced (pseudo_coverage, pseudo_accuracy as in
                 --local) -> fine-tune epoch -> validation (counts all-reduced)
              -> ray.train.report(metrics, checkpoint) on EVERY rank (rank 0 attaches the checkpoint)
            stage A reports every epoch, like --local's records (same keys and ``step``); only its
            last report (stage A's end) carries a checkpoint

Design choices:
- Gradients: data parallel over the process group Ray Train sets up (gloo on CPU, NCCL on GPU),
  by default with one explicit all-reduce of the gradients after every backward instead of a DDP
  wrapper, because the L_tot step reaches encode/decode/project, not forward (see
  ``cssl_ray.method.collectives``); ``train.grad_sync: ddp`` runs the supervised and L_tot steps
  inside DDP around a step module instead (``collectives.DDPCollectives``: bucketed all-reduces
  overlapped with the backward). ``prepare_model`` only places the student on the device. The
  teacher is a plain module, never wrapped, never given gradients.
- World-size invariance: ``train.batch_size``, ``consistency.batch_size`` and ``patches.batch_size``
  are global. Each rank takes its ``rank_share`` of every batch, L_CL runs on the all-gathered
  embeddings (so every anchor sees the paper's 816-patch batch whatever the worker count), pixel
  means divide by the global count, and a step on N ranks is one process's step on the same
  global batch (tests/test_world_size.py). Left per rank: BatchNorm's batch statistics (unless
  ``train.sync_bn``, CUDA), the draws of the consistency noise and of which patches and images
  form a batch (each rank draws from its own shard): statistically, not bitwise, the same run.
- Checkpoints hold ``schedule.RunState.state_dict()`` plus every rank's random streams; rank 0 writes.
- ``train.protocol: joint``: the same set-up (shards, state, checkpoint, collectives, reports), then
  ``joint_worker.joint_rounds`` instead of stage A and the streamed rounds (every method).
"""
from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cssl_ray.config import Config, from_dict, to_dict
from cssl_ray.data.bundle import DataSource, open_source
from cssl_ray.distributed.collectives import TorchCollectives
from cssl_ray.distributed.train_checkpoints import STATE_FILE, WORLD_FILE, resume_world_message
from cssl_ray.method.collectives import Collectives, rank_share
from cssl_ray.run.baseline_rounds import ROUND_METHODS
from cssl_ray.run.labelling import labelled_confidence
from cssl_ray.run.loop import evaluate, supervised_epoch
from cssl_ray.run.schedule import RunState
from cssl_ray.run.supervised_epochs import stage_a_plan, sup_steps
from cssl_ray.tracking.progress import record_warnings

if TYPE_CHECKING:  # pipeline imports ray at module level; the CLI loads this module before Ray
    from cssl_ray.distributed.stream import RankSteps, StreamResources

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


def _quiet_worker(rank: int) -> None:
    """A quiet terminal (``ray_init``'s docstring), on this worker: no Ray Data progress bars (one per
    rank and stream, redrawn as new lines on the driver), and the project's warnings from rank 0 only
    (every rank has the same all-reduced counts, so each rank would print the same warnings)."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False  # the streams' Datasets copy it
    if rank:
        logging.getLogger("cssl_ray").setLevel(logging.ERROR)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Train worker (rank) of a CSSL run; ``config`` = {"config": to_dict(cfg), "weight_store": name,
    "source": the split's ``DataSource`` (None: opened here), "labellers": the pool's actors,
    "resources": ``StreamResources``, "verbose": False for a quiet terminal (``_quiet_worker``)}. Its
    Python warnings also go to ``warnings_rank<r>.json`` in the run folder when that is an absolute
    path (Tune trials: the experiment's driver shows them)."""
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
    if not config.get("verbose", True):
        _quiet_worker(rank)
    if t.num_threads > 0:
        torch.set_num_threads(t.num_threads)
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL collectives (all_gather_object too) use the current device
    col = TorchCollectives(device) if world > 1 else Collectives()

    source: DataSource = config.get("source") or open_source(cfg.data)
    shard = _RankShard(source, rank, world)  # this rank's D_L and val, read here (module docstring)
    joint = t.protocol == "joint"
    if joint:  # the joint loop's state: Mean Teacher's EMA, CPS's network B, one Adam over both
        from cssl_ray.run.joint import joint_state
        state = joint_state(cfg, device, rank)
    else:
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
    if world > 1 and t.grad_sync == "ddp":  # bucketed, overlapped all-reduces for the student's steps
        from cssl_ray.distributed.collectives import DDPCollectives
        col = DDPCollectives(device, state.model)
    if joint:
        from cssl_ray.distributed.joint_worker import broadcast_networks
        broadcast_networks(state, col)  # the EMA teacher and CPS's B start equal too

    # train.batch_size is global: this rank takes its share, for the steps of one pass over all of D_L
    sup = dict(batch_size=rank_share(t.batch_size, rank, world), steps=sup_steps(t, source.count("labelled")),
               augment=t.augment, ignore_index=cfg.pseudo.ignore_index, generator=state.streams.sup,
               precision=state.precision, scaler=state.scaler, sup_loss=t.sup_loss)

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

    if joint:  # train.protocol joint: no stage A, no labellers (cssl_ray.distributed.joint_worker)
        from cssl_ray.distributed.joint_worker import joint_rounds
        return joint_rounds(state, cfg, shard, col, validate_and_record, lambda record: _report(state, cfg, record, col))

    from cssl_ray.distributed import baseline_worker as baseline  # the baseline cells' pieces
    if not state.stage_a_done:  # stage A (skipped when resuming past it)
        pretrained = {}
        if t.method == "simclr_pretrain" and not state.history:  # before stage A's first epoch
            pretrained = baseline.pretrain_simclr(state, cfg, shard, col)
        # one report per epoch, as --local's records (MLflow curves and ASHA's round 0 alike whatever
        # the workers); only the last carries a checkpoint: stage A's end
        plan = stage_a_plan(t, source.count("labelled"))
        for epoch, n_steps in enumerate(plan):
            stats = fine_tune(n_steps)
            val = validate_and_record({"stage": "supervised", "round": 0, "epoch": epoch,
                                       "stage_a_step": sum(plan[:epoch + 1]), **stats, **pretrained})
            pretrained = {}
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

    if t.method == "cps" and state.peer is None:  # network B: seed + 1's stage A (a resume restores it)
        state.peer = baseline.trained_peer(state, shard, col)
    cssl_on = t.use_cl or t.use_cr
    while state.round < t.max_rounds:
        state.start_round()
        record: dict[str, Any] = {"stage": "round", "round": state.round}
        if t.method in ROUND_METHODS and source.count("unlabelled"):  # a baseline cell's unlabelled epoch
            record.update(baseline.baseline_round(state, cfg, shard, col))
        elif cssl_on:
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
        if state.peer is not None:  # CPS's network B: its own fine-tune epoch
            record["loss_sup_peer"] = baseline.peer_fine_tune(state, shard, col)
        state.track_best(validate_and_record(record))
        stop = state.should_stop(record)
        _report(state, cfg, record, col)
        if stop:
            break


class _RankShard:
    """This rank's slice ``[rank::world]`` of D_L and val, read from ``source`` by this worker (test
    stays with the driver). Of D_U it holds only the size of its slice (the slices are what
    ``plan.pass_shares`` expects): the rank's step tasks read the images."""

    def __init__(self, source: DataSource, rank: int, world: int) -> None:
        self.source = source
        self.labelled_images, self.labelled_masks = source.take("labelled", range(rank, source.count("labelled"), world))
        self.val_images, self.val_masks = source.take("val", range(rank, source.count("val"), world))
        self.n_unlabelled = len(range(rank, source.count("unlabelled"), world))
        self.rank, self.world = rank, world
        self._snapshot: torch.Tensor | None = None
        self._unlabelled: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def unlabelled(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's slice of D_U, images and hidden masks (None when unknown), read once and kept: the
        joint protocol's steps and the baselines' unlabelled epochs draw from it every round (CSSL's
        paper-protocol rounds stream it instead)."""
        if self._unlabelled is None:
            images, masks = self.source.take("unlabelled", range(self.rank, self.source.count("unlabelled"), self.world))
            self._unlabelled = (images, masks if self.source.hidden_known else None)
        return self._unlabelled

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
    from cssl_ray.run.plan import epoch_plan

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
    from cssl_ray.run.labelling import confidence_stats

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
    record["ranks_identical"] = metrics["ranks_identical"]  # and kept in the history (checkpoints, MLflow)
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
