"""Ray Data: steps B and C of a CSSL round as one streaming pipeline of class-wise patches.

    D_U rows {image (C, H, W) float32, index[, hidden_mask (H, W)]}
      -> map_batches(label_and_sample_rows)  tasks; each hands its batch to one PseudoLabeller
                                             actor of a LabellerPool, started ONCE per run (not per
                                             round), which adds pseudo (H, W), weights_version and
                                             pixel counts; then samples class-wise windows of the
                                             pseudo-labels itself (sample_patch_rows)
    D_L rows {image, mask (H, W), index}
      -> map_batches(attach_store_version) -> map_batches(sample_patch_rows)   (ground truth)
    union -> rows {patch (C, s, s) float32, patch_class, index, labelled, top, left, weights_version,
                   pseudo_pixels, pseudo_covered, pseudo_correct}

The sources are any ``ray.data.Dataset`` of such rows (``image_rows`` builds one from tensors; the
dataset store's Parquet files give the same columns). The method code (``pseudo_labels``,
``patches``) stays plain torch; this module only wires it into Ray Data.

Labellers: Ray Data keeps no actors between executions, so a ``map_batches`` actor pool would start
(process, torch import, model) again every round: 2-5 s per round on a 2-core machine. Instead the
caller starts a ``LabellerPool`` of long-lived actors next to the ``WeightStore`` and closes it when
the run ends; the Ray Data stage is a task that forwards its batch to the actor picked by a stable
hash of the batch's first image index, waits for the labelled batch and samples its patches. Doing
both in one task matters: a separate forwarding stage (forward -> sampler tasks) ran no faster than
the per-execution pool (more concurrent tasks than Ray keeps worker processes for, each new one
importing torch); the one-stage form ran a pass in about half the time (benchmarks/patch_stream.py).
Without a pool (``labellers=None``) the stage is the per-execution Ray Data actor pool followed by
sampling tasks, for one-shot streams.

Weights: each PseudoLabeller reads the store's version per batch and reloads the state dict only
when it changed (``cssl_ray.weights``), so one Dataset object, re-executed each round, labels with
the weights of the latest round, and every row carries the version it was labelled with.

Pseudo-label statistics: besides its patch rows, every D_U image gives ONE stats row
(``patch_class == STATS_CLASS``, a zero patch) with its pixel count, covered pixels (not
``ignore_index``) and, when the rows carry ``hidden_mask``, covered pixels equal to it; patch rows
count 0. A rank sums the counts of its shard and drops the stats rows (``split_stats_rows``); the
sums all-reduced over ranks give ``--local``'s ``pseudo_coverage`` / ``pseudo_accuracy``
(``pseudo_stats``), images without any patch included. Per class, the stats row also carries
``CLASS_COUNT_COLUMNS`` ((C,) vectors: pixels predicted as each class, and those confident enough to
be pseudo-labelled), for ``--local``'s ``pseudo_coverage/<class>`` (``pseudo_labels.class_coverage``).

Reproducibility: the windows of an image are drawn with a generator seeded from
``(train.seed, round, labelled, index)`` (``patch_seed``), so the multiset of patches does not
depend on batching, actor count or execution order. ``round_=None`` takes the round from the
weights version, so a Dataset reused for every round (one Train fit) still draws new windows each
round; the arrival order of blocks is not reproducible (several actors run at once).

Shuffle: at iteration, ``iter_torch_batches(local_shuffle_buffer_size=shuffle_buffer_size(cfg))``,
not ``Dataset.random_shuffle``. A global shuffle is an all-to-all barrier: no patch leaves before
the last image is pseudo-labelled, so the trainer would wait a whole labelling pass every round.
A local buffer of a few contrastive batches keeps the stream streaming and mixes patches of many
images (one image gives ``patches.per_image`` patches, split over its classes, contiguous in its block).

CPU budget (ENVIRONMENT.md: a stage with no CPU left waits forever): labellers hold
``labeller_cpus`` (0.5) each, a fixed set of ``labellers``, for the run; sampling tasks (the D_U
ones also forward to a labeller, and Ray frees their CPU while they wait on it) ask
``sampler_cpus`` (0.25), at most ``samplers`` at once per branch (D_U: at least 2 per labeller, so
the next batch is queued at the actor while it labels one). With Train workers at 0.5 CPU this
fits a 2-CPU machine.
"""
from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import ray
import ray.data
import torch

