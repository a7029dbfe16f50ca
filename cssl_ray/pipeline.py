"""Ray Data: the labelling side of a round, as one stream of L_tot steps per rank, consumed as it arrives.

    rank r, round k:  its D_U shard in the epoch's step order (``loop.epoch_plan``)
      rows {step, index (b,)}, one row = one step: the D_U positions of its images, no pixels
      -> map_batches(label_and_sample_step)  tasks; each reads its step's images from the dataset
                                             (``DataSource.take``: the rows of the Parquet store
                                             that hold them; the driver never loads D_U), hands
                                             them to one long-lived
                                             PseudoLabeller of the run's LabellerPool (the weights
                                             of round k, read from the WeightStore), then samples the
                                             class-wise windows of their pseudo-labels
                                             (``loop.image_patches``: seeded per image)
      -> rows {step, image (b, C, H, W), patch (P, C, s, s), patch_class (P,), weights_version,
               COUNT_COLUMNS, CLASS_COUNT_COLUMNS}: the step's D_U images (for L_CR), patches and
               pseudo-label counts
    worker: ``RankSteps`` iterates the stream (``iter_batches(prefetch_batches=...)``) and yields
            each step's ``loop.StepData`` as soon as its row arrives: the step's images for L_CR,
            their patches plus the ground-truth patches of the step's D_L slice (computed in the
            worker: nothing to label), so step 1 starts after one step's labelling, not after a
            whole pass, and labelling steps k+1.. overlaps training on step k.

Synthetic data has no store: the rank makes its shard's images once (each seeded by its index; the
process keeps them) and sends each step's in its row, since Ray's short-lived task processes would
make them again and again (measured in the patch-stream benchmark: 6 task processes made 220 of the
258 images of 3 passes again, 5.1 s of generation on 2 cores).

Why the tasks read the store by row index, not ``ray.data.read_parquet`` over it: a step is a
seeded random draw of D_U images (the epoch's order), so a file-order read would need a shuffle or
a group-by per round to form the steps; reading a step's rows is one Parquet row-group read per
image at most (``Store.arrays``), in the task that needs them, and nothing passes the driver.

Why per rank and in step order, not one Dataset split by Ray Train (``streaming_split``): a step
needs ITS images' patches (the paper's batch: 816 patches from the 8 images of the step), the
ranks must run the same number of steps, and ``streaming_split(equal=True)`` may drop rows, the
pseudo-label counts among them. Each rank builds its own Dataset of its own steps, every row
arrives, in step order (``preserve_order``: a run is reproducible), and nothing depends on which
worker a row would have been split to. The labellers are the run's, shared by the ranks.

Labellers: Ray Data keeps no actors between executions, so a ``map_batches`` actor pool would start
(process, torch import, model) again every round: 2-5 s per round on a 2-core machine. Instead the
driver starts a ``LabellerPool`` of long-lived actors next to the ``WeightStore`` and closes it when
the run ends; the stream's task hands its step to the actor picked by a stable hash of the step's
first image index (``labeller_slot``), waits for the labels and samples the patches itself. Each
labeller reads the store's version per call and reloads the weights only when it changed
(``cssl_ray.weights``); every row carries the version it was labelled with, and ``RankSteps``
refuses a row of another round.

Pseudo-label statistics: each step row carries the summed counts of its images (pixels, covered
pixels, and with ``hidden_mask`` covered pixels equal to it; per class, the pixels predicted as
each class and those confident enough: ``CLASS_COUNT_COLUMNS``); a rank sums its steps' and the
sums all-reduced over ranks give ``--local``'s ``pseudo_coverage`` / ``pseudo_accuracy``
(``pseudo_stats``) and ``pseudo_coverage/<class>`` (``pseudo_labels.class_coverage``).

CPU budget (ENVIRONMENT.md: a stage with no CPU left waits forever): labellers hold
``labeller_cpus`` (0.5) each, a fixed set for the run (``placement``: in the trial's placement
group under Tune); each rank's stream runs at most ``max(samplers, 2 x labellers)`` tasks of
``sampler_cpus`` (0.25), which Ray frees while a task waits on its labeller.

The method code stays plain torch (``loop``, ``patches``, ``pseudo_labels``); this module wires it
into Ray.
"""
from __future__ import annotations

