"""The per-rank step stream (``pipeline.RankSteps``) and the weight store, against the in-process
method code (``plan.local_steps``, ``predict_pseudo_labels``).

One Ray instance for the module. A labeller labels a step's images in one forward pass, and the
references do too (the same images, the same batch): oneDNN convolutions differ in the last bit
between batch shapes, which could flip a pixel whose confidence sits exactly at the threshold;
with equal shapes and one thread both sides are bitwise equal, so the comparisons below are exact.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import ray
import torch
from conftest_ray import local_ray

from cssl_ray.config import ConfigError, from_dict
from cssl_ray.data.bundle import DataSource
from cssl_ray.data.splits import Split
from cssl_ray.data.synthetic import class_names, make_synthetic
from cssl_ray.distributed.stream import (
    COUNT_COLUMNS,
    LabellerPool,
    RankSteps,
    StreamResources,
    labeller_slot,
    pseudo_stats,
)
from cssl_ray.distributed.weights import WeightsClient, get_or_create_weight_store, publish_weights
from cssl_ray.method.pseudo_labels import class_coverage, predict_pseudo_labels
from cssl_ray.method.streams import RandomStreams
from cssl_ray.models import create_model
from cssl_ray.run.plan import StepData, epoch_plan, image_patches, local_steps

pytestmark = [
    pytest.mark.slow,
    # Ray 2.60's own DataContext warns about its deprecated fields on first use; not ours to fix.
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context"),
]

CFG = from_dict({
    "data": {"image_size": [32, 32]},
    "model": {"base_channels": 4, "depth": 2, "embed_dim": 16, "proj_hidden": 16},
    "patches": {"size": 16, "min_pixels": 10, "per_image": 6, "batch_size": 24},
    "consistency": {"batch_size": 3},
    "train": {"seed": 7},
})
RES = StreamResources(labellers=2)
IMAGES, MASKS = make_synthetic(10, (32, 32), seed=3)
L_IDX, U_IDX = [0, 1], list(range(2, 10))  # D_L, D_U (image indices)
# What the step tasks read D_U from: the synthetic images above, generated again by index in the task
SOURCE = DataSource(dataclasses.replace(CFG.data, seed=3), None, Split(L_IDX, U_IDX, [], []),
                    class_names(CFG.data.num_classes))
CLASSES = list(range(1, CFG.data.num_classes))


@pytest.fixture(scope="module")
def ray_session():
    with local_ray(num_cpus=4):
        yield


@torch.no_grad()
def _banded_model(seed: int) -> torch.nn.Module:
    """A tiny model with confident, spatially varied pseudo-labels: its classifier splits the first
    principal component of the decoder features into 4 bands (a random init predicts one class
    everywhere, and nothing passes the 0.9 threshold)."""
    torch.manual_seed(seed)
    model = create_model(CFG.model, CFG.data.in_channels, CFG.data.num_classes).eval()
    feats = []
    hook = model.classifier.register_forward_hook(lambda m, inp, out: feats.append(inp[0]))
    model(IMAGES)
    hook.remove()
    f = feats[0].permute(0, 2, 3, 1).reshape(-1, feats[0].shape[1])  # (N H W, F)
    u = torch.linalg.svd(f - f.mean(0), full_matrices=False).Vh[0]  # first principal direction
    s = f @ u
    a, b = u / s.std(), 1.2 - s.mean() / s.std()  # s' = a.f + b: standardised, shifted
    centres = 0.8 * torch.arange(4.0)  # class c wins where s' is nearest centre c; gain 30 -> confident
    model.classifier.weight.copy_(30 * centres[:, None, None, None] * a[None, :, None, None])
    model.classifier.bias.copy_(30 * (centres * b - centres**2 / 2))
    return model


def _pseudo(model: torch.nn.Module, plan: list[torch.Tensor], with_argmax: bool = False):
    """In-process reference pseudo-labels of D_U (U, H, W), one forward per step like the labellers."""
    pseudo = torch.zeros(len(U_IDX), 32, 32, dtype=torch.int64)
    argmax = torch.zeros_like(pseudo)
    for idx in plan:
        pseudo[idx], argmax[idx] = predict_pseudo_labels(model, IMAGES[U_IDX][idx], CFG.pseudo.threshold,
                                                         with_argmax=True)
    return (pseudo, argmax) if with_argmax else pseudo


@pytest.fixture(scope="module")
def rounds(ray_session):
    """One LabellerPool, two rounds: publish v1 and stream round 1's steps, publish v2 (different
    weights) and stream round 2's; the pool's actors serve both."""
    models = {1: _banded_model(1), 2: _banded_model(3)}
    store = get_or_create_weight_store("test_pipeline_weights")
    plan = epoch_plan(len(U_IDX), CFG, RandomStreams(0))
    steps, counts, loaded = {}, {}, {}
    with LabellerPool(CFG, "test_pipeline_weights", RES) as pool:
        for version, model in models.items():
            publish_weights(store, model, version)
            stream = RankSteps(CFG, version, plan, rank=0, world=1, source=SOURCE,
                               labelled_images=IMAGES[L_IDX], labelled_masks=MASKS[L_IDX], actors=pool.actors,
                               resources=RES)
            steps[version], counts[version] = list(stream), stream.counts
            assert stream.first_wait_s > 0 and stream.wait_s >= stream.first_wait_s
            loaded[version] = ray.get([a.loaded_version.remote() for a in pool.actors])
        with pytest.raises(RuntimeError, match="labelled with weights version 2"):  # a stale store: refused
            list(RankSteps(CFG, 3, plan[:1], rank=0, world=1, source=SOURCE, labelled_images=IMAGES[L_IDX],
                           labelled_masks=MASKS[L_IDX], actors=pool.actors, resources=RES))
    return {"models": models, "plan": plan, "steps": steps, "counts": counts, "loaded": loaded}


def test_weight_store_versions_and_client_cache(ray_session):
    store = get_or_create_weight_store("test_store")
    assert ray.get(store.version.remote()) == -1
    client, model = WeightsClient("test_store"), _banded_model(1)
    with pytest.raises(RuntimeError, match="no weights yet"):
        client.latest(model)
    source = _banded_model(3)
    publish_weights(store, source, 5)
    assert client.latest(model) == 5
    assert ray.get(get_or_create_weight_store("test_store").version.remote()) == 5  # got, not created again
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))
    with pytest.raises(ValueError, match="older"):
        publish_weights(store, source, 4)  # versions only go up
    with pytest.raises(RuntimeError, match="older than the required 6"):
        client.latest(model, min_version=6)
    model.classifier.bias.data.add_(1.0)  # an unchanged version is not reloaded
    assert client.latest(model) == 5 and not torch.equal(model.classifier.bias, source.classifier.bias)
    version, state = ray.get(store.get.remote())
    assert version == 5 and torch.equal(state["classifier.bias"], source.classifier.bias)
    # a worker restarted from an older checkpoint republishes from there: a new generation, so the
    # client reloads even a version number it already holds
    older, again = _banded_model(2), _banded_model(4)
    assert publish_weights(store, older, 3, restart=True) == 3
    assert client.latest(model) == 3 and torch.equal(model.classifier.bias, older.classifier.bias)
    publish_weights(store, again, 5)
    assert client.latest(model) == 5 and torch.equal(model.classifier.bias, again.classifier.bias)
    assert not torch.equal(again.classifier.bias, source.classifier.bias)  # not the first attempt's version 5
    with pytest.raises(RuntimeError, match="no weight store named"):
        WeightsClient("no_such_store").store_version()


@pytest.mark.parametrize("version", [1, 2])
def test_streamed_steps_equal_the_in_process_steps(rounds, version):
    """Step by step, in order: the step's images, and a pool of their pseudo-label patches (labelled
    with this round's weights) plus its D_L slice's ground-truth patches, as --local builds them."""
    plan, got = rounds["plan"], rounds["steps"][version]
    assert [len(p) for p in plan] == [3, 3, 2] and all(isinstance(s, StepData) for s in got)
    want = list(local_steps(CFG, version, plan, IMAGES[U_IDX], _pseudo(rounds["models"][version], plan),
                            IMAGES[L_IDX], MASKS[L_IDX]))
    assert len(got) == len(want) == 3
    for g, w in zip(got, want):
        assert torch.equal(g.unlabelled, w.unlabelled)
        assert torch.equal(g.classes, w.classes) and torch.equal(g.patches, w.patches)
        assert g.patches.shape[0] > 0 and len(set(g.classes.tolist())) >= 2


def test_patches_come_from_the_latest_weights(rounds):
    one, two = rounds["steps"][1], rounds["steps"][2]
    assert any(not torch.equal(a.patches, b.patches) for a, b in zip(one, two))
    assert rounds["loaded"] == {1: [1] * RES.labellers, 2: [2] * RES.labellers}  # the same actors, reloaded


def test_labelled_patches_use_ground_truth(rounds):
    """The pool's D_L part: the slice's ground-truth patches, not pseudo-labels of those images."""
    model = rounds["models"][2]
    for k, step in enumerate(rounds["steps"][2]):
        l_idx = torch.tensor([k % len(L_IDX)])  # 2 labelled images over 3 steps: one a step, cycling
        truth, truth_c = image_patches(CFG, IMAGES[L_IDX][l_idx], MASKS[L_IDX][l_idx], l_idx, 2, labelled=True)
        pseudo = predict_pseudo_labels(model, IMAGES[L_IDX][l_idx], CFG.pseudo.threshold)
        guessed, _ = image_patches(CFG, IMAGES[L_IDX][l_idx], pseudo, l_idx, 2, labelled=True)
        n = truth.shape[0]
        assert n > 0 and torch.equal(step.patches[:n], truth) and torch.equal(step.classes[:n], truth_c)
        assert guessed.shape != truth.shape or not torch.equal(guessed, truth)


def test_every_patch_holds_min_pixels_of_its_class():
    labels = MASKS[:4]
    _, _, windows = seeded_patches_of(labels)
    s = CFG.patches.size
    for c, src, top, left in zip(*(t.tolist() for t in (windows.classes, windows.sources, windows.top, windows.left))):
        window = labels[src, top:top + s, left:left + s]
        assert int((window == c).sum()) >= CFG.patches.min_pixels


def seeded_patches_of(labels: torch.Tensor):
    from cssl_ray.method.patches import seeded_patches

    pt = CFG.patches
    return seeded_patches(IMAGES[:labels.shape[0]], labels, list(range(labels.shape[0])), size=pt.size,
                          min_pixels=pt.min_pixels, per_image=pt.per_image,
                          classes=CLASSES, seed=CFG.train.seed, round_=1, labelled=True)


def test_steps_count_pseudo_label_pixels(rounds):
    """The steps' summed counts against predict_pseudo_labels (exact): --local's statistics."""
    ignore = CFG.pseudo.ignore_index
    truth = MASKS[U_IDX]
    for version in (1, 2):
        counts = rounds["counts"][version]
        pseudo, argmax = _pseudo(rounds["models"][version], rounds["plan"], with_argmax=True)
        covered = pseudo != ignore
        assert counts["pseudo_pixels"] == pseudo.numel()  # every D_U image, once
        assert counts["pseudo_covered"] == int(covered.sum())
        assert counts["pseudo_correct"] == int(((pseudo == truth) & covered).sum())
        want_cov = covered.sum().item() / pseudo.numel()
        want_acc = ((pseudo == truth) & covered).sum().item() / max(covered.sum().item(), 1)
        assert pseudo_stats(counts, with_accuracy=True) == {"pseudo_coverage": want_cov, "pseudo_accuracy": want_acc}
        assert 0.0 < want_cov < 1.0
        want = class_coverage(pseudo, argmax, CFG.data.num_classes)
        got = [k / p if p else float("nan") for p, k in zip(counts["class_predicted"], counts["class_confident"])]
        assert np.allclose(got, want, equal_nan=True)


def test_pseudo_stats_degenerate_cases():
    zero = dict.fromkeys(COUNT_COLUMNS, 0)
    assert pseudo_stats(zero, with_accuracy=True) == {"pseudo_coverage": 0.0, "pseudo_accuracy": 0.0}
    counts = {"pseudo_pixels": 8, "pseudo_covered": 2, "pseudo_correct": 1}
    assert pseudo_stats(counts, with_accuracy=False) == {"pseudo_coverage": 0.25}


def test_labeller_slot_is_stable_and_spreads_consecutive_batches():
    starts = list(range(0, 64, 8))  # first indices of batches of 8: all even, so index % 2 would use one actor
    slots = [labeller_slot(i, 2) for i in starts]
    assert slots == [labeller_slot(i, 2) for i in starts] and set(slots) == {0, 1}
    assert all(0 <= labeller_slot(i, 3) < 3 for i in range(-5, 50))


def test_placement_strategy_is_checked_before_ray_starts(tmp_path, capsys):
    from cssl_ray.distributed.ray_train import run_ray
    from cssl_ray.experiments.train import build_config, main

    cfg = build_config(None, [f"train.out_dir={tmp_path}"], smoke=True)
    with pytest.raises(ConfigError, match="--placement-strategy: 'spread' is not a placement strategy; allowed: "
                                          "PACK, SPREAD, STRICT_PACK, STRICT_SPREAD"):
        run_ray(cfg, placement_strategy="spread")
    assert main(["--smoke", "--placement-strategy", "NODE", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--placement-strategy: 'NODE'" in err[0]