from cssl_ray.config import Config, from_dict, to_dict
from cssl_ray.models import create_model
from cssl_ray.patches import extract_patches, sample_windows
from cssl_ray.placement import StreamResources, labeller_group  # StreamResources: re-exported
from cssl_ray.pseudo_labels import class_counts, predict_pseudo_labels
from cssl_ray.weights import WeightsClient

Batch = dict[str, np.ndarray]
PATCH_COLUMNS = ("patch", "patch_class", "index", "labelled", "top", "left", "weights_version")
COUNT_COLUMNS = ("pseudo_pixels", "pseudo_covered", "pseudo_correct")  # per D_U image, on its stats row
CLASS_COUNT_COLUMNS = ("class_predicted", "class_confident")  # (C,) per D_U image, on its stats row
STREAM_COLUMNS = PATCH_COLUMNS + COUNT_COLUMNS + CLASS_COUNT_COLUMNS
STATS_CLASS = -1  # patch_class of a stats row (no patch; see the module docstring)


def patch_seed(seed: int, round_: int, labelled: bool, index: int) -> int:
    """Seed of one image's window draws in one round (a 64-bit hash of the four, all >= 0)."""
    return int(np.random.SeedSequence([seed, round_, int(labelled), index]).generate_state(1, np.uint64)[0])


def shuffle_buffer_size(cfg: Config, batches: int = 4) -> int:
    """``local_shuffle_buffer_size`` for iterating the stream: a few contrastive batches."""
    return batches * cfg.patches.batch_size


def image_rows(images: torch.Tensor, masks: torch.Tensor | None = None,
               indices: list[int] | None = None, hidden: torch.Tensor | None = None) -> ray.data.Dataset:
    """A Dataset of image rows from tensors: ``images (N, C, H, W)``, optional ``masks (N, H, W)``
    (labelled rows), the images' indices (default ``0..N-1``) and optional ``hidden (N, H, W)``
    ground truth of unlabelled rows (``hidden_mask``: pseudo-label accuracy only, never trained on)."""
    n = images.shape[0]
    indices = list(range(n)) if indices is None else list(indices)
    if len(indices) != n or any(t is not None and t.shape[0] != n for t in (masks, hidden)):
        raise ValueError(f"images ({n}), masks, hidden and indices ({len(indices)}) must have the same length")
    rows = []
    for i in range(n):
        row: dict[str, Any] = {"image": images[i].numpy().astype(np.float32), "index": int(indices[i])}
        if masks is not None:
            row["mask"] = masks[i].numpy()
        if hidden is not None:
            row["hidden_mask"] = hidden[i].numpy()
        rows.append(row)
    return ray.data.from_items(rows)


def _label_dtype(cfg: Config) -> type:
    """uint8 when every class id and ignore_index fit (8x less object-store traffic), else int64."""
    ignore = cfg.pseudo.ignore_index
    return np.uint8 if cfg.data.num_classes <= 255 and 0 <= ignore <= 255 else np.int64


class PseudoLabeller:
    """Pseudo-label a batch of images with the store's latest weights (a Ray actor's state).

    Adds ``pseudo`` (B, H, W) (threshold ``pseudo.threshold``, ``ignore_index`` elsewhere),
    ``weights_version`` (B,) int64 and the counts ``COUNT_COLUMNS`` (B,) int64; a ``hidden_mask``
    column is used for ``pseudo_correct`` and dropped; every other column passes through. Runs as a
    ``LabellerPool`` actor (``label``) or as a Ray Data ``map_batches`` class (``__call__``).
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
        pseudo, argmax = predict_pseudo_labels(self.model, images, p.threshold, p.ignore_index,
                                               batch_size=images.shape[0], with_argmax=True)  # (B, H, W) each
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
        return batch

    __call__ = label  # Ray Data's map_batches calls the instance

    def loaded_version(self) -> int:
        """The weights version in the model (-1 before the first batch)."""
        return self.weights.version


class LabellerPool:
    """``resources.labellers`` long-lived PseudoLabeller actors: started once, used by every execution
    of a stream built with them (``build_patch_stream(labellers=...)``), stopped by ``close()``.

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


