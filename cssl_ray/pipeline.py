"""Ray Data: steps B and C of a CSSL round as one streaming pipeline of class-wise patches.

    D_U rows {image (C, H, W) float32, index}
      -> map_batches(PseudoLabeller)   actor pool; the latest weights from the WeightStore;
                                       adds pseudo (H, W), weights_version
      -> map_batches(sample_patch_rows) tasks; class-wise windows of the pseudo-labels
    D_L rows {image, mask (H, W), index}
      -> map_batches(attach_store_version) -> map_batches(sample_patch_rows)   (ground truth)
    union -> patch rows {patch (C, s, s) float32, patch_class, index, labelled, top, left,
                         weights_version}

The sources are any ``ray.data.Dataset`` of such rows (``image_rows`` builds one from tensors; the
dataset store's Parquet files give the same columns). The method code (``pseudo_labels``,
``patches``) stays plain torch; this module only wires it into Ray Data.

Weights: each PseudoLabeller reads the store's version per batch and reloads the state dict only
when it changed (``cssl_ray.weights``), so one Dataset object, re-executed each round, labels with
the weights of the latest round.

Reproducibility: the windows of an image are drawn with a generator seeded from
``(train.seed, round, labelled, index)`` (``patch_seed``), so the multiset of patches does not
depend on batching, actor count or execution order. ``round_=None`` takes the round from the
weights version, so a Dataset reused for every round (one Train fit) still draws new windows each
round; the arrival order of blocks is not reproducible (several actors run at once).

Shuffle: at iteration, ``iter_torch_batches(local_shuffle_buffer_size=shuffle_buffer_size(cfg))``,
not ``Dataset.random_shuffle``. A global shuffle is an all-to-all barrier: no patch leaves before
the last image is pseudo-labelled, so the trainer would wait a whole labelling pass every round.
A local buffer of a few contrastive batches keeps the stream streaming and mixes patches of many
images (one image gives ``per_class_per_image`` patches per class, contiguous in its block).

CPU budget (ENVIRONMENT.md: a stage with no CPU left waits forever): labellers hold
``labeller_cpus`` (0.5) each, a fixed pool of ``labellers``; samplers ask ``sampler_cpus`` (0.25),
at most ``samplers`` at once per branch. With Train workers at 0.5 CPU this fits a 2-CPU machine.
Each execution starts a fresh labeller pool (Ray Data does not keep actors between executions):
about 2-3 s per round here, mostly the actor's process start and torch import.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import ray.data
import torch

from cssl_ray.config import Config, from_dict, to_dict
from cssl_ray.models import create_model
from cssl_ray.patches import extract_patches, sample_windows
from cssl_ray.pseudo_labels import predict_pseudo_labels
from cssl_ray.weights import WeightsClient

Batch = dict[str, np.ndarray]
PATCH_COLUMNS = ("patch", "patch_class", "index", "labelled", "top", "left", "weights_version")


@dataclass(frozen=True)
class StreamResources:
    """Ray resources of the pipeline's stages.

    Fractional CPUs keep a 2-CPU machine from hanging, but on their own they let Ray run 1 / 0.25
    tasks per CPU, each in a fresh worker process that imports torch (Ray warned of 8 workers
    started at once, and the stream ran slower); ``samplers`` caps the concurrent tasks instead.
    """

    labellers: int = 1  # PseudoLabeller actors (a fixed pool: its CPUs are held all round)
    labeller_cpus: float = 0.5  # CPUs each labeller holds for its lifetime
    labeller_gpus: float | None = None  # None: 1 per labeller if the cluster has GPUs, else 0;
    #                                     give a fraction when Train workers hold every GPU
    samplers: int = 2  # most concurrent patch-sampling tasks per branch (see above)
    sampler_cpus: float = 0.25  # CPUs per patch-sampling task
    labeller_batch: int = 0  # images per labeller call; 0 = consistency.batch_size
    sampler_batch: int = 8  # images per sampling task


def patch_seed(seed: int, round_: int, labelled: bool, index: int) -> int:
    """Seed of one image's window draws in one round (a 64-bit hash of the four, all >= 0)."""
    return int(np.random.SeedSequence([seed, round_, int(labelled), index]).generate_state(1, np.uint64)[0])


