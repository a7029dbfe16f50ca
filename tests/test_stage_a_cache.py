"""Shared stage A (local.run_local(stage_a_cache=...)): a run that loads another run's stage A ends
exactly where it would have ended training stage A itself."""
from __future__ import annotations

import dataclasses

import torch

from cssl_ray.experiments.ablation_cells import ABLATION_CELLS
from cssl_ray.experiments.train import build_config
from cssl_ray.run.local import run_local, stage_a_key


def cell(cfg, name: str, out):
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, out_dir=str(out), **ABLATION_CELLS[name]))


def final_weights(result) -> dict[str, torch.Tensor]:
    return torch.load(result.out_dir / "round_002.pt", weights_only=False)["model"]


def test_loaded_stage_a_equals_trained_stage_a(tmp_path):
    cfg = build_config(None, ["train.progress=false", "train.figures=false"], smoke=True)
    cache = tmp_path / "stage_a"
    first = run_local(cell(cfg, "cssl", tmp_path / "cssl_trains"), stage_a_cache=cache)  # trains, then shares
    assert len(list(cache.glob("stage_a_*.pt"))) == 1

    records: list[dict] = []
    shared = run_local(cell(cfg, "supervised", tmp_path / "sup_loads"), stage_a_cache=cache, log=records.append)
    alone = run_local(cell(cfg, "supervised", tmp_path / "sup_alone"))
    for k, v in final_weights(alone).items():  # bitwise: the same state, the same steps after it
        assert torch.equal(v, final_weights(shared)[k]), k
    assert shared.test == alone.test
    # the loaded stage A's validation records are reported too (MLflow, ASHA): same as a fresh run
    stage_a = [r for r in records if r["stage"] == "supervised"]
    assert len(stage_a) == cfg.train.stage_a_steps and [r["step"] for r in stage_a] == [1, 2]

    again = run_local(cell(cfg, "cssl", tmp_path / "cssl_loads"), stage_a_cache=cache)
    for k, v in final_weights(first).items():
        assert torch.equal(v, final_weights(again)[k]), k


def test_key_ignores_the_method_and_sees_the_supervised_schedule():
    cfg = build_config(None, [], smoke=True)
    # every cell shares stage A but simclr_pretrain and simclr_dl, which start it from pretrained weights
    same = [dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **ABLATION_CELLS[c])) for c in ABLATION_CELLS
            if ABLATION_CELLS[c]["method"] != "simclr_pretrain"]
    same.append(dataclasses.replace(cfg, baselines=dataclasses.replace(cfg.baselines, simclr_epochs=3, mt_weight=1.0)))
    same.append(dataclasses.replace(cfg, contrastive=dataclasses.replace(cfg.contrastive, tau=0.3)))
    same.append(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_rounds=9, out_dir="elsewhere")))
    assert len({stage_a_key(c) for c in same}) == 1
    # the selection: stage A's early stop, the weights it goes on from and the best the rounds must beat
    for change in ({"seed": 1}, {"stage_a_steps": 3}, {"batch_size": 2}, {"num_threads": 1}, {"sup_loss": "ce_dice"},
                   {"select_metric": "val_loss"}, {"select_mode": "min"}, {"select_metric": "val_dice/blob"}):
        assert stage_a_key(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **change))) != stage_a_key(cfg)
    same_selection = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, select_mode="max"))  # = auto
    assert stage_a_key(same_selection) == stage_a_key(cfg)
    assert stage_a_key(dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=0.01))) != stage_a_key(cfg)
    for rounds_only in ({"cssl_lr": 1e-3}, {"finetune_lr": 1e-5}, {"round_warmup_steps": 3}, {"round_schedule": "cosine"}):
        # set at round 1: a search over the rounds' rates shares one stage A
        assert stage_a_key(dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, **rounds_only))) == stage_a_key(cfg)
    assert stage_a_key(dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, plateau_metric="val_loss"))) != \
        stage_a_key(cfg)
    assert stage_a_key(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seed=3))) != stage_a_key(cfg)
