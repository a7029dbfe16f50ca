"""Configs from plain dicts, YAML files and ``key=value`` overrides, checked with one-line errors
(``validate``); back to plain dicts and YAML for Ray workers and run folders."""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from cssl_ray.config.tree import Config, ConfigError, check_metric


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (tuples from lists)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(map(str, allowed))}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp!r}")  # pragma: no cover - config author error


# keys that no longer exist, with what replaced them (an old YAML gets this line, not a bare "unknown key")
RENAMED = {
    "train.supervised_epochs": "train.stage_a_steps (stage A's budget in optimiser steps; epochs x "
                               "train.sup_steps_per_epoch), run in full without early stopping by default",
}


def apply_overrides(cfg: Any, overrides: dict[str, Any], prefix: str = "") -> Any:
    """Return a copy of dataclass ``cfg`` with nested ``overrides`` applied and type-checked."""
    if not isinstance(overrides, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {overrides!r}")
    hints = typing.get_type_hints(type(cfg))
    names = [f.name for f in dataclasses.fields(cfg)]
    changes: dict[str, Any] = {}
    for key, value in overrides.items():
        full = f"{prefix}{key}"
        if full in RENAMED:
            raise ConfigError(f"{full} was replaced by {RENAMED[full]}")
        if key not in names:
            raise ConfigError(f"unknown config key {full!r}; allowed here: {', '.join(names)}")
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current):
            changes[key] = apply_overrides(current, value, prefix=f"{full}.")
        else:
            changes[key] = _coerce(full, value, hints[key])
    return dataclasses.replace(cfg, **changes)