import time
import zlib
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import ray
import ray.data
import torch

from cssl_ray.config import Config, from_dict, to_dict
from cssl_ray.data.bundle import DataSource
from cssl_ray.loop import StepData, image_patches, labelled_slices
from cssl_ray.models import create_model
from cssl_ray.placement import StreamResources, labeller_group  # StreamResources: re-exported
from cssl_ray.pseudo_labels import (CONFIDENCE_BINS, class_counts, confidence_histogram, predict_pseudo_labels,
                                    rule_of)
from cssl_ray.weights import WeightsClient

Batch = dict[str, np.ndarray]
COUNT_COLUMNS = ("pseudo_pixels", "pseudo_covered", "pseudo_correct")  # per image, summed per step
CLASS_COUNT_COLUMNS = ("class_predicted", "class_confident")  # (C,) per image, summed per step
CONFIDENCE_COLUMN = "confidence_hist"  # (C * bins,) per image: pseudo_labels.confidence_histogram, summed per step
NO_PATCH = -1  # patch_class of a step row's placeholder patch when no image had a valid window


def _label_dtype(cfg: Config) -> type:
    """uint8 when every class id and ignore_index fit (8x less object-store traffic), else int64."""
    ignore = cfg.pseudo.ignore_index
    return np.uint8 if cfg.data.num_classes <= 255 and 0 <= ignore <= 255 else np.int64


class PseudoLabeller:
    """Pseudo-label a batch of images with the store's latest weights (a Ray actor's state).

    Adds ``pseudo`` (B, H, W) (threshold ``pseudo.threshold``, ``ignore_index`` elsewhere),
    ``weights_version`` (B,) int64 and the counts ``COUNT_COLUMNS`` (B,) int64; a ``hidden_mask``
    column is used for ``pseudo_correct`` and dropped; every other column passes through. Runs as a
    ``LabellerPool`` actor.
    """

    def __init__(self, config: Mapping[str, Any], store_name: str, min_version: int | None = None,
                 threads: int = 1) -> None:
        # One intra-op thread per CPU held: tiny convolutions and sample_patches gain nothing from a
        # second thread and, under contention, lose a lot (sample_patches ran 30x slower, measured).
        torch.set_num_threads(threads)
        self.cfg = from_dict(dict(config))
        d = self.cfg.data
        self.device = torch.device("cuda" if ray.get_gpu_ids() else "cpu")  # ray.get_gpu_ids: this actor's GPUs
        self.model = create_model(self.cfg.model, d.in_channels, d.num_classes).to(self.device)
        self.weights = WeightsClient(store_name)
        self.min_version = min_version

    def label(self, batch: Batch) -> Batch:
        version = self.weights.latest(self.model, self.min_version)  # reloads only when it changed
        images = torch.from_numpy(np.array(batch["image"], dtype=np.float32))  # (B, C, H, W), a writable copy
        p = self.cfg.pseudo
        pseudo, argmax, confidence = predict_pseudo_labels(self.model, images, **rule_of(p), batch_size=images.shape[0],
                                                           with_argmax=True, with_confidence=True)  # (B, H, W) each
        covered = pseudo != p.ignore_index  # (B, H, W)
        hidden = batch.pop("hidden_mask", None)
        correct = torch.zeros_like(covered)
        if hidden is not None:
            correct = covered & (pseudo == torch.from_numpy(np.asarray(hidden).astype(np.int64)))
        b = images.shape[0]
        batch["pseudo"] = pseudo.numpy().astype(_label_dtype(self.cfg))
        batch["weights_version"] = np.full(b, version, dtype=np.int64)
        batch["pseudo_pixels"] = np.full(b, pseudo[0].numel() if b else 0, dtype=np.int64)
        batch["pseudo_covered"] = covered.flatten(1).sum(1).numpy().astype(np.int64)
        batch["pseudo_correct"] = correct.flatten(1).sum(1).numpy().astype(np.int64)
        c = self.cfg.data.num_classes
        per_image = [class_counts(pseudo[i], argmax[i], c) for i in range(b)]  # (predicted, confident) each (C,)
        for j, k in enumerate(CLASS_COUNT_COLUMNS):
            batch[k] = np.stack([counts[j].numpy() for counts in per_image]).astype(np.int64).reshape(b, c)  # (B, C)
        batch[CONFIDENCE_COLUMN] = np.stack([confidence_histogram(argmax[i], confidence[i], c).flatten().numpy()
                                             for i in range(b)]).astype(np.int64).reshape(b, -1)  # (B, C * bins)
        return batch

    def loaded_version(self) -> int:
        """The weights version in the model (-1 before the first batch)."""
        return self.weights.version


