"""Data-parallel collectives the CSSL loop needs, as one small object it can be handed.

    Collectives        one process: every operation is the identity (the loop's default)
    TorchCollectives   torch.distributed (gloo on CPU, NCCL on GPU) over the default process group,
                       in cssl_ray.distributed.collectives: the method sees only this interface

The loop calls these at the same points on every rank, so a rank that skips one hangs the others:
``loop.cssl_epoch`` agrees on its step count first, then runs every step on every rank.

Why gradients are averaged here and not by a DDP wrapper: the CSSL objective reaches the student
through ``encode`` / ``project`` / ``decode`` (``consistency._unwrap``), not through ``forward``, so
DDP's reducer would never see those steps. One explicit all-reduce of the flattened gradients after
every backward, on every rank, gives DDP's update (the mean over ranks) for every kind of step
without forcing each student computation through one ``forward``. (Mixing the two on one module,
DDP's forward for supervised steps and explicit sync for L_tot steps, failed in torch 2.14 with
"Encountered gradient which is undefined, but still allreduced by DDP reducer".) Ranks start equal
because ``broadcast_state`` copies rank 0's parameters and buffers, as DDP's constructor would.

World-size invariance: the configured batch sizes are GLOBAL. With N ranks each holds a share
(``rank_share``) of every supervised, L_CR and patch batch; the contrastive loss runs on the
embeddings of all ranks (``gather_with_grad``: every rank computes the same L_CL over the whole
global batch, and the gradient of each rank's own embeddings comes back to it), and pixel-mean
losses divide by the global pixel count (``global_mean``). With the gradient average after every
backward, one step on N ranks is the step one process takes on the same global batch
(tests/test_world_size.py), BatchNorm's batch statistics aside: those are per rank unless
``train.sync_bn`` (CUDA) syncs them.

Plain torch: no Ray here.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn


class Collectives:
    """The single-process identity: world size 1, rank 0."""

    rank = 0
    world_size = 1

    def agree_steps(self, n: int) -> int:
        """The number of steps every rank can run: the minimum over ranks."""
        return n

    def step(self, model: nn.Module, forward: Callable[[nn.Module], Any]) -> Any:
        """``forward(model)``: a training step's forward computation (everything whose backward the
        step runs). A data-parallel implementation may run it inside a wrapper that syncs the
        gradients during the backward (``DDPCollectives``); ``average_gradients`` stays the call after it."""
        return forward(model)

    def average_gradients(self, model: nn.Module) -> None:
        """Replace each parameter's gradient by its mean over ranks."""

    def sum_(self, t: Tensor) -> Tensor:
        """Sum ``t`` over ranks (returns a tensor on ``t``'s device)."""
        return t

    def mean_floats(self, values: dict[str, float]) -> dict[str, float]:
        """Mean over ranks of each float (epoch statistics; NaN stays NaN)."""
        return dict(values)

    def gather(self, t: Tensor) -> Tensor:
        """Concatenate ``t`` (N_r, ...) of every rank along dim 0, in rank order; N_r may differ."""
        return t

    def gather_with_grad(self, t: Tensor) -> Tensor:
        """``gather`` that keeps the graph: the gradient of every rank's loss w.r.t. this rank's rows
        is summed back into ``t``'s gradient (so a loss computed identically on every rank from the
        gathered tensor, then gradient-averaged, gives the single-process gradient)."""
        return t

    def global_mean(self, total: Tensor, count: Tensor | float) -> Tensor:
        """This rank's part of a mean over every rank's items: ``total * N / sum_r count_r``.

        ``total`` (with its graph) is the sum over this rank's items, ``count`` their number; after
        the gradient average over ranks the gradient is that of sum_r total_r / sum_r count_r, and
        the mean over ranks of the returned values is that mean. A global count of 0 gives
        ``total`` (a graph-connected zero when nothing was summed)."""
        n = float(count)
        return total / n if n > 0 else total

    def broadcast_float(self, x: float) -> float:
        """Rank 0's value of ``x`` on every rank."""
        return x

    def broadcast_buffers(self, model: nn.Module) -> None:
        """Rank 0's buffers (BatchNorm running statistics) on every rank."""

    def broadcast_state(self, model: nn.Module) -> None:
        """Rank 0's parameters and buffers on every rank."""

    def barrier(self) -> None:
        """Wait until every rank gets here."""

    def gather_objects(self, obj: object) -> list[object]:
        """Every rank's picklable ``obj``, in rank order."""
        return [obj]


def rank_share(total: int, rank: int, world: int) -> int:
    """Items of a global batch of ``total`` that rank ``rank`` of ``world`` holds: the global batch's
    positions are dealt round-robin (position p to rank p % world), so shares differ by at most 1."""
    return positions_of_rank(0, total, rank, world)


def positions_of_rank(start: int, stop: int, rank: int, world: int) -> int:
    """How many positions p in [start, stop) have p % world == rank."""
    def below(x: int) -> int:  # positions p < x with p % world == rank
        return max(0, -(-(x - rank) // world))
    return below(stop) - below(start)
