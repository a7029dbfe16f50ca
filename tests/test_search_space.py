"""Search spaces: every shipped space loads, every bad space is one line naming the key, and every
value a domain can draw gives a valid config."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from cssl_ray.config import Config, ConfigError
from cssl_ray.experiments.ablation_cells import (
    ABLATION_CELLS,
    BASELINE_CELLS,
    CELL_BASELINES,
    CELL_DATA,
    DEFAULT_CELLS,
    cell_of,
)
from cssl_ray.experiments.search_space import SpaceError, load_space
from cssl_ray.experiments.space_config import unflatten
from cssl_ray.experiments.space_domains import Domain

SPACES = sorted((Path(__file__).resolve().parents[1] / "tune_spaces").glob("*.yaml"))
SMOKE_BASE = str(Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml")


def write(tmp_path: Path, body: dict | str, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(body if isinstance(body, str) else yaml.safe_dump(body, sort_keys=False))
    return path


def smoke(**extra) -> dict:
    """A valid synthetic space on the smoke config (stride 4, 32 px images); ``extra`` replaces keys."""
    body = {"dataset": "synthetic", "base": SMOKE_BASE,
            "search": {"contrastive.tau": {"loguniform": [0.05, 0.5]}}}
    body.update(extra)
    return body


def test_spaces_folder_is_not_empty():
    assert {p.stem for p in SPACES} >= {"monuseg", "chaos", "jsrt", "idrid", "folder", "nuclei", "smoke"}


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.stem)
def test_shipped_space_loads(path: Path):
    space = load_space(path)  # real datasets are not on disk: loading must not need them
    cfg = space.base_config()
    assert space.name == path.stem and cfg.data.name == space.dataset
    assert set(space.param_space()) == set(space.search)
    if path.stem in ("nuclei", "nuclei_demo", "nuclei_headroom", "synthetic"):  # the CPU spaces: tau and what decides the rounds
        assert {"contrastive.tau", "pseudo.threshold", "optim.cssl_lr"} <= set(space.search)
    elif path.stem != "smoke":  # the paper's data sets: the loss's own hyperparameters, threshold, rate
        assert {"contrastive.tau", "consistency.eps", "contrastive.alpha_min", "contrastive.alpha_max",
                "patches.size", "pseudo.threshold", "optim.cssl_lr"} <= set(space.search)
    if "patches.size" in space.search:
        assert space.search["patches.size"].kind in ("choice", "grid")
    assert path.read_text().startswith("#")  # the header says what it searches and its budget


def test_headroom_space_gives_both_protocols_one_budget():
    """nuclei_headroom: SSL4MIS's CE + Dice in every cell, and the paper protocol's optimiser steps equal
    the joint budget (stage A + rounds x (one L_tot pass over nuclei's 21 D_U images in batches of
    consistency.batch_size + the fine-tune steps))."""
    space = load_space(next(p for p in SPACES if p.stem == "nuclei_headroom"))
    cfg, t = space.base_config(), space.base_config().train
    assert t.sup_loss == "ce_dice" and t.protocol == "joint" and space.ablation.protocols == ["joint", "paper"]
    l_tot_steps = -(-21 // cfg.consistency.batch_size)
    assert t.stage_a_steps + t.max_rounds * (l_tot_steps + t.sup_steps_per_epoch) == t.total_steps
    assert t.last_round() == t.max_rounds  # as many validations under joint as rounds under paper
    assert {"supervised", "supervised_all", "bn_mix", "mean_teacher", "cps", "cssl"} <= set(space.ablation.cells)


def test_smoke_space_settings():
    space = load_space(next(p for p in SPACES if p.stem == "smoke"))
    assert space.dataset == "synthetic" and space.num_samples == 2 and space.max_concurrent_trials == 2
    assert space.resources == type(space.resources)(workers=1, cpus_per_worker=0.5, gpus_per_worker=0.0)
    assert space.ablation.seeds == 2 and space.ablation.cells == DEFAULT_CELLS
    assert space.base_config().train.max_rounds == 2  # from ../configs/smoke.yaml


def test_defaults_and_layering(tmp_path: Path):
    path = write(tmp_path, smoke(labelled_fraction=0.5, config={"train": {"max_rounds": 3}}), "mine.yaml")
    space = load_space(path)
    assert (space.name, space.metric, space.mode, space.num_samples) == ("mine", "val_dice_mean", "max", 1)
    assert (space.scheduler.name, space.scheduler.grace_period, space.scheduler.reduction_factor) == ("asha", 1, 2.0)
    assert space.max_concurrent_trials == 2 and space.ablation.seeds == 3 and space.ablation.label_fractions == []
    cfg = space.base_config()
    assert cfg.train.max_rounds == 3 and cfg.model.depth == 2  # config: over base
    assert cfg.data.labelled_fraction == 0.5 and cfg.data.labelled_count == 0
    assert space.overrides["data"]["name"] == "synthetic"
    assert load_space(write(tmp_path, smoke(metric="val_loss"))).mode == "min"
    assert load_space(write(tmp_path, smoke(metric="loss_cl"))).mode == "min"
    assert load_space(write(tmp_path, smoke(metric="val_dice/blob"))).metric == "val_dice/blob"


BAD = [
    ("unknown top-level", smoke(budget=3), "unknown key 'budget'; allowed: name, dataset"),
    ("missing dataset", {"search": {}}, "dataset: missing"),
    ("unknown dataset", smoke(dataset="mnist"), "dataset: 'mnist' is not a card"),
    ("fraction and count", smoke(labelled_fraction=0.1, labelled_count=3), "labelled_fraction, labelled_count"),
    ("fraction range", smoke(labelled_fraction=1.5), "labelled_fraction: 1.5 is out of range"),
    ("missing base", smoke(base="nope.yaml"), "base: "),
    ("bad config key", smoke(config={"train": {"roundz": 1}}), "config: unknown config key 'train.roundz'"),
    ("bad config value", smoke(config={"contrastive": {"tau": -1.0}}), "config: contrastive.tau"),
    ("conflicting data.name", smoke(config={"data": {"name": "nuclei"}}), "config.data.name: 'nuclei' conflicts"),
    ("card classes", {"dataset": "monuseg"}, "space.yaml: data.num_classes: 4 does not match dataset 'monuseg'"),
    ("section as key", smoke(search={"contrastive": {"uniform": [0.1, 0.2]}}), "search.contrastive: not a leaf"),
    ("typo key", smoke(search={"contrastive.taux": {"uniform": [0.1, 0.2]}}),
     "allowed in contrastive: contrastive.tau"),
    ("unknown section", smoke(search={"foo.bar": {"uniform": [0.1, 0.2]}}), "search.foo.bar: unknown config section"),
    ("unsearchable", smoke(search={"train.out_dir": {"choice": ["a", "b"]}}), "search.train.out_dir: not searchable"),
    ("unsearchable name", smoke(search={"data.name": {"choice": ["synthetic"]}}), "search.data.name: not searchable"),
    ("two kinds", smoke(search={"contrastive.tau": {"uniform": [0.1, 0.2], "choice": [0.1]}}),
     "search.contrastive.tau: expected one domain"),
    ("unknown kind", smoke(search={"contrastive.tau": {"normal": [0.1, 0.2]}}), "search.contrastive.tau: expected one"),
    ("bare value", smoke(search={"contrastive.tau": 0.1}), "search.contrastive.tau: expected one domain"),
    ("arity", smoke(search={"contrastive.tau": {"uniform": [0.1]}}),
     "search.contrastive.tau: uniform needs [low, high]"),
    ("low >= high", smoke(search={"contrastive.tau": {"uniform": [0.2, 0.1]}}),
     "search.contrastive.tau: uniform needs low < high"),
    ("loguniform zero", smoke(search={"contrastive.tau": {"loguniform": [0, 0.5]}}),
     "search.contrastive.tau: loguniform needs 0 < low < high, got [0, 0.5]"),
    ("string number", smoke(search={"optim.lr": {"loguniform": ["1e-4", 0.01]}}), "search.optim.lr: expected a number"),
    ("randint floats", smoke(search={"model.depth": {"randint": [1.5, 3]}}), "search.model.depth: expected an integer"),
    ("randint empty", smoke(search={"model.depth": {"randint": [2, 2]}}),
     "search.model.depth: randint needs low < high"),
    ("uniform on int", smoke(search={"model.depth": {"uniform": [1, 3]}}),
     "search.model.depth: uniform draws floats but model.depth takes an integer; use randint"),
    ("randint on literal", smoke(search={"consistency.teacher": {"randint": [0, 2]}}),
     "search.consistency.teacher: randint draws integers but consistency.teacher takes one of previous, ema; "
     "use choice"),
    ("empty choice", smoke(search={"contrastive.tau": {"choice": []}}),
     "search.contrastive.tau: choice needs a non-empty"),
    ("grid not list", smoke(search={"train.seed": {"grid": 3}}), "search.train.seed: grid needs a non-empty list"),
    ("choice bad type", smoke(search={"train.seed": {"choice": [0, "one"]}}), "search.train.seed: 'one'"),
    ("corner out of range", smoke(search={"contrastive.tau": {"uniform": [0.0, 0.5]}}),
     "search.contrastive.tau: 0.0 (a uniform corner) gives an invalid config: contrastive.tau"),
    ("alpha overlap", smoke(search={"contrastive.alpha_min": {"uniform": [0.0, 0.3]},
                                    "contrastive.alpha_max": {"uniform": [0.2, 0.5]}}),
     "search.contrastive.alpha_max: sampled values can break 0 <= alpha_min < alpha_max <= 0.5 "
     "(alpha_min up to 0.3, alpha_max from 0.2); keep the ranges apart"),
    ("alpha touching", smoke(search={"contrastive.alpha_min": {"uniform": [0.0, 0.2]},
                                     "contrastive.alpha_max": {"uniform": [0.2, 0.4]}}), "keep the ranges apart"),
    ("alpha vs base", smoke(search={"contrastive.alpha_min": {"uniform": [0.0, 0.45]}}),
     "search.contrastive.alpha_min: sampled values can break"),
    ("alpha_max > 0.5", smoke(search={"contrastive.alpha_max": {"uniform": [0.3, 0.6]}}),
     "search.contrastive.alpha_max: 0.6"),
    ("patch stride", smoke(search={"patches.size": {"choice": [16, 18]}}),
     "search.patches.size: 18 is not valid for the model's stride 4 (model.name=attention_unet, model.depth=2); "
     "allowed: 4, 8, 12, 16, ... (nearest: 16 or 20)"),
    ("patch with depth", smoke(search={"patches.size": {"choice": [8, 16]}, "model.depth": {"randint": [2, 5]}}),
     "search.patches.size: 8 is not valid for the model's stride 16"),
    ("patch uniform", smoke(search={"patches.size": {"uniform": [16, 32]}}),
     "search.patches.size: uniform draws sizes that need not be multiples of the network stride 4; search it with "
     "choice or grid of sizes valid for the stride"),
    ("patch randint", smoke(search={"patches.size": {"randint": [16, 33]}}), "search it with choice or grid"),
    ("patch too big", smoke(search={"patches.size": {"choice": [16, 64]}}), "search.patches.size: 64"),
    ("fraction search ignored", {"dataset": "nuclei", "base": str(Path(SMOKE_BASE).with_name("nuclei.yaml")),
                                 "search": {"data.labelled_fraction": {"uniform": [0.1, 0.5]}}},
     "search.data.labelled_fraction: has no effect while data.labelled_count is 3"),
    ("metric", smoke(metric="dice"), "metric: 'dice' is not a key the trials report"),
    ("metric class", smoke(metric="val_dice/liver"), "metric: 'val_dice/liver'"),
    ("mode", smoke(mode="maximise"), "mode: 'maximise' is not allowed"),
    ("num_samples", smoke(num_samples=0), "num_samples: 0 is out of range; allowed: >= 1"),
    ("scheduler name", smoke(scheduler={"name": "pbt"}), "scheduler.name: 'pbt' is not allowed"),
    ("scheduler key", smoke(scheduler={"name": "asha", "max_t": 3}), "unknown key 'scheduler.max_t'"),
    ("grace", smoke(scheduler={"grace_period": 0}), "scheduler.grace_period: 0 is out of range"),
    ("reduction", smoke(scheduler={"reduction_factor": 1}), "scheduler.reduction_factor: 1 is out of range"),
    ("workers", smoke(resources={"workers": -1}), "resources.workers: -1 is out of range"),
    ("cpus", smoke(resources={"cpus_per_worker": 0}), "resources.cpus_per_worker: 0 is out of range"),
    ("gpus", smoke(resources={"gpus_per_worker": -1}), "resources.gpus_per_worker: -1 is out of range"),
    ("labellers", smoke(resources={"labellers": 0}), "resources.labellers: 0 is out of range; allowed: >= 1"),
    ("labeller gpus", smoke(resources={"gpus_per_labeller": 1.5}),
     "resources.gpus_per_labeller: 1.5 is out of range; allowed: 0 (CPU labellers) to 1 (a fraction shares a GPU)"),
    ("resources key", smoke(resources={"gpus_per_labellers": 0.5}), "unknown key 'resources.gpus_per_labellers'"),
    ("concurrency", smoke(max_concurrent_trials=0), "max_concurrent_trials: 0 is out of range"),
    ("seeds", smoke(ablation={"seeds": 0}), "ablation.seeds: 0 is out of range"),
    ("cells", smoke(ablation={"cells": ["cssl", "mixup"]}), "ablation.cells: ['cssl', 'mixup'] is not allowed"),
    ("fractions", smoke(ablation={"label_fractions": [0.1, 0.0]}), "ablation.label_fractions: 0.0 is out of range"),
    ("protocols", smoke(ablation={"protocols": ["paper", "jont"]}), "ablation.protocols: ['paper', 'jont'] is not allowed"),
    ("search_algorithm typo", smoke(search_algorithm="optuan"),
     "search_algorithm: 'optuan' is not allowed; choose random or optuna"),
    ("search_algorithm case", smoke(search_algorithm="Optuna"), "search_algorithm: 'Optuna' is not allowed"),
    ("grid with optuna", smoke(search_algorithm="optuna", search={"contrastive.tau": {"loguniform": [0.05, 0.5]},
                                                                  "train.seed": {"grid": [0, 1]}}),
     "search.train.seed: grid is not allowed with search_algorithm: optuna"),
    ("optuna without search", smoke(search_algorithm="optuna", search={}),
     "search: search_algorithm: optuna needs at least one searched key"),
    ("seed with random", smoke(seed=3), "seed: seeds Optuna's sampler only and has no effect with search_algorithm: "
                                        "random"),
    ("seed negative", smoke(search_algorithm="optuna", seed=-1), "seed: -1 is out of range; allowed: >= 0"),
    ("seed float", smoke(search_algorithm="optuna", seed=1.5), "seed: expected an integer, got 1.5"),
    ("not a mapping", "- 1\n- 2\n", "expected a mapping of keys"),
    ("invalid yaml", "dataset: [synthetic\n", "not valid YAML (line 2: "),
]


@pytest.mark.parametrize("body, expected", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_space_is_one_line_naming_the_key(tmp_path: Path, body, expected: str):
    path = write(tmp_path, body)
    with pytest.raises(SpaceError) as info:
        load_space(path)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{path}: "), msg
    assert expected in msg, msg
    assert isinstance(info.value, ConfigError)


def test_unreadable_file(tmp_path: Path):
    with pytest.raises(SpaceError, match=r"^.*missing\.yaml: cannot read search space"):
        load_space(tmp_path / "missing.yaml")


def test_base_is_relative_to_the_space_file(tmp_path: Path):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "tiny.yaml").write_text(Path(SMOKE_BASE).read_text())
    space = load_space(write(tmp_path, smoke(base="cfg/tiny.yaml")))
    assert space.base_config().model.depth == 2
    (tmp_path / "cfg" / "bad.yaml").write_text("train: {roundz: 1}\n")
    with pytest.raises(SpaceError, match=r"space\.yaml: base: .*bad\.yaml: unknown config key 'train\.roundz'"):
        load_space(write(tmp_path, smoke(base="cfg/bad.yaml")))


def _sample(domain: Domain, n: int, rng) -> list:
    """n draws from ``domain`` through Tune's own sampler (grid: every value in turn)."""
    tuned = domain.to_tune()
    if isinstance(tuned, dict):
        return [tuned["grid_search"][i % len(tuned["grid_search"])] for i in range(n)]
    return list(tuned.sample(size=n, random_state=rng))