def _check(ok: bool, key: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: {value!r} is out of range; allowed: {allowed}")


def validate(cfg: Config) -> Config:
    """Range checks across the tree; raises ``ConfigError`` naming the first bad key."""
    d, m, p, pt, c = cfg.data, cfg.model, cfg.pseudo, cfg.patches, cfg.contrastive
    _check(d.num_classes >= 2, "data.num_classes", ">= 2 (background + at least one class)", d.num_classes)
    _check(all(s >= 8 for s in d.image_size), "data.image_size", "both sides >= 8", d.image_size)
    _check(d.in_channels >= 1, "data.in_channels", ">= 1", d.in_channels)
    _check(d.n_train >= 2, "data.n_train", ">= 2", d.n_train)
    _check(d.n_val >= 1 and d.n_test >= 1, "data.n_val/n_test", ">= 1", (d.n_val, d.n_test))
    _check(0.0 < d.labelled_fraction <= 1.0, "data.labelled_fraction", "0 < fraction <= 1", d.labelled_fraction)
    if d.name == "synthetic":  # real datasets check labelled_count against their training pool
        _check(0 <= d.labelled_count <= d.n_train, "data.labelled_count", f"0..data.n_train ({d.n_train})", d.labelled_count)
        _check(d.normalise in ("auto", "none", "percentile"), "data.normalise",
               "auto (= none), none or percentile (per image) for synthetic", d.normalise)
    _check(d.labelled_count >= 0, "data.labelled_count", ">= 0", d.labelled_count)
    _check(d.difficulty >= 0, "data.difficulty", ">= 0", d.difficulty)
    _check(bool(d.name) and "/" not in d.name and not d.name.startswith("."), "data.name",
           "a dataset card name (python -m cssl_ray.data list)", d.name)
    _check(d.val_fraction == -1.0 or 0.0 <= d.val_fraction < 1.0, "data.val_fraction", "-1 (the card's) or 0 <= f < 1",
           d.val_fraction)
    _check(d.test_fraction == -1.0 or 0.0 <= d.test_fraction < 1.0, "data.test_fraction",
           "-1 (the card's) or 0 <= f < 1", d.test_fraction)
    _check(d.val_count >= 0 and (d.val_count == 0 or d.name != "synthetic"), "data.val_count",
           ">= 0, and 0 for synthetic (set data.n_val)", d.val_count)
    _check(max(d.val_fraction, 0.0) + max(d.test_fraction, 0.0) < 1.0, "data.val_fraction + data.test_fraction",
           "< 1", (d.val_fraction, d.test_fraction))
    _check(m.base_channels >= 1, "model.base_channels", ">= 1", m.base_channels)
    _check(1 <= m.depth <= 6, "model.depth", "1..6", m.depth)
    _check(m.embed_dim >= 2, "model.embed_dim", ">= 2", m.embed_dim)
    _check(m.proj_hidden >= 1, "model.proj_hidden", ">= 1", m.proj_hidden)
    _check(0.0 < p.threshold <= 1.0, "pseudo.threshold", "0 < threshold <= 1", p.threshold)
    _check(0.0 <= p.class_fraction <= 1.0, "pseudo.class_fraction", "0..1 (0 = the threshold alone)", p.class_fraction)
    _check(0.0 <= p.floor <= 1.0 and (p.class_fraction == 0 or p.floor <= p.threshold), "pseudo.floor",
           f"0..pseudo.threshold ({p.threshold}) with pseudo.class_fraction > 0", p.floor)
    _check(p.ignore_index < 0 or p.ignore_index >= d.num_classes, "pseudo.ignore_index",
           f"negative or >= data.num_classes ({d.num_classes})", p.ignore_index)
    _check(pt.size >= 1 and all(pt.size <= s for s in d.image_size), "patches.size",
           f"1..min(data.image_size) ({min(d.image_size)})", pt.size)
    _check(1 <= pt.min_pixels <= pt.size * pt.size, "patches.min_pixels", f"1..patches.size^2 ({pt.size ** 2})", pt.min_pixels)
    _check(pt.per_image >= 1, "patches.per_image", ">= 1", pt.per_image)
    _check(pt.batch_size >= 2, "patches.batch_size", ">= 2 (an anchor needs a positive)", pt.batch_size)
    _check(c.tau > 0, "contrastive.tau", "> 0", c.tau)
    _check(0.0 <= c.alpha_min, "contrastive.alpha_min", ">= 0", c.alpha_min)
    _check(c.alpha_max <= 0.5, "contrastive.alpha_max", "<= 0.5 (the anchor must weigh less than the negative)", c.alpha_max)
    _check(c.alpha_min < c.alpha_max, "contrastive.alpha_min", f"< contrastive.alpha_max ({c.alpha_max})", c.alpha_min)
    _check(c.hard_ratio > 0, "contrastive.hard_ratio", "> 0", c.hard_ratio)
    _check(c.aux_samples >= 0, "contrastive.aux_samples", ">= 0", c.aux_samples)
    _check(c.aux_sigma > 0, "contrastive.aux_sigma", "> 0", c.aux_sigma)
    _check(cfg.silhouette.max_samples >= 2, "silhouette.max_samples", ">= 2", cfg.silhouette.max_samples)
    _check(cfg.consistency.eps >= 0, "consistency.eps", ">= 0", cfg.consistency.eps)
    _check(0.0 <= cfg.consistency.ema_decay < 1.0, "consistency.ema_decay", "0 <= decay < 1", cfg.consistency.ema_decay)
    _check(cfg.consistency.batch_size >= 1, "consistency.batch_size", ">= 1", cfg.consistency.batch_size)
    o, t = cfg.optim, cfg.train
    _check(o.cssl_lr >= 0, "optim.cssl_lr", ">= 0 (0 = L_tot steps the supervised optimiser)", o.cssl_lr)
    _check(o.finetune_lr >= 0, "optim.finetune_lr", ">= 0 (0 = the rate stage A ended at)", o.finetune_lr)
    _check(o.round_warmup_steps >= 0, "optim.round_warmup_steps", ">= 0", o.round_warmup_steps)
    _check(t.stage_a_patience >= 0, "train.stage_a_patience", ">= 0 (0 = no early stopping)", t.stage_a_patience)
    check_metric("train.select_metric", t.select_metric, None)  # the class name: once the data is known
    _check(o.lr > 0, "optim.lr", "> 0", o.lr)
    _check(o.weight_decay >= 0, "optim.weight_decay", ">= 0", o.weight_decay)
    _check(0.0 < o.plateau_factor < 1.0, "optim.plateau_factor", "0 < factor < 1", o.plateau_factor)
    _check(o.plateau_patience >= 0, "optim.plateau_patience", ">= 0", o.plateau_patience)
    _check(t.batch_size >= 1, "train.batch_size", ">= 1", t.batch_size)
    _check(t.stage_a_steps >= 0, "train.stage_a_steps", ">= 0 (0 = no stage A)", t.stage_a_steps)
    _check(t.max_rounds >= 0, "train.max_rounds", ">= 0", t.max_rounds)
    _check(t.total_steps >= 1, "train.total_steps", ">= 1 (train.protocol joint's budget)", t.total_steps)
    _check(t.rampup_steps >= 0, "train.rampup_steps", ">= 0 (0 = the whole budget)", t.rampup_steps)
    _check(t.pseudo_refresh_steps >= 1, "train.pseudo_refresh_steps", ">= 1", t.pseudo_refresh_steps)
    _check(t.steps_per_round >= 0, "train.steps_per_round", ">= 0", t.steps_per_round)
    _check(t.round_passes >= 1, "train.round_passes", ">= 1", t.round_passes)
    _check(t.sup_steps_per_epoch >= 0, "train.sup_steps_per_epoch", ">= 0", t.sup_steps_per_epoch)
    _check(t.num_threads >= 0, "train.num_threads", ">= 0 (0 = torch's default)", t.num_threads)
    _check(t.keep_checkpoints >= 1, "train.keep_checkpoints", ">= 1", t.keep_checkpoints)
    _check(t.plateau_rounds >= 1, "train.plateau_rounds", ">= 1", t.plateau_rounds)
    _check(t.w_cl >= 0 and t.w_cr >= 0, "train.w_cl/w_cr", ">= 0", (t.w_cl, t.w_cr))
    _check(t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda"), "train.device",
           "auto, cpu, cuda or cuda:N", t.device)
    _check(not (t.amp == "fp16" and t.device == "cpu"), "train.amp", "off or bf16 on train.device cpu "
           "(fp16 needs CUDA)", t.amp)
    _check(t.method == "cssl" or not (t.use_cl or t.use_cr), "train.method",
           "cssl with train.use_cl / use_cr; a baseline needs both false", t.method)
    b = cfg.baselines
    _check(b.pseudo_weight >= 0, "baselines.pseudo_weight", ">= 0", b.pseudo_weight)
    _check(0.0 <= b.mt_ema_decay < 1.0, "baselines.mt_ema_decay", "0 <= decay < 1", b.mt_ema_decay)
    _check(b.mt_weight >= 0, "baselines.mt_weight", ">= 0", b.mt_weight)
    _check(b.mt_rampup_rounds >= 0, "baselines.mt_rampup_rounds", ">= 0 (0 = all rounds)", b.mt_rampup_rounds)
    _check(b.mt_noise_std >= 0, "baselines.mt_noise_std", ">= 0", b.mt_noise_std)
    _check(b.cps_weight >= 0, "baselines.cps_weight", ">= 0", b.cps_weight)
    _check(b.simclr_epochs >= 1, "baselines.simclr_epochs", ">= 1", b.simclr_epochs)
    _check(b.simclr_batch_size >= 2, "baselines.simclr_batch_size", ">= 2 (a view needs negatives)",
           b.simclr_batch_size)
    _check(b.simclr_temperature > 0, "baselines.simclr_temperature", "> 0", b.simclr_temperature)
    _check(t.method != "cps" or o.cssl_lr > 0, "optim.cssl_lr", "> 0 with train.method cps (one Adam steps both "
           "networks in the unlabelled epoch)", o.cssl_lr)
    return cfg


def from_dict(overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then ``overrides`` (nested dict), then range checks."""
    return validate(apply_overrides(Config(), overrides or {}))


def load_config(path: str | Path, extra: dict[str, Any] | None = None) -> Config:
    """Read a YAML file of overrides; errors name the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror})") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else "invalid YAML"
        raise ConfigError(f"{path}: not valid YAML ({first})") from None
    try:
        cfg = apply_overrides(Config(), data)
        if extra:
            cfg = apply_overrides(cfg, extra)
        return validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) for YAML, Ray and MLflow."""
    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(cfg))


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def parse_override(text: str) -> dict[str, Any]:
    """``"contrastive.tau=0.2"`` -> ``{"contrastive": {"tau": 0.2}}`` (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.path=value")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw)
    if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string; a number is meant
        try:
            value = float(value) if value.strip().lower() not in ("nan", "inf", "-inf", "infinity") else value
        except ValueError:
            pass
    out: dict[str, Any] = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge nested dicts (b wins)."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