def shuffle_buffer_size(cfg: Config, batches: int = 4) -> int:
    """``local_shuffle_buffer_size`` for iterating the stream: a few contrastive batches."""
    return batches * cfg.patches.batch_size


def image_rows(images: torch.Tensor, masks: torch.Tensor | None = None,
               indices: list[int] | None = None) -> ray.data.Dataset:
    """A Dataset of image rows from tensors: ``images (N, C, H, W)``, optional ``masks (N, H, W)``
    (labelled rows) and the images' indices (default ``0..N-1``)."""
    n = images.shape[0]
    indices = list(range(n)) if indices is None else list(indices)
    if len(indices) != n or (masks is not None and masks.shape[0] != n):
        raise ValueError(f"images ({n}), masks and indices ({len(indices)}) must have the same length")
    rows = []
    for i in range(n):
        row: dict[str, Any] = {"image": images[i].numpy().astype(np.float32), "index": int(indices[i])}
        if masks is not None:
            row["mask"] = masks[i].numpy()
        rows.append(row)
    return ray.data.from_items(rows)


def _label_dtype(cfg: Config) -> type:
    """uint8 when every class id and ignore_index fit (8x less object-store traffic), else int64."""
    ignore = cfg.pseudo.ignore_index
    return np.uint8 if cfg.data.num_classes <= 255 and 0 <= ignore <= 255 else np.int64


