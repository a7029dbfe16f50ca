"""The Ray Data patch stream and the weight store, against the in-process method code.

One Ray instance for the module. The labellers run one image per forward pass (labeller_batch=1)
and the references do too: oneDNN convolutions differ in the last bit between batch sizes, which
could flip a pixel whose confidence sits exactly at the threshold; with equal shapes and one
thread both sides are bitwise equal, so every comparison below is exact.

The streams label on a ``LabellerPool`` (long-lived actors, as ``ray_train`` runs them); one pass
of the per-execution form (a Ray Data actor pool) must give the same rows. The last tests run one
1-worker ``run_ray`` on this Ray instance: the pseudo-label statistics its round records carry,
each progress line printed once, and the placement-strategy check.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
import ray
import torch

from conftest_ray import local_ray
from cssl_ray.config import ConfigError, from_dict
from cssl_ray.data.synthetic import make_synthetic
from cssl_ray.models import create_model
from cssl_ray.patches import sample_patches
from cssl_ray.pipeline import (CLASS_COUNT_COLUMNS, COUNT_COLUMNS, STATS_CLASS, LabellerPool, StreamResources,
                               build_patch_stream, image_rows, labeller_slot, patch_seed, pseudo_label_stage, pseudo_stats,
                               split_stats_rows)
from cssl_ray.pseudo_labels import class_coverage, predict_pseudo_labels
from cssl_ray.weights import WeightsClient, get_or_create_weight_store, publish_weights

pytestmark = [
    pytest.mark.slow,
    # Ray 2.60's own DataContext warns about its deprecated fields on first use; not ours to fix.
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context"),
]

CFG = from_dict({
    "data": {"image_size": [32, 32]},
    "model": {"base_channels": 4, "depth": 2, "embed_dim": 16, "proj_hidden": 16},
    "patches": {"size": 16, "min_pixels": 10, "per_image": 6, "batch_size": 24},
    "train": {"seed": 7},
})
RES = StreamResources(labellers=2, labeller_batch=1, sampler_batch=3)
IMAGES, MASKS = make_synthetic(10, (32, 32), seed=3)
L_IDX, U_IDX = [0, 1], list(range(2, 10))  # D_L, D_U (image indices)
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


def _pseudo(model: torch.nn.Module, idx: list[int]) -> torch.Tensor:
    """In-process reference pseudo-labels, one image per forward like the labellers."""
    return torch.cat([predict_pseudo_labels(model, IMAGES[i:i + 1], CFG.pseudo.threshold) for i in idx])


def _reference(labels: torch.Tensor, idx: list[int], labelled: bool, round_: int) -> dict:
    """sample_patches in-process, per image with the stream's seed: {index: sorted patch keys}."""
    out = {}
    for k, i in enumerate(idx):
        gen = torch.Generator().manual_seed(patch_seed(CFG.train.seed, round_, labelled, i))
        pt = CFG.patches
        patches, classes, _ = sample_patches(IMAGES[i:i + 1], labels[k:k + 1], pt.size, pt.min_pixels,
                                             per_class=pt.windows_per_class(CFG.data.num_classes), mask=pt.mask, classes=CLASSES,
                                             ignore_index=CFG.pseudo.ignore_index, generator=gen)
        key = sorted((int(c), p.numpy().tobytes()) for p, c in zip(patches, classes))
        if key:  # an image without a valid window has no rows in the stream
            out[i] = key
    return out


def _patch_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if int(r["patch_class"]) != STATS_CLASS]


def _stats_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if int(r["patch_class"]) == STATS_CLASS]


def _by_image(rows: list[dict], labelled: bool) -> dict:
    out = defaultdict(list)
    for r in _patch_rows(rows):
        if bool(r["labelled"]) == labelled:
            out[int(r["index"])].append((int(r["patch_class"]), np.asarray(r["patch"], np.float32).tobytes()))
    return {i: sorted(v) for i, v in out.items()}


