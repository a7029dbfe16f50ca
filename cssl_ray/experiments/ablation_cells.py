"""The ablation cells: the paper's Table 5 switches, the semi-supervised baselines, and a config's cell.

Ablation cells (the paper's Table 5, ``ABLATION_CELLS``; train.use_cl / use_cr / use_hard_negatives):
supervised F F F, cl T F F, cl_hn T F T, cr F T F, cl_cr T T F, cssl T T T (the full method), and
the reference supervised_all (F F F with every training image labelled, ``CELL_DATA``), and the
baselines (bn_stats: bn_mix with ``baselines.bn_batch: separate``; simclr_dl: simclr_pretrain on D_L alone,
``baselines.simclr_images: labelled``; ``CELL_BASELINES``).
``cell_of(cfg)`` maps a config back (hard negatives are irrelevant without use_cl; a config cannot
tell supervised_all from supervised, so trials carry their cell name).
"""
from __future__ import annotations

from typing import Any

from cssl_ray.config import Config

# The paper's Table 5 ablation: each cell's switches, as TrainConfig fields (train.<key>).
_OFF = {"use_cl": False, "use_cr": False, "use_hard_negatives": False}
ABLATION_CELLS: dict[str, dict[str, Any]] = {
    "supervised": {**_OFF, "method": "cssl"},  # the rounds hold only the fine-tune epoch
    "cl": {"use_cl": True, "use_cr": False, "use_hard_negatives": False, "method": "cssl"},
    "cl_hn": {"use_cl": True, "use_cr": False, "use_hard_negatives": True, "method": "cssl"},
    "cr": {"use_cl": False, "use_cr": True, "use_hard_negatives": False, "method": "cssl"},
    "cl_cr": {"use_cl": True, "use_cr": True, "use_hard_negatives": False, "method": "cssl"},
    "cssl": {"use_cl": True, "use_cr": True, "use_hard_negatives": True, "method": "cssl"},  # the full method
    # a reference, not a method: every training image labelled, the supervised schedule; it shows the
    # headroom semi-supervision can recover (its data overrides: CELL_DATA)
    "supervised_all": {**_OFF, "method": "cssl"},
    # semi-supervised baselines with the same steps (cssl_ray.run.baseline_rounds); bn_mix is their control
    "bn_mix": {**_OFF, "method": "bn_mix"},
    # the same control with D_U in its own forward (baselines.bn_batch separate, CELL_BASELINES): the
    # unlabelled images move only BatchNorm's running statistics, never the labelled batch's statistics
    "bn_stats": {**_OFF, "method": "bn_mix"},
    "pseudo_label": {**_OFF, "method": "pseudo_label"},
    "mean_teacher": {**_OFF, "method": "mean_teacher"},
    "cps": {**_OFF, "method": "cps"},
    "simclr_pretrain": {**_OFF, "method": "simclr_pretrain"},
    # its control: the same pretraining steps on D_L alone (baselines.simclr_images labelled, CELL_BASELINES),
    # so a SimCLR gain over supervised is credited to D_U only if it beats this cell too
    "simclr_dl": {**_OFF, "method": "simclr_pretrain"},
}
BASELINE_CELLS = ("bn_mix", "bn_stats", "pseudo_label", "mean_teacher", "cps", "simclr_pretrain", "simclr_dl")
DEFAULT_CELLS = [c for c in ABLATION_CELLS if c not in BASELINE_CELLS]  # the paper's Table 5 + supervised_all
# data overrides of a cell (the rest of the split - val, test, the seed - is the experiment's)
CELL_DATA: dict[str, dict[str, Any]] = {"supervised_all": {"labelled_fraction": 1.0, "labelled_count": 0}}
# baselines overrides of a cell (the rest of the section is the experiment's)
CELL_BASELINES: dict[str, dict[str, Any]] = {"bn_stats": {"bn_batch": "separate"},
                                             "simclr_dl": {"simclr_images": "labelled"}}
PROTOCOLS = ("paper", "joint")  # train.protocol


def cell_of(cfg: Config) -> str:
    """The ABLATION_CELLS name of ``cfg``'s switches and method (hard negatives only count with use_cl)."""
    t = cfg.train
    switches = {"use_cl": t.use_cl, "use_cr": t.use_cr, "use_hard_negatives": t.use_hard_negatives and t.use_cl,
                "method": t.method}
    matches = [name for name, cell in ABLATION_CELLS.items() if cell == switches
               and all(getattr(cfg.baselines, k) == v for k, v in CELL_BASELINES.get(name, {}).items())]
    # the most specific match (bn_stats over bn_mix); among equals the first (supervised before _all)
    return max(matches, key=lambda name: len(CELL_BASELINES.get(name, {})))
