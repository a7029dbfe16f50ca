"""The paper's figures as run artifacts: PNGs without pyplot state, snapshots, the trainer hooks."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from cssl_ray.evaluation import figures
from cssl_ray.evaluation.figures import (
    IGNORE,
    plot_embeddings,
    plot_omega,
    plot_pseudo_refinement,
    project_2d,
    pseudo_snapshot,
    write_run_figures,
)
from cssl_ray.experiments.train import build_config
from cssl_ray.method.pseudo_labels import predict_pseudo_labels
from cssl_ray.models import create_model
from cssl_ray.run import checkpoint as ckpt
from cssl_ray.run.local import run_local
from cssl_ray.run.schedule import RunState

PNG = b"\x89PNG\r\n\x1a\n"
NAMES = ["background", "blob", "band", "dot"]


def smoke(tmp_path, *overrides: str):
    return build_config(None, [f"train.out_dir={tmp_path}", "train.progress=false", *overrides], smoke=True)


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG and len(data) > 100


def figure_files(out_dir):
    d = out_dir / "figures"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def test_plots_write_pngs_and_leave_pyplot_alone(tmp_path):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 1, 16, 16, generator=g)
    masks = torch.randint(0, 4, (2, 16, 16), generator=g)
    snaps = [(r, np.where(np.random.default_rng(r).random((2, 16, 16)) < 0.3, IGNORE,
                          np.random.default_rng(r).integers(0, 4, (2, 16, 16))).astype(np.uint8)) for r in range(1, 4)]
    history = [{"stage": "supervised", "round": 0}] + [
        {"stage": "round", "round": r, "omega": 0.1 * r, "lambda": 0.5 + 0.05 * r} for r in range(1, 4)]
    z = torch.nn.functional.normalize(torch.randn(30, 8, generator=g), dim=1)
    classes = torch.arange(30) % 3 + 1
    paths = [
        plot_pseudo_refinement(images, masks, snaps, NAMES, tmp_path / "a" / "refine.png"),
        plot_pseudo_refinement(torch.rand(1, 3, 16, 16), None, [(1, snaps[0][1][:1])], NAMES,
                               tmp_path / "refine_rgb_no_gt.png"),
        plot_omega(history, tmp_path / "omega.png"),
        plot_embeddings(z, classes, NAMES, tmp_path / "emb.png", title_extra="silhouette = 0.1"),
        plot_embeddings(z, torch.ones(30, dtype=torch.int64), ["background", "nucleus"], tmp_path / "emb1.png",
                        method="tsne"),
    ]
    for p in paths:
        assert_png(p)
    assert plt.get_fignums() == before


def test_plots_reject_missing_or_mismatched_data(tmp_path):
    with pytest.raises(ValueError, match="no snapshots"):
        plot_pseudo_refinement(torch.rand(2, 1, 8, 8), None, [], NAMES, tmp_path / "x.png")
    with pytest.raises(ValueError, match="snapshot"):
        plot_pseudo_refinement(torch.rand(2, 1, 8, 8), None, [(1, np.zeros((1, 8, 8), np.uint8))], NAMES,
                               tmp_path / "x.png")
    with pytest.raises(ValueError, match="no round records"):
        plot_omega([{"stage": "round", "round": 1}], tmp_path / "x.png")  # supervised arm: no omega


def test_rounds_shown_are_evenly_spaced_with_first_and_last():
    assert figures._evenly_spaced(4, 6) == [0, 1, 2, 3]
    assert figures._evenly_spaced(20, 6) == [0, 4, 8, 11, 15, 19]
    assert figures._evenly_spaced(7, 6)[0] == 0 and figures._evenly_spaced(7, 6)[-1] == 6


def test_pca_equals_sklearn():
    from sklearn.decomposition import PCA

    x = np.random.default_rng(0).normal(size=(40, 6))
    xy, used = project_2d(x, "pca")
    assert used == "pca"
    np.testing.assert_allclose(xy, PCA(2).fit_transform(x), atol=1e-10)
    assert project_2d(x[:1], "pca")[0].shape == (1, 2)  # degenerate: one point
    assert project_2d(x[:3], "tsne")[1] == "pca"  # too few points for t-SNE


@pytest.mark.parametrize("ignore_index", [255, -1])
def test_pseudo_snapshot_equals_predict_pseudo_labels(ignore_index):
    cfg = build_config(None, [f"pseudo.ignore_index={ignore_index}"], smoke=True)
    torch.manual_seed(0)
    model = create_model(cfg.model, cfg.data.in_channels, cfg.data.num_classes)
    images = torch.rand(3, 1, 32, 32)
    with torch.no_grad():  # the median confidence: half the pixels pass, half are ignored
        threshold = float(torch.softmax(model.eval()(images), 1).amax(1).median())
    cfg.pseudo.threshold = threshold
    model.train()
    rng = torch.get_rng_state()
    snap = pseudo_snapshot(model, images, cfg)
    assert torch.equal(torch.get_rng_state(), rng) and model.training  # no draws, mode restored
    oracle = predict_pseudo_labels(model, images, threshold, ignore_index, batch_size=cfg.consistency.batch_size)
    oracle[oracle == ignore_index] = IGNORE
    assert snap.dtype == np.uint8 and snap.shape == (3, 32, 32)
    np.testing.assert_array_equal(snap, oracle.numpy())
    assert (snap == IGNORE).any() and (snap != IGNORE).any()  # both kinds of pixel were exercised


def test_smoke_run_writes_figures_and_checkpoints_carry_snapshots(tmp_path):
    run_local(smoke(tmp_path))
    assert figure_files(tmp_path) == sorted(figures.FILES)
    for name in figures.FILES:
        assert_png(tmp_path / "figures" / name)
    saved = ckpt.load(ckpt.round_path(tmp_path, 2))
    assert [r for r, _ in saved["snapshots"]] == [1, 2]
    assert all(a.dtype == torch.uint8 and a.shape == (2, 32, 32) for _, a in saved["snapshots"])
    weights_only = torch.load(ckpt.round_path(tmp_path, 2), weights_only=True)  # still loadable safely
    assert len(weights_only["snapshots"]) == 2


def test_figures_off_writes_none_and_takes_no_snapshot(tmp_path):
    run_local(smoke(tmp_path, "train.figures=false"))
    assert figure_files(tmp_path) == []
    assert ckpt.load(ckpt.round_path(tmp_path, 2))["snapshots"] == []


def test_supervised_arm_skips_the_figures_without_data(tmp_path):
    run_local(smoke(tmp_path, "train.use_cl=false", "train.use_cr=false"))
    assert figure_files(tmp_path) == ["embeddings.png"]  # no pseudo-labels, no omega


def test_resume_keeps_snapshots(tmp_path):
    straight = ckpt.load(ckpt.round_path(run_local(smoke(tmp_path / "a")).out_dir, 2))["snapshots"]
    run_local(smoke(tmp_path / "b", "train.max_rounds=1"))
    run_local(smoke(tmp_path / "b"), resume=True)
    resumed = ckpt.load(ckpt.round_path(tmp_path / "b", 2))["snapshots"]
    assert [r for r, _ in resumed] == [1, 2]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(straight, resumed))
    assert_png(tmp_path / "b" / "figures" / "pseudo_refinement.png")


def test_old_checkpoints_without_snapshots_load(tmp_path):
    cfg = smoke(tmp_path)
    state = RunState(cfg, torch.device("cpu"))
    old = state.state_dict()
    del old["snapshots"]
    state.snapshots = [(1, np.zeros((2, 32, 32), np.uint8))]
    state.load_state_dict(old)
    assert state.snapshots == []


def test_a_failing_figure_is_one_warning_not_a_failed_run(tmp_path, monkeypatch, caplog):
    cfg = smoke(tmp_path)
    from cssl_ray.data.bundle import load_bundle

    bundle = load_bundle(cfg.data)
    state = RunState(cfg, torch.device("cpu"))
    state.round = 1
    state.take_snapshot(cfg, bundle.unlabelled_images)
    state.history = [{"stage": "round", "round": 1, "omega": 0.2, "lambda": 0.5}]

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(figures, "plot_omega", boom)
    with caplog.at_level(logging.WARNING, logger="cssl_ray.evaluation.figures"):
        written = write_run_figures(state, cfg, bundle, tmp_path)
    assert [p.name for p in written] == ["pseudo_refinement.png", "embeddings.png"]
    assert len(caplog.records) == 1 and "omega.png" in caplog.records[0].getMessage()
    assert "\n" not in caplog.records[0].getMessage()
