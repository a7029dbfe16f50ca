"""Random streams: one seeded generator per purpose, so switching a loss on or off changes nothing else.

A run draws random numbers for several independent purposes. With one shared generator, a cell that
turns L_CL on would consume patch-sampling and alpha draws, and every later supervised batch of that
seed would differ from the supervised cell's: the ablation would compare different data orders as
much as different losses. Each purpose therefore has its own ``torch.Generator``:

    sup       supervised batches and their augmentation (stage A and every fine-tune epoch)
    patches   class-wise window sampling and the class-balanced contrastive batches
    alpha     per-pair hard-negative weights a ~ U(alpha_min, alpha_max)
    aux       samples of the auxiliary Gaussian class (one foreground class)
    noise     the consistency noise r ~ N(0, lambda_ I)
    cr        the order of D_U in the L_CR pass
    omega     the silhouette's subsample and the batch omega is measured on before round 1
    ltot_sup  the supervised batches (and augmentation) inside L_tot steps (train.lsup_in_ltot)

Each seed is a hash of ``(seed, purpose, rank)``: streams of one run are unrelated to each other and
to other ranks, and equal across cells, workers counts aside (rank 0 of any run draws what a
single-process run draws). The ``SHARED`` purposes are the exception: they draw for the whole
all-gathered contrastive batch, which every rank holds (``collectives.gather_with_grad``), so every
rank seeds them as rank 0 does and all ranks draw the same alpha, auxiliary samples and silhouette
subsample, the ones a single process would draw.
"""
from __future__ import annotations

import hashlib

import torch

PURPOSES = ("sup", "patches", "alpha", "aux", "noise", "cr", "omega", "ltot_sup")
ADDED = ("ltot_sup",)  # purposes newer than some checkpoints: a state without them keeps their fresh seed
SHARED = ("alpha", "aux", "omega")  # equal on every rank (see the module docstring)


def stream_seed(seed: int, purpose: str, rank: int = 0) -> int:
    """A 63-bit seed for ``purpose`` of run ``seed`` on ``rank`` (rank 0's for a ``SHARED`` purpose)."""
    if purpose in SHARED:
        rank = 0
    digest = hashlib.sha256(f"cssl_ray/{seed}/{purpose}/{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class RandomStreams:
    """One CPU ``torch.Generator`` per purpose in ``PURPOSES``, as attributes (``streams.sup``...)."""

    def __init__(self, seed: int, rank: int = 0) -> None:
        self.seed, self.rank = seed, rank
        for purpose in PURPOSES:
            setattr(self, purpose, torch.Generator().manual_seed(stream_seed(seed, purpose, rank)))

    def __getitem__(self, purpose: str) -> torch.Generator:
        if purpose not in PURPOSES:
            raise KeyError(f"no random stream {purpose!r}; streams: {', '.join(PURPOSES)}")
        return getattr(self, purpose)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {p: self[p].get_state() for p in PURPOSES}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [p for p in PURPOSES if p not in state and p not in ADDED]
        if missing:
            raise ValueError(f"random-stream state lacks {', '.join(missing)} (a checkpoint of an older version?)")
        for p in PURPOSES:
            if p in state:
                self[p].set_state(state[p])
