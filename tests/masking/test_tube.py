import math

import pytest
import torch

from medssl.masking import TubeMasking


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75, 0.9])
@pytest.mark.parametrize("grid, time_axis", [((6, 6, 5), -1), ((4, 3, 2, 5), -1), ((5, 4, 4), 0), ((4, 5, 3), 1)])
def test_tubes_share_one_spatial_mask(mask_checks, grid, time_axis, ratio):
    check_mask_output, _ = mask_checks
    masking = TubeMasking(ratio, time_axis=time_axis)
    frames = grid[time_axis]
    keep = int(math.prod(grid) // frames * (1 - ratio)) * frames
    assert masking.num_keep(grid) == keep
    out = masking(3, grid)
    check_mask_output(out, 3, grid, keep)
    mask = out.mask.view(3, *grid).movedim(1 + time_axis % len(grid), -1)
    assert torch.equal(mask, mask[..., :1].expand_as(mask))


def test_seeding(mask_checks):
    _, check_seeding = mask_checks
    check_seeding(TubeMasking(0.75), (6, 6, 4))


def test_spatial_masks_are_uniform():
    mask = TubeMasking(0.5)(4000, (2, 2, 3), generator=torch.Generator().manual_seed(0)).mask
    assert torch.allclose(mask.float().mean(dim=0), torch.full((12,), 0.5), atol=0.04)


def test_rejects_grids_without_space_or_time():
    with pytest.raises(ValueError, match=r"time_axis -1 .* got grid \(8,\)"):
        TubeMasking(0.5)(1, (8,))
    with pytest.raises(ValueError, match=r"time_axis 3 .* got grid \(4, 4, 2\)"):
        TubeMasking(0.5, time_axis=3).num_keep((4, 4, 2))