def test_apart_alpha_ranges_pass_and_every_sample_is_valid(tmp_path: Path):
    np = pytest.importorskip("numpy")
    space = load_space(write(tmp_path, smoke(search={
        "contrastive.tau": {"loguniform": [0.05, 0.5]},
        "consistency.eps": {"uniform": [0.0, 0.1]},
        "contrastive.alpha_min": {"uniform": [0.0, 0.2]},
        "contrastive.alpha_max": {"uniform": [0.25, 0.5]},
        "patches.size": {"choice": [8, 16, 32]},
        "model.depth": {"randint": [1, 4]},
        "train.seed": {"grid": [0, 1]},
    })))
    rng = np.random.default_rng(0)
    draws = {key: _sample(domain, 2000, rng) for key, domain in space.search.items()}
    seen_depths = set()
    for i in range(2000):
        cfg = space.trial_config({key: values[i] for key, values in draws.items()})  # NumPy scalars too
        assert cfg.contrastive.alpha_min < cfg.contrastive.alpha_max <= 0.5
        assert cfg.patches.size % 2**cfg.model.depth == 0
        seen_depths.add(cfg.model.depth)
    assert seen_depths == {1, 2, 3}  # randint's upper bound is exclusive


def test_to_tune_types_and_bounds():
    from ray.tune.search.sample import Categorical, Float, Integer, LogUniform, Uniform

    u = Domain("uniform", [0.0, 0.1]).to_tune()
    assert isinstance(u, Float) and isinstance(u.get_sampler(), Uniform) and (u.lower, u.upper) == (0.0, 0.1)
    lu = Domain("loguniform", [0.05, 0.5]).to_tune()
    assert isinstance(lu, Float) and isinstance(lu.get_sampler(), LogUniform) and (lu.lower, lu.upper) == (0.05, 0.5)
    r = Domain("randint", [2, 4]).to_tune()
    assert isinstance(r, Integer) and (r.lower, r.upper) == (2, 4)
    c = Domain("choice", [16, 24]).to_tune()
    assert isinstance(c, Categorical) and c.categories == [16, 24]
    assert Domain("grid", [0, 1]).to_tune() == {"grid_search": [0, 1]}


