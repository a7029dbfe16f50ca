"""Data-parallel collectives the CSSL loop needs, as one small object it can be handed.

    Collectives        one process: every operation is the identity (the loop's default)
    TorchCollectives   torch.distributed (gloo on CPU, NCCL on GPU) over the default process group

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

import torch
import torch.distributed as dist
from torch import Tensor, nn


class Collectives:
    """The single-process identity: world size 1, rank 0."""

    rank = 0
    world_size = 1

    def agree_steps(self, n: int) -> int:
        """The number of steps every rank can run: the minimum over ranks."""
        return n

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


class TorchCollectives(Collectives):
    """torch.distributed over the default process group (it must be initialised)."""

    def __init__(self, device: torch.device) -> None:
        if not dist.is_initialized():
            raise RuntimeError("TorchCollectives needs an initialised torch.distributed process group")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        # NCCL reduces CUDA tensors only; gloo CPU tensors. Every tensor goes through this device.
        self.device = device

    def _all_reduce(self, t: Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> Tensor:
        out = t.to(self.device, copy=True)
        dist.all_reduce(out, op=op)
        return out.to(t.device)

    def agree_steps(self, n: int) -> int:
        return int(self._all_reduce(torch.tensor([n], dtype=torch.int64), dist.ReduceOp.MIN).item())

    def average_gradients(self, model: nn.Module) -> None:
        # Parameters without a gradient (the projection head when L_CL is off) stay out, as Adam
        # skips them: which ones have one depends only on the config, the same on every rank.
        params = [p for p in model.parameters() if p.grad is not None]
        if not params:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in params]).to(self.device)  # one all-reduce per step
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n

    def sum_(self, t: Tensor) -> Tensor:
        return self._all_reduce(t)

    def mean_floats(self, values: dict[str, float]) -> dict[str, float]:
        keys = sorted(values)  # the same order on every rank
        t = self._all_reduce(torch.tensor([float(values[k]) for k in keys], dtype=torch.float64))
        return {k: float(v) / self.world_size for k, v in zip(keys, t.tolist())}

    def gather(self, t: Tensor) -> Tensor:
        return self._gather_sized(t)[0]

    def _gather_sized(self, t: Tensor) -> tuple[Tensor, list[int]]:
        """``gather``, and every rank's row count."""
        n = torch.tensor([t.shape[0]], dtype=torch.int64, device=self.device)
        sizes = [torch.zeros_like(n) for _ in range(self.world_size)]
        dist.all_gather(sizes, n)
        sizes_ = [int(s.item()) for s in sizes]
        padded = torch.zeros((max(sizes_), *t.shape[1:]), dtype=t.dtype, device=self.device)  # all_gather: equal shapes
        padded[:t.shape[0]] = t.to(self.device)
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return torch.cat([p[:s] for p, s in zip(parts, sizes_)]).to(t.device), sizes_

    def gather_with_grad(self, t: Tensor) -> Tensor:
        return _GatherWithGrad.apply(t, self)

    def global_mean(self, total: Tensor, count: Tensor | float) -> Tensor:
        n = float(self._all_reduce(torch.tensor([float(count)], dtype=torch.float64)).item())
        return total * (self.world_size / n) if n > 0 else total

    def broadcast_float(self, x: float) -> float:
        t = torch.tensor([x], dtype=torch.float64, device=self.device)
        dist.broadcast(t, src=0)
        return float(t.item())

    def broadcast_state(self, model: nn.Module) -> None:
        with torch.no_grad():
            for p in model.parameters():
                tmp = p.detach().to(self.device, copy=True)
                dist.broadcast(tmp, src=0)
                p.copy_(tmp.to(p.device))
        self.broadcast_buffers(model)

    def broadcast_buffers(self, model: nn.Module) -> None:
        for b in model.buffers():
            tmp = b.detach().to(self.device, copy=True)
            dist.broadcast(tmp, src=0)
            b.data.copy_(tmp.to(b.device))

    def barrier(self) -> None:
        dist.barrier()

    def gather_objects(self, obj: object) -> list[object]:
        out: list[object] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


class _GatherWithGrad(torch.autograd.Function):
    """all_gather with autograd: forward concatenates every rank's rows (sizes may differ); backward
    sums the gradient of the gathered tensor over ranks (one all-reduce) and returns this rank's rows.
    An all-reduce, not torch.distributed.nn's reduce-scatter / all-to-all, so gloo runs it too."""

    @staticmethod
    def forward(ctx, t: Tensor, col: TorchCollectives) -> Tensor:  # type: ignore[override]
        out, sizes = col._gather_sized(t.detach())
        ctx.col, ctx.start, ctx.rows = col, sum(sizes[:col.rank]), t.shape[0]
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        summed = ctx.col.sum_(grad.contiguous())
        return summed[ctx.start:ctx.start + ctx.rows], None


def rank_share(total: int, rank: int, world: int) -> int:
    """Items of a global batch of ``total`` that rank ``rank`` of ``world`` holds: the global batch's
    positions are dealt round-robin (position p to rank p % world), so shares differ by at most 1."""
    return positions_of_rank(0, total, rank, world)


def positions_of_rank(start: int, stop: int, rank: int, world: int) -> int:
    """How many positions p in [start, stop) have p % world == rank."""
    def below(x: int) -> int:  # positions p < x with p % world == rank
        return max(0, -(-(x - rank) // world))
    return below(stop) - below(start)