class LabellerPool:
    """``resources.labellers`` long-lived PseudoLabeller actors: started once, used by every rank's
    step stream of every round (``RankSteps``), stopped by ``close()``.

    Create it in the driver, next to the ``WeightStore``; it lives until ``close()`` or the driver's
    end. A labeller whose process dies is restarted by Ray (it reloads the store's weights) and the
    call retried: labelling is idempotent.

    Placement: actor i runs in bundle ``first + i`` of a placement group whose last
    ``resources.labellers`` bundles are ``resources.labeller_bundles()``. ``placement_group``: a
    Tune trial's (``placement.trial_bundles`` puts the labellers after the driver's bundle), so Tune
    admits a trial only when its labellers fit; None = the pool reserves a group of its own
    (``placement.labeller_group``: it waits until the cluster has the resources, so a GPU labeller
    waits for a GPU node, never falls back to a CPU) and removes it on ``close()``.
    """

    def __init__(self, cfg: Config, store_name: str, resources: StreamResources = StreamResources(),
                 min_version: int | None = None, placement_group: Any = None) -> None:
        if resources.labellers < 1:
            raise ValueError(f"resources.labellers must be >= 1, got {resources.labellers}")
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self._own_group = placement_group is None
        group = labeller_group(resources, log=print) if placement_group is None else placement_group
        first = len(group.bundle_specs) - resources.labellers
        if first < 0 or group.bundle_specs[first:] != resources.labeller_bundles():
            raise ValueError(f"the placement group's last bundles {group.bundle_specs[max(first, 0):]} are not the "
                             f"labellers' {resources.labeller_bundles()}")
        self.placement_group = group
        remote = ray.remote(PseudoLabeller)
        options = dict(num_cpus=resources.labeller_cpus, num_gpus=resources.labeller_gpus, max_restarts=2,
                       max_task_retries=2)
        args = (to_dict(cfg), store_name, min_version, max(1, int(resources.labeller_cpus)))
        self.actors: list[ray.actor.ActorHandle] = [
            remote.options(scheduling_strategy=PlacementGroupSchedulingStrategy(group, first + i), **options)
            .remote(*args) for i in range(resources.labellers)]

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        if self._own_group and self.placement_group is not None:
            from ray.util.placement_group import remove_placement_group
            remove_placement_group(self.placement_group)
        self.placement_group = None

    def __enter__(self) -> LabellerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def labeller_slot(index: int, n: int) -> int:
    """The labeller (0..n-1) of a batch whose first image has ``index``: a stable hash, since batches
    of consecutive indices would all land on one labeller with ``index % n``."""
    return zlib.crc32(int(index).to_bytes(8, "little", signed=True)) % n


def pseudo_stats(counts: Mapping[str, int | float], with_accuracy: bool) -> dict[str, float]:
    """``--local``'s round statistics from summed counts: ``pseudo_coverage`` (covered / pixels; 0
    without pixels) and, ``with_accuracy`` (hidden ground truth known), ``pseudo_accuracy`` (correct /
    covered; 0 when nothing is covered), as ``loop.round_patches`` computes them."""
    pixels, covered = counts["pseudo_pixels"], counts["pseudo_covered"]
    out = {"pseudo_coverage": float(covered) / pixels if pixels else 0.0}
    if with_accuracy:
        out["pseudo_accuracy"] = float(counts["pseudo_correct"]) / max(covered, 1)
    return out


