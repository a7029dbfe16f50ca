"""SimCLR pre-training (Chen et al., "A Simple Framework for Contrastive Learning of Visual
Representations", ICML 2020), the image-level contrastive baseline.

Two random views of every image go through the encoder E, global average pooling and a projection
MLP g; the NT-Xent loss pulls the two views of an image together and pushes every other view of the
batch away. The encoder is then fine-tuned on the labelled images.

Legend:

    z1, z2  (N, D) projections of the two views; z = normalize(cat(z1, z2)), (2N, D)
    s       z_i . z_k, the cosine similarity
    tau     temperature > 0; typical values 0.1-0.5

    l_i = -log( exp(s_{i,p(i)} / tau) / sum_{k != i} exp(s_ik / tau) ),  p(i) = (i + N) mod 2N
    L   = 1/(2N) sum_i l_i

The views (``two_views``) use augmentations that make sense for grayscale medical images: flips and
90-degree rotations, a random resized crop of 50-100% of the area, brightness/contrast jitter on
standardised intensities and Gaussian noise; no colour jitter or greyscale conversion.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cssl_ray.config import Config, ConfigError
from cssl_ray.data.augment import flip_rotate
from cssl_ray.data.batches import index_batches
from cssl_ray.models.heads import ProjectionHead

CROP_SCALE = (0.5, 1.0)  # share of the image area a crop keeps
CONTRAST = (0.8, 1.2)  # multiplicative factor on standardised intensities
BRIGHTNESS = 0.1  # additive shift, uniform in [-0.1, 0.1]
NOISE_STD = 0.05  # Gaussian noise

# SimCLR's g is the paper's projection head: Linear -> ReLU -> Linear, (B, in_dim) -> (B, out_dim).
ProjectionMLP = ProjectionHead


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR, a scalar.

    z1, z2: (N, D) projections of the two views of N images, N >= 1; row i of z1 and row i of z2
    are a positive pair. Rows are L2-normalised here, so the loss does not depend on their scale
    (a zero row has similarity 0 to everything). Computed in float32 (float64 if given). N = 1:
    the positive is the only other view, the loss is 0.
    """
    if z1.dim() != 2 or z1.shape != z2.shape or z1.shape[0] < 1:
        raise ValueError(f"nt_xent: z1 and z2 must both be (N, D) with N >= 1, got {tuple(z1.shape)} and "
                         f"{tuple(z2.shape)}")
    if not temperature > 0 or math.isinf(temperature):  # also rejects NaN
        raise ValueError(f"nt_xent: temperature must be a finite number > 0, got {temperature!r}")
    n = z1.shape[0]
    dtype = torch.float64 if z1.dtype == torch.float64 else torch.float32
    z = F.normalize(torch.cat([z1, z2]).to(dtype), dim=1)  # (2N, D)
    with torch.autocast(z.device.type, enabled=False):  # bf16 would round s by up to 2^-8
        logits = z @ z.T / temperature  # (2N, 2N) similarities / tau
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))  # k != i in the denominator
    targets = (torch.arange(2 * n, device=z.device) + n) % (2 * n)  # (2N,) index of the positive
    return F.cross_entropy(logits, targets)


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None) -> Tensor:
    """(n,) draws from U(low, high) on the generator's device (CPU keeps runs reproducible)."""
    device = generator.device if generator is not None else None
    return low + (high - low) * torch.rand(n, generator=generator, device=device)


def _random_resized_crop(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """One crop of CROP_SCALE of the area (the image's aspect ratio) per sample, resized back to
    (H, W) bilinearly. x: (B, C, H, W)."""
    b, _, h, w = x.shape
    side = _uniform(b, *CROP_SCALE, generator).sqrt()  # (B,) side ratio of the crop
    corner = _uniform(2 * b, 0.0, 1.0, generator).view(b, 2)  # (B, 2) position in the free space
    out = []
    for i in range(b):
        ch, cw = max(1, round(h * float(side[i]))), max(1, round(w * float(side[i])))
        top = int(float(corner[i, 0]) * (h - ch + 1))  # in [0, h - ch]: rand() < 1
        left = int(float(corner[i, 1]) * (w - cw + 1))
        crop = x[i : i + 1, :, top : top + ch, left : left + cw]  # (1, C, ch, cw)
        out.append(F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False))
    return torch.cat(out)


def _view(images: Tensor, generator: torch.Generator | None) -> Tensor:
    """One random view of (B, C, H, W) images; see ``two_views``."""
    b = images.shape[0]
    dummy = torch.zeros(images.shape[:1] + images.shape[2:], dtype=torch.uint8, device=images.device)  # (B, H, W)
    x, _ = flip_rotate(images, dummy, generator)
    x = _random_resized_crop(x, generator)
    contrast = _uniform(b, *CONTRAST, generator).to(x.device, x.dtype).view(b, 1, 1, 1)
    shift = _uniform(b, -BRIGHTNESS, BRIGHTNESS, generator).to(x.device, x.dtype).view(b, 1, 1, 1)
    device = generator.device if generator is not None else x.device
    noise = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)
    return x * contrast + shift + NOISE_STD * noise


