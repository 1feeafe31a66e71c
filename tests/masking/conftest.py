"""Checks every mask generator must pass, shared by the generator tests."""

import math

import pytest
import torch


def check_mask_output(out, batch_size, grid, num_keep):
    """Shapes, exact counts, ``mask`` agreeing with ``ids_keep``, and ``ids_restore`` undoing the shuffle."""
    n = math.prod(grid)
    assert out.ids_keep.shape == (batch_size, num_keep) and out.ids_keep.dtype == torch.long
    assert out.ids_restore.shape == (batch_size, n) and out.ids_restore.dtype == torch.long
    assert out.mask.shape == (batch_size, n) and out.mask.dtype == torch.bool
    assert (out.mask.sum(dim=1) == n - num_keep).all()
    assert not out.mask.gather(1, out.ids_keep).any()
    assert (out.ids_keep.sort(dim=1).values.diff(dim=1) > 0).all()  # no token kept twice
    # MAE's use: encode the visible tokens, append mask tokens, unshuffle with ids_restore.
    tokens = torch.randn(batch_size, n, 3)
    visible = torch.stack([row[ids] for row, ids in zip(tokens, out.ids_keep)])
    mask_tokens = torch.full((batch_size, n - num_keep, 3), -100.0)
    restored = torch.stack([row[ids] for row, ids in zip(torch.cat([visible, mask_tokens], 1), out.ids_restore)])
    expected = torch.where(out.mask[..., None], torch.tensor(-100.0), tokens)
    assert torch.equal(restored, expected)
    assert torch.equal(out.ids_restore.sort(dim=1).values, torch.arange(n).expand(batch_size, n))


def check_seeding(generator_object, grid):
    """One seed gives one mask, another seed another."""
    draw = lambda seed: generator_object(4, grid, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    first, again, other = draw(0), draw(0), draw(1)
    for name in ("ids_keep", "ids_restore", "mask"):
        assert torch.equal(getattr(first, name), getattr(again, name))
    assert not torch.equal(first.mask, other.mask)


@pytest.fixture
def mask_checks():
    return check_mask_output, check_seeding
