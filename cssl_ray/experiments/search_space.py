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
domains' corners (``Domain.corners``: both ends of uniform / loguniform, lo and hi-1 of randint,
every value of choice / grid): the cartesian product of all corners (or, above
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

Ablation cells (the paper's Table 5, ``ABLATION_CELLS``; train.use_cl / use_cr / use_hard_negatives):
supervised F F F, cl T F F, cl_hn T F T, cr F T F, cl_cr T T F, cssl T T T (the full method), and
the reference supervised_all (F F F with every training image labelled, ``CELL_DATA``).
``cell_of(cfg)`` maps a config back (hard negatives are irrelevant without use_cl; a config cannot
tell supervised_all from supervised, so trials carry their cell name).

Loading a space never touches the dataset's files; only config-level checks run. Every error is
a ``SpaceError``: one line, starting with the space file's path and naming the key.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cssl_ray.config import Config, ConfigError, apply_overrides, check_metric, merge, natural_mode, validate
from cssl_ray.data.bundle import check_card
from cssl_ray.data.cards import CardError, DatasetCard, card_names, datasets_dir, load_card
from cssl_ray.data.synthetic import class_names as synthetic_class_names
from cssl_ray.distributed.placement import Resources
from cssl_ray.models import check_geometry, model_stride

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
    "pseudo_label": {**_OFF, "method": "pseudo_label"},
    "mean_teacher": {**_OFF, "method": "mean_teacher"},
    "cps": {**_OFF, "method": "cps"},
    "simclr_pretrain": {**_OFF, "method": "simclr_pretrain"},
}
# in-process only (ray_train runs the cssl method)
BASELINE_CELLS = ("bn_mix", "pseudo_label", "mean_teacher", "cps", "simclr_pretrain")
DEFAULT_CELLS = [c for c in ABLATION_CELLS if c not in BASELINE_CELLS]  # the paper's Table 5 + supervised_all
# data overrides of a cell (the rest of the split - val, test, the seed - is the experiment's)
CELL_DATA: dict[str, dict[str, Any]] = {"supervised_all": {"labelled_fraction": 1.0, "labelled_count": 0}}
PROTOCOLS = ("paper", "joint")  # train.protocol
KINDS = ("uniform", "loguniform", "randint", "choice", "grid")
SEARCH_ALGORITHMS = ("random", "optuna")  # Tune's variant generator; Ray's OptunaSearch with Optuna's TPE
TOP_KEYS = ("name", "dataset", "labelled_fraction", "labelled_count", "base", "config", "search", "metric", "mode",
            "num_samples", "scheduler", "search_algorithm", "seed", "resources", "max_concurrent_trials", "ablation")
# Set per trial by the tuner (or by the top-level dataset:), so never sampled.
UNSEARCHABLE = ("data.name", "train.out_dir", "train.progress", "data.cache_dir", "data.root")
TRAIN_METRICS = ("loss", "loss_cl", "loss_cr", "loss_sup", "omega")
MAX_CORNERS = 4096
# Keys whose constraints couple them; checked as full products when all corners are too many.
COUPLED_KEYS = (
    ("contrastive.alpha_min", "contrastive.alpha_max"),
    ("patches.size", "model.depth", "model.name", "data.image_size", "patches.min_pixels"),
    ("data.val_fraction", "data.test_fraction"),
    ("data.num_classes", "pseudo.ignore_index"),
    ("data.labelled_count", "data.n_train"),
)


class SpaceError(ConfigError):
    """A bad search space; one line starting with the space file's path and naming the key."""


@dataclass
class Domain:
    kind: str  # one of KINDS
    values: list  # [low, high] for uniform / loguniform / randint; the values for choice / grid

    def to_tune(self) -> Any:
        from ray import tune

        if self.kind == "uniform":
            return tune.uniform(float(self.values[0]), float(self.values[1]))
        if self.kind == "loguniform":
            return tune.loguniform(float(self.values[0]), float(self.values[1]))
        if self.kind == "randint":
            return tune.randint(int(self.values[0]), int(self.values[1]))
        if self.kind == "choice":
            return tune.choice(list(self.values))
        return tune.grid_search(list(self.values))

    def corners(self) -> list:
        """The extreme values the domain can produce (randint's upper bound is exclusive)."""
        if self.kind in ("uniform", "loguniform"):
            return [float(self.values[0]), float(self.values[1])]
        if self.kind == "randint":
            return [int(self.values[0]), int(self.values[1]) - 1]
        return list(self.values)


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
            return _checked(apply_overrides(_raw(self.overrides), unflatten(plain)), _card(self.dataset))
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
        check_metric(key, chosen[0], _class_names(cfg, _card(self.dataset)))
        train = dataclasses.replace(t, select_metric=chosen[0], select_mode=chosen[1])
        return validate(dataclasses.replace(cfg, train=train))

    def param_space(self) -> dict[str, Any]:
        """``{dotted key: Tune domain}`` for ``Tuner(param_space=...)``."""
        return {key: domain.to_tune() for key, domain in self.search.items()}


def cell_of(cfg: Config) -> str:
    """The ABLATION_CELLS name of ``cfg``'s switches and method (hard negatives only count with use_cl)."""
    t = cfg.train
    switches = {"use_cl": t.use_cl, "use_cr": t.use_cr, "use_hard_negatives": t.use_hard_negatives and t.use_cl,
                "method": t.method}
    return next(name for name, cell in ABLATION_CELLS.items() if cell == switches)  # supervised before _all


def unflatten(params: dict[str, Any]) -> dict:
    """``{"a.b": 1, "a.c": 2}`` -> ``{"a": {"b": 1, "c": 2}}`` (nested dict values are merged)."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        parts = str(key).split(".")
        nested: Any = value
        for part in reversed(parts[1:]):
            nested = {part: nested}
        head = parts[0]
        if head in out and not (isinstance(out[head], dict) and isinstance(nested, dict)):
            raise ConfigError(f"{key}: set twice (as a value and as a section)")
        out[head] = merge(out[head], nested) if head in out else nested
    return out


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
        frac = _number(data["labelled_fraction"], "labelled_fraction", fail)
        if not 0.0 < frac <= 1.0:
            raise fail(f"labelled_fraction: {frac!r} is out of range; allowed: 0 < fraction <= 1")
        data_keys.update(labelled_fraction=frac, labelled_count=0)
    if "labelled_count" in data:
        count = _number(data["labelled_count"], "labelled_count", fail, integer=True)
        if count < 1:
            raise fail(f"labelled_count: {count!r} is out of range; allowed: >= 1 labelled images")
        data_keys["labelled_count"] = count
    overrides = merge(merge(overrides, config), {"data": data_keys})

    card = _card(dataset)
    try:
        base_cfg = _checked(_raw(overrides), card)
    except ConfigError as e:
        raise fail(f"{'config: ' if config else 'base: ' if 'base' in data else ''}{e}") from None

    search = _parse_search(data.get("search", {}) or {}, base_cfg, fail)
    _check_samples(search, base_cfg, card, fail)
    metric = data.get("metric", "val_dice_mean")
    _check_metric(metric, _class_names(base_cfg, card), fail)
    mode = data.get("mode", natural_mode(metric))
    if mode not in ("max", "min"):
        raise fail(f"mode: {mode!r} is not allowed; choose max or min")
    algorithm = _search_algorithm(data, search, fail)
    return Space(
        path=path, name=name, dataset=dataset, overrides=overrides, search=search, metric=metric, mode=mode,
        num_samples=_count(data, "num_samples", 1, 1, fail),
        scheduler=_scheduler(data.get("scheduler", {}), fail),
        search_algorithm=algorithm, seed=_count(data, "seed", 0, 0, fail),
        resources=_resources(data.get("resources", {}), fail),
        max_concurrent_trials=_count(data, "max_concurrent_trials", 2, 1, fail),
        ablation=_ablation(data.get("ablation", {}), fail),
    )


def _read_base(base: Path, fail: Any) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(base.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise fail(f"base: cannot read {base} ({str(e).splitlines()[0]})") from None
    try:
        _raw(raw)
    except ConfigError as e:
        raise fail(f"base: {base}: {e}") from None
    return raw


def _raw(overrides: dict[str, Any]) -> Config:
    return apply_overrides(Config(), overrides)


@functools.lru_cache(maxsize=None)
def _card(dataset: str) -> DatasetCard | None:
    """The card whose classes / channels the config must match (synthetic: any class count)."""
    if dataset == "synthetic":
        return None
    try:
        return load_card(dataset)
    except CardError as e:
        raise ConfigError(f"data.name: {e}") from None


def _checked(cfg: Config, card: DatasetCard | None) -> Config:
    validate(cfg)
    check_geometry(cfg.model, cfg.data.image_size, cfg.patches.size)
    check_metric("train.select_metric", cfg.train.select_metric, _class_names(cfg, card))
    if card is not None:
        check_card(cfg.data, card)
    return cfg


def _leaf_types() -> dict[str, Any]:
    out = {}
    for section in dataclasses.fields(Config):
        hints = typing.get_type_hints(section.default_factory)  # type: ignore[arg-type]
        for f in dataclasses.fields(section.default_factory):  # type: ignore[arg-type]
            out[f"{section.name}.{f.name}"] = hints[f.name]
    return out


def _number(value: Any, key: str, fail: Any, integer: bool = False) -> Any:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok:
        hint = ""
        if isinstance(value, str):
            try:
                float(value)
                hint = " (YAML reads 1e-3 as text: write 1.0e-3)"
            except ValueError:
                pass
        raise fail(f"{key}: expected {'an integer' if integer else 'a number'}, got {value!r}{hint}")
    return value


def _parse_search(raw: Any, base: Config, fail: Any) -> dict[str, Domain]:
    if not isinstance(raw, dict):
        raise fail(f"search: expected a mapping of dotted config keys to domains, got {raw!r}")
    leaves = _leaf_types()
    sections = [f.name for f in dataclasses.fields(Config)]
    out: dict[str, Domain] = {}
    for key, spec in raw.items():
        where = f"search.{key}"
        section = str(key).split(".")[0]
        if section not in sections:
            raise fail(f"{where}: unknown config section {section!r}; sections: {', '.join(sections)}")
        if key not in leaves:
            here = [k for k in leaves if k.startswith(section + ".")]
            raise fail(f"{where}: not a leaf config key; allowed in {section}: {', '.join(here)}")
        if key in UNSEARCHABLE:
            raise fail(f"{where}: not searchable (set per trial by the tuner or by dataset:); "
                       f"unsearchable: {', '.join(UNSEARCHABLE)}")
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
            raise fail(f"{where}: expected one domain such as {{uniform: [low, high]}}; kinds: "
                       f"{', '.join(KINDS)}; got {spec!r}")
        kind, values = next(iter(spec.items()))
        out[key] = _domain(where, kind, values, leaves[key], base, fail)
    if "data.labelled_fraction" in out and base.data.labelled_count > 0:
        raise fail(f"search.data.labelled_fraction: has no effect while data.labelled_count is "
                   f"{base.data.labelled_count} (the count wins); use labelled_fraction: instead of a count")
    return out


def _domain(where: str, kind: str, values: Any, tp: Any, base: Config, fail: Any) -> Domain:
    if kind in ("choice", "grid"):
        if not isinstance(values, list) or not values:
            raise fail(f"{where}: {kind} needs a non-empty list of values, got {values!r}")
        return Domain(kind, list(values))
    if not isinstance(values, list) or len(values) != 2:
        raise fail(f"{where}: {kind} needs [low, high], got {values!r}")
    lo, hi = (_number(v, where, fail, integer=kind == "randint") for v in values)
    if kind == "loguniform" and not 0 < lo < hi:
        raise fail(f"{where}: loguniform needs 0 < low < high, got {values!r}")
    if not lo < hi:
        raise fail(f"{where}: {kind} needs low < high{' (high is exclusive)' if kind == 'randint' else ''}, "
                   f"got {values!r}")
    if where == "search.patches.size":
        stride = model_stride(base.model)
        raise fail(f"{where}: {kind} draws sizes that need not be multiples of the network stride {stride}; "
                   f"search it with choice or grid of sizes valid for the stride, e.g. "
                   f"{{choice: {[stride * k for k in range(1, 5)]}}}")
    if tp is not float and not (tp is int and kind == "randint"):
        use = "randint, choice or grid" if tp is int else "choice or grid"
        raise fail(f"{where}: {kind} draws {'integers' if kind == 'randint' else 'floats'} but "
                   f"{where[len('search.'):]} takes {_describe_type(tp)}; use {use}")
    return Domain(kind, [lo, hi])


def _describe_type(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if typing.get_origin(tp) is tuple:
        return f"a list of {len(typing.get_args(tp))} values"
    return {int: "an integer", bool: "true or false", str: "a string"}.get(tp, str(tp))


# ---------------------------------------------------------------------------------------------
# Every sample valid: configs at the domains' corners.


def _check_samples(search: dict[str, Domain], base: Config, card: DatasetCard | None, fail: Any) -> None:
    corners = {key: d.corners() for key, d in search.items()}
    keys = list(corners)
    if math.prod(len(c) for c in corners.values()) <= MAX_CORNERS:
        groups = [keys]
    else:  # every pair, and the coupled groups in full
        groups = [list(p) for p in itertools.combinations(keys, 2)]
        groups += [[k for k in g if k in corners] for g in COUPLED_KEYS]
    for group in groups:
        for combo in itertools.product(*(corners[k] for k in group)):
            params = dict(zip(group, combo))
            err = _try(base, params, card)
            if err is not None:
                raise fail(_blame(params, err, search, base, card))


def _try(base: Config, params: dict[str, Any], card: DatasetCard | None) -> str | None:
    try:
        _checked(apply_overrides(base, unflatten(params)), card)
    except ConfigError as e:
        return str(e)
    return None


def _blame(params: dict[str, Any], err: str, search: dict[str, Domain], base: Config,
           card: DatasetCard | None) -> str:
    """One line naming the searched key that can break the config, and how."""
    err_key = err.split(":")[0]
    if err_key == "contrastive.alpha_min" and "< contrastive.alpha_max" in err:
        def ends(key: str, pick: Any) -> float:
            return pick(search[key].corners()) if key in search else getattr(base.contrastive, key.split(".")[1])
        key = "contrastive.alpha_max" if "contrastive.alpha_max" in search else "contrastive.alpha_min"
        return (f"search.{key}: sampled values can break 0 <= alpha_min < alpha_max <= 0.5 (alpha_min up to "
                f"{ends('contrastive.alpha_min', max)}, alpha_max from {ends('contrastive.alpha_max', min)}); "
                f"keep the ranges apart")
    if "network stride" in err:
        order = ["patches.size"] if err_key == "patches.size" else []
        order += ["data.image_size", "model.depth", "model.encoder", "model.name", "patches.size"]
        key = next((k for k in order if k in params), next(iter(params)))
        cfg = apply_overrides(base, unflatten(params))
        stride = model_stride(cfg.model)
        if key == "patches.size" and err_key == "patches.size":
            detail = err.split(f"stride {stride} ", 1)[-1]
            return f"search.patches.size: {params[key]} is not valid for the model's stride {stride} {detail}"
        return f"search.{key}: {params[key]!r} breaks the network geometry (stride {stride}): {err}"
    suspects = sorted(params, key=lambda k: k != err_key)  # the key the error names first
    for key in suspects:  # a key that breaks the config on its own
        alone = _try(base, {key: params[key]}, card)
        if alone is not None:
            return f"search.{key}: {params[key]!r} (a {search[key].kind} corner) gives an invalid config: {alone}"
    key = err_key if err_key in params else next(iter(params))
    others = ", ".join(f"{k}={v!r}" for k, v in params.items() if k != key)
    return f"search.{key}: sampled value {params[key]!r} gives an invalid config with {others}: {err}"


# ---------------------------------------------------------------------------------------------
# Metric, scheduler, resources, ablation.


def _class_names(cfg: Config, card: DatasetCard | None) -> list[str] | None:
    if cfg.data.name == "synthetic":
        return synthetic_class_names(cfg.data.num_classes)
    return None if card is None or card.classes is None else list(card.classes)


def _check_metric(metric: Any, classes: list[str] | None, fail: Any) -> None:
    try:
        check_metric("metric", metric, classes, extra=TRAIN_METRICS)
    except ConfigError as e:
        raise fail(str(e)) from None


def _count(data: dict, key: str, default: int, least: int, fail: Any, where: str = "") -> int:
    value = _number(data.get(key, default), where + key, fail, integer=True)
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


def _scheduler(raw: Any, fail: Any) -> Scheduler:
    d = _section(raw, "scheduler", ("name", "grace_period", "reduction_factor"), fail)
    name = d.get("name", "asha")
    if name not in ("asha", "fifo"):
        raise fail(f"scheduler.name: {name!r} is not allowed; choose asha or fifo")
    rf = _number(d.get("reduction_factor", 2.0), "scheduler.reduction_factor", fail)
    if not rf > 1:
        raise fail(f"scheduler.reduction_factor: {rf!r} is out of range; allowed: > 1")
    return Scheduler(name, _count(d, "grace_period", 1, 1, fail, "scheduler."), float(rf))


def _search_algorithm(data: dict, search: dict[str, Domain], fail: Any) -> str:
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


def _resources(raw: Any, fail: Any) -> Resources:
    d = _section(raw, "resources", ("workers", "cpus_per_worker", "gpus_per_worker", "labellers", "gpus_per_labeller"),
                 fail)
    cpus = _number(d.get("cpus_per_worker", 1.0), "resources.cpus_per_worker", fail)
    gpus = _number(d.get("gpus_per_worker", 0.0), "resources.gpus_per_worker", fail)
    labeller_gpus = _number(d.get("gpus_per_labeller", 0.0), "resources.gpus_per_labeller", fail)
    if not cpus > 0:
        raise fail(f"resources.cpus_per_worker: {cpus!r} is out of range; allowed: > 0")
    if not gpus >= 0:
        raise fail(f"resources.gpus_per_worker: {gpus!r} is out of range; allowed: >= 0")
    if not 0 <= labeller_gpus <= 1:
        raise fail(f"resources.gpus_per_labeller: {labeller_gpus!r} is out of range; allowed: 0 (CPU labellers) "
                   "to 1 (a fraction shares a GPU)")
    return Resources(_count(d, "workers", 1, 0, fail, "resources."), float(cpus), float(gpus),
                     _count(d, "labellers", 1, 1, fail, "resources."), float(labeller_gpus))


def _ablation(raw: Any, fail: Any) -> Ablation:
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
        if not 0 < _number(f, "ablation.label_fractions", fail) <= 1:
            raise fail(f"ablation.label_fractions: {f!r} is out of range; allowed: each in (0, 1]")
    protocols = d.get("protocols", []) or []
    if not isinstance(protocols, list) or len(set(map(str, protocols))) != len(protocols) \
            or any(p not in PROTOCOLS for p in protocols):
        raise fail(f"ablation.protocols: {protocols!r} is not allowed; a list of distinct values from "
                   f"{', '.join(PROTOCOLS)}")
    return Ablation(_count(d, "seeds", 3, 1, fail, "ablation."), list(cells), [float(f) for f in fractions],
                    list(protocols))
