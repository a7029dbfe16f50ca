"""What a space's keys become: YAML numbers read strictly, dotted keys nested, overrides applied to a
``Config`` and that config checked (validation, network geometry, selection metric, dataset card).

Config-level checks only: nothing here touches a dataset's files.
"""
from __future__ import annotations

import functools
from typing import Any

from cssl_ray.config import Config, ConfigError, apply_overrides, check_metric, merge, validate
from cssl_ray.data.bundle import check_card
from cssl_ray.data.cards import CardError, DatasetCard, load_card
from cssl_ray.data.synthetic import class_names as synthetic_class_names
from cssl_ray.models import check_geometry


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


def raw_config(overrides: dict[str, Any]) -> Config:
    return apply_overrides(Config(), overrides)


@functools.lru_cache(maxsize=None)
def dataset_card(dataset: str) -> DatasetCard | None:
    """The card whose classes / channels the config must match (synthetic: any class count)."""
    if dataset == "synthetic":
        return None
    try:
        return load_card(dataset)
    except CardError as e:
        raise ConfigError(f"data.name: {e}") from None


def checked_config(cfg: Config, card: DatasetCard | None) -> Config:
    validate(cfg)
    check_geometry(cfg.model, cfg.data.image_size, cfg.patches.size)
    check_metric("train.select_metric", cfg.train.select_metric, config_class_names(cfg, card))
    if card is not None:
        check_card(cfg.data, card)
    return cfg


def config_class_names(cfg: Config, card: DatasetCard | None) -> list[str] | None:
    if cfg.data.name == "synthetic":
        return synthetic_class_names(cfg.data.num_classes)
    return None if card is None or card.classes is None else list(card.classes)


def read_number(value: Any, key: str, fail: Any, integer: bool = False) -> Any:
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
