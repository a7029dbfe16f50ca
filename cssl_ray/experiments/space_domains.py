"""A space's ``search:`` section: each dotted config key's Tune domain (``Domain``), parsed and
checked against the key's type, and the check that every value a domain can draw gives a valid config
(the domains' corners; ``cssl_ray.experiments.search_space`` says why corners bound every sample).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import typing
from dataclasses import dataclass
from typing import Any

from cssl_ray.config import Config, ConfigError, apply_overrides
from cssl_ray.data.cards import DatasetCard
from cssl_ray.experiments.space_config import checked_config, read_number, unflatten
from cssl_ray.models import model_stride

KINDS = ("uniform", "loguniform", "randint", "choice", "grid")
# Set per trial by the tuner (or by the top-level dataset:), so never sampled.
UNSEARCHABLE = ("data.name", "train.out_dir", "train.progress", "data.cache_dir", "data.root")
MAX_CORNERS = 4096
# Keys whose constraints couple them; checked as full products when all corners are too many.
COUPLED_KEYS = (
    ("contrastive.alpha_min", "contrastive.alpha_max"),
    ("patches.size", "model.depth", "model.name", "data.image_size", "patches.min_pixels"),
    ("data.val_fraction", "data.test_fraction"),
    ("data.num_classes", "pseudo.ignore_index"),
    ("data.labelled_count", "data.n_train"),
)


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


def _leaf_types() -> dict[str, Any]:
    out = {}
    for section in dataclasses.fields(Config):
        hints = typing.get_type_hints(section.default_factory)  # type: ignore[arg-type]
        for f in dataclasses.fields(section.default_factory):  # type: ignore[arg-type]
            out[f"{section.name}.{f.name}"] = hints[f.name]
    return out


def parse_search(raw: Any, base: Config, fail: Any) -> dict[str, Domain]:
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
    lo, hi = (read_number(v, where, fail, integer=kind == "randint") for v in values)
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


def check_samples(search: dict[str, Domain], base: Config, card: DatasetCard | None, fail: Any) -> None:
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
        checked_config(apply_overrides(base, unflatten(params)), card)
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