def label_on_pool(batch: Batch, *, actors: list[ray.actor.ActorHandle]) -> Batch:
    """``map_batches`` task: the batch labelled by one of the pool's actors (``PseudoLabeller.label``)."""
    actor = actors[labeller_slot(int(batch["index"][0]), len(actors))]
    return ray.get(actor.label.remote(batch))


def label_and_sample_rows(batch: Batch, *, actors: list[ray.actor.ActorHandle], config: Mapping[str, Any],
                          round_: int | None) -> Batch:
    """``map_batches`` task of the D_U branch with a pool: ``label_on_pool``, then ``sample_patch_rows``."""
    return sample_patch_rows(label_on_pool(batch, actors=actors), config=config, label_column="pseudo",
                             labelled=False, round_=round_)


def attach_store_version(batch: Batch, *, store_name: str) -> Batch:
    """Labelled rows: the store's version, so they draw with the round's seed and carry it."""
    batch["weights_version"] = np.full(len(batch["index"]), WeightsClient(store_name).store_version(), np.int64)
    return batch


def sample_patch_rows(batch: Batch, *, config: Mapping[str, Any], label_column: str, labelled: bool,
                      round_: int | None) -> Batch:
    """Class-wise patches of every image in ``batch``, drawn per image with ``patch_seed``.

    ``label_column`` holds the labels to sample from: ``pseudo`` (D_U) or ``mask`` (D_L, the
    ground truth). Returns rows ``STREAM_COLUMNS``: the patch rows (counts 0) and, for a batch that
    carries ``COUNT_COLUMNS`` (pseudo-labelled), one stats row per image. Images without a valid
    window give no patch row, and a batch without any row gives an empty block. Windows come from
    ``sample_windows`` and ``extract_patches`` (exactly what ``sample_patches`` runs) so that each
    row keeps its position.
    """
    torch.set_num_threads(1)
    cfg = from_dict(dict(config))
    pt, ignore = cfg.patches, cfg.pseudo.ignore_index
    classes = list(range(1, cfg.data.num_classes))
    stats = all(k in batch for k in COUNT_COLUMNS)
    class_stats = all(k in batch for k in CLASS_COUNT_COLUMNS)
    out: dict[str, list[np.ndarray]] = {k: [] for k in STREAM_COLUMNS}

    n_classes = cfg.data.num_classes

    def add(patches: np.ndarray, patch_class: np.ndarray, index: int, version: int, top: np.ndarray,
            left: np.ndarray, counts: tuple[int, int, int] = (0, 0, 0),
            image_class_counts: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        p = patches.shape[0]
        for k, v in (("patch", patches), ("patch_class", patch_class), ("top", top), ("left", left)):
            out[k].append(v)
        for j, k in enumerate(CLASS_COUNT_COLUMNS):  # (p, C): the image's vectors on its stats row, else 0
            out[k].append(np.zeros((p, n_classes), np.int64) if image_class_counts is None
                          else np.broadcast_to(image_class_counts[j], (p, n_classes)).astype(np.int64))
        for k, v in (("index", index), ("labelled", labelled), ("weights_version", version),
                     *zip(COUNT_COLUMNS, counts)):
            out[k].append(np.full(p, v, bool if k == "labelled" else np.int64))

    for i in range(len(batch["index"])):
        image = torch.from_numpy(np.array(batch["image"][i], dtype=np.float32))[None]  # (1, C, H, W)
        labels = torch.from_numpy(np.asarray(batch[label_column][i]).astype(np.int64))[None]  # (1, H, W)
        index, version = int(batch["index"][i]), int(batch["weights_version"][i])
        seed = patch_seed(cfg.train.seed, version if round_ is None else round_, labelled, index)
        windows = sample_windows(labels, pt.size, pt.min_pixels, per_class=pt.windows_per_class(cfg.data.num_classes),
                                 classes=classes, ignore_index=ignore, generator=torch.Generator().manual_seed(seed))
        patches = extract_patches(image, labels, windows, pt.size, mask=pt.mask, ignore_index=ignore)  # (P, C, s, s)
        add(patches.numpy(), windows.classes.numpy(), index, version, windows.top.numpy(), windows.left.numpy())
        if stats:
            none = np.full(1, -1, np.int64)
            add(np.zeros((1, image.shape[1], pt.size, pt.size), np.float32), np.full(1, STATS_CLASS, np.int64),
                index, version, none, none, tuple(int(batch[k][i]) for k in COUNT_COLUMNS),
                tuple(np.asarray(batch[k][i]) for k in CLASS_COUNT_COLUMNS) if class_stats else None)
    if sum(len(c) for c in out["patch_class"]) == 0:
        # Ray 2.60 cannot store a 0-row (0, C, s, s) array as a tensor column; it falls back to a
        # pickled-object column whose schema clashes with the other blocks. {} is an empty block.
        return {}
    return {k: np.concatenate(v) for k, v in out.items()}


def split_stats_rows(cols: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Collected stream columns (numpy arrays or torch tensors, equal length) -> (the patch rows only,
    the summed ``COUNT_COLUMNS`` (ints) and, where present, ``CLASS_COUNT_COLUMNS`` ((C,) lists)).
    Columns without the counts give counts of 0 (class vectors: absent)."""
    keep = cols["patch_class"] >= 0
    counts: dict[str, Any] = {k: int(cols[k].sum()) if k in cols else 0 for k in COUNT_COLUMNS}
    for k in CLASS_COUNT_COLUMNS:
        if k in cols and len(cols[k]):
            counts[k] = [int(v) for v in cols[k].sum(0)]
    return {k: v[keep] for k, v in cols.items()}, counts


def pseudo_stats(counts: Mapping[str, int | float], with_accuracy: bool) -> dict[str, float]:
    """``--local``'s round statistics from summed counts: ``pseudo_coverage`` (covered / pixels; 0
    without pixels) and, ``with_accuracy`` (hidden ground truth known), ``pseudo_accuracy`` (correct /
    covered; 0 when nothing is covered), as ``loop.round_patches`` computes them."""
    pixels, covered = counts["pseudo_pixels"], counts["pseudo_covered"]
    out = {"pseudo_coverage": float(covered) / pixels if pixels else 0.0}
    if with_accuracy:
        out["pseudo_accuracy"] = float(counts["pseudo_correct"]) / max(covered, 1)
    return out


def pseudo_label_stage(cfg: Config, unlabelled_ds: ray.data.Dataset, store_name: str,
                       resources: StreamResources = StreamResources(), min_version: int | None = None,
                       labellers: LabellerPool | None = None) -> ray.data.Dataset:
    """D_U rows -> the same rows plus ``pseudo``, ``weights_version`` and ``COUNT_COLUMNS``.

    With ``labellers``: tasks forwarding each batch to the pool's long-lived actors (``store_name``
    and ``min_version`` are the pool's). Without: a Ray Data actor pool, started afresh on every
    execution of the Dataset (fine for one pass; 2-5 s per round for a Dataset re-run each round).
    """
    r = resources
    batch_size = r.labeller_batch or cfg.consistency.batch_size  # an explicit int: needed with GPUs
    if labellers is not None:
        return unlabelled_ds.map_batches(label_on_pool, fn_kwargs={"actors": _live(labellers)}, batch_size=batch_size,
                                         num_cpus=r.sampler_cpus, compute=_forwarders(r, labellers),
                                         udf_modifying_row_count=False)
    return unlabelled_ds.map_batches(
        PseudoLabeller,
        fn_constructor_args=(to_dict(cfg), store_name, min_version, max(1, int(r.labeller_cpus))),
        batch_size=batch_size,
        # A fixed pool holds a known CPU budget. Ray 2.60: compute=, since `concurrency=` is deprecated.
        compute=ray.data.ActorPoolStrategy(size=r.labellers),
        num_cpus=r.labeller_cpus,
        num_gpus=r.labeller_gpus,
        udf_modifying_row_count=False,
    )


def _live(labellers: LabellerPool) -> list[ray.actor.ActorHandle]:
    if not labellers.actors:
        raise ValueError("the LabellerPool is closed")
    return labellers.actors


def _forwarders(r: StreamResources, labellers: LabellerPool) -> ray.data.TaskPoolStrategy:
    """Concurrent forwarding tasks: ``samplers``, and at least 2 per labeller (one labelling, one queued)."""
    return ray.data.TaskPoolStrategy(size=max(r.samplers, 2 * len(labellers.actors)))


def build_patch_stream(cfg: Config, unlabelled_ds: ray.data.Dataset | None,
                       labelled_ds: ray.data.Dataset | None, round_: int | None = None,
                       store_name: str = "cssl_weights", *,
                       resources: StreamResources = StreamResources(),
                       min_version: int | None = None,
                       labellers: LabellerPool | None = None) -> ray.data.Dataset:
    """The round's stream of class-wise patch rows and D_U stats rows (unshuffled; shuffle at iteration).

    Args:
        cfg: the run's config (pseudo.threshold / ignore_index, patches.*, data.num_classes,
            train.seed).
        unlabelled_ds: D_U rows ``{image (C, H, W), index[, hidden_mask (H, W)]}``, pseudo-labelled
            here; or None.
        labelled_ds: D_L rows ``{image, mask (H, W), index}``, sampled from their ground truth;
            or None.
        round_: the round in the sampling seed; None = the weights version (for one Dataset
            re-executed every round).
        store_name: the ``WeightStore`` the labellers read (it must exist before iterating).
        resources: CPUs / GPUs / batch sizes of the stages.
        min_version: labellers refuse weights older than this (a stale-weights guard; a pool's
            own setting when ``labellers`` is given).
        labellers: long-lived labeller actors (a Dataset re-executed every round should get them);
            None = a Ray Data actor pool started on every execution.

    Returns:
        A lazy Dataset of rows ``STREAM_COLUMNS`` (drop the stats rows with ``split_stats_rows``);
        every iteration re-runs the pipeline with the store's weights at that time.
    """
    if unlabelled_ds is None and labelled_ds is None:
        raise ValueError("build_patch_stream needs unlabelled_ds, labelled_ds or both")
    r = resources
    config = to_dict(cfg)

    def sample(ds: ray.data.Dataset, label_column: str, labelled: bool) -> ray.data.Dataset:
        return ds.map_batches(sample_patch_rows, batch_size=r.sampler_batch, num_cpus=r.sampler_cpus,
                              compute=ray.data.TaskPoolStrategy(size=r.samplers),
                              fn_kwargs={"config": config, "label_column": label_column,
                                         "labelled": labelled, "round_": round_})

    streams = []
    if unlabelled_ds is not None and labellers is not None:  # one stage: label on the pool, sample here
        streams.append(unlabelled_ds.map_batches(
            label_and_sample_rows, fn_kwargs={"actors": _live(labellers), "config": config, "round_": round_},
            batch_size=r.labeller_batch or cfg.consistency.batch_size, num_cpus=r.sampler_cpus,
            compute=_forwarders(r, labellers)))
    elif unlabelled_ds is not None:
        streams.append(sample(pseudo_label_stage(cfg, unlabelled_ds, store_name, r, min_version), "pseudo", False))
    if labelled_ds is not None:
        versioned = labelled_ds.map_batches(attach_store_version, batch_size=r.sampler_batch, num_cpus=r.sampler_cpus,
                                            compute=ray.data.TaskPoolStrategy(size=r.samplers),
                                            fn_kwargs={"store_name": store_name}, udf_modifying_row_count=False)
        streams.append(sample(versioned, "mask", True))
    return streams[0].union(*streams[1:]) if len(streams) > 1 else streams[0]
