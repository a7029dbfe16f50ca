"""Search spaces: a YAML file of Ray Tune domains over dotted config keys, checked before Ray starts.

A space file (``tune_spaces/<name>.yaml``; every key but ``dataset`` is optional)::

    name: smoke                  # MLflow experiment name; default: the file stem
    dataset: synthetic           # a dataset card (datasets/<name>.yaml) -> data.name
    labelled_fraction: 0.25      # -> data.labelled_fraction (and data.labelled_count 0), or
    labelled_count: 3            # -> data.labelled_count; not both
    base: ../configs/smoke.yaml  # a config YAML (configs/*.yaml format), relative to THIS file
    config: {train: {max_rounds: 3}}   # nested overrides on top of base (same format)
    search:                      # dotted leaf config key -> exactly one domain
      contrastive.tau: {loguniform: [0.05, 0.5]}   # low > 0
      consistency.eps: {uniform: [0.0, 0.1]}
      patches.size: {choice: [16, 24]}              # choice / grid: a non-empty list of values
      train.seed: {grid: [0, 1]}                    # every value in every sample (Tune's grid_search)
      model.depth: {randint: [2, 4]}                # integers, upper bound exclusive (Tune)
    metric: val_dice_mean        # val_loss, val_dice_mean, val_iou_mean, val_dice/<class>,
                                 # val_iou/<class>, loss, loss_cl, loss_cr, loss_sup, omega
    mode: max                    # default max; min for val_loss and loss*
                                 # a val_ metric is also what each trial keeps its best weights
                                 # (and test metrics) by: train.select_metric / select_mode
                                 # (Space.select; --select-metric / --select-mode override it)
    num_samples: 8               # default 1; repeats of the grid product, as in Tune
    scheduler: {name: asha, grace_period: 1, reduction_factor: 2}   # the default; or {name: fifo}
    search_algorithm: random     # default random (Tune's variant generator); or optuna (TPE; no grid)
    seed: 0                      # optuna only: the TPE sampler's seed (default 0); not train.seed
    resources: {workers: 1, cpus_per_worker: 1.0, gpus_per_worker: 0}  # workers 0 = in-process trial
    #          also labellers: 1, gpus_per_labeller: 0 (pseudo-labeller actors in the trial's
    #          placement group; 0 GPU = CPU labellers, a fraction up to 1 shares a GPU)
    max_concurrent_trials: 2     # default 2
    ablation: {seeds: 3, cells: [supervised, cl, cl_hn, cr, cl_cr, cssl], label_fractions: [],
               protocols: []}  # protocols: [paper, joint] runs every cell under both (default: the config's)

The overrides are layered base file -> ``config:`` -> ``dataset`` / ``labelled_*`` (written into
``data``; ``dataset`` wins over a base file's ``data.name``, a ``config.data.name`` must agree); a
trial adds its sampled dotted params on top (``Space.trial_config``).

Every value a domain can produce must give a valid config. ``load_space`` checks this at the
domains' corners (``cssl_ray.experiments.space_domains``; ``Domain.corners``: both ends of uniform /
loguniform, lo and hi-1 of randint, every value of choice / grid): the cartesian product of all corners (or, above
``MAX_CORNERS`` combinations, every pair of keys plus the full product of each group in
``COUPLED_KEYS``), each through ``apply_overrides`` + ``validate`` + ``check_geometry`` (+ the
card's classes / channels). The config's constraints are monotone in each key (an order, a bound,
divisibility by ``2**depth``), so the corners bound every sample. Because uniform corners include
both ends this is conservative ON PURPOSE: alpha_min U(0, 0.2) with alpha_max U(0.2, 0.4) is
rejected (0.2 < 0.2 fails) although Tune would almost never draw that pair; keep ranges apart.
The same holds for ``search_algorithm: optuna``: Ray's ``OptunaSearch`` turns each Tune domain into
the Optuna distribution with the same bounds (uniform / loguniform -> ``FloatDistribution(low, high
[, log])``, both ends included; randint -> ``IntDistribution(low, high - 1)``; choice ->
``CategoricalDistribution(values)``), so every TPE suggestion lies inside the domains and the corner
check covers it (``tests/test_search_space.py`` checks the mapping). Grid domains are an error with
optuna, not turned into choices: a grid means "every value in every sample", which a sampler
cannot keep.
``patches.size`` must be searched with choice or grid (a continuous or integer range would
draw sizes that are not multiples of the network stride).

The ablation cells a space's ``ablation:`` grids over are ``cssl_ray.experiments.ablation_cells``.

Loading a space never touches the dataset's files; only config-level checks run. Every error is
a ``SpaceError``: one line, starting with the space file's path and naming the key.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cssl_ray.config import Config, ConfigError, apply_overrides, check_metric, merge, natural_mode, validate
from cssl_ray.data.cards import card_names, datasets_dir
from cssl_ray.distributed.placement import Resources
from cssl_ray.experiments.space_config import (
    checked_config,
    config_class_names,
    dataset_card,
    raw_config,
    read_number,
    unflatten,
)
from cssl_ray.experiments.space_domains import Domain, check_samples, parse_search
from cssl_ray.experiments.space_settings import (
    Ablation,
    Scheduler,
    check_space_metric,
    parse_ablation,
    parse_resources,
    parse_scheduler,
    parse_search_algorithm,
    read_count,
)

TOP_KEYS = ("name", "dataset", "labelled_fraction", "labelled_count", "base", "config", "search", "metric", "mode",
            "num_samples", "scheduler", "search_algorithm", "seed", "resources", "max_concurrent_trials", "ablation")


class SpaceError(ConfigError):
    """A bad search space; one line starting with the space file's path and naming the key."""