def label_and_sample_step(batch: Batch, *, actors: list[ray.actor.ActorHandle], config: Mapping[str, Any],
                          round_: int, source: DataSource) -> Batch:
    """``map_batches`` task (one row = one step): read the step's D_U images from ``source``,
    pseudo-label them on a labeller of the pool, then sample their class-wise patches. Returns one
    row: the images, the patches (a single placeholder of class ``NO_PATCH`` when no image has a
    valid window: Ray 2.60 cannot store a 0-length tensor column), the version the images were
    labelled with and the summed counts."""
    torch.set_num_threads(1)
    cfg = from_dict(dict(config))
    index = np.asarray(batch["index"][0], dtype=np.int64)  # (b,) D_U positions
    if "image" in batch:  # synthetic: the rank made its shard's images once and sends them in the row
        # (b, C, H, W); a copy: Ray Data hands read-only arrays, torch.from_numpy wants writable ones
        images = np.array(batch["image"][0], dtype=np.float32)
        hidden = np.asarray(batch["hidden_mask"][0]) if "hidden_mask" in batch else None
    else:  # a dataset store: this task reads the step's rows
        x, masks = source.take("unlabelled", index)  # (b, C, H, W), (b, H, W) or None
        images, hidden = x.numpy(), (masks.numpy() if masks is not None else None)
    request: Batch = {"image": images, "index": index}
    if source.hidden_known and hidden is not None:  # pseudo-label accuracy (diagnostics only)
        request["hidden_mask"] = hidden
    actor = actors[labeller_slot(int(index[0]), len(actors))]
    labelled = ray.get(actor.label.remote(request))
    pseudo = torch.from_numpy(np.asarray(labelled["pseudo"]).astype(np.int64))  # (b, H, W)
    patches, classes = image_patches(cfg, torch.from_numpy(images), pseudo, index.tolist(), round_, labelled=False)
    if classes.numel() == 0:
        patches = torch.zeros((1, images.shape[1], cfg.patches.size, cfg.patches.size))
        classes = torch.full((1,), NO_PATCH, dtype=torch.int64)
    out: Batch = {"step": np.asarray(batch["step"][:1], np.int64), "image": images[None],
                  "patch": patches.numpy()[None], "patch_class": classes.numpy()[None],
                  "weights_version": np.asarray([int(np.min(labelled["weights_version"]))], np.int64)}
    for k in COUNT_COLUMNS:
        out[k] = np.asarray([int(np.sum(labelled[k]))], np.int64)
    for k in (*CLASS_COUNT_COLUMNS, CONFIDENCE_COLUMN):
        out[k] = np.asarray(labelled[k]).sum(0, keepdims=True).astype(np.int64)  # (1, C) / (1, C * bins)
    return out


def step_stream(cfg: Config, steps: list[dict[str, Any]], actors: list[ray.actor.ActorHandle], round_: int,
                source: DataSource, resources: StreamResources = StreamResources()) -> ray.data.Dataset:
    """The Dataset of one rank's steps: ``steps`` are rows {step, index (b,)} (D_U positions of
    ``source``) in step order, one block each; labelled by ``actors``."""
    if not actors:
        raise ValueError("step_stream needs the run's labeller actors")
    ds = ray.data.from_items(steps, override_num_blocks=max(len(steps), 1))
    ds = ds.map_batches(label_and_sample_step, batch_size=1, num_cpus=resources.sampler_cpus,
                        # one step labelling, one queued at each labeller: the stream runs ahead
                        compute=ray.data.TaskPoolStrategy(size=min(max(resources.samplers, 2 * len(actors)),
                                                                   max(len(steps), 1))),
                        fn_kwargs={"actors": actors, "config": to_dict(cfg), "round_": round_, "source": source})
    ds.context.execution_options.preserve_order = True  # this Dataset's own context: rows in step order
    if not cfg.train.progress:
        ds.context.enable_progress_bars = False
    return ds