def test_corners():
    assert Domain("uniform", [0, 1]).corners() == [0.0, 1.0]
    assert Domain("loguniform", [0.05, 0.5]).corners() == [0.05, 0.5]
    assert Domain("randint", [2, 4]).corners() == [2, 3]
    assert Domain("choice", [16, 24, 32]).corners() == [16, 24, 32]
    assert Domain("grid", [0, 1]).corners() == [0, 1]


def test_param_space_and_trial_config(tmp_path: Path):
    space = load_space(write(tmp_path, smoke(search={
        "contrastive.tau": {"loguniform": [0.05, 0.5]}, "train.seed": {"grid": [0, 1]}})))
    ps = space.param_space()
    assert set(ps) == {"contrastive.tau", "train.seed"} and ps["train.seed"] == {"grid_search": [0, 1]}
    cfg = space.trial_config({"contrastive.tau": 0.2, "train.seed": 1, "train.out_dir": "/tmp/x",
                              **{f"train.{k}": v for k, v in ABLATION_CELLS["cl_hn"].items()}})
    assert isinstance(cfg, Config)
    assert (cfg.contrastive.tau, cfg.train.seed, cfg.train.out_dir) == (0.2, 1, "/tmp/x")
    assert cfg.model.depth == 2 and cell_of(cfg) == "cl_hn"  # the base is kept
    assert space.base_config().contrastive.tau == 0.1
    with pytest.raises(ConfigError, match=r"space\.yaml: contrastive\.tau: -1\.0 is out of range") as info:
        space.trial_config({"contrastive.tau": -1.0})
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=r"unknown config key 'contrastive\.taux'"):
        space.trial_config({"contrastive.taux": 0.2})