@pytest.fixture(scope="module")
def rounds(ray_session):
    """One Dataset on one LabellerPool iterated twice: after publishing v1, then v2 (different
    weights); at v2 also the pool's pseudo-label stage alone and the per-execution stream."""
    models = {1: _banded_model(1), 2: _banded_model(3)}
    store = get_or_create_weight_store("test_pipeline_weights")
    unlabelled = image_rows(IMAGES[U_IDX], indices=U_IDX, hidden=MASKS[U_IDX])
    labelled = image_rows(IMAGES[L_IDX], MASKS[L_IDX], indices=L_IDX)
    with LabellerPool(CFG, "test_pipeline_weights", RES) as pool:
        ds = build_patch_stream(CFG, unlabelled, labelled, store_name="test_pipeline_weights", resources=RES,
                                labellers=pool)
        rows, loaded = {}, {}
        for version, model in models.items():
            publish_weights(store, model, version)
            rows[version] = ds.take_all()  # the same Dataset object re-executes with the new weights
            loaded[version] = ray.get([a.loaded_version.remote() for a in pool.actors])  # the same actors
        pseudo_rows = pseudo_label_stage(CFG, unlabelled, "test_pipeline_weights", RES, labellers=pool).take_all()
    per_execution = build_patch_stream(CFG, unlabelled, labelled, store_name="test_pipeline_weights",
                                       resources=RES).take_all()
    return models, rows, pseudo_rows, {"loaded": loaded, "per_execution": per_execution}


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
    with pytest.raises(RuntimeError, match="no weight store named"):
        WeightsClient("no_such_store").store_version()


def test_patches_come_from_the_latest_weights(rounds):
    models, rows, pseudo_rows, _ = rounds
    for version in (1, 2):
        assert rows[version], "the stream is empty"
        assert {int(r["weights_version"]) for r in rows[version]} == {version}
    assert _by_image(rows[1], False) != _by_image(rows[2], False)
    # The pseudo-labels equal those of the v2 model computed here.
    assert {int(r["weights_version"]) for r in pseudo_rows} == {2}
    got = {int(r["index"]): torch.from_numpy(np.asarray(r["pseudo"]).astype(np.int64)) for r in pseudo_rows}
    assert sorted(got) == U_IDX
    want = _pseudo(models[2], U_IDX)
    assert torch.equal(torch.stack([got[i] for i in U_IDX]), want)
    assert not torch.equal(want, _pseudo(models[1], U_IDX))


@pytest.mark.parametrize("version", [1, 2])
def test_stream_equals_in_process_sampling(rounds, version):
    models, rows, _, _ = rounds
    unlabelled = _reference(_pseudo(models[version], U_IDX), U_IDX, False, version)
    labelled = _reference(MASKS[L_IDX], L_IDX, True, version)
    assert unlabelled and labelled
    assert _by_image(rows[version], False) == unlabelled
    assert _by_image(rows[version], True) == labelled


def test_every_patch_holds_min_pixels_of_its_class(rounds):
    models, rows, _, _ = rounds
    labels = dict(zip(U_IDX, _pseudo(models[2], U_IDX))) | dict(zip(L_IDX, MASKS[L_IDX]))
    s, classes_seen = CFG.patches.size, set()
    for r in _patch_rows(rows[2]):
        c, top, left = int(r["patch_class"]), int(r["top"]), int(r["left"])
        window = labels[int(r["index"])][top:top + s, left:left + s]
        assert int((window == c).sum()) >= CFG.patches.min_pixels
        patch = torch.from_numpy(np.array(r["patch"]))  # (C, s, s); others_all: only class c survives
        assert torch.equal(patch, IMAGES[int(r["index"])][:, top:top + s, left:left + s] * (window == c))
        classes_seen.add(c)
    assert len(classes_seen) >= 2


def test_labelled_rows_use_ground_truth(rounds):
    models, rows, _, _ = rounds
    for version in (1, 2):
        from_truth = _reference(MASKS[L_IDX], L_IDX, True, version)
        from_pseudo = _reference(_pseudo(models[version], L_IDX), L_IDX, True, version)
        assert _by_image(rows[version], True) == from_truth != from_pseudo


def test_labellers_persist_and_both_forms_agree(rounds):
    models, rows, _, extra = rounds
    # The pool's actors served both executions: each holds the version of the latest one.
    assert extra["loaded"] == {1: [1] * RES.labellers, 2: [2] * RES.labellers}
    # A Ray Data actor pool per execution gives the same rows (the fallback for one-shot streams).
    key = lambda r: (int(r["index"]), bool(r["labelled"]), int(r["patch_class"]), int(r["top"]), int(r["left"]),
                     int(r["weights_version"]), *(int(r[k]) for k in COUNT_COLUMNS))  # noqa: E731
    assert sorted(map(key, extra["per_execution"])) == sorted(map(key, rows[2]))


