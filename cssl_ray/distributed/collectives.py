"""``Collectives`` (cssl_ray.method.collectives) on torch.distributed: gloo on CPU, NCCL on GPU,
over the default process group a Ray Train worker (or a test's gloo group) has initialised.

Why the gradients are averaged by hand and how the world-size invariance follows: the module
docstring of cssl_ray.method.collectives. Plain torch: no Ray here either.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from cssl_ray.method.collectives import Collectives


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


class _StepModule(nn.Module):
    """What DDP wraps: ``forward(fn)`` runs ``fn(net)``, a whole step's forward computation, so every
    call the step makes (``encode``, ``decode``, ``project``, not only ``forward``) is inside one DDP
    forward, and DDP's reducer expects the backward that follows."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, fn: Callable[[nn.Module], Any]) -> Any:
        return fn(self.net)


class DDPCollectives(TorchCollectives):
    """``TorchCollectives`` whose steps on ``model`` sync gradients with torch DistributedDataParallel:
    bucketed all-reduces launched during the backward as each bucket's gradients are ready, instead of
    one all-reduce after it (``train.grad_sync: ddp``).

    ``step(model, fn)`` runs ``fn`` inside DDP's forward (``_StepModule``); the ``average_gradients``
    call after that backward then has nothing left to do. A backward whose forward did not go
    through ``step`` (a path that calls the model directly, another network) is averaged explicitly,
    so no path is ever left unsynced. DDP's settings: ``find_unused_parameters`` (the projection head
    gets no gradient in a supervised step; parameters no rank used keep no gradient, as with the
    explicit sync), no buffer broadcast at each forward (BatchNorm statistics stay per rank and are
    broadcast after each epoch, as with the explicit sync). ``gather_with_grad`` works unchanged inside
    the step: the contrastive negatives of every rank still reach L_CL. DDP's reducer logs once per
    rank that an L_tot step left no parameter unused (find_unused_parameters' extra graph traversal:
    the supervised steps need it)."""

    def __init__(self, device: torch.device, model: nn.Module) -> None:
        super().__init__(device)
        from torch.nn.parallel import DistributedDataParallel

        self.model = model
        self.ddp = DistributedDataParallel(
            _StepModule(model), device_ids=[device] if device.type == "cuda" else None,
            find_unused_parameters=True, forward_sync_buffers=False)
        self._synced = False  # the pending backward's forward ran inside DDP

    def step(self, model: nn.Module, forward: Callable[[nn.Module], Any]) -> Any:
        if model is not self.model or not torch.is_grad_enabled():
            return forward(model)
        self._synced = True
        return self.ddp(forward)

    def average_gradients(self, model: nn.Module) -> None:
        if model is self.model and self._synced:
            self._synced = False  # DDP averaged them during the backward
            return
        super().average_gradients(model)
