"""Round pieces: index batches, BatchNorm statistics during L_tot, patches from pseudo-labels."""
from __future__ import annotations

import dataclasses

import torch

from cssl_ray.config import from_dict
from cssl_ray.data.batches import index_batches
from cssl_ray.data.synthetic import make_synthetic
from cssl_ray.method.consistency import Teacher
from cssl_ray.method.streams import RandomStreams
from cssl_ray.models import create_model
from cssl_ray.run.labelling import round_patches
from cssl_ray.run.loop import cssl_epoch, frozen_norm_statistics
from cssl_ray.run.plan import epoch_plan, pooled_steps


def small_cfg(**train):
    return from_dict({
        "data": {"image_size": [32, 32]},
        "model": {"base_channels": 4, "depth": 2, "embed_dim": 8, "proj_hidden": 8},
        "patches": {"size": 16, "min_pixels": 10, "per_image": 6, "batch_size": 4},
        "consistency": {"batch_size": 2},
        "pseudo": {"threshold": 0.3},
        "train": {"steps_per_round": 2, **train},
    })


def test_index_batches_one_pass_and_fixed_steps():
    g = torch.Generator().manual_seed(0)
    batches = list(index_batches(10, 4, generator=g))
    assert [len(b) for b in batches] == [4, 4, 4]  # padded by redrawing: full batches only
    assert set(torch.cat(batches[:2]).tolist()) | set(batches[2].tolist()) == set(range(10))
    assert len(list(index_batches(3, 8, steps=5, generator=g))) == 5
    assert all(len(b) == 3 for b in index_batches(3, 8, steps=5, generator=g))
    assert list(index_batches(0, 4)) == []


def test_cssl_epoch_with_ltot_bn_frozen_leaves_batchnorm_running_statistics_alone():
    cfg = small_cfg()
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, ltot_bn="frozen"))
    torch.manual_seed(0)
    model = create_model(cfg.model, 1, cfg.data.num_classes)
    images, masks = make_synthetic(6, (32, 32), 4, seed=0)
    patches, classes, _ = round_patches(model, cfg, images[:2], masks[:2], images[2:],
                                        generator=torch.Generator().manual_seed(0))
    assert patches.shape[0] > 0
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    params_before = [p.detach().clone() for p in model.parameters()]
    streams = RandomStreams(0)
    plan = epoch_plan(4, cfg, streams)
    stats = cssl_epoch(model, Teacher(model), torch.optim.Adam(model.parameters(), 1e-3),
                       pooled_steps(plan, images[2:], patches, classes), len(plan), cfg, lambda_=0.5, streams=streams)
    assert stats["steps"] == 2
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # statistics untouched
    assert any(not torch.equal(a, p) for a, p in zip(params_before, model.parameters()))  # weights learned
    momenta = [m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(m == 0.1 for m in momenta)  # restored


def test_frozen_norm_statistics_restores_on_error():
    bn = torch.nn.BatchNorm1d(3)
    try:
        with frozen_norm_statistics(bn):
            assert bn.momentum == 0.0
            raise RuntimeError
    except RuntimeError:
        pass
    assert bn.momentum == 0.1


def test_round_patches_use_ground_truth_for_labelled_and_pseudo_labels_for_the_rest():
    cfg = small_cfg()
    model = create_model(cfg.model, 1, cfg.data.num_classes)
    images, masks = make_synthetic(4, (32, 32), 4, seed=1)
    # no unlabelled images: every patch must come from ground truth, class pixels >= min_pixels
    patches, classes, stats = round_patches(model, cfg, images, masks, images[:0],
                                            generator=torch.Generator().manual_seed(0))
    assert "pseudo_coverage" not in stats and stats["patches"] == patches.shape[0] > 0
    assert set(classes.tolist()) <= {1, 2, 3}
    # with unlabelled images, coverage and (diagnostic) accuracy against hidden masks are reported
    _, _, stats = round_patches(model, cfg, images[:2], masks[:2], images[2:],
                                generator=torch.Generator().manual_seed(0), hidden_masks=masks[2:])
    assert 0.0 <= stats["pseudo_coverage"] <= 1.0 and 0.0 <= stats["pseudo_accuracy"] <= 1.0
