"""How long the supervised epochs are: ``sup_steps`` (one epoch of stage A or of the rounds'
fine-tune) and ``stage_a_plan`` (stage A's budget cut into epochs); the same on every rank."""
from __future__ import annotations

import math
from typing import Any


def sup_steps(train: Any, n_labelled: int) -> int:
    """Supervised steps of one epoch (stage A's and the rounds' fine-tune): ``train.sup_steps_per_epoch``,
    else one pass over D_L in (global) batches of ``train.batch_size``; the same on every rank."""
    if train.sup_steps_per_epoch > 0:
        return train.sup_steps_per_epoch
    return math.ceil(n_labelled / min(train.batch_size, n_labelled)) if n_labelled else 0


def stage_a_plan(train: Any, n_labelled: int) -> list[int]:
    """Steps of each stage-A epoch: ``train.stage_a_steps`` in epochs of ``sup_steps``, the last one
    shortened so that they add up to the budget exactly. [] without labelled images or budget."""
    per_epoch = sup_steps(train, n_labelled)
    if per_epoch == 0 or train.stage_a_steps == 0:
        return []
    full, rest = divmod(train.stage_a_steps, per_epoch)
    return [per_epoch] * full + ([rest] if rest else [])
