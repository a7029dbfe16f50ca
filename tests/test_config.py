"""The config tree: paper defaults, YAML overrides, one-line errors naming the key."""
from __future__ import annotations

import pytest

from cssl_ray.config import Config, ConfigError, check_metric, from_dict, load_config, parse_override, to_dict


def test_paper_defaults():
    cfg = Config()
    assert cfg.contrastive.tau == 0.1
    assert (cfg.contrastive.alpha_min, cfg.contrastive.alpha_max) == (0.0, 0.4)
    assert cfg.contrastive.hard_ratio == 1.0
    assert cfg.patches.size == 64 and cfg.patches.min_pixels == 25 and cfg.patches.batch_size == 816
    assert cfg.model.embed_dim == 256
    assert cfg.consistency.batch_size == 8
    assert cfg.optim.lr == 1e-3 and cfg.optim.plateau_factor == 0.1
    assert cfg.pseudo.threshold == 0.9 and cfg.pseudo.ignore_index == 255
    assert cfg.patches.mask == "others_all" and cfg.silhouette.metric == "manhattan"
    assert cfg.patches.per_image * cfg.consistency.batch_size >= cfg.patches.batch_size  # 8 images fill 816
    assert cfg.consistency.noise == "absolute"  # lambda is the noise variance itself, as written