def test_stats_rows_count_pseudo_label_pixels(rounds):
    """One stats row per D_U image and version; its counts against predict_pseudo_labels (exact)."""
    models, rows, pseudo_rows, _ = rounds
    ignore = CFG.pseudo.ignore_index
    for version in (1, 2):
        stats = {int(r["index"]): r for r in _stats_rows(rows[version])}
        assert sorted(stats) == U_IDX and len(_stats_rows(rows[version])) == len(U_IDX)
        pseudo = _pseudo(models[version], U_IDX)  # (U, H, W)
        truth = MASKS[U_IDX]
        for k, i in enumerate(U_IDX):
            r = stats[i]
            assert not bool(r["labelled"]) and int(r["weights_version"]) == version
            assert int(r["pseudo_pixels"]) == 32 * 32
            assert int(r["pseudo_covered"]) == int((pseudo[k] != ignore).sum())
            assert int(r["pseudo_correct"]) == int(((pseudo[k] != ignore) & (pseudo[k] == truth[k])).sum())
        for r in _patch_rows(rows[version]):
            assert all(int(r[c]) == 0 for c in COUNT_COLUMNS)  # counted once per image, on its stats row
        # Summed as a rank does: --local's statistics of the same pseudo-labels.
        cols = {k: np.array([r[k] for r in rows[version]]) for k in ("patch_class", *COUNT_COLUMNS)}
        kept, counts = split_stats_rows(cols)
        assert (kept["patch_class"] >= 0).all() and len(kept["patch_class"]) == len(_patch_rows(rows[version]))
        covered = pseudo != ignore
        want_cov = covered.sum().item() / pseudo.numel()
        want_acc = ((pseudo == truth) & covered).sum().item() / max(covered.sum().item(), 1)
        assert pseudo_stats(counts, with_accuracy=True) == {"pseudo_coverage": want_cov, "pseudo_accuracy": want_acc}
        assert 0.0 < want_cov < 1.0
        # per class: the stats rows' vectors summed give --local's class_coverage of the same model
        cols = {k: np.array([r[k] for r in rows[version]]) for k in ("patch_class", *CLASS_COUNT_COLUMNS)}
        _, counts = split_stats_rows(cols)
        pairs = [predict_pseudo_labels(models[version], IMAGES[i:i + 1], CFG.pseudo.threshold, with_argmax=True)
                 for i in U_IDX]  # one image per forward, like the labellers
        pseudo_u, argmax_u = torch.cat([a for a, _ in pairs]), torch.cat([b for _, b in pairs])
        want = class_coverage(pseudo_u, argmax_u, CFG.data.num_classes)
        got = [k / p if p else float("nan") for p, k in zip(counts["class_predicted"], counts["class_confident"])]
        assert np.allclose(got, want, equal_nan=True)
        for r in _patch_rows(rows[version]):
            assert all(not np.asarray(r[c]).any() for c in CLASS_COUNT_COLUMNS)
    assert "hidden_mask" not in pseudo_rows[0]  # used for the counts, not shipped further


def test_pseudo_stats_degenerate_cases():
    zero = dict.fromkeys(COUNT_COLUMNS, 0)
    assert pseudo_stats(zero, with_accuracy=True) == {"pseudo_coverage": 0.0, "pseudo_accuracy": 0.0}
    counts = {"pseudo_pixels": 8, "pseudo_covered": 2, "pseudo_correct": 1}
    assert pseudo_stats(counts, with_accuracy=False) == {"pseudo_coverage": 0.25}
    kept, counts = split_stats_rows({"patch_class": np.array([1, STATS_CLASS, 2])})  # no count columns
    assert counts == zero and kept["patch_class"].tolist() == [1, 2]


def test_labeller_slot_is_stable_and_spreads_consecutive_batches():
    starts = list(range(0, 64, 8))  # first indices of batches of 8: all even, so index % 2 would use one actor
    slots = [labeller_slot(i, 2) for i in starts]
    assert slots == [labeller_slot(i, 2) for i in starts] and set(slots) == {0, 1}
    assert all(0 <= labeller_slot(i, 3) < 3 for i in range(-5, 50))


def test_placement_strategy_is_checked_before_ray_starts(tmp_path, capsys):
    from cssl_ray.ray_train import run_ray
    from cssl_ray.train import build_config, main

    cfg = build_config(None, [f"train.out_dir={tmp_path}"], smoke=True)
    with pytest.raises(ConfigError, match="--placement-strategy: 'spread' is not a placement strategy; allowed: "
                                          "PACK, SPREAD, STRICT_PACK, STRICT_SPREAD"):
        run_ray(cfg, placement_strategy="spread")
    assert main(["--smoke", "--placement-strategy", "NODE", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--placement-strategy: 'NODE'" in err[0]