@dataclass
class Space:
    path: Path
    name: str
    dataset: str
    overrides: dict  # nested config overrides: base file, then config:, then dataset / labelled_*
    search: dict[str, Domain]
    metric: str = "val_dice_mean"
    mode: str = "max"
    num_samples: int = 1
    scheduler: Scheduler = field(default_factory=Scheduler)
    # random: Tune's variant generator (unseeded, as Tune draws); optuna: Optuna's TPE sampler, which
    # proposes each trial from the finished ones (cssl_ray.experiments.tune.make_searcher)
    search_algorithm: str = "random"
    # optuna's sampler seed, its own key so the suggestions do not change with train.seed (which a
    # space may search, and ablate grids over); the same seed and space give the same first trials
    seed: int = 0
    resources: Resources = field(default_factory=Resources)
    max_concurrent_trials: int = 2
    ablation: Ablation = field(default_factory=Ablation)

    def base_config(self) -> Config:
        """The config every trial starts from (validated)."""
        return self.trial_config({})

    def trial_config(self, params: dict[str, Any]) -> Config:
        """Base config plus dotted ``params`` (e.g. ``{"contrastive.tau": 0.2}``), validated.
        NumPy scalars (what Tune's samplers draw in bulk) become plain Python values."""
        plain = {k: v.item() if type(v).__module__ == "numpy" else v for k, v in params.items()}
        try:
            cfg = apply_overrides(raw_config(self.overrides), unflatten(plain))
            return checked_config(cfg, dataset_card(self.dataset))
        except ConfigError as e:
            raise SpaceError(f"{self.path}: {e}") from None

    def select(self, cfg: Config, metric: str | None = None, mode: str | None = None) -> Config:
        """``cfg`` keeping its weights as this search picks its trials: ``train.select_metric`` =
        ``metric`` (``--select-metric``; its mode ``mode``, else auto), else the space's ``metric:``
        with its ``mode:`` (``mode`` overrides it) where that is a validation key; a training metric
        (loss_cl, omega, ...) picks no weights, so then the config's own selection stays. The metric
        is checked against the dataset's class names where its card knows them (one line)."""
        t = cfg.train
        if metric is not None:
            chosen = (metric, mode or "auto")
        elif self.metric.startswith("val_"):
            chosen = (self.metric, mode or self.mode)
        else:
            chosen = (t.select_metric, mode or t.select_mode)
        key = "--select-metric" if metric is not None else "train.select_metric"
        check_metric(key, chosen[0], config_class_names(cfg, dataset_card(self.dataset)))
        train = dataclasses.replace(t, select_metric=chosen[0], select_mode=chosen[1])
        return validate(dataclasses.replace(cfg, train=train))

    def param_space(self) -> dict[str, Any]:
        """``{dotted key: Tune domain}`` for ``Tuner(param_space=...)``."""
        return {key: domain.to_tune() for key, domain in self.search.items()}


# ---------------------------------------------------------------------------------------------
# Loading and checking.


