"""Which weights are "best": the comparison rules of the run's model selection.

"Best" is by ``train.select_metric`` in ``train.select_mode`` (default val dice_mean, larger is
better; ``is_better``), ties broken by ``TrainConfig.selection_order`` (``beats``): stage A's best
epoch, the best round, ``best_val`` / ``best_round`` in result.json and best.pt. A NaN value is
never best; a tie keeps the earlier weights.
"""
from __future__ import annotations

import math


def is_better(value: float, best: float, mode: str) -> bool:
    """Whether ``value`` beats ``best`` in ``mode`` ("max" | "min"): strictly, so a tie keeps the
    earlier; NaN never beats anything (and any number beats a NaN best)."""
    if math.isnan(value):
        return False
    if math.isnan(best):
        return True
    return value > best if mode == "max" else value < best


def beats(val: dict[str, float], best: dict[str, float], order: list[tuple[str, str]]) -> bool:
    """Whether the metrics ``val`` beat ``best`` by ``order`` ((key, mode) pairs compared in turn,
    ``TrainConfig.selection_order``): a NaN or missing first key never beats; anything else beats an
    empty ``best``; a full tie keeps the earlier (``best``)."""
    if math.isnan(float(val.get(order[0][0], math.nan))):
        return False
    if not best:
        return True
    for key, mode in order:
        v, b = float(val.get(key, math.nan)), float(best.get(key, math.nan))
        if is_better(v, b, mode):
            return True
        if is_better(b, v, mode):
            return False
    return False


def worst_score(mode: str) -> float:
    """The score every value beats in ``mode``: -inf for "max", +inf for "min"."""
    return -math.inf if mode == "max" else math.inf


def selection_score(val: dict[str, float], key: str, mode: str) -> float:
    """``val[key]``; no such value (an empty ``val``) is the worst score of ``mode``."""
    return float(val.get(key, worst_score(mode)))
