from __future__ import annotations

import torch

from cssl_ray.data.augment import flip_rotate


def test_image_and_mask_get_the_same_transform():
    # the mask is a function of the image: any paired transform keeps the relation exact
    torch.manual_seed(0)
    x = torch.randn(16, 2, 8, 8)
    y = (x[:, 0] > 0).long()
    ax, ay = flip_rotate(x, y, torch.Generator().manual_seed(3))
    assert torch.equal((ax[:, 0] > 0).long(), ay)
    assert not torch.equal(ax, x)  # something moved
    # non-square: only shape-preserving transforms
    x = torch.randn(8, 1, 4, 6)
    y = (x[:, 0] > 0).long()
    ax, ay = flip_rotate(x, y, torch.Generator().manual_seed(0))
    assert ax.shape == x.shape and torch.equal((ax[:, 0] > 0).long(), ay)


def test_all_eight_symmetries_occur():
    x = torch.arange(16.0).reshape(1, 1, 4, 4).repeat(200, 1, 1, 1)
    ax, _ = flip_rotate(x, x[:, 0].long(), torch.Generator().manual_seed(0))
    assert len({tuple(a.flatten().tolist()) for a in ax}) == 8