def test_yaml_overrides_nested(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("contrastive:\n  tau: 0.2\ndata:\n  image_size: [64, 96]\ntrain:\n  use_cl: false\n")
    cfg = load_config(p)
    assert cfg.contrastive.tau == 0.2
    assert cfg.data.image_size == (64, 96)
    assert cfg.train.use_cl is False
    assert cfg.contrastive.alpha_max == 0.4  # untouched keys keep their defaults


def test_int_accepted_for_float():
    assert from_dict({"optim": {"lr": 1}}).optim.lr == 1.0


@pytest.mark.parametrize("overrides, needle", [
    ({"contrastive": {"tauu": 0.1}}, "unknown config key 'contrastive.tauu'"),
    ({"contrastiv": {}}, "unknown config key 'contrastiv'"),
    ({"contrastive": {"tau": "high"}}, "contrastive.tau: expected a number"),
    ({"train": {"use_cl": "yes"}}, "train.use_cl: expected true or false"),
    ({"train": {"max_rounds": 2.5}}, "train.max_rounds: expected an integer"),
    ({"contrastive": {"tau": 0.0}}, "contrastive.tau"),
    ({"contrastive": {"tau": -1.0}}, "contrastive.tau"),
    ({"contrastive": {"alpha_max": 0.6}}, "contrastive.alpha_max"),
    ({"contrastive": {"alpha_min": 0.3, "alpha_max": 0.2}}, "contrastive.alpha_min"),
    ({"patches": {"mask": "some"}}, "patches.mask: 'some' is not allowed"),
    ({"patches": {"size": 512}}, "patches.size"),
    ({"pseudo": {"threshold": 1.5}}, "pseudo.threshold"),
    ({"pseudo": {"ignore_index": 2}}, "pseudo.ignore_index"),
    ({"data": {"image_size": [64]}}, "data.image_size: expected a list of 2 values"),
    ({"consistency": {"teacher": "mean"}}, "consistency.teacher"),
    ({"optim": {"plateau_factor": 1.0}}, "optim.plateau_factor"),
    ({"optim": {"cssl_lr": -1e-4}}, "optim.cssl_lr"),
    ({"optim": {"finetune_lr": -1.0}}, "optim.finetune_lr"),
    ({"optim": {"round_warmup_steps": -1}}, "optim.round_warmup_steps"),
    ({"optim": {"round_schedule": "linear"}}, "optim.round_schedule: 'linear' is not allowed"),
    ({"train": {"stage_a_patience": -1}}, "train.stage_a_patience"),
    ({"train": {"stop": "plateau"}}, "train.stop: 'plateau' is not allowed"),
    ({"consistency": {"noise": "loud"}}, "consistency.noise: 'loud' is not allowed"),
    ({"patches": {"per_image": 0}}, "patches.per_image"),
    ({"patches": {"per_class_per_image": 4}}, "unknown config key 'patches.per_class_per_image'"),
    ({"train": {"select_metric": "dice_mean"}}, "train.select_metric: 'dice_mean' is not a validation record key; "
                                                "allowed: val_loss, val_dice_mean, val_iou_mean, val_dice/<class>, "
                                                "val_iou/<class>"),
    ({"train": {"select_metric": "loss_cl"}}, "train.select_metric: 'loss_cl' is not a validation record key"),
    ({"train": {"select_metric": "val_dice/"}}, "train.select_metric: 'val_dice/'"),
    ({"train": {"select_mode": "best"}}, "train.select_mode: 'best' is not allowed; choose one of auto, max, min"),
    ({"train": {"supervised_epochs": 60}}, "train.supervised_epochs was replaced by train.stage_a_steps"),
    ({"train": {"stage_a_steps": -1}}, "train.stage_a_steps"),
    ({"train": {"round_passes": 0}}, "train.round_passes"),
    ({"train": {"ltot_bn": "eval"}}, "train.ltot_bn: 'eval' is not allowed"),
    ({"optim": {"plateau_metric": "val_dice"}}, "optim.plateau_metric: 'val_dice' is not allowed"),
    ({"pseudo": {"class_fraction": 1.5}}, "pseudo.class_fraction"),
    ({"pseudo": {"class_fraction": 0.5, "floor": 0.95}}, "pseudo.floor: 0.95 is out of range; allowed: 0..pseudo.threshold"),
    ({"data": {"val_count": 5}}, "data.val_count: 5 is out of range; allowed: >= 0, and 0 for synthetic"),
])
def test_bad_values_are_one_line_errors_naming_the_key(overrides, needle):
    with pytest.raises(ConfigError) as e:
        from_dict(overrides)
    msg = str(e.value)
    assert needle in msg
    assert "\n" not in msg


def test_file_errors_name_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("contrastive:\n  tau: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(p)
    p.write_text("model:\n  embed_dimm: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'model.embed_dimm'"):
        load_config(p)
    with pytest.raises(ConfigError, match="missing.yaml: cannot read config"):
        load_config(tmp_path / "missing.yaml")


def test_patch_size_must_be_multiple_of_stride():
    from cssl_ray.models import check_geometry
    cfg = from_dict({"model": {"depth": 3}, "data": {"image_size": [64, 64]}, "patches": {"size": 20}})
    with pytest.raises(ConfigError, match="patches.size") as e:
        check_geometry(cfg.model, cfg.data.image_size, cfg.patches.size)
    assert "\n" not in str(e.value)
    check_geometry(cfg.model, cfg.data.image_size, 16)


def test_round_trip_and_override_parsing(tmp_path):
    cfg = from_dict({"contrastive": {"tau": 0.3}})
    again = from_dict(to_dict(cfg))
    assert again == cfg
    assert parse_override("contrastive.tau=0.2") == {"contrastive": {"tau": 0.2}}
    assert parse_override("train.use_cl=false") == {"train": {"use_cl": False}}
    assert parse_override("optim.cssl_lr=1e-5") == {"optim": {"cssl_lr": 1e-5}}  # YAML 1.1 alone: a string
    assert parse_override("data.name=nuclei") == {"data": {"name": "nuclei"}}
    with pytest.raises(ConfigError):
        parse_override("contrastive.tau")


def test_selection_metric_and_mode():
    assert Config().train.selection() == ("val_dice_mean", "max")
    assert from_dict({"train": {"select_metric": "val_loss"}}).train.selection() == ("val_loss", "min")  # auto
    cfg = from_dict({"train": {"select_metric": "val_iou/anything", "select_mode": "min"}})  # the class: with the data
    assert cfg.train.selection() == ("val_iou/anything", "min")
    with pytest.raises(ConfigError, match=r"^k: 'val_dice/liver' is not a validation record key; allowed: val_loss, "
                                          r"val_dice_mean, val_iou_mean, val_dice/background, val_dice/blob, "
                                          r"val_iou/background, val_iou/blob$"):
        check_metric("k", "val_dice/liver", ["background", "blob"])
    check_metric("k", "val_iou/blob", ["background", "blob"])
