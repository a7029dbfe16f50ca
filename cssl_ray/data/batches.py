"""Which items each step takes: shuffled index batches, and D_L dealt over a round's steps.

Plain torch on integer indices; the generator passed in is the only source of randomness, so a
run's streams (``cssl_ray.method.streams``) make the batches reproducible.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor


def index_batches(n: int, batch_size: int, steps: int = 0,
                  generator: torch.Generator | None = None) -> Iterator[Tensor]:
    """Shuffled index batches: one pass over ``n`` items, or exactly ``steps`` batches (reshuffling
    after every pass) when ``steps`` > 0. Small sets are padded by drawing again, so every batch
    holds min(batch_size, n) items."""
    if n <= 0:
        return
    bs = min(batch_size, n)
    total = steps if steps > 0 else math.ceil(n / bs)
    perm = torch.randperm(n, generator=generator)
    pos = 0
    for _ in range(total):
        if pos + bs > n:
            perm = torch.cat([perm[pos:], torch.randperm(n, generator=generator)])
            pos = 0
        yield perm[pos:pos + bs]
        pos += bs


def labelled_slices(n_labelled: int, n_steps: int) -> list[Tensor]:
    """D_L positions whose ground-truth patches join each step's pool: D_L dealt over the steps in
    order, ceil(n_labelled / n_steps) images a step, cycling when D_L is the smaller set (every step
    has labelled patches, and D_L is passed about once an epoch)."""
    if n_labelled == 0:
        return [torch.zeros(0, dtype=torch.int64) for _ in range(n_steps)]
    m = math.ceil(n_labelled / max(n_steps, 1))
    return [torch.arange(k * m, (k + 1) * m) % n_labelled for k in range(n_steps)]
