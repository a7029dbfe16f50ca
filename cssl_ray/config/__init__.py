"""The one typed config tree (``tree``: every default, with the paper's symbols explained) and how
configs are read, overridden, checked and written (``load``). Import from here:
``from cssl_ray.config import Config, load_config``."""
from cssl_ray.config.load import (
                                  RENAMED,
                                  apply_overrides,
                                  dump_config,
                                  from_dict,
                                  load_config,
                                  merge,
                                  parse_override,
                                  to_dict,
                                  validate,
)
from cssl_ray.config.tree import (
                                  PER_CLASS_VAL_METRICS,
                                  VAL_METRICS,
                                  BaselinesConfig,
                                  Config,
                                  ConfigError,
                                  ConsistencyConfig,
                                  ContrastiveConfig,
                                  DataConfig,
                                  ModelConfig,
                                  OptimConfig,
                                  PatchConfig,
                                  PseudoConfig,
                                  SilhouetteConfig,
                                  TrainConfig,
                                  check_metric,
                                  natural_mode,
)

__all__ = ["RENAMED", "apply_overrides", "dump_config", "from_dict", "load_config", "merge", "parse_override", "to_dict",
           "validate", "PER_CLASS_VAL_METRICS", "VAL_METRICS", "BaselinesConfig", "Config", "ConfigError",
           "ConsistencyConfig", "ContrastiveConfig", "DataConfig", "ModelConfig", "OptimConfig", "PatchConfig",
           "PseudoConfig", "SilhouetteConfig", "TrainConfig", "check_metric", "natural_mode"]
