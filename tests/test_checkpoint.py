from __future__ import annotations

import pytest
import torch

from cssl_ray.run import checkpoint as ckpt


def test_atomic_save_prune_latest(tmp_path):
    for r in range(4):
        ckpt.save_atomic({"round": r, "w": torch.ones(2) * r}, ckpt.round_path(tmp_path, r))
    assert [r for r, _ in ckpt.round_checkpoints(tmp_path)] == [0, 1, 2, 3]
    ckpt.prune(tmp_path, keep=2)
    assert [r for r, _ in ckpt.round_checkpoints(tmp_path)] == [2, 3]
    assert ckpt.load(ckpt.latest_checkpoint(tmp_path))["round"] == 3
    assert not list(tmp_path.glob("*.tmp"))


def test_failed_save_leaves_nothing(tmp_path):
    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        ckpt.save_atomic({"x": Boom()}, tmp_path / "round_001.pt")
    assert list(tmp_path.iterdir()) == []


def test_bad_files_are_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        ckpt.load(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt: not a readable cssl_ray checkpoint"):
        ckpt.load(bad)
