"""Run a function on a real gloo process group of N CPU processes (no Ray), for the data-parallel tests:
``on_ranks(step, world, folder)`` spawns ``world`` processes, each calls ``step(rank, world, col)``
with a ``TorchCollectives`` over the group (one torch thread), and returns {rank: its result}.
``step`` must be a module-level function (the spawned processes import it by name)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from cssl_ray.distributed.collectives import TorchCollectives


def _rank_main(rank: int, world: int, init_file: str, out: dict, step: Callable[..., Any]) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        out[rank] = step(rank, world, TorchCollectives(torch.device("cpu")))
    finally:
        dist.destroy_process_group()


def on_ranks(step: Callable[..., Any], world: int, folder: Path) -> dict[int, Any]:
    """{rank: step(rank, world, collectives)} of ``world`` gloo processes (``folder``: the group's init file)."""
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank_main, args=(world, str(folder / "init"), out, step), nprocs=world, join=True)
        return dict(out)


def group_norm(model: nn.Module) -> nn.Module:
    """BatchNorm -> GroupNorm(1, C) in place: per-sample statistics, so a step does not depend on how a
    batch is split over ranks (BatchNorm's per-rank statistics are the documented exception; train.sync_bn)."""
    for name, child in model.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(model, name, nn.GroupNorm(1, child.num_features))
        else:
            group_norm(child)
    return model