def test_search_algorithm_default_and_optuna(tmp_path: Path):
    space = load_space(write(tmp_path, smoke()))
    assert (space.search_algorithm, space.seed) == ("random", 0)
    space = load_space(write(tmp_path, smoke(search_algorithm="optuna")))
    assert (space.search_algorithm, space.seed) == ("optuna", 0)  # seeded by default
    space = load_space(write(tmp_path, smoke(search_algorithm="optuna", seed=7)))
    assert (space.search_algorithm, space.seed) == ("optuna", 7)
    assert load_space(write(tmp_path, smoke(search_algorithm="random"))).search_algorithm == "random"


def test_optuna_distributions_have_the_corners_bounds(tmp_path: Path):
    """Ray's OptunaSearch maps every domain kind optuna takes to an Optuna distribution whose ends are
    exactly the domain's corners, so the corner check covers every TPE suggestion."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
    from ray.tune.search.optuna import OptunaSearch

    space = load_space(write(tmp_path, smoke(search_algorithm="optuna", search={
        "contrastive.tau": {"loguniform": [0.05, 0.5]}, "consistency.eps": {"uniform": [0.0, 0.1]},
        "model.depth": {"randint": [2, 4]}, "patches.size": {"choice": [8, 16]},
        "train.use_hard_negatives": {"choice": [True, False]}})))
    dists = OptunaSearch.convert_search_space(space.param_space())
    assert set(dists) == set(space.search)  # dotted keys kept as they are
    for key, dist in dists.items():
        corners = space.search[key].corners()
        if isinstance(dist, CategoricalDistribution):
            assert list(dist.choices) == corners, key
        else:
            assert isinstance(dist, IntDistribution if space.search[key].kind == "randint" else FloatDistribution)
            assert [dist.low, dist.high] == corners and dist.step in (None, 1), key  # both ends drawable
    assert dists["contrastive.tau"].log and not dists["consistency.eps"].log and not dists["model.depth"].log
    assert (dists["model.depth"].low, dists["model.depth"].high) == (2, 3)  # randint's high is exclusive


def test_make_searcher(tmp_path: Path):
    from cssl_ray.experiments.tune import make_searcher, search_text

    random = load_space(write(tmp_path, smoke()))
    assert make_searcher(random) is None and search_text(random) == "random search"  # Tune's variant generator
    space = load_space(write(tmp_path, smoke(search_algorithm="optuna", seed=5, metric="val_loss")))
    searcher = make_searcher(space)
    assert type(searcher).__name__ == "OptunaSearch" and (searcher.metric, searcher.mode) == ("val_loss", "min")
    assert type(searcher._sampler).__name__ == "TPESampler" and search_text(space) == "Optuna TPE search (seed 5)"

    def first_suggestions(seed: int) -> list[float]:
        s = make_searcher(dataclasses.replace(space, seed=seed))
        s.set_search_properties(space.metric, space.mode, space.param_space())
        return [s.suggest(f"t{i}")["contrastive.tau"] for i in range(3)]

    first = first_suggestions(5)
    assert first == first_suggestions(5) != first_suggestions(6)  # seeded
    assert all(0.05 <= tau <= 0.5 for tau in first)


def test_unflatten():
    assert unflatten({"a.b": 1, "a.c.d": 2, "e": 3}) == {"a": {"b": 1, "c": {"d": 2}}, "e": 3}
    assert unflatten({}) == {}
    with pytest.raises(ConfigError, match="a.b"):
        unflatten({"a": 1, "a.b": 2})


@pytest.mark.parametrize("name", [c for c in ABLATION_CELLS if c != "supervised_all"])  # its data says it
def test_cell_of_round_trips(name: str):
    train = dataclasses.replace(Config().train, **ABLATION_CELLS[name])
    baselines = dataclasses.replace(Config().baselines, **CELL_BASELINES.get(name, {}))
    assert cell_of(dataclasses.replace(Config(), train=train, baselines=baselines)) == name


def test_cells_match_the_paper():
    assert DEFAULT_CELLS == ["supervised", "cl", "cl_hn", "cr", "cl_cr", "cssl", "supervised_all"]
    assert list(ABLATION_CELLS) == DEFAULT_CELLS + list(BASELINE_CELLS)
    assert CELL_DATA == {"supervised_all": {"labelled_fraction": 1.0, "labelled_count": 0}}
    assert ABLATION_CELLS["cssl"] == {"use_cl": True, "use_cr": True, "use_hard_negatives": True, "method": "cssl"}
    off = {"use_cl": False, "use_cr": False, "use_hard_negatives": False}
    assert ABLATION_CELLS["supervised"] == {**off, "method": "cssl"}
    hn_without_cl = dataclasses.replace(Config().train, use_cl=False, use_cr=True, use_hard_negatives=True)
    assert cell_of(dataclasses.replace(Config(), train=hn_without_cl)) == "cr"  # hn is irrelevant without CL
    for cell in BASELINE_CELLS:  # a baseline: every CSSL switch off, its method on; maps back to itself
        if cell in CELL_BASELINES:  # another cell's method with one baselines key changed
            continue
        assert ABLATION_CELLS[cell] == {**off, "method": cell}
        assert cell_of(dataclasses.replace(Config(), train=dataclasses.replace(Config().train, **ABLATION_CELLS[cell]))) \
            == cell
    # bn_stats: bn_mix with its D_U in a forward of its own; simclr_dl: SimCLR's steps on D_L alone
    assert CELL_BASELINES == {"bn_stats": {"bn_batch": "separate"}, "simclr_dl": {"simclr_images": "labelled"}}
    assert ABLATION_CELLS["bn_stats"] == {**off, "method": "bn_mix"}
    assert ABLATION_CELLS["simclr_dl"] == {**off, "method": "simclr_pretrain"}


BENIGN = {  # 13 keys x 2 corners = 8192 > MAX_CORNERS: the pairwise + coupled-group fallback
    "contrastive.tau": {"loguniform": [0.05, 0.5]}, "consistency.eps": {"uniform": [0.0, 0.1]},
    "optim.lr": {"loguniform": [0.0001, 0.01]}, "optim.weight_decay": {"uniform": [0.0, 0.001]},
    "contrastive.hard_ratio": {"uniform": [0.5, 2.0]}, "contrastive.aux_sigma": {"uniform": [0.01, 0.1]},
    "pseudo.threshold": {"uniform": [0.7, 0.95]}, "train.w_cl": {"uniform": [0.5, 1.0]},
    "train.w_cr": {"uniform": [0.5, 1.0]}, "consistency.ema_decay": {"uniform": [0.9, 0.999]},
    "optim.plateau_factor": {"uniform": [0.1, 0.5]}, "train.plateau_delta": {"uniform": [0.0, 0.01]},
    "data.difficulty": {"uniform": [0.5, 1.5]},
}


def test_many_keys_fall_back_to_pairs_and_coupled_groups(tmp_path: Path):
    assert len(load_space(write(tmp_path, smoke(search=BENIGN))).search) == 13
    overlap = {**BENIGN, "contrastive.alpha_min": {"uniform": [0.0, 0.3]},
               "contrastive.alpha_max": {"uniform": [0.2, 0.5]}}
    with pytest.raises(SpaceError, match="search.contrastive.alpha_max: sampled values can break"):
        load_space(write(tmp_path, smoke(search=overlap)))
    fractions = {**BENIGN, "data.val_fraction": {"uniform": [0.1, 0.5]}, "data.test_fraction": {"uniform": [0.1, 0.6]}}
    with pytest.raises(SpaceError, match=r"search\.data\.(val|test)_fraction: .*val_fraction \+ data\.test_fraction"):
        load_space(write(tmp_path, smoke(search=fractions)))


def test_loading_never_touches_the_dataset_files(tmp_path: Path):
    body = yaml.safe_load(next(p for p in SPACES if p.stem == "monuseg").read_text())
    body["config"]["data"]["root"] = str(tmp_path / "not-there")
    space = load_space(write(tmp_path, body))
    assert space.base_config().data.root.endswith("not-there")


# -- the runs' selection (train.select_metric): what tune and ablate pass into the base config ------


def test_trials_keep_their_weights_by_the_space_metric(tmp_path: Path):
    space = load_space(write(tmp_path, smoke(metric="val_iou_mean")))
    assert space.base_config().train.selection() == ("val_dice_mean", "max")  # the space alone: the config's
    assert space.select(space.base_config()).train.selection() == ("val_iou_mean", "max")  # what tune / ablate run
    by_class = load_space(write(tmp_path, smoke(metric="val_dice/blob", mode="min")))
    assert by_class.select(by_class.base_config()).train.selection() == ("val_dice/blob", "min")
    loss = load_space(write(tmp_path, smoke(metric="val_loss")))
    assert loss.select(loss.base_config()).train.selection() == ("val_loss", "min")
    # a training metric picks no weights: the config's own selection stays
    train_metric = load_space(write(tmp_path, smoke(metric="loss_cl")))
    assert train_metric.select(train_metric.base_config()).train.selection() == ("val_dice_mean", "max")


def test_select_flags_override_the_space_and_any_fixed_config(tmp_path: Path):
    space = load_space(write(tmp_path, smoke(metric="val_iou_mean")))
    assert space.select(space.base_config(), "val_loss").train.selection() == ("val_loss", "min")  # auto
    assert space.select(space.base_config(), None, "min").train.selection() == ("val_iou_mean", "min")
    assert space.select(space.base_config(), "val_dice/dot", "max").train.selection() == ("val_dice/dot", "max")
    # ablate's --config (or a tuned best config) selects as the space does, unless the flags say otherwise
    fixed = dataclasses.replace(space.base_config(), train=dataclasses.replace(
        space.base_config().train, select_metric="val_loss", select_mode="min"))
    assert space.select(fixed).train.selection() == ("val_iou_mean", "max")
    with pytest.raises(ConfigError, match=r"^--select-metric: 'val_dice/liver' is not a validation record key; "
                                          r"allowed: val_loss, .*val_dice/blob.*val_iou/dot$"):
        space.select(space.base_config(), "val_dice/liver")


def test_select_metric_class_is_checked_against_the_card(tmp_path: Path):
    with pytest.raises(SpaceError, match=r"config: train.select_metric: 'val_dice/liver' is not a validation record key"):
        load_space(write(tmp_path, smoke(config={"train": {"select_metric": "val_dice/liver"}})))


@pytest.mark.parametrize("cli", ["tune", "ablate"])
def test_bad_select_metric_is_one_line_before_ray(cli: str, tmp_path: Path, capsys):
    import importlib
    main = importlib.import_module(f"cssl_ray.{cli}").main
    space = write(tmp_path, smoke())
    assert main(["--space", str(space), "--storage-path", str(tmp_path / "s"), "--select-metric", "val_dice/liver",
                 "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--select-metric: 'val_dice/liver' is not a validation record key" in err
    assert not (tmp_path / "s").exists()
