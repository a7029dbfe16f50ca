"""TorchCollectives on a real 2-process gloo group (no Ray), against hand-computed values."""
from __future__ import annotations

import pytest
import torch
from gloo_ranks import on_ranks

from cssl_ray.distributed.collectives import TorchCollectives
from cssl_ray.method.collectives import Collectives


def _rank_results(rank: int, world: int, col: TorchCollectives) -> dict:
    res: dict = {}
    res["steps"] = col.agree_steps(3 + rank)  # 3, 4 -> 3
    res["mean"] = col.mean_floats({"b": 2.0 * rank, "a": 1.0})  # keys in any order
    res["sum"] = col.sum_(torch.tensor([rank + 1, 10], dtype=torch.int64)).tolist()
    res["gather"] = col.gather(torch.full((rank + 1, 2), float(rank))).tolist()  # 1 row, then 2 rows
    res["bcast"] = col.broadcast_float(0.5 + rank)
    # Different data on each rank: after averaging, both ranks hold the mean gradient.
    torch.manual_seed(rank)  # different initial weights too: broadcast_state must equalise them
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    col.broadcast_state(model)
    x = torch.arange(12.0).reshape(4, 3) * (rank + 1)
    model(x).pow(2).sum().backward()
    local = [p.grad.clone() for p in model.parameters()]
    col.average_gradients(model)
    res["local_grads"] = [g.tolist() for g in local]
    res["grads"] = [p.grad.tolist() for p in model.parameters()]
    res["params"] = [p.detach().tolist() for p in model.parameters()]
    res["objects"] = col.gather_objects({"rank": rank})
    col.barrier()
    return res


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return on_ranks(_rank_results, 2, tmp_path_factory.mktemp("gloo"))


def test_scalars_and_gathers(results):
    for rank in (0, 1):
        r = results[rank]
        assert r["steps"] == 3
        assert r["mean"] == {"a": 1.0, "b": 1.0}
        assert r["sum"] == [3, 20]
        assert r["gather"] == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
        assert r["bcast"] == 0.5
        assert r["objects"] == [{"rank": 0}, {"rank": 1}]


def test_gradients_are_the_mean_over_ranks(results):
    r0, r1 = results[0], results[1]
    assert r0["params"] == r1["params"]  # broadcast_state: rank 0's weights everywhere
    assert r0["local_grads"] != r1["local_grads"]  # the data differ
    for g0, g1, l0, l1 in zip(r0["grads"], r1["grads"], r0["local_grads"], r1["local_grads"]):
        assert g0 == g1
        assert torch.allclose(torch.tensor(g0), (torch.tensor(l0) + torch.tensor(l1)) / 2)


def test_single_process_is_the_identity():
    col = Collectives()
    t = torch.ones(2)
    assert col.agree_steps(5) == 5 and col.sum_(t) is t and col.gather(t) is t
    assert col.mean_floats({"x": 1.5}) == {"x": 1.5} and col.broadcast_float(2.0) == 2.0
    assert col.gather_objects("a") == ["a"]