def load_space(path: str | Path) -> Space:
    """Read and check a space file; every problem is one ``SpaceError`` line naming the key."""
    path = Path(path)

    def fail(msg: str) -> SpaceError:
        return SpaceError(f"{path}: {msg}")

    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise fail(f"cannot read search space ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise fail(f"not valid YAML ({where}{getattr(e, 'problem', None) or str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise fail(f"expected a mapping of keys ({', '.join(TOP_KEYS)}), got {type(data).__name__}")
    for key in data:
        if key not in TOP_KEYS:
            raise fail(f"unknown key {key!r}; allowed: {', '.join(TOP_KEYS)}")

    dataset = data.get("dataset")
    if dataset is None:
        raise fail(f"dataset: missing; name a dataset card ({', '.join(card_names())})")
    if not isinstance(dataset, str) or dataset not in card_names():
        raise fail(f"dataset: {dataset!r} is not a card in {datasets_dir()}; known: {', '.join(card_names())}")
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not name.strip():
        raise fail(f"name: expected a non-empty string (the MLflow experiment), got {name!r}")
    if "labelled_fraction" in data and "labelled_count" in data:
        raise fail("labelled_fraction, labelled_count: set one, not both")

    overrides: dict[str, Any] = {}
    if "base" in data:
        if not isinstance(data["base"], str):
            raise fail(f"base: expected a path to a config YAML, got {data['base']!r}")
        base = path.parent / data["base"]
        if not base.is_file():
            raise fail(f"base: {base} does not exist")
        overrides = _read_base(base, fail)
    config = data.get("config", {}) or {}
    if not isinstance(config, dict):
        raise fail(f"config: expected nested config overrides (a mapping), got {config!r}")
    try:
        apply_overrides(Config(), config)
    except ConfigError as e:
        raise fail(f"config: {e}") from None
    set_name = config.get("data", {}).get("name", dataset)
    if set_name != dataset:
        raise fail(f"config.data.name: {set_name!r} conflicts with dataset: {dataset!r}; set the dataset only once")
    data_keys: dict[str, Any] = {"name": dataset}
    if "labelled_fraction" in data:
        frac = read_number(data["labelled_fraction"], "labelled_fraction", fail)
        if not 0.0 < frac <= 1.0:
            raise fail(f"labelled_fraction: {frac!r} is out of range; allowed: 0 < fraction <= 1")
        data_keys.update(labelled_fraction=frac, labelled_count=0)
    if "labelled_count" in data:
        count = read_number(data["labelled_count"], "labelled_count", fail, integer=True)
        if count < 1:
            raise fail(f"labelled_count: {count!r} is out of range; allowed: >= 1 labelled images")
        data_keys["labelled_count"] = count
    overrides = merge(merge(overrides, config), {"data": data_keys})

    card = dataset_card(dataset)
    try:
        base_cfg = checked_config(raw_config(overrides), card)
    except ConfigError as e:
        raise fail(f"{'config: ' if config else 'base: ' if 'base' in data else ''}{e}") from None

    search = parse_search(data.get("search", {}) or {}, base_cfg, fail)
    check_samples(search, base_cfg, card, fail)
    metric = data.get("metric", "val_dice_mean")
    check_space_metric(metric, config_class_names(base_cfg, card), fail)
    mode = data.get("mode", natural_mode(metric))
    if mode not in ("max", "min"):
        raise fail(f"mode: {mode!r} is not allowed; choose max or min")
    algorithm = parse_search_algorithm(data, search, fail)
    return Space(
        path=path, name=name, dataset=dataset, overrides=overrides, search=search, metric=metric, mode=mode,
        num_samples=read_count(data, "num_samples", 1, 1, fail),
        scheduler=parse_scheduler(data.get("scheduler", {}), fail),
        search_algorithm=algorithm, seed=read_count(data, "seed", 0, 0, fail),
        resources=parse_resources(data.get("resources", {}), fail),
        max_concurrent_trials=read_count(data, "max_concurrent_trials", 2, 1, fail),
        ablation=parse_ablation(data.get("ablation", {}), fail),
    )


def _read_base(base: Path, fail: Any) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(base.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise fail(f"base: cannot read {base} ({str(e).splitlines()[0]})") from None
    try:
        raw_config(raw)
    except ConfigError as e:
        raise fail(f"base: {base}: {e}") from None
    return raw
