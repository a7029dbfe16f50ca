"""Which images and patches each L_tot step takes: the steps of an epoch over D_U (equal on every
rank), each rank's share of them, and the windows and patches cut from a step's images, seeded by
(seed, round, labelled, index) so one process and N ranks cut the same patches. Plain torch, no Ray."""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from cssl_ray.config import Config
from cssl_ray.data.batches import labelled_slices
from cssl_ray.method.collectives import Collectives, positions_of_rank
from cssl_ray.method.patches import extract_patches, seeded_patches
from cssl_ray.method.streams import RandomStreams
from cssl_ray.method.windows import PatchWindows, seeded_windows


def l_tot_steps(n_unlabelled: int, cfg: Config, world: int = 1) -> int:
    """Steps of one L_tot epoch: ``train.round_passes`` passes over D_U (all ranks' images,
    ``n_unlabelled``) in global batches of ``consistency.batch_size``, capped by
    ``train.steps_per_round`` (> 0). The same for every cell with L_CL or L_CR, so the ablation
    compares losses, not amounts of work."""
    n = _pass_batches(n_unlabelled, cfg.consistency.batch_size, world) * cfg.train.round_passes
    return min(n, cfg.train.steps_per_round) if cfg.train.steps_per_round > 0 else n


def _pass_batches(n: int, batch_size: int, world: int) -> int:
    """Global batches of one pass over ``n`` items: ceil(n / batch_size), except that a last batch
    with fewer items than ranks joins the one before (every rank needs an item at every step;
    never with one rank)."""
    steps = math.ceil(n / batch_size)
    return steps - 1 if steps > 1 and n - (steps - 1) * batch_size < world else steps


def pass_shares(n_local: int, n_global: int, batch_size: int, rank: int, world: int,
                generator: torch.Generator | None = None) -> list[Tensor]:
    """This rank's part of every global batch of one shuffled pass over D_U.

    The pass's global batches are ``batch_size`` consecutive positions of ``n_global`` (the last
    one smaller, ``_pass_batches``); position p belongs to rank p % world, and this rank holds the
    images ``[rank::world]`` (``n_local`` of them), shuffled by ``generator``. One rank: the
    shuffled pass split into batches of ``batch_size``."""
    if batch_size < world:
        raise ValueError(f"a global batch of {batch_size} cannot give each of {world} ranks an item")
    steps = _pass_batches(n_global, batch_size, world)
    bounds = [k * batch_size for k in range(steps)] + [n_global]
    sizes = [positions_of_rank(a, b, rank, world) for a, b in zip(bounds[:-1], bounds[1:])]
    if sum(sizes) != n_local:
        raise ValueError(f"rank {rank} of {world} holds {n_local} of {n_global} images; its share is {sum(sizes)}")
    return list(torch.randperm(n_local, generator=generator).split(sizes)) if n_local else []


@dataclass
class StepData:
    """One L_tot step's inputs on one rank.

    ``unlabelled`` (b, C, H, W): this rank's share of the step's L_CR batch. ``patches``
    (P, C, s, s) and ``classes`` (P,): the step's patch pool, the class-wise windows of those
    images (their pseudo-labels) and of a slice of D_L (ground truth), from which the step's
    class-balanced contrastive batch is drawn; ``patches.per_image`` windows per image give the
    paper's density (816 patches from 8 images)."""

    unlabelled: Tensor
    patches: Tensor
    classes: Tensor


def epoch_plan(n_unlabelled: int, cfg: Config, streams: RandomStreams,
               collectives: Collectives | None = None) -> list[Tensor]:
    """This rank's D_U positions of every step of one L_tot epoch (``train.round_passes`` shuffled
    passes over D_U in global batches, ``pass_shares``; ``l_tot_steps`` steps, agreed by every rank).
    Draws the passes from ``streams.cr``."""
    col = collectives or Collectives()
    n_global = int(col.sum_(torch.tensor([n_unlabelled], dtype=torch.int64)).item())
    n_steps = col.agree_steps(l_tot_steps(n_global, cfg, col.world_size)) if n_global else 0
    if not n_steps:
        return []
    plan: list[Tensor] = []
    while len(plan) < n_steps:
        plan += pass_shares(n_unlabelled, n_global, cfg.consistency.batch_size, col.rank, col.world_size, streams.cr)
    return plan[:n_steps]


def image_patches(cfg: Config, images: Tensor, labels: Tensor, indices: Tensor | list[int], round_: int,
                  labelled: bool) -> tuple[Tensor, Tensor]:
    """``patches.seeded_patches`` with the run's settings: the class-wise patches (P, C, s, s) and
    classes (P,) of these images in this round, the same in every path."""
    pt = cfg.patches
    patches, classes, _ = seeded_patches(
        images, labels, [int(i) for i in indices], size=pt.size, min_pixels=pt.min_pixels,
        per_image=pt.per_image, classes=list(range(1, cfg.data.num_classes)),
        seed=cfg.train.seed, round_=round_, labelled=labelled, mask=pt.mask, ignore_index=cfg.pseudo.ignore_index)
    return patches, classes


def image_windows(cfg: Config, labels: Tensor, indices: Tensor | list[int], round_: int, labelled: bool) -> PatchWindows:
    """``windows.seeded_windows`` with the run's settings: the windows ``image_patches`` cuts."""
    pt = cfg.patches
    return seeded_windows(labels, [int(i) for i in indices], size=pt.size, min_pixels=pt.min_pixels,
                          per_image=pt.per_image, classes=list(range(1, cfg.data.num_classes)), seed=cfg.train.seed,
                          round_=round_, labelled=labelled, ignore_index=cfg.pseudo.ignore_index)


def cut_patches(cfg: Config, images: Tensor, labels: Tensor, windows: PatchWindows) -> Tensor:
    """The masked patches (P, C, s, s) of ``windows`` in ``images`` / ``labels`` (``image_windows``'):
    ``image_patches``' patches, cut where the images are."""
    pt = cfg.patches
    return extract_patches(images, labels, windows, pt.size, mask=pt.mask, ignore_index=cfg.pseudo.ignore_index)


def local_steps(cfg: Config, round_: int, plan: list[Tensor], unlabelled: Tensor, pseudo: Tensor,
                labelled_images: Tensor, labelled_masks: Tensor) -> Iterator[StepData]:
    """The steps of ``plan`` in one process: step k's images, the patches of their pseudo-labels
    (``pseudo``, labelled with the round's weights before the epoch) and of its D_L slice."""
    slices = labelled_slices(labelled_images.shape[0], len(plan))
    for idx, l_idx in zip(plan, slices):
        u_p, u_c = image_patches(cfg, unlabelled[idx], pseudo[idx], idx, round_, labelled=False)
        l_p, l_c = image_patches(cfg, labelled_images[l_idx], labelled_masks[l_idx], l_idx, round_, labelled=True)
        yield StepData(unlabelled[idx], torch.cat([l_p, u_p]), torch.cat([l_c, u_c]))


def pooled_steps(plan: list[Tensor], unlabelled: Tensor, patches: Tensor, classes: Tensor) -> Iterator[StepData]:
    """Steps of ``plan`` that all draw their contrastive batch from one pool (e.g. a whole round's
    patches from ``round_patches``): for tests and benchmarks that fix the patches."""
    for idx in plan:
        yield StepData(unlabelled[idx], patches, classes)
