"""World-size invariance: one step on 2 gloo ranks, each holding half of a global batch, equals the
step one process takes on the whole batch (L_sup, L_CL with hard and auxiliary negatives, L_CR and
the parameter update), and the pass over D_U is split so that every image is used once."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gloo_ranks import group_norm, on_ranks

from cssl_ray.config import from_dict
from cssl_ray.distributed.collectives import DDPCollectives
from cssl_ray.method.collectives import Collectives, positions_of_rank, rank_share
from cssl_ray.method.consistency import Teacher
from cssl_ray.method.contrastive import AuxiliaryGaussian
from cssl_ray.method.objective import StepInputs, Terms, cssl_objective
from cssl_ray.method.streams import RandomStreams
from cssl_ray.models import create_model
from cssl_ray.run.loop import supervised_epoch
from cssl_ray.run.plan import l_tot_steps, pass_shares

WORLD = 2


def _cfg():
    return from_dict({
        "data": {"image_size": [32, 32], "num_classes": 2},
        "model": {"base_channels": 4, "depth": 2, "embed_dim": 8, "proj_hidden": 8},
        "patches": {"size": 16, "batch_size": 8},
        "consistency": {"batch_size": 4},
        "pseudo": {"threshold": 0.3},
        "contrastive": {"aux_samples": 6},
    })


def _global_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    masks = torch.randint(0, 2, (4, 32, 32), generator=g)
    masks[0, :4] = 255  # some ignored pixels, unevenly over the ranks' shares
    return {"images": torch.randn(4, 1, 32, 32, generator=g), "masks": masks,
            "patches": torch.randn(8, 1, 16, 16, generator=g), "classes": torch.tensor([1, 0, 1, 1, 0, 1, 0, 1]),
            "unlabelled": torch.randn(4, 1, 32, 32, generator=g)}


def _step(rank: int, world: int, col: Collectives, ddp: bool = False) -> dict:
    """One supervised step and one L_tot step of this rank's share ([rank::world]) of the global batch
    (``ddp``: the gradients synced by ``DDPCollectives``, train.grad_sync ddp)."""
    cfg = _cfg()
    torch.manual_seed(0)
    model = group_norm(create_model(cfg.model, 1, 2))
    if ddp:
        col = DDPCollectives(torch.device("cpu"), model)
    teacher = Teacher(model)
    with torch.no_grad():  # a teacher that differs from the student, so L_CR is not trivially small
        for p in teacher.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    # a rank's share; one process: the gathered order (rank 0's rows, then rank 1's), which alpha's pairs follow
    b = {k: v[rank::world] if world > 1 else torch.cat([v[r::WORLD] for r in range(WORLD)])
         for k, v in _global_batch().items()}
    res: dict = {}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    res.update(supervised_epoch(model, opt, b["images"], b["masks"], batch_size=rank_share(4, rank, world), steps=1,
                                augment=False, collectives=col))
    res["without_grad"] = [i for i, p in enumerate(model.parameters()) if p.grad is None]  # the projection head
    streams = RandomStreams(0, rank)
    aux = AuxiliaryGaussian(cfg.model.embed_dim, seed=0)
    inputs = StepInputs(b["patches"], b["classes"], b["unlabelled"])
    out = col.step(model, lambda m: cssl_objective(m, teacher, inputs, Terms.of(cfg), lambda_=0.0, streams=streams,
                                                   aux=aux, collectives=col))
    opt.zero_grad()
    out["loss"].backward()
    col.average_gradients(model)
    opt.step()
    res.update(col.mean_floats({k: float(out[k].detach()) for k in ("loss_cl", "loss_cr")}))
    res["anchors"] = int(out["anchors"])
    for through_step in (False, True):  # a step calling the model directly (the baselines' path), then one through step
        opt.zero_grad()
        logits = col.step(model, lambda m: m(b["images"])) if through_step else model(b["images"])
        col.global_mean(F.cross_entropy(logits, b["masks"], ignore_index=255, reduction="sum"),
                        (b["masks"] != 255).sum()).backward()
        col.average_gradients(model)
        opt.step()
    res["params"] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return res


def _step_ddp(rank: int, world: int, col: Collectives) -> dict:
    return _step(rank, world, col, ddp=True)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return on_ranks(_step, WORLD, tmp_path_factory.mktemp("gloo"))


def test_ddp_steps_equal_the_explicit_sync(two_ranks, tmp_path):
    """train.grad_sync ddp: the same two steps with DDP's bucketed all-reduce during the backward end
    where the explicit all-reduce after it ends, with the same parameters left without a gradient."""
    ddp = on_ranks(_step_ddp, WORLD, tmp_path)
    for rank in range(WORLD):
        assert ddp[rank]["without_grad"] == two_ranks[rank]["without_grad"] and ddp[rank]["without_grad"]
        for k in ("loss_sup", "loss_cl", "loss_cr"):
            assert ddp[rank][k] == pytest.approx(two_ranks[rank][k], abs=1e-6), k
        torch.testing.assert_close(ddp[rank]["params"], two_ranks[rank]["params"], atol=1e-6, rtol=0)
    assert torch.equal(ddp[0]["params"], ddp[1]["params"])


def test_one_step_on_two_ranks_equals_one_process(two_ranks):
    torch.set_num_threads(1)
    one = _step(0, 1, Collectives())
    for rank in range(WORLD):
        got = two_ranks[rank]
        assert got["anchors"] == one["anchors"] == 8  # L_CL saw the whole global batch on every rank
        for k in ("loss_sup", "loss_cl", "loss_cr"):
            assert got[k] == pytest.approx(one[k], abs=1e-5), k
        assert one["loss_cr"] > 0 and one["loss_cl"] > 0
        torch.testing.assert_close(got["params"], one["params"], atol=1e-5, rtol=0)
    assert torch.equal(two_ranks[0]["params"], two_ranks[1]["params"])


def test_rank_shares_deal_positions_round_robin():
    for total in range(0, 12):
        for world in (1, 2, 3, 5):
            shares = [rank_share(total, r, world) for r in range(world)]
            assert sum(shares) == total and max(shares) - min(shares) <= 1
            for a in range(total):
                naive = [sum(1 for p in range(a, total) if p % world == r) for r in range(world)]
                assert [positions_of_rank(a, total, r, world) for r in range(world)] == naive


@pytest.mark.parametrize("n, batch, world", [(10, 4, 1), (10, 4, 2), (9, 4, 2), (13, 4, 3), (5, 4, 4), (3, 8, 2)])
def test_pass_shares_cover_each_image_once_in_global_batches(n, batch, world):
    cfg = from_dict({"consistency": {"batch_size": batch}})
    steps = l_tot_steps(n, cfg, world)
    parts = [pass_shares(len(range(r, n, world)), n, batch, r, world, torch.Generator().manual_seed(r))
             for r in range(world)]
    assert all(len(p) == steps for p in parts)
    for r, p in enumerate(parts):  # every image of the rank's shard once
        assert sorted(torch.cat(p).tolist()) == list(range(len(range(r, n, world))))
    sizes = [sum(len(p[k]) for p in parts) for k in range(steps)]  # the global batch of each step
    assert sum(sizes) == n
    assert all(s == batch for s in sizes[:-1]) and all(s >= world for s in sizes)  # every rank has one
    assert all(len(p[k]) >= 1 for p in parts for k in range(steps))
    if world == 1:
        assert sizes == [len(c) for c in torch.arange(n).split(batch)]  # one process: the plain split
    with pytest.raises(ValueError, match="global batch"):
        pass_shares(2, 4, 1, 0, 2)  # a global batch smaller than the ranks