class PseudoLabeller:
    """``map_batches`` actor: pseudo-label a batch of images with the store's latest weights.

    Adds ``pseudo`` (B, H, W) (threshold ``pseudo.threshold``, ``ignore_index`` elsewhere) and
    ``weights_version`` (B,) int64; every other column passes through.
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

    def __call__(self, batch: Batch) -> Batch:
        version = self.weights.latest(self.model, self.min_version)  # reloads only when it changed
        images = torch.from_numpy(np.array(batch["image"], dtype=np.float32))  # (B, C, H, W), a writable copy
        p = self.cfg.pseudo
        pseudo = predict_pseudo_labels(self.model, images, p.threshold, p.ignore_index,
                                       batch_size=images.shape[0])  # (B, H, W) int64
        batch["pseudo"] = pseudo.numpy().astype(_label_dtype(self.cfg))
        batch["weights_version"] = np.full(images.shape[0], version, dtype=np.int64)
        return batch


def attach_store_version(batch: Batch, *, store_name: str) -> Batch:
    """Labelled rows: the store's version, so they draw with the round's seed and carry it."""
    batch["weights_version"] = np.full(len(batch["index"]), WeightsClient(store_name).store_version(), np.int64)
    return batch


def sample_patch_rows(batch: Batch, *, config: Mapping[str, Any], label_column: str, labelled: bool,
                      round_: int | None) -> Batch:
    """Class-wise patches of every image in ``batch``, drawn per image with ``patch_seed``.

    ``label_column`` holds the labels to sample from: ``pseudo`` (D_U) or ``mask`` (D_L, the
    ground truth). Returns patch rows (see ``PATCH_COLUMNS``); images without a valid window give
    none, and a batch without any gives an empty block. Windows come from ``sample_windows`` and
    ``extract_patches`` (exactly what ``sample_patches`` runs) so that each row keeps its position.
    """
    torch.set_num_threads(1)
    cfg = from_dict(dict(config))
    pt, ignore = cfg.patches, cfg.pseudo.ignore_index
    classes = list(range(1, cfg.data.num_classes))
    out: dict[str, list[np.ndarray]] = {k: [] for k in PATCH_COLUMNS}
    for i in range(len(batch["index"])):
        image = torch.from_numpy(np.array(batch["image"][i], dtype=np.float32))[None]  # (1, C, H, W)
        labels = torch.from_numpy(np.asarray(batch[label_column][i]).astype(np.int64))[None]  # (1, H, W)
        index, version = int(batch["index"][i]), int(batch["weights_version"][i])
        seed = patch_seed(cfg.train.seed, version if round_ is None else round_, labelled, index)
        windows = sample_windows(labels, pt.size, pt.min_pixels, per_class=pt.per_class_per_image,
                                 classes=classes, ignore_index=ignore, generator=torch.Generator().manual_seed(seed))
        patches = extract_patches(image, labels, windows, pt.size, mask=pt.mask, ignore_index=ignore)  # (P, C, s, s)
        p = patches.shape[0]
        out["patch"].append(patches.numpy())
        out["patch_class"].append(windows.classes.numpy())
        out["index"].append(np.full(p, index, np.int64))
        out["labelled"].append(np.full(p, labelled, bool))
        out["top"].append(windows.top.numpy())
        out["left"].append(windows.left.numpy())
        out["weights_version"].append(np.full(p, version, np.int64))
    if sum(len(c) for c in out["patch_class"]) == 0:
        # Ray 2.60 cannot store a 0-row (0, C, s, s) array as a tensor column; it falls back to a
        # pickled-object column whose schema clashes with the other blocks. {} is an empty block.
        return {}
    return {k: np.concatenate(v) for k, v in out.items()}


def pseudo_label_stage(cfg: Config, unlabelled_ds: ray.data.Dataset, store_name: str,
                       resources: StreamResources = StreamResources(),
                       min_version: int | None = None) -> ray.data.Dataset:
    """D_U rows -> the same rows plus ``pseudo`` and ``weights_version`` (a PseudoLabeller pool)."""
    r = resources
    gpus = r.labeller_gpus
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    return unlabelled_ds.map_batches(
        PseudoLabeller,
        fn_constructor_args=(to_dict(cfg), store_name, min_version, max(1, int(r.labeller_cpus))),
        batch_size=r.labeller_batch or cfg.consistency.batch_size,  # an explicit int: needed with GPUs
        # A fixed pool holds a known CPU budget. Ray 2.60: compute=, since `concurrency=` is deprecated.
        compute=ray.data.ActorPoolStrategy(size=r.labellers),
        num_cpus=r.labeller_cpus,
        num_gpus=gpus,
        udf_modifying_row_count=False,
    )


def build_patch_stream(cfg: Config, unlabelled_ds: ray.data.Dataset | None,
                       labelled_ds: ray.data.Dataset | None, round_: int | None = None,
                       store_name: str = "cssl_weights", *,
                       resources: StreamResources = StreamResources(),
                       min_version: int | None = None) -> ray.data.Dataset:
    """The round's stream of class-wise patch rows (unshuffled; shuffle at iteration).

    Args:
        cfg: the run's config (pseudo.threshold / ignore_index, patches.*, data.num_classes,
            train.seed).
        unlabelled_ds: D_U rows ``{image (C, H, W), index}``, pseudo-labelled here; or None.
        labelled_ds: D_L rows ``{image, mask (H, W), index}``, sampled from their ground truth;
            or None.
        round_: the round in the sampling seed; None = the weights version (for one Dataset
            re-executed every round).
        store_name: the ``WeightStore`` the labellers read (it must exist before iterating).
        resources: CPUs / GPUs / batch sizes of the stages.
        min_version: labellers refuse weights older than this (a stale-weights guard).

    Returns:
        A lazy Dataset of rows ``PATCH_COLUMNS``; every iteration re-runs the pipeline with the
        store's weights at that time.
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
    if unlabelled_ds is not None:
        streams.append(sample(pseudo_label_stage(cfg, unlabelled_ds, store_name, r, min_version), "pseudo", False))
    if labelled_ds is not None:
        versioned = labelled_ds.map_batches(attach_store_version, batch_size=r.sampler_batch, num_cpus=r.sampler_cpus,
                                            compute=ray.data.TaskPoolStrategy(size=r.samplers),
                                            fn_kwargs={"store_name": store_name}, udf_modifying_row_count=False)
        streams.append(sample(versioned, "mask", True))
    return streams[0].union(*streams[1:]) if len(streams) > 1 else streams[0]