def two_views(images: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Two independent random views (v1, v2) of ``images`` (B, C, H, W), each (B, C, H, W).

    Per sample and view: flip / 90-degree rotation (``cssl_ray.data.augment.flip_rotate``; 90/270 only for
    square images), random resized crop, contrast and brightness jitter, Gaussian noise. Every draw
    comes from ``generator``, so equal generator states give equal views. ``images`` is unchanged.
    """
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"two_views: images must be a float (B, C, H, W) tensor, got {tuple(images.shape)} "
                         f"{images.dtype}")
    return _view(images, generator), _view(images, generator)


def deepest_channels(model: nn.Module, in_channels: int, image_size: int | tuple[int, int]) -> int:
    """Channels of the deepest encoder map, ``model.encode(x)[-1]``: the in_dim of the projection MLP.

    Read from ``model.feature_channels[-1]`` when the model declares it (every registry model does);
    otherwise one dummy forward of a (1, in_channels, H, W) zero image, under no_grad and in eval
    mode (BatchNorm statistics untouched; each submodule's train/eval flag is restored).
    """
    net = getattr(model, "module", model)  # the plain module behind DDP
    declared = getattr(net, "feature_channels", None)
    if declared:
        return int(declared[-1])
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    param = next(iter(net.parameters()), None)
    x = torch.zeros(1, in_channels, h, w, device=param.device if param is not None else None)
    modes = [(m, m.training) for m in net.modules()]
    net.eval()
    try:
        with torch.no_grad():
            return int(net.encode(x)[-1].shape[1])
    finally:
        for m, training in modes:
            m.training = training


def image_embedding(model: nn.Module, x: Tensor, head: nn.Module | None = None) -> Tensor:
    """g(pool(E(x)[-1])): (B, C_in, H, W) images -> (B, D) projections, NOT normalised.

    pool is the global average over the deepest encoder map (B, C_h, h, w) -> (B, C_h). ``head``: a
    ``ProjectionMLP(deepest_channels(...), hidden, D)`` of the caller; None uses the model's own
    projection head (``model.project``), whose in_dim already matches.
    """
    net = getattr(model, "module", model)
    h = net.encode(x)[-1]  # (B, C_h, h, w) deepest map
    if head is None:
        return net.project(h)  # (B, D)
    return head(h.mean(dim=(2, 3)))  # (B, C_h) -> (B, D)


def simclr_batches(n_labelled: int, n_unlabelled: int, cfg: Config, generator: torch.Generator) -> Iterator[Tensor]:
    """One SimCLR epoch's index batches. ``simclr_images: all``: a shuffled pass over the N_L + N_U
    images of D_L then D_U (indices into their concatenation), batches of ``simclr_batch_size``.
    ``labelled``: indices into D_L alone, batches of min(simclr_batch_size, N_L), as many as the
    ``all`` epoch has (reshuffled passes over D_L), so the control gets the same optimiser steps.
    Lazy, like ``index_batches``: its reshuffles draw from ``generator`` between the views' draws."""
    b = cfg.baselines
    n_all = n_labelled + n_unlabelled
    if b.simclr_images == "all":
        return index_batches(n_all, b.simclr_batch_size, generator=generator)
    if n_labelled < 2:
        raise ConfigError(f"baselines.simclr_images: 'labelled' needs at least 2 labelled images (a view needs "
                          f"a negative), this split has {n_labelled}; use 'all'")
    steps = math.ceil(n_all / min(b.simclr_batch_size, n_all))
    return index_batches(n_labelled, b.simclr_batch_size, steps=steps, generator=generator)


def simclr_pretrain(model: nn.Module, labelled: Tensor, unlabelled: Tensor, cfg: Config,
                    generator: torch.Generator) -> dict[str, float]:
    """Image-level contrastive pretraining of ``model`` (the ``simclr_pretrain`` cell, before stage A):
    ``baselines.simclr_epochs`` epochs of NT-Xent batches of ``baselines.simclr_batch_size`` images
    (``simclr_batches``: D_L + D_U, or D_L alone under ``simclr_images: labelled``); each batch's two
    views (``two_views``) are embedded by the encoder, global pooling and the model's projection head
    (``image_embedding``) and trained with ``nt_xent`` at ``baselines.simclr_temperature`` on a fresh
    Adam at ``optim.lr``. ``labelled`` / ``unlabelled``: (N_L, C, H, W) / (N_U, C, H, W) images. The
    decoder does not move (it gets no gradient); stage A then trains the whole network. ``generator``:
    batches and views. Returns the NT-Xent loss of the first and of the last epoch (means)."""
    b = cfg.baselines
    images = labelled if b.simclr_images == "labelled" else torch.cat([labelled, unlabelled])  # simclr_batches' indices
    device = next(model.parameters()).device
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    model.train()
    epochs: list[float] = []
    for _ in range(b.simclr_epochs):
        losses = []
        for idx in simclr_batches(labelled.shape[0], unlabelled.shape[0], cfg, generator):
            if idx.numel() < 2:
                continue  # one image has no negatives
            v1, v2 = two_views(images[idx], generator)  # (n, C, H, W) each
            z = image_embedding(model, torch.cat([v1, v2]).to(device))  # (2n, D): one BatchNorm batch
            loss = nt_xent(z[: idx.numel()], z[idx.numel():], b.simclr_temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        epochs.append(sum(losses) / max(len(losses), 1))
    return {"simclr_loss_first": epochs[0], "simclr_loss_last": epochs[-1]}