class RankSteps:
    """This rank's steps of one L_tot epoch, streamed: iterate it once (``loop.cssl_epoch``'s
    ``steps``). After the epoch, ``counts`` holds the summed pseudo-label counts of the steps that
    ran (``pipeline.COUNT_COLUMNS`` and the per-class vectors) and ``wait_s`` / ``first_wait_s`` the
    time spent waiting on the stream (all steps / the first step, which includes the stream's
    start)."""

    def __init__(self, cfg: Config, round_: int, plan: list[torch.Tensor], *, rank: int, world: int,
                 source: DataSource, labelled_images: torch.Tensor, labelled_masks: torch.Tensor,
                 actors: list[ray.actor.ActorHandle], resources: StreamResources = StreamResources(),
                 prefetch_steps: int = 2) -> None:
        """``plan``: the steps' positions in this rank's D_U shard ``[rank::world]`` of ``source``;
        ``labelled_images`` / ``labelled_masks``: the rank's D_L shard (its patches are cut here)."""
        self.cfg, self.round, self.plan, self.rank, self.world = cfg, round_, plan, rank, world
        self.labelled_images, self.labelled_masks = labelled_images, labelled_masks
        self.prefetch_steps = prefetch_steps
        rows: list[dict[str, Any]] = [{"step": k, "index": (rank + world * pos).numpy()} for k, pos in enumerate(plan)]
        if source.store is None and rows:  # synthetic: no store to read; the rank's images go in the rows
            for row in rows:
                x, masks = source.take("unlabelled", row["index"])  # made once per rank (the row cache)
                row["image"] = x.numpy()
                if masks is not None and source.hidden_known:
                    row["hidden_mask"] = masks.numpy()
        self.dataset = step_stream(cfg, rows, actors, round_, source, resources) if rows else None
        c = cfg.data.num_classes
        self.counts: dict[str, Any] = {**dict.fromkeys(COUNT_COLUMNS, 0),
                                       **{k: np.zeros(c, np.int64) for k in CLASS_COUNT_COLUMNS},
                                       CONFIDENCE_COLUMN: np.zeros(c * CONFIDENCE_BINS, np.int64)}
        self.wait_s = self.first_wait_s = 0.0
        self.patches = 0

    def __iter__(self) -> Iterator[StepData]:
        if self.dataset is None:
            return
        rows = iter(self.dataset.iter_batches(batch_size=None, prefetch_batches=self.prefetch_steps,
                                              batch_format="numpy"))
        n_l = self.labelled_images.shape[0]
        slices = labelled_slices(n_l, len(self.plan))
        for k, l_pos in enumerate(slices):
            started = time.perf_counter()
            row = next(rows)
            waited = time.perf_counter() - started
            self.wait_s += waited
            if k == 0:
                self.first_wait_s = waited
            if int(row["step"][0]) != k:
                raise RuntimeError(f"round {self.round}: step {int(row['step'][0])} arrived as step {k}")
            if int(row["weights_version"][0]) != self.round:
                raise RuntimeError(f"round {self.round}: step {k} was labelled with weights version "
                                   f"{int(row['weights_version'][0])}")
            for key in COUNT_COLUMNS:
                self.counts[key] += int(row[key][0])
            for key in (*CLASS_COUNT_COLUMNS, CONFIDENCE_COLUMN):
                self.counts[key] = self.counts[key] + np.asarray(row[key][0], np.int64)
            u_c = torch.from_numpy(np.array(row["patch_class"][0], np.int64))  # copies: Ray's blocks are read-only
            u_p = torch.from_numpy(np.array(row["patch"][0], np.float32))[u_c != NO_PATCH]
            u_c = u_c[u_c != NO_PATCH]
            l_p, l_c = image_patches(self.cfg, self.labelled_images[l_pos], self.labelled_masks[l_pos],
                                     self.rank + self.world * l_pos, self.round, labelled=True)
            self.patches += u_c.numel() + l_c.numel()
            images = torch.from_numpy(np.array(row["image"][0], np.float32))  # (b, C, H, W)
            yield StepData(images, torch.cat([l_p, u_p]), torch.cat([l_c, u_c]))
