"""Atomic checkpoints: written to a temporary file and renamed, so a crash never leaves half a file."""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

_ROUND = re.compile(r"round_(\d{3,})\.pt$")


def save_atomic(state: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def round_path(out_dir: str | Path, round_: int) -> Path:
    return Path(out_dir) / f"round_{round_:03d}.pt"


def round_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """(round, path) of every round checkpoint in ``out_dir``, oldest first."""
    found = []
    for p in Path(out_dir).glob("round_*.pt"):
        m = _ROUND.search(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = round_checkpoints(out_dir)
    return found[-1][1] if found else None


def prune(out_dir: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` round checkpoints."""
    for _, p in round_checkpoints(out_dir)[:-keep]:
        p.unlink(missing_ok=True)


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # a truncated or foreign file
        raise ValueError(f"{path}: not a readable cssl_ray checkpoint ({type(e).__name__}: {e})") from None
