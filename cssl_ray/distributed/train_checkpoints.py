"""The Train run's checkpoint bookkeeping, shared by the driver (``ray_train``) and the workers
(``train_worker``): the files inside a checkpoint, the run's folder name, and the worker count
("world") a checkpoint was written by, which ``--resume`` must match (each rank's random streams
are in it). ``check_resume_world`` runs on the driver before Ray starts; a worker that restores a
checkpoint of another world size raises ``resume_world_message`` too.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from cssl_ray.config import ConfigError

STATE_FILE = "state.pt"  # inside every Train checkpoint directory
WORLD_FILE = "world.json"  # beside it: the worker count that wrote it (read before Ray starts on --resume)
RUN_NAME = "ray_train"  # the Train run's folder under train.out_dir


def resume_world_message(workers: int, saved: int, where: str) -> str:
    return (f"--workers: {workers}, but {where} was written by {saved} worker(s): each rank's random streams "
            f"(its data order, augmentation and noise) are in it, so another worker count would change the run; "
            f"resume with --workers {saved}, or start a new run (another --out / --storage-path)")


def checkpointed_world(run_dir: Path) -> int | None:
    """The worker count of the newest Train checkpoint in ``run_dir`` (Train V2 names them
    ``checkpoint_<timestamp>``); None when there is none or it does not say."""
    points = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
    if not points:
        return None
    meta = points[-1] / WORLD_FILE
    if meta.exists():
        return int(json.loads(meta.read_text())["world_size"])
    if (points[-1] / STATE_FILE).exists():  # a checkpoint from before world.json
        streams = torch.load(points[-1] / STATE_FILE, map_location="cpu", weights_only=False).get("rank_streams")
        return len(streams) if streams else None
    return None


def check_resume_world(storage: str, workers: int) -> None:
    """``--resume`` with another worker count than the run's checkpoints: one line (local storage;
    a URI's checkpoints are checked by the worker that loads them)."""
    if "://" in storage:
        return
    run_dir = Path(storage) / RUN_NAME
    saved = checkpointed_world(run_dir)
    if saved is not None and saved != workers:
        raise ConfigError(resume_world_message(workers, saved, f"the newest checkpoint in {run_dir}"))
