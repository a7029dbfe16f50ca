"""A space's settings beside ``search:``: the metric, the scheduler, the search algorithm, the
resources per trial and the ablation grid, each read and checked (one ``fail`` line naming the key).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cssl_ray.config import ConfigError, check_metric
from cssl_ray.distributed.placement import Resources
from cssl_ray.experiments.ablation_cells import ABLATION_CELLS, DEFAULT_CELLS, PROTOCOLS
from cssl_ray.experiments.space_config import read_number
from cssl_ray.experiments.space_domains import Domain

SEARCH_ALGORITHMS = ("random", "optuna")  # Tune's variant generator; Ray's OptunaSearch with Optuna's TPE
TRAIN_METRICS = ("loss", "loss_cl", "loss_cr", "loss_sup", "omega")


@dataclass
class Scheduler:
    name: str = "asha"  # asha | fifo
    grace_period: int = 1  # CSSL rounds before ASHA may stop a trial (its time attribute is the round)
    reduction_factor: float = 2.0


@dataclass
class Ablation:
    seeds: int = 3  # train.seed 0..seeds-1 per cell
    cells: list[str] = field(default_factory=lambda: list(DEFAULT_CELLS))
    label_fractions: list[float] = field(default_factory=list)  # [] = the space's own labelled setting
    # train.protocol values to grid over (paper, joint: cssl_ray.run.joint); [] = the config's own. Each
    # cell is reported against the supervised cell of its own protocol
    protocols: list[str] = field(default_factory=list)


def check_space_metric(metric: Any, classes: list[str] | None, fail: Any) -> None:
    try:
        check_metric("metric", metric, classes, extra=TRAIN_METRICS)
    except ConfigError as e:
        raise fail(str(e)) from None


def read_count(data: dict, key: str, default: int, least: int, fail: Any, where: str = "") -> int:
    value = read_number(data.get(key, default), where + key, fail, integer=True)
    if value < least:
        raise fail(f"{where}{key}: {value!r} is out of range; allowed: >= {least}")
    return value


def _section(raw: Any, name: str, keys: tuple[str, ...], fail: Any) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise fail(f"{name}: expected a mapping with keys {', '.join(keys)}, got {raw!r}")
    for key in raw:
        if key not in keys:
            raise fail(f"unknown key '{name}.{key}'; allowed: {', '.join(keys)}")
    return raw


def parse_scheduler(raw: Any, fail: Any) -> Scheduler:
    d = _section(raw, "scheduler", ("name", "grace_period", "reduction_factor"), fail)
    name = d.get("name", "asha")
    if name not in ("asha", "fifo"):
        raise fail(f"scheduler.name: {name!r} is not allowed; choose asha or fifo")
    rf = read_number(d.get("reduction_factor", 2.0), "scheduler.reduction_factor", fail)
    if not rf > 1:
        raise fail(f"scheduler.reduction_factor: {rf!r} is out of range; allowed: > 1")
    return Scheduler(name, read_count(d, "grace_period", 1, 1, fail, "scheduler."), float(rf))


def parse_search_algorithm(data: dict, search: dict[str, Domain], fail: Any) -> str:
    """``search_algorithm`` (default random) and what it allows: optuna samples (no grid) and
    needs a domain to sample; ``seed`` seeds optuna only (Tune's random search draws unseeded)."""
    algorithm = data.get("search_algorithm", "random")
    if algorithm not in SEARCH_ALGORITHMS:
        raise fail(f"search_algorithm: {algorithm!r} is not allowed; choose {' or '.join(SEARCH_ALGORITHMS)}")
    if algorithm == "random":
        if "seed" in data:
            raise fail("seed: seeds Optuna's sampler only and has no effect with search_algorithm: random "
                       "(Tune's random search is unseeded); remove it or set search_algorithm: optuna")
        return algorithm
    grids = [key for key, d in search.items() if d.kind == "grid"]
    if grids:
        raise fail(f"search.{grids[0]}: grid is not allowed with search_algorithm: optuna (a grid runs every value "
                   f"in every sample, a sampler cannot); use choice, or search_algorithm: random")
    if not search:
        raise fail("search: search_algorithm: optuna needs at least one searched key (uniform, loguniform, randint "
                   "or choice)")
    return algorithm


def parse_resources(raw: Any, fail: Any) -> Resources:
    d = _section(raw, "resources", ("workers", "cpus_per_worker", "gpus_per_worker", "labellers", "gpus_per_labeller"),
                 fail)
    cpus = read_number(d.get("cpus_per_worker", 1.0), "resources.cpus_per_worker", fail)
    gpus = read_number(d.get("gpus_per_worker", 0.0), "resources.gpus_per_worker", fail)
    labeller_gpus = read_number(d.get("gpus_per_labeller", 0.0), "resources.gpus_per_labeller", fail)
    if not cpus > 0:
        raise fail(f"resources.cpus_per_worker: {cpus!r} is out of range; allowed: > 0")
    if not gpus >= 0:
        raise fail(f"resources.gpus_per_worker: {gpus!r} is out of range; allowed: >= 0")
    if not 0 <= labeller_gpus <= 1:
        raise fail(f"resources.gpus_per_labeller: {labeller_gpus!r} is out of range; allowed: 0 (CPU labellers) "
                   "to 1 (a fraction shares a GPU)")
    return Resources(read_count(d, "workers", 1, 0, fail, "resources."), float(cpus), float(gpus),
                     read_count(d, "labellers", 1, 1, fail, "resources."), float(labeller_gpus))


def parse_ablation(raw: Any, fail: Any) -> Ablation:
    d = _section(raw, "ablation", ("seeds", "cells", "label_fractions", "protocols"), fail)
    cells = d.get("cells", list(DEFAULT_CELLS))
    if not isinstance(cells, list) or not cells or len(set(map(str, cells))) != len(cells) \
            or any(c not in ABLATION_CELLS for c in cells):
        raise fail(f"ablation.cells: {cells!r} is not allowed; a list of distinct cells from "
                   f"{', '.join(ABLATION_CELLS)}")
    fractions = d.get("label_fractions", []) or []
    if not isinstance(fractions, list):
        raise fail(f"ablation.label_fractions: expected a list of fractions in (0, 1], got {fractions!r}")
    for f in fractions:
        if not 0 < read_number(f, "ablation.label_fractions", fail) <= 1:
            raise fail(f"ablation.label_fractions: {f!r} is out of range; allowed: each in (0, 1]")
    protocols = d.get("protocols", []) or []
    if not isinstance(protocols, list) or len(set(map(str, protocols))) != len(protocols) \
            or any(p not in PROTOCOLS for p in protocols):
        raise fail(f"ablation.protocols: {protocols!r} is not allowed; a list of distinct values from "
                   f"{', '.join(PROTOCOLS)}")
    return Ablation(read_count(d, "seeds", 3, 1, fail, "ablation."), list(cells), [float(f) for f in fractions],
                    list(protocols))
